"""The "conv5" RoI head of the single-scale C4 Faster R-CNN baseline (FPN Table 3(a)).

He et al.'s ResNet Faster R-CNN, which the FPN paper reproduces as its strongest
baseline (§5.2.1, Table 2(a) / 3(a)): RoIs are pooled 14×14 from C4, the whole
res5 stage (stride 2 on its first block, so 14×14 → 7×7) runs on every RoI as the
head's hidden layers, then a global average pool and sibling class-score and
class-specific box layers. The FPN paper replaces this with the lighter 2-fc head
(``fpn_tf.models.box_heads.FastRCNNHead``, §4.2) because FPN already spends conv5
on the pyramid.

Shapes: B images, N RoIs per image, P pooled side, C channels, K classes
including background.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from fpn_tf.config import BackboneConfig, from_dict, to_dict
from fpn_tf.models.box_heads import class_and_box_output_spec, class_and_box_outputs
from fpn_tf.models.resnet import build_resnet_stage, resnet_output_specs


@keras.saving.register_keras_serializable(package="fpn_tf")
class Conv5Head(keras.layers.Layer):
    """res5 on each RoI, global average pool, class scores and box deltas.

    Args:
      num_classes: classes including background (label 0).
      backbone: the backbone's ``BackboneConfig`` (or its dict): res5 gets the same
        block type, width multiplier, norm and layer names as the backbone would
        (``build_resnet_stage(backbone, 5, in_channels)``).
      in_channels: channels of the pooled features (C4's).

    Call args:
      pooled: [B, N, P, P, in_channels] RoI features (P = 14 in the paper; any P,
        the stride-2 stage gives ceil(P / 2)).

    Returns:
      (class_logits [B, N, K] float32, box_deltas [B, N, K, 4] float32), K =
      num_classes, deltas in (dy, dx, dh, dw) — the same contract as
      ``FastRCNNHead``.
    """

    def __init__(self, num_classes: int, backbone: BackboneConfig | dict, in_channels: int, **kwargs):
        super().__init__(**kwargs)
        if num_classes < 2:
            raise ValueError(f"num_classes counts background and must be >= 2, got {num_classes}")
        if isinstance(backbone, dict):
            backbone = from_dict(BackboneConfig, backbone)
        self.num_classes = int(num_classes)
        self.backbone = backbone
        self.in_channels = int(in_channels)
        self.hidden_dim = resnet_output_specs(backbone)["C5"][0]
        self.res5 = build_resnet_stage(backbone, 5, self.in_channels, stride=2, name="res5")
        self.class_logits = keras.layers.Dense(
            self.num_classes,
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
            name="class_logits",
        )
        self.box_deltas = keras.layers.Dense(
            4 * self.num_classes,
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.001),
            name="box_deltas",
        )

    def build(self, pooled_shape):
        channels = pooled_shape[-1]
        if channels is not None and channels != self.in_channels:
            raise ValueError(f"Conv5Head expects {self.in_channels}-channel RoI features, got {channels}")
        self.class_logits.build((None, self.hidden_dim))
        self.box_deltas.build((None, self.hidden_dim))

    def call(self, pooled, training=None):
        shape = tf.shape(pooled)
        b, n = shape[0], shape[1]
        s1, s2 = pooled.shape[2], pooled.shape[3]
        x = tf.reshape(pooled, [b * n, s1, s2, self.in_channels])
        x = self.res5(x, training=training)
        x = tf.reduce_mean(x, axis=[1, 2])  # global average pool: [B * N, hidden_dim]
        return class_and_box_outputs(self.class_logits, self.box_deltas, x, b, n, self.num_classes)

    def compute_output_spec(self, pooled, training=None):
        return class_and_box_output_spec(pooled, self.num_classes)

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "backbone": to_dict(self.backbone),
            "in_channels": self.in_channels,
        }
