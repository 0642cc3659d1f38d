"""FPN level assignment of RoIs, paper eq. (1) (Lin et al. 2017, §4.2).

Shapes: B images, N RoIs per image; boxes (y1, x1, y2, x2) input pixels.
"""

from __future__ import annotations

import math

import tensorflow as tf


def assign_levels(
    boxes: tf.Tensor,
    min_level: int = 2,
    max_level: int = 5,
    canonical_size: float = 224.0,
    canonical_level: int = 4,
    eps: float = 1e-6,
) -> tf.Tensor:
    """Pyramid level of each box by eq. (1): ``k = floor(k0 + log2(sqrt(w*h) / 224))``.

    Computed as torchvision's ``LevelMapper``: ``floor(k0 + log2(sqrt(area) / s0) + eps)``
    clamped to ``[min_level, max_level]``; the ``eps`` keeps boxes of exactly
    ``s0 * 2**j`` on level ``k0 + j`` despite rounding. Boxes with zero (or
    negative) area go to ``min_level``.

    Args:
      boxes: float [..., 4], ``(y1, x1, y2, x2)`` in input pixels.
      min_level, max_level: the levels RoIs may be pooled from (P2..P5 in the paper).
      canonical_size: s0, the ImageNet pre-training size (224).
      canonical_level: k0, the level a box of size s0 maps to (4).
      eps: added before the floor (torchvision uses 1e-6).

    Returns:
      int32 [...], the level number k of each box (not an offset from min_level).
    """
    if min_level > max_level:
        raise ValueError(f"min_level ({min_level}) must not exceed max_level ({max_level})")
    if canonical_size <= 0:
        raise ValueError(f"canonical_size must be positive, got {canonical_size}")
    boxes = tf.convert_to_tensor(boxes, tf.float32)
    if boxes.shape.rank is not None and (boxes.shape.rank == 0 or boxes.shape[-1] != 4):
        raise ValueError(f"boxes must have shape [..., 4], got {boxes.shape}")
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    size = tf.sqrt(tf.maximum(area, 0.0))  # 0 -> log2 = -inf -> min_level
    level = tf.floor(canonical_level + tf.math.log(size / canonical_size) / math.log(2.0) + eps)
    level = tf.clip_by_value(level, float(min_level), float(max_level))
    return tf.cast(level, tf.int32)
