"""Anchors and test-time detections of a one-stage (dense) detector such as RetinaNet.

Anchors: on each level, ``scales_per_octave`` sizes ``size * 2**(i / n)`` (32, 40.3,
50.8 px on P3 for RetinaNet) × the aspect ratios, so A = 9 per location.

Detections (Lin et al. 2017b, §4 "Inference"; torchvision's
``RetinaNet.postprocess_detections``): on every level, the sigmoid scores of all
(anchor, class) pairs above ``score_threshold``, the best ``topk_candidates`` of
them, their anchors' boxes decoded and clipped to the valid image; then per-class
NMS over all levels together and the best D per image, in original-image pixels.
Shapes stay static: the per-level top-k and the padded NMS have fixed sizes.

Shapes: B images, h/w a level's map size, A anchors per location, Kc class channels
per anchor, D detections per image. Boxes are (y1, x1, y2, x2) float32.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from fpn_tf.config import AnchorConfig, RetinaNetConfig, from_dict
from fpn_tf.models.detection_generator import detection_output_spec, padded_detections
from fpn_tf.ops import anchors as anchor_ops
from fpn_tf.ops import box_coder, box_ops


def dense_anchor_sizes(
    levels: list[str], anchors: AnchorConfig, cfg: RetinaNetConfig
) -> dict[str, tuple[float, ...]]:
    """{level: (size * 2**(i / scales_per_octave) for i)} with one base size per level."""
    if len(levels) != len(anchors.sizes):
        raise ValueError(
            f"anchors.sizes has {len(anchors.sizes)} sizes but the pyramid has {len(levels)} levels "
            f"{levels}: give one base size per level"
        )
    if cfg.scales_per_octave < 1:
        raise ValueError(f"retinanet.scales_per_octave must be >= 1, got {cfg.scales_per_octave}")
    out = {}
    for level, size in zip(levels, anchors.sizes):
        scaled = [float(size) * 2 ** (i / cfg.scales_per_octave) for i in range(cfg.scales_per_octave)]
        out[level] = tuple(float(int(s)) if cfg.truncate_anchor_sizes else s for s in scaled)
    return out


def level_anchors(
    maps: dict, levels: list[str], level_sizes: dict, anchors: AnchorConfig
) -> dict[str, tf.Tensor]:
    """{level: [h·w·A, 4]} input-pixel anchors for maps shaped like ``maps[level]`` [B, h, w, ...]."""
    sizes = {}
    for level in levels:
        static, dynamic = maps[level].shape, tf.shape(maps[level])
        sizes[level] = tuple(static[i] if static[i] is not None else dynamic[i] for i in (1, 2))
    strides = {level: 2 ** int(level[1:]) for level in levels}
    if anchors.strides_from_input_size:
        # torchvision's AnchorGenerator: stride = input size // map size per axis, the
        # input size being the finest map's size times its stride (800 // 7 = 114 on P7).
        h0, w0 = sizes[levels[0]]
        s0 = strides[levels[0]]
        strides = {level: ((h0 * s0) // h, (w0 * s0) // w) for level, (h, w) in sizes.items()}
    return anchor_ops.generate_anchors(
        sizes,
        level_sizes,
        strides,
        aspect_ratios=anchors.aspect_ratios,
        offset=anchors.offset,
        round_base=anchors.round_base,
    )


@keras.saving.register_keras_serializable(package="fpn_tf")
class DenseDetectionGenerator(keras.layers.Layer):
    """Anchors, and detections from per-level class logits and box deltas (no weights).

    Args:
      anchor_config, retinanet_config: dicts of AnchorConfig / RetinaNetConfig.
      levels: the pyramid levels, finest first.

    Call args:
      head_outputs: {"class_logits": {level: [B, h, w, A * Kc]}, "box_deltas":
        {level: [B, h, w, A * 4]}} (``RetinaNetHead``); Kc = K-1, or K with
        ``background_channel`` (channel 0 then is ignored).
      image_info: [B, 6].

    Returns:
      detection_boxes [B, D, 4] in ORIGINAL-image pixels, detection_scores [B, D],
      detection_classes [B, D] int32 labels 1..K-1, num_detections [B] int32;
      padded rows are 0; rows sorted by score.
    """

    def __init__(self, anchor_config: dict, retinanet_config: dict, levels: list[str], **kwargs):
        super().__init__(**kwargs)
        self.anchor_config = dict(anchor_config)
        self.retinanet_config = dict(retinanet_config)
        self.levels = list(levels)
        self._anchors = from_dict(AnchorConfig, self.anchor_config)
        self._cfg = from_dict(RetinaNetConfig, self.retinanet_config)
        self.level_sizes = dense_anchor_sizes(self.levels, self._anchors, self._cfg)
        self.score_threshold = self._cfg.score_threshold
        self.nms_iou = self._cfg.nms_iou
        self.detections_per_image = self._cfg.detections_per_image

    @property
    def num_anchors(self) -> int:
        """A, anchors per location (the same on every level)."""
        return len(self._anchors.aspect_ratios) * self._cfg.scales_per_octave

    def anchors(self, maps: dict) -> dict[str, tf.Tensor]:
        """{level: [h·w·A, 4]} anchors for maps shaped like ``maps`` (e.g. the class logits)."""
        return level_anchors(maps, self.levels, self.level_sizes, self._anchors)

    def _level_candidates(self, logits, deltas, anchors, valid_hw):
        """Top-k (anchor, class) pairs above the threshold of one level: boxes, scores, labels."""
        cfg = self._cfg
        batch = tf.shape(logits)[0]
        channels = logits.shape[-1] // self.num_anchors
        scores = tf.sigmoid(tf.reshape(logits, [batch, -1, channels]))  # [B, hwA, Kc]
        first = 1 if cfg.background_channel else 0
        scores = scores[:, :, first:]
        per_anchor = channels - first
        flat = tf.reshape(scores, [batch, -1])
        flat = tf.where(flat > self.score_threshold, flat, tf.zeros_like(flat))
        n = flat.shape[1] if flat.shape[1] is not None else tf.shape(flat)[1]
        k = min(cfg.topk_candidates, n) if isinstance(n, int) else tf.minimum(cfg.topk_candidates, n)
        top_scores, top_idx = tf.math.top_k(flat, k=k, sorted=True)
        anchor_idx = top_idx // per_anchor
        labels = top_idx % per_anchor + 1
        top_deltas = tf.gather(tf.reshape(deltas, [batch, -1, 4]), anchor_idx, batch_dims=1)
        boxes = box_coder.decode_boxes(top_deltas, tf.gather(anchors, anchor_idx), cfg.box_coder_weights)
        return box_ops.clip_boxes(boxes, valid_hw[:, None, :]), top_scores, labels

    def call(self, head_outputs, image_info, anchors=None):
        if anchors is None:
            anchors = self.anchors(head_outputs["class_logits"])
        found = [
            self._level_candidates(
                head_outputs["class_logits"][level],
                head_outputs["box_deltas"][level],
                anchors[level],
                image_info[:, 2:4],
            )
            for level in self.levels
        ]
        boxes, scores, labels = (tf.concat(parts, axis=1) for parts in zip(*found))
        # Per-class NMS over all levels (torchvision's batched_nms on the concatenation).
        return padded_detections(
            boxes, scores, labels, image_info, self.detections_per_image, self.nms_iou, self.score_threshold
        )

    def compute_output_spec(self, head_outputs, image_info, anchors=None):
        b, d = image_info.shape[0], self.detections_per_image
        return detection_output_spec(b, d)

    def get_config(self):
        return {
            **super().get_config(),
            "anchor_config": self.anchor_config,
            # the inference settings as they are now (a caller may have changed them)
            "retinanet_config": {
                **self.retinanet_config,
                "score_threshold": float(self.score_threshold),
                "nms_iou": float(self.nms_iou),
                "detections_per_image": int(self.detections_per_image),
            },
            "levels": self.levels,
        }
