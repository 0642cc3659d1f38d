"""PAFPN: the FPN plus PANet's bottom-up path augmentation (Liu et al., CVPR 2018, §3.1).

On top of the FPN's P_min..P_max (``fpn_tf.models.fpn_backbone``) a second,
bottom-up pathway shortens the path from the fine levels to the coarse ones::

    N_min = P_min
    S_k   = P_k + down_k(N_{k-1})        down_k: 3x3 conv, stride 2, d channels
    N_k   = fuse_k(S_k)                  fuse_k: 3x3 conv, d channels

``neck.pafpn_style`` picks between the two definitions in use (they differ only
here; the weights are the same 2 (max - min) convs):

- ``"paper"`` (default): as above, each conv followed by ReLU (PANet §3.1).
- ``"mmdetection"``: MMDetection's ``PAFPN`` (the implementation whose results are
  quoted, 37.5 box AP for Faster R-CNN R50 1x): no activation, and the stride-2
  conv reads the running sum S_{k-1} instead of N_{k-1}.

The extra levels (P6 by max-pool, or RetinaNet's P6/P7) come after, from N_max
(``add_extra_levels``). Strided convs pad 1 on every side (PyTorch's
``padding=1``), so N_k has P_k's size, ``ceil(H_{k-1} / 2)``.

Shapes: B images, H_k/W_k level k's size, d = ``fpn.num_channels``.
"""

from __future__ import annotations

import keras

from fpn_tf.config import FPNConfig
from fpn_tf.detector_types import PAFPN_STYLES
from fpn_tf.neck_configs import NeckConfig


@keras.saving.register_keras_serializable(package="fpn_tf")
class BottomUpPath(keras.layers.Layer):
    """PANet's augmented bottom-up path over ``{"P<k>": [B, H_k, W_k, d]}`` (module docstring).

    Args:
      num_channels: d.
      min_level, max_level: the P levels it runs over (finest first).
      style: "paper" | "mmdetection".

    ``call(pyramid)`` -> ``{"P<k>": N_k [B, H_k, W_k, d]}`` for min_level..max_level.
    """

    def __init__(
        self, num_channels: int = 256, min_level: int = 2, max_level: int = 5, style="paper", **kwargs
    ):
        super().__init__(**kwargs)
        if style not in PAFPN_STYLES:
            raise ValueError(f"pafpn style must be one of {', '.join(PAFPN_STYLES)}, got {style!r}")
        if not 1 <= min_level < max_level:
            raise ValueError(f"need 1 <= min_level < max_level, got {min_level}, {max_level}")
        self.num_channels, self.min_level, self.max_level = int(num_channels), int(min_level), int(max_level)
        self.style = style
        activation = "relu" if style == "paper" else None
        init = keras.initializers.VarianceScaling(1.0, "fan_in", "uniform")  # as the FPN's convs
        # Plain attributes (down3, fuse3, ...): TF checkpoints do not see layers in lists.
        for k in range(self.min_level + 1, self.max_level + 1):
            setattr(self, f"pad{k}", keras.layers.ZeroPadding2D(1, name=f"pad{k}"))
            setattr(
                self,
                f"down{k}",
                keras.layers.Conv2D(
                    self.num_channels,
                    3,
                    strides=2,
                    activation=activation,
                    kernel_initializer=init,
                    name=f"down{k}",
                ),
            )
            setattr(
                self,
                f"fuse{k}",
                keras.layers.Conv2D(
                    self.num_channels,
                    3,
                    padding="same",
                    activation=activation,
                    kernel_initializer=init,
                    name=f"fuse{k}",
                ),
            )

    def build(self, input_shape):
        shape = (None, None, None, self.num_channels)
        for k in range(self.min_level + 1, self.max_level + 1):
            getattr(self, f"pad{k}").build(shape)
            getattr(self, f"down{k}").build(shape)
            getattr(self, f"fuse{k}").build(shape)
        self.built = True

    def call(self, pyramid: dict) -> dict:
        previous = pyramid[f"P{self.min_level}"]
        outputs = {f"P{self.min_level}": previous}
        for k in range(self.min_level + 1, self.max_level + 1):
            summed = pyramid[f"P{k}"] + getattr(self, f"down{k}")(getattr(self, f"pad{k}")(previous))
            outputs[f"P{k}"] = getattr(self, f"fuse{k}")(summed)
            previous = outputs[f"P{k}"] if self.style == "paper" else summed
        return outputs

    def compute_output_spec(self, pyramid):
        return {f"P{k}": keras.KerasTensor(pyramid[f"P{k}"].shape, dtype=self.compute_dtype)
                for k in range(self.min_level, self.max_level + 1)}  # fmt: skip

    def get_config(self):
        return {
            **super().get_config(),
            "num_channels": self.num_channels,
            "min_level": self.min_level,
            "max_level": self.max_level,
            "style": self.style,
        }


def build_pafpn_neck(features: dict, fpn: FPNConfig, neck: NeckConfig) -> dict:
    """The FPN, PANet's bottom-up path (layer ``"pafpn"``), then the extra levels of ``fpn``."""
    from fpn_tf.models.fpn_backbone import add_extra_levels, fpn_levels

    if fpn.variant != "fpn":
        raise ValueError(
            f"model.neck.type pafpn builds on the full FPN; model.fpn.variant is {fpn.variant!r}"
        )
    pyramid = fpn_levels(features, fpn)
    path = BottomUpPath(fpn.num_channels, fpn.min_level, fpn.max_level, neck.pafpn_style, name="pafpn")
    return add_extra_levels(path(pyramid), features, fpn)
