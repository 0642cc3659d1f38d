"""Elementary box geometry: area, clipping, pairwise IoU.

Boxes are ``(y1, x1, y2, x2)`` float32 pixels (see docs/design.md). Width is
``x2 - x1`` and height ``y2 - y1`` (no ``+1``, as torchvision and Detectron2).
Every function broadcasts over leading dimensions and compiles with
``tf.function(jit_compile=True)``.
"""

from __future__ import annotations

import tensorflow as tf


def _check_last_dim(tensor: tf.Tensor, size: int, name: str) -> None:
    last = tensor.shape[-1] if tensor.shape.rank else None
    if tensor.shape.rank == 0 or (last is not None and last != size):
        raise ValueError(f"{name} must have last dimension {size}, got shape {tensor.shape}")


def area(boxes: tf.Tensor) -> tf.Tensor:
    """Area of boxes.

    Args:
      boxes: ``[..., 4]`` float, ``(y1, x1, y2, x2)``.

    Returns:
      ``[...]`` areas, same dtype; negative extents count as 0 (a degenerate or
      zero-padded box has area 0).
    """
    boxes = tf.convert_to_tensor(boxes)
    _check_last_dim(boxes, 4, "boxes")
    y1, x1, y2, x2 = tf.unstack(boxes, num=4, axis=-1)
    return tf.maximum(y2 - y1, 0.0) * tf.maximum(x2 - x1, 0.0)


def clip_boxes(boxes: tf.Tensor, height_width: tf.Tensor) -> tf.Tensor:
    """Clips y to ``[0, height]`` and x to ``[0, width]``.

    Args:
      boxes: ``[..., 4]`` float, ``(y1, x1, y2, x2)``.
      height_width: ``[..., 2]`` ``(height, width)`` broadcastable against the
        boxes' leading dimensions, e.g. ``[B, 1, 2]`` for boxes ``[B, N, 4]``,
        or ``[2]`` for one size for all.

    Returns:
      ``[..., 4]`` clipped boxes, dtype of ``boxes``.
    """
    boxes = tf.convert_to_tensor(boxes)
    _check_last_dim(boxes, 4, "boxes")
    height_width = tf.cast(height_width, boxes.dtype)
    _check_last_dim(height_width, 2, "height_width")
    height = height_width[..., 0:1]
    width = height_width[..., 1:2]
    y1, x1, y2, x2 = tf.split(boxes, 4, axis=-1)
    y1 = tf.minimum(tf.maximum(y1, 0.0), height)
    x1 = tf.minimum(tf.maximum(x1, 0.0), width)
    y2 = tf.minimum(tf.maximum(y2, 0.0), height)
    x2 = tf.minimum(tf.maximum(x2, 0.0), width)
    return tf.concat([y1, x1, y2, x2], axis=-1)


def pairwise_iou(boxes1: tf.Tensor, boxes2: tf.Tensor) -> tf.Tensor:
    """Intersection over union of every pair of boxes.

    Args:
      boxes1: ``[..., N, 4]`` ``(y1, x1, y2, x2)``.
      boxes2: ``[..., M, 4]`` ``(y1, x1, y2, x2)``; leading dimensions
        broadcast against ``boxes1``'s (e.g. ``[N, 4]`` with ``[B, M, 4]``).

    Returns:
      ``[..., N, M]`` float32 IoU in ``[0, 1]``; exactly 0 where either box has
      zero area, so zero-padded GT rows never match anything.
    """
    boxes1 = tf.cast(boxes1, tf.float32)
    boxes2 = tf.cast(boxes2, tf.float32)
    _check_last_dim(boxes1, 4, "boxes1")
    _check_last_dim(boxes2, 4, "boxes2")
    if boxes1.shape.rank is not None and boxes1.shape.rank < 2:
        raise ValueError(f"boxes1 must be [..., N, 4], got shape {boxes1.shape}")
    if boxes2.shape.rank is not None and boxes2.shape.rank < 2:
        raise ValueError(f"boxes2 must be [..., M, 4], got shape {boxes2.shape}")
    area1 = area(boxes1)[..., :, None]  # [..., N, 1]
    area2 = area(boxes2)[..., None, :]  # [..., 1, M]
    a_y1, a_x1, a_y2, a_x2 = tf.unstack(boxes1[..., :, None, :], num=4, axis=-1)
    b_y1, b_x1, b_y2, b_x2 = tf.unstack(boxes2[..., None, :, :], num=4, axis=-1)
    inter_h = tf.maximum(tf.minimum(a_y2, b_y2) - tf.maximum(a_y1, b_y1), 0.0)
    inter_w = tf.maximum(tf.minimum(a_x2, b_x2) - tf.maximum(a_x1, b_x1), 0.0)
    intersection = inter_h * inter_w
    union = area1 + area2 - intersection
    valid = tf.logical_and(area1 > 0.0, area2 > 0.0)
    iou = intersection / tf.where(valid, union, 1.0)
    return tf.where(valid, iou, 0.0)


def to_original_pixels(boxes: tf.Tensor, image_info: tf.Tensor) -> tf.Tensor:
    """Boxes in input pixels -> original-image pixels, clipped to the original size.

    Args:
      boxes: ``[B, N, 4]`` in pixels of the resized network input.
      image_info: ``[B, 6]`` (orig_h, orig_w, valid_h, valid_w, scale_y, scale_x).

    Returns:
      ``[B, N, 4]`` in pixels of the image before resizing.
    """
    scale = tf.concat([image_info[:, 4:6], image_info[:, 4:6]], axis=-1)[:, None, :]
    return clip_boxes(boxes / scale, image_info[:, None, 0:2])
