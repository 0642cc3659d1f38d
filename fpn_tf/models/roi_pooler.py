"""RoI pooling from the feature pyramid (FPN §4.2, eq. 1 + RoIAlign).

An RoI of width w and height h (input pixels) is pooled from level
k = ⌊k0 + log2(√(wh)/224)⌋, clamped to the pooler's levels (P2..P5 by default;
``fpn_tf.ops.level_assignment``), with RoIAlign (``fpn_tf.ops.roi_align``).

Shapes: B images, N RoIs per image, P pooled side (7 for boxes, 14 for masks),
C channels, h/w a level's map size. Boxes are (y1, x1, y2, x2) float32 input pixels.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from fpn_tf.ops import roi_align
from fpn_tf.ops.xla import jit_unless_inside_xla


def pooled_levels(levels: list[str], min_level: int, max_level: int) -> list[str]:
    """Levels an RoI head pools from: P-levels within [min, max], or the only level."""
    if len(levels) == 1:
        return list(levels)
    chosen = [lv for lv in levels if min_level <= int(lv[1:]) <= max_level]
    if not chosen:
        raise ValueError(f"no pyramid level among {levels} lies in RoI levels [{min_level}, {max_level}]")
    return chosen


def _pool(features, boxes, levels, output_size, sampling_ratio, aligned, canonical_size, canonical_level):
    """RoIAlign of ``boxes`` [B, N, 4] from ``features`` {level: [B, h, w, C]}: [B, N, P, P, C]."""
    if len(levels) == 1:
        level = levels[0]
        return roi_align.roi_align(
            features[level],
            boxes,
            spatial_scale=1.0 / 2 ** int(level[1:]),
            output_size=output_size,
            sampling_ratio=sampling_ratio,
            aligned=aligned,
        )
    numbers = [int(level[1:]) for level in levels]
    return roi_align.multilevel_roi_align(
        {level: features[level] for level in levels},
        boxes,
        output_size=output_size,
        sampling_ratio=sampling_ratio,
        aligned=aligned,
        min_level=min(numbers),
        max_level=max(numbers),
        canonical_size=canonical_size,
        canonical_level=canonical_level,
    )


# The gathers and bilinear weights of RoIAlign fuse under XLA into one pass over the
# RoIs: 4x faster on CPU than TF's separate gather ops, which is why the pooler
# compiles it even inside a function that is not compiled as a whole (inlined inside
# one that is: a nested compiled call recompiled the training step every step).
_pool_xla = jit_unless_inside_xla(_pool)


@keras.saving.register_keras_serializable(package="fpn_tf")
class RoIPooler(keras.layers.Layer):
    """RoIAlign from the pyramid: multi-level by eq. (1), or from a single map.

    Call args:
      features: {level: [B, h, w, C]}; only levels min_level..max_level are used,
        or the only level when the pyramid has one (single-scale baselines, P2-only).
      boxes: [B, N, 4] input pixels.

    Returns:
      [B, N, P, P, C] pooled features, P = output_size.

    ``jit_compile=True`` (the default) runs the pooling as an XLA-compiled function
    (the same maths; see ``_pool_xla``).
    """

    def __init__(
        self,
        levels: list[str],
        output_size: int = 7,
        sampling_ratio: int = 2,
        aligned: bool = True,
        canonical_size: float = 224.0,
        canonical_level: int = 4,
        jit_compile: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.levels = list(levels)
        self.output_size = int(output_size)
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)
        self.canonical_size = float(canonical_size)
        self.canonical_level = int(canonical_level)
        self.jit_compile = bool(jit_compile)
        if not self.levels:
            raise ValueError("RoIPooler needs at least one feature level")

    def call(self, features, boxes):
        pool = _pool_xla if self.jit_compile else _pool
        return pool(
            {level: features[level] for level in self.levels},
            tf.convert_to_tensor(boxes, tf.float32),
            tuple(self.levels),
            self.output_size,
            self.sampling_ratio,
            self.aligned,
            self.canonical_size,
            self.canonical_level,
        )

    def compute_output_spec(self, features, boxes):
        channels = features[self.levels[0]].shape[-1]
        s = self.output_size
        return keras.KerasTensor(
            tuple(boxes.shape[:2]) + (s, s, channels), dtype=features[self.levels[0]].dtype
        )

    def get_config(self):
        return {
            **super().get_config(),
            "levels": self.levels,
            "output_size": self.output_size,
            "sampling_ratio": self.sampling_ratio,
            "aligned": self.aligned,
            "canonical_size": self.canonical_size,
            "canonical_level": self.canonical_level,
            "jit_compile": self.jit_compile,
        }


def roi_pooler_from_config(
    cfg, levels: list[str], output_size: int, sampling_ratio: int, name: str
) -> RoIPooler:
    """A float32 RoIPooler on ``cfg.roi_head``'s levels and eq. (1) settings (``cfg``: a ModelConfig).

    The box branch (7×7) and Mask R-CNN's mask branch (14×14) differ only in
    ``output_size`` / ``sampling_ratio``.
    """
    r = cfg.roi_head
    return RoIPooler(
        pooled_levels(levels, r.min_level, r.max_level),
        output_size,
        sampling_ratio,
        r.aligned,
        r.canonical_size,
        r.canonical_level,
        dtype="float32",
        autocast=False,
        name=name,
    )
