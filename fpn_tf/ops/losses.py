"""Losses shared by the detectors: box regression, and RetinaNet's sigmoid focal loss.

Box defaults (see fpn_tf.config): smooth-L1 with beta 1/9 for the RPN (Detectron v1,
torchvision) and beta 1.0 for the head (Fast R-CNN, Detectron v1). Detectron2
uses plain L1 for both: ``box_loss: l1``. RetinaNet: smooth-L1 beta 0.1
(Detectron2) or L1 (torchvision).
"""

from __future__ import annotations

import tensorflow as tf

from fpn_tf.detector_types import BOX_LOSSES


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


def sigmoid_focal_loss(logits: tf.Tensor, targets: tf.Tensor, alpha: float, gamma: float) -> tf.Tensor:
    """Element-wise focal loss (Lin et al. 2017b, eq. 5), torchvision's ``sigmoid_focal_loss``.

    ``FL = alpha_t * (1 - p_t)**gamma * BCE(logits, targets)`` with ``p_t = p`` for
    targets 1 and ``1 - p`` for 0; ``alpha_t = alpha`` for 1 and ``1 - alpha`` for 0
    (``alpha < 0`` turns the weighting off).

    Args:
      logits, targets: same shape, float; targets in {0, 1}.

    Returns:
      float32, the shape of ``logits`` (not reduced).
    """
    logits = tf.cast(logits, tf.float32)
    targets = tf.cast(targets, tf.float32)
    p = tf.sigmoid(logits)
    ce = tf.nn.sigmoid_cross_entropy_with_logits(labels=targets, logits=logits)
    p_t = p * targets + (1.0 - p) * (1.0 - targets)
    loss = ce * tf.pow(1.0 - p_t, gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1.0 - alpha) * (1.0 - targets)) * loss
    return loss
