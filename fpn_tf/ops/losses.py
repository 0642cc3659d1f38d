"""Box regression losses shared by the RPN and the Fast R-CNN head.

Defaults (see fpn_tf.config): smooth-L1 with beta 1/9 for the RPN (Detectron v1,
torchvision) and beta 1.0 for the head (Fast R-CNN, Detectron v1). Detectron2
uses plain L1 for both: ``box_loss: l1``.
"""

from __future__ import annotations

import tensorflow as tf

BOX_LOSSES = ("smooth_l1", "l1")


def box_regression_loss(pred: tf.Tensor, target: tf.Tensor, kind: str, beta: float) -> tf.Tensor:
    """Element-wise box loss summed over the last axis.

    Args:
      pred, target: [..., 4] float32 deltas.
      kind: "smooth_l1" (Huber-like, quadratic below ``beta``) or "l1".
      beta: smooth-L1 transition point; beta <= 0 makes smooth-L1 equal L1.

    Returns:
      [...] float32, the loss per box (not reduced over boxes).
    """
    if kind not in BOX_LOSSES:
        raise ValueError(f"unknown box loss {kind!r}; expected one of {BOX_LOSSES}")
    diff = tf.abs(tf.cast(pred, tf.float32) - tf.cast(target, tf.float32))
    if kind == "l1" or beta <= 0.0:
        loss = diff
    else:
        loss = tf.where(diff < beta, 0.5 * tf.square(diff) / beta, diff - 0.5 * beta)
    return tf.reduce_sum(loss, axis=-1)
