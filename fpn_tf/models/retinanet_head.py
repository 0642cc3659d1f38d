"""RetinaNet's dense head, shared by every pyramid level (Lin et al. 2017b, §4 "Focal Loss").

Two towers of ``num_convs`` × (3×3 conv + ReLU), optionally with GroupNorm(32)
before each ReLU (torchvision's v2 head), then a 3×3 conv to Kc class logits per
anchor (bias ``-log((1 - π) / π)``, π = 0.01, so every anchor starts as
background with probability 0.99) and a 3×3 conv to 4 box deltas per anchor
(``(dy, dx, dh, dw)``). Conv kernels start N(0, 0.01), biases 0 (the paper's,
torchvision's and Detectron2's init).

Shapes: B images, h/w a level's map size, C channels in (``C_in``), Kc class
channels per anchor (K-1, or K with ``background_channel``), A anchors per location.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from fpn_tf.detector_types import RETINANET_NORMS as NORMS

GROUP_NORM_GROUPS = 32  # torchvision's partial(nn.GroupNorm, 32)


@keras.saving.register_keras_serializable(package="fpn_tf")
class RetinaNetHead(keras.layers.Layer):
    """Class and box towers applied to every pyramid level with the same weights.

    Args:
      num_anchors: A, anchors per location.
      num_class_channels: Kc, sigmoid class channels per anchor.
      conv_channels: channels of the tower convs.
      num_convs: tower depth (4 in the paper).
      norm: "none" or "group_norm".
      prior_probability: π of the class-logit bias init.

    Call args:
      features: {level: [B, h, w, C_in]}.

    Returns:
      {"class_logits": {level: [B, h, w, A * Kc] float32},
       "box_deltas": {level: [B, h, w, A * 4] float32}}; channel ``a * Kc + c`` is
      anchor a's class c (anchors ordered as ``fpn_tf.ops.anchors``).

    Sub-layers are attributes ``class_conv{i}``, ``class_norm{i}``, ``box_conv{i}``,
    ``box_norm{i}``, ``class_logits``, ``box_deltas`` (TF checkpoints do not see
    layers in lists).
    """

    def __init__(
        self,
        num_anchors: int,
        num_class_channels: int,
        conv_channels: int = 256,
        num_convs: int = 4,
        norm: str = "none",
        prior_probability: float = 0.01,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if norm not in NORMS:
            raise ValueError(f"unknown retinanet.norm {norm!r}; valid: {', '.join(NORMS)}")
        if not 0.0 < prior_probability < 1.0:
            raise ValueError(f"retinanet.prior_probability must be in (0, 1), got {prior_probability}")
        if norm == "group_norm" and conv_channels % GROUP_NORM_GROUPS:
            raise ValueError(
                f"retinanet.norm 'group_norm' needs conv_channels divisible by {GROUP_NORM_GROUPS}, "
                f"got {conv_channels}"
            )
        self.num_anchors = int(num_anchors)
        self.num_class_channels = int(num_class_channels)
        self.conv_channels = int(conv_channels)
        self.num_convs = int(num_convs)
        self.norm = norm
        self.prior_probability = float(prior_probability)
        init = keras.initializers.RandomNormal(stddev=0.01)
        use_bias = norm == "none"  # torchvision: Conv2dNormActivation(bias=norm_layer is None)
        for tower in ("class", "box"):
            for i in range(self.num_convs):
                conv = keras.layers.Conv2D(
                    self.conv_channels, 3, padding="same", use_bias=use_bias, kernel_initializer=init,
                    name=f"{tower}_conv{i}",
                )  # fmt: skip
                setattr(self, f"{tower}_conv{i}", conv)
                if norm == "group_norm":
                    gn = keras.layers.GroupNormalization(
                        GROUP_NORM_GROUPS, epsilon=1e-5, name=f"{tower}_norm{i}"
                    )
                    setattr(self, f"{tower}_norm{i}", gn)
        bias = -math.log((1.0 - self.prior_probability) / self.prior_probability)
        self.class_logits = keras.layers.Conv2D(
            self.num_anchors * self.num_class_channels, 3, padding="same", kernel_initializer=init,
            bias_initializer=keras.initializers.Constant(bias), name="class_logits",
        )  # fmt: skip
        self.box_deltas = keras.layers.Conv2D(
            self.num_anchors * 4, 3, padding="same", kernel_initializer=init, name="box_deltas"
        )

    def tower(self, name: str) -> list[tuple[keras.layers.Layer, keras.layers.Layer | None]]:
        """[(conv, norm or None)] of tower ``name`` ("class" or "box"), input side first."""
        return [
            (getattr(self, f"{name}_conv{i}"), getattr(self, f"{name}_norm{i}", None))
            for i in range(self.num_convs)
        ]

    def build(self, features_shape):
        shape = tuple(next(iter(features_shape.values())))
        hidden = shape[:-1] + (self.conv_channels,)
        for name in ("class", "box"):
            for i, (conv, norm) in enumerate(self.tower(name)):
                conv.build(shape if i == 0 else hidden)
                if norm is not None:
                    norm.build(hidden)
        last = hidden if self.num_convs else shape
        self.class_logits.build(last)
        self.box_deltas.build(last)

    def _run_tower(self, name: str, x):
        for conv, norm in self.tower(name):
            x = conv(x)
            if norm is not None:
                x = norm(x)
            x = tf.nn.relu(x)
        return x

    def call(self, features):
        class_logits, box_deltas = {}, {}
        for level, x in features.items():
            class_logits[level] = tf.cast(self.class_logits(self._run_tower("class", x)), tf.float32)
            box_deltas[level] = tf.cast(self.box_deltas(self._run_tower("box", x)), tf.float32)
        return {"class_logits": class_logits, "box_deltas": box_deltas}

    def compute_output_spec(self, features):
        out = {"class_logits": {}, "box_deltas": {}}
        for level, x in features.items():
            spatial = tuple(x.shape[:-1])
            channels = self.num_anchors * self.num_class_channels
            out["class_logits"][level] = keras.KerasTensor(spatial + (channels,), dtype="float32")
            out["box_deltas"][level] = keras.KerasTensor(spatial + (self.num_anchors * 4,), dtype="float32")
        return out

    def get_config(self):
        return {
            **super().get_config(),
            "num_anchors": self.num_anchors,
            "num_class_channels": self.num_class_channels,
            "conv_channels": self.conv_channels,
            "num_convs": self.num_convs,
            "norm": self.norm,
            "prior_probability": self.prior_probability,
        }
