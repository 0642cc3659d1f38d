"""Pixel normalisation inside the model, so exported graphs take raw RGB pixels."""

from __future__ import annotations

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="fpn_tf")
class PixelNormalization(keras.layers.Layer):
    """(x - mean) / std, then zeroes the padded area outside each image's valid size.

    Zeroing after normalisation makes the padding exactly 0 inside the network,
    as torchvision's GeneralizedRCNNTransform does (it normalises, then pads).

    Call args:
      images: [B, H, W, 3] float32 RGB in [0, 255], valid image at the top-left.
      image_info: [B, 6] float32 (orig_h, orig_w, valid_h, valid_w, scale_y, scale_x).

    Returns:
      [B, H, W, 3] normalised images in the layer's compute dtype.
    """

    def __init__(self, mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375), **kwargs):
        super().__init__(**kwargs)
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"pixel mean/std need 3 values (RGB), got {mean} / {std}")
        if min(std) <= 0:
            raise ValueError(f"pixel std must be positive, got {std}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def call(self, images, image_info):
        images = tf.cast(images, tf.float32)
        x = (images - tf.constant(self.mean)) / tf.constant(self.std)
        shape = tf.shape(images)
        valid_h = tf.cast(image_info[:, 2], tf.int32)
        valid_w = tf.cast(image_info[:, 3], tf.int32)
        rows = tf.range(shape[1])[None, :] < valid_h[:, None]  # [B, H]
        cols = tf.range(shape[2])[None, :] < valid_w[:, None]  # [B, W]
        mask = tf.logical_and(rows[:, :, None], cols[:, None, :])
        x = x * tf.cast(mask, tf.float32)[..., None]
        return tf.cast(x, self.compute_dtype)

    def compute_output_spec(self, images, image_info):
        return keras.KerasTensor(images.shape, dtype=self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "mean": list(self.mean), "std": list(self.std)}
