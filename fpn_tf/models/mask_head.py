"""The Mask R-CNN mask head (He et al. 2017, with the FPN; torchvision / Detectron2 layout).

    pooled [B, N, P, P, C] (P = 14, RoIAlign on P2..P5 by eq. 1)
      -> 4 x (3x3 conv, 256, ReLU) -> 2x2 stride-2 transposed conv + ReLU
      -> 1x1 conv, one channel per class -> logits [B, N, M, M, K] (M = 2P = 28)

``MaskHead`` is that stack; ``ClassMasks`` takes each detection's class channel
and applies the sigmoid (inference); ``ToInputPixels`` maps detection boxes
from original-image pixels back to the network input, where the mask RoIs are
pooled (the inverse of ``fpn_tf.ops.box_ops.to_original_pixels``; the box
branch clips to the valid input, so the round trip is exact up to float
rounding).

Shapes: B images, N RoIs per image, D detections per image, P pooled side,
C channels, M mask side, K classes including background (label 0).
"""

from __future__ import annotations

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="fpn_tf")
class MaskHead(keras.layers.Layer):
    """Mask logits of pooled RoIs: ``num_convs`` 3x3 convs, a 2x upsampling, a 1x1 classifier.

    Call args:
      pooled: [B, N, P, P, C] RoI features (14x14 in Mask R-CNN).

    Returns:
      float32 [B, N, 2P, 2P, K] per-class mask logits.

    Layers are named as torchvision's ``mask_head.mask_fcn{i}`` /
    ``mask_predictor.conv5_mask`` / ``mask_predictor.mask_fcn_logits``. Init as
    torchvision / Detectron2: He-normal (fan_out, ReLU gain) convs with zero bias;
    the classifier N(0, 0.001) (Detectron2; torchvision uses He-normal there too).
    """

    def __init__(self, num_classes: int, num_convs: int = 4, conv_channels: int = 256, **kwargs):
        super().__init__(**kwargs)
        if num_classes < 2:
            raise ValueError(f"num_classes counts background and must be >= 2, got {num_classes}")
        self.num_classes = int(num_classes)
        self.num_convs = int(num_convs)
        self.conv_channels = int(conv_channels)
        msra = keras.initializers.VarianceScaling(2.0, "fan_out", "untruncated_normal")
        # Plain attributes mask_fcn1..: TF checkpoints do not see layers in Keras-tracked lists.
        for i in range(1, self.num_convs + 1):
            conv = keras.layers.Conv2D(
                self.conv_channels, 3, padding="same", activation="relu", kernel_initializer=msra,
                name=f"mask_fcn{i}",
            )  # fmt: skip
            setattr(self, f"mask_fcn{i}", conv)
        self.conv5_mask = keras.layers.Conv2DTranspose(
            self.conv_channels, 2, strides=2, activation="relu", kernel_initializer=msra, name="conv5_mask"
        )
        self.mask_fcn_logits = keras.layers.Conv2D(
            self.num_classes,
            1,
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.001),
            name="mask_fcn_logits",
        )

    @property
    def convs(self) -> list[keras.layers.Conv2D]:
        """The 3x3 convs, mask_fcn1 first (a view of the mask_fcn{i} attributes)."""
        return [getattr(self, f"mask_fcn{i}") for i in range(1, self.num_convs + 1)]

    def build(self, pooled_shape):
        p, c = pooled_shape[2], pooled_shape[4]
        shape = (None, p, p, c)
        for conv in self.convs:
            conv.build(shape)
            shape = (None, p, p, self.conv_channels)
        self.conv5_mask.build(shape)
        self.mask_fcn_logits.build((None, 2 * p if p else None, 2 * p if p else None, self.conv_channels))

    def call(self, pooled):
        shape = tf.shape(pooled)
        b, n = shape[0], shape[1]
        p, c = pooled.shape[2], pooled.shape[4]
        x = tf.reshape(pooled, [b * n, p, p, c])
        for conv in self.convs:
            x = conv(x)
        x = self.mask_fcn_logits(self.conv5_mask(x))
        return tf.reshape(tf.cast(x, tf.float32), [b, n, 2 * p, 2 * p, self.num_classes])

    def compute_output_spec(self, pooled):
        b, n, p = pooled.shape[0], pooled.shape[1], pooled.shape[2]
        side = 2 * p if p is not None else None
        return keras.KerasTensor((b, n, side, side, self.num_classes), dtype="float32")

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "num_convs": self.num_convs,
            "conv_channels": self.conv_channels,
        }


@keras.saving.register_keras_serializable(package="fpn_tf")
class ClassMasks(keras.layers.Layer):
    """Each detection's own-class mask probabilities (inference).

    Call args:
      mask_logits: [B, D, M, M, K]; classes: int32 [B, D] labels 1..K-1 (0 = padding).

    Returns:
      float32 [B, D, M, M] sigmoid probabilities in the detection box's frame;
      padding rows (class 0) are 0.
    """

    def call(self, mask_logits, classes):
        classes = tf.cast(classes, tf.int32)
        picked = tf.gather(tf.transpose(mask_logits, [0, 1, 4, 2, 3]), classes, batch_dims=2)
        valid = tf.cast(classes > 0, tf.float32)[:, :, None, None]
        return tf.sigmoid(picked) * valid

    def compute_output_spec(self, mask_logits, classes):
        return keras.KerasTensor(tuple(mask_logits.shape[:4]), dtype="float32")


@keras.saving.register_keras_serializable(package="fpn_tf")
class ToInputPixels(keras.layers.Layer):
    """Boxes [B, N, 4] in original-image pixels -> network-input pixels (× scale from image_info)."""

    def call(self, boxes, image_info):
        scale = tf.concat([image_info[:, 4:6], image_info[:, 4:6]], axis=-1)[:, None, :]
        return boxes * scale

    def compute_output_spec(self, boxes, image_info):
        return keras.KerasTensor(boxes.shape, dtype="float32")
