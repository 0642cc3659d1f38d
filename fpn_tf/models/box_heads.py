"""Box heads on pooled RoIs: the paper's 2-fc head (FPN §4.2).

The conv5 head of the C4 baseline (Table 3a) is ``fpn_tf.models.conv5_head``; both
end in ``class_and_box_outputs`` (sibling class-score and class-specific box layers).

Shapes: B images, N RoIs per image, P pooled side, C channels, E features per RoI,
K classes including background (label 0). Box deltas are (dy, dx, dh, dw).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from fpn_tf.config import ModelConfig


def build_box_head(cfg: ModelConfig, in_channels: int) -> keras.layers.Layer:
    """The RoI head of ``cfg.roi_head.head``: "2fc" (FPN §4.2) or "conv5" (res5, Table 3(a))."""
    from fpn_tf.models.conv5_head import Conv5Head  # conv5_head imports this module

    r = cfg.roi_head
    if r.head == "conv5":
        return Conv5Head(cfg.num_classes, cfg.backbone, in_channels, name="box_head")
    return FastRCNNHead(cfg.num_classes, r.fc_dim, r.num_fc, name="box_head")


def class_and_box_outputs(class_layer, box_layer, features, batch, num_rois, num_classes):
    """Sibling class-score and class-specific box layers on per-RoI features.

    Args:
      features: [B * N, E] RoI features.

    Returns:
      (class_logits [batch, num_rois, K] float32, box_deltas [batch, num_rois, K, 4] float32).
    """
    logits = tf.cast(class_layer(features), tf.float32)
    deltas = tf.cast(box_layer(features), tf.float32)
    return (
        tf.reshape(logits, [batch, num_rois, num_classes]),
        tf.reshape(deltas, [batch, num_rois, num_classes, 4]),
    )


def class_and_box_output_spec(pooled, num_classes):
    """KerasTensor specs of ``class_and_box_outputs`` for pooled RoIs [B, N, ...]."""
    b, n = pooled.shape[:2]
    return (
        keras.KerasTensor((b, n, num_classes), dtype="float32"),
        keras.KerasTensor((b, n, num_classes, 4), dtype="float32"),
    )


@keras.saving.register_keras_serializable(package="fpn_tf")
class FastRCNNHead(keras.layers.Layer):
    """Two fc layers + ReLU, then class scores and class-specific box deltas (§4.2).

    Call args:
      pooled: [B, N, P, P, C] RoI features.

    Returns:
      (class_logits [B, N, K] float32, box_deltas [B, N, K, 4] float32), K =
      num_classes including background (label 0), deltas in (dy, dx, dh, dw).
    """

    def __init__(self, num_classes: int, fc_dim: int = 1024, num_fc: int = 2, **kwargs):
        super().__init__(**kwargs)
        if num_classes < 2:
            raise ValueError(f"num_classes counts background and must be >= 2, got {num_classes}")
        self.num_classes = int(num_classes)
        self.fc_dim = int(fc_dim)
        self.num_fc = int(num_fc)
        fc_init = keras.initializers.VarianceScaling(1.0, "fan_in", "uniform")  # Detectron2's c2_xavier_fill
        # Plain attributes fc6, fc7, ...: TF checkpoints do not see layers in Keras-tracked lists.
        for i in range(self.num_fc):
            layer = keras.layers.Dense(
                self.fc_dim, activation="relu", kernel_initializer=fc_init, name=f"fc{i + 6}"
            )
            setattr(self, f"fc{i + 6}", layer)
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

    @property
    def fcs(self) -> list[keras.layers.Dense]:
        """The hidden fc layers, fc6 first (a view of the fc{k} attributes)."""
        return [getattr(self, f"fc{i + 6}") for i in range(self.num_fc)]

    def build(self, pooled_shape):
        p, _, c = pooled_shape[2:]
        dim = p * p * c
        for fc in self.fcs:
            fc.build((None, dim))
            dim = self.fc_dim
        self.class_logits.build((None, dim))
        self.box_deltas.build((None, dim))

    def call(self, pooled):
        shape = tf.shape(pooled)
        b, n = shape[0], shape[1]
        s1, s2, c = pooled.shape[2], pooled.shape[3], pooled.shape[4]
        x = tf.reshape(pooled, [b * n, s1 * s2 * c])
        for fc in self.fcs:
            x = fc(x)
        return class_and_box_outputs(self.class_logits, self.box_deltas, x, b, n, self.num_classes)

    def compute_output_spec(self, pooled):
        return class_and_box_output_spec(pooled, self.num_classes)

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "fc_dim": self.fc_dim,
            "num_fc": self.num_fc,
        }
