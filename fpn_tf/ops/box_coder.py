"""Box regression targets of R-CNN (Girshick et al. 2014), as used by FPN (§4.1, §4.2).

Deltas are ``(dy, dx, dh, dw)``::

    dy = wy * (cy - cy_a) / h_a      dh = wh * log(h / h_a)
    dx = wx * (cx - cx_a) / w_a      dw = ww * log(w / w_a)

with ``h = y2 - y1`` (no ``+1``) and ``cy = y1 + 0.5 * h``. The arithmetic follows
torchvision's ``BoxCoder`` operation by operation so that decoded boxes agree
with it to the last bit in float32. The RPN uses weights ``(1, 1, 1, 1)``, the
Fast R-CNN head ``(10, 10, 5, 5)``.

Shapes: any leading dimensions ``[...]`` of boxes / deltas, last dimension 4.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import tensorflow as tf

# Sizes are floored at this before dividing / taking logs, so degenerate
# (e.g. zero-padded) boxes give finite deltas instead of inf / NaN.
_MIN_SIZE = 1e-6
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


def _check_weights(weights: Sequence[float]) -> tuple[float, float, float, float]:
    weights = tuple(float(w) for w in weights)
    if len(weights) != 4 or any(w <= 0 for w in weights):
        raise ValueError(f"box coder weights must be 4 positive numbers (wy, wx, wh, ww), got {weights}")
    return weights


def _size_and_centre(boxes: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    y1, x1, y2, x2 = tf.unstack(boxes, num=4, axis=-1)
    h = y2 - y1
    w = x2 - x1
    return h, w, y1 + 0.5 * h, x1 + 0.5 * w


def encode_boxes(
    boxes: tf.Tensor, anchors: tf.Tensor, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)
) -> tf.Tensor:
    """Regression targets that turn ``anchors`` into ``boxes``.

    Args:
      boxes: ``[..., 4]`` target boxes ``(y1, x1, y2, x2)``.
      anchors: ``[..., 4]`` reference boxes (anchors or proposals), broadcastable
        against ``boxes``.
      weights: ``(wy, wx, wh, ww)`` multipliers of the deltas.

    Returns:
      ``[..., 4]`` float32 deltas ``(dy, dx, dh, dw)``. Sizes are floored at 1e-6
      first, so zero-size (padded) boxes give large but finite deltas.
    """
    wy, wx, wh, ww = _check_weights(weights)
    boxes = tf.cast(boxes, tf.float32)
    anchors = tf.cast(anchors, tf.float32)
    h, w, cy, cx = _size_and_centre(boxes)
    ha, wa, cya, cxa = _size_and_centre(anchors)
    h = tf.maximum(h, _MIN_SIZE)
    w = tf.maximum(w, _MIN_SIZE)
    ha = tf.maximum(ha, _MIN_SIZE)
    wa = tf.maximum(wa, _MIN_SIZE)
    dy = wy * (cy - cya) / ha
    dx = wx * (cx - cxa) / wa
    dh = wh * tf.math.log(h / ha)
    dw = ww * tf.math.log(w / wa)
    return tf.stack([dy, dx, dh, dw], axis=-1)


def decode_boxes(
    deltas: tf.Tensor,
    anchors: tf.Tensor,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    scale_clamp: float = DEFAULT_SCALE_CLAMP,
) -> tf.Tensor:
    """Applies deltas to anchors (inverse of :func:`encode_boxes`).

    Args:
      deltas: ``[..., 4]`` ``(dy, dx, dh, dw)``.
      anchors: ``[..., 4]`` reference boxes ``(y1, x1, y2, x2)``, broadcastable
        against ``deltas``.
      weights: ``(wy, wx, wh, ww)`` the deltas were encoded with.
      scale_clamp: ``dh`` and ``dw`` (after dividing by the weights) are clamped
        from above at this, so ``exp`` cannot overflow; default ``log(1000/16)``.

    Returns:
      ``[..., 4]`` float32 boxes ``(y1, x1, y2, x2)``, not clipped.
    """
    wy, wx, wh, ww = _check_weights(weights)
    deltas = tf.cast(deltas, tf.float32)
    anchors = tf.cast(anchors, tf.float32)
    ha, wa, cya, cxa = _size_and_centre(anchors)
    dy, dx, dh, dw = tf.unstack(deltas, num=4, axis=-1)
    dy = dy / wy
    dx = dx / wx
    dh = tf.minimum(dh / wh, scale_clamp)
    dw = tf.minimum(dw / ww, scale_clamp)
    cy = dy * ha + cya
    cx = dx * wa + cxa
    h = tf.exp(dh) * ha
    w = tf.exp(dw) * wa
    half_h = 0.5 * h
    half_w = 0.5 * w
    return tf.stack([cy - half_h, cx - half_w, cy + half_h, cx + half_w], axis=-1)
