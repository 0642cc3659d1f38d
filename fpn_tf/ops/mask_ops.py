"""Mask R-CNN mask targets, mask loss and mask pasting (pure TF, static shapes).

Shape legend: B batch, G ground-truth boxes per image, N RoIs per image, D
detections per image, K classes incl. background, Mg side of the box-relative
ground-truth masks (``input.mask_size``), M side of the mask head's output
(28), h/w output image height/width.

Boxes are (y1, x1, y2, x2) float32 pixels. A *box-relative* mask of side Mg
holds the instance at the centres of an Mg x Mg grid over its box
(``fpn_tf/data/masks.py``); continuous pixel coordinates put pixel k's centre
at k + 0.5.

- ``mask_targets``: the GT mask seen through each RoI, at M x M bin centres,
  bilinear. torchvision and Detectron2 RoIAlign the *full-image* GT mask into
  the RoI; here the same points are mapped into the GT box's frame and read from
  the box-relative mask (zero outside the GT box), so nothing full-image is
  needed. XLA-compilable (gathers and einsums).
- ``mask_loss``: per-pixel sigmoid cross-entropy on the channel of the RoI's GT
  class, averaged over the pixels of the positive RoIs of the whole batch
  (torchvision's ``maskrcnn_loss`` and Detectron2's ``mask_rcnn_loss``: BCE
  "mean" over the concatenated positives; 0 without positives).
- ``paste_masks`` / ``paste_mask_numpy``: box-relative probabilities -> image
  pixels exactly as torchvision's ``paste_masks_in_image`` (pad the M x M mask by
  one zero pixel per side, scale the box by (M + 2) / M about its centre,
  truncate it to integers, bilinear-resize to ``(y2 - y1 + 1, x2 - x1 + 1)``
  with half-pixel centres and no antialiasing, paste clipped to the image).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

# ---------------------------------------------------------------- targets


def _axis_weights(lo, hi, ref_lo, ref_hi, size: int, side: int):
    """Bilinear weights ``[..., size, side]`` that sample a box-relative axis at RoI bin centres.

    ``lo, hi``: RoI extent ``[...]``; ``ref_lo, ref_hi``: GT box extent ``[...]``.
    Points outside the GT box get weight 0 (the GT mask is empty there); inside,
    the mask is read with clamp-to-edge bilinear interpolation.
    """
    t = (tf.range(size, dtype=tf.float32) + 0.5) / size
    points = lo[..., None] + t * (hi - lo)[..., None]  # [..., size] pixels
    extent = tf.maximum(ref_hi - ref_lo, 1e-6)[..., None]
    u = (points - ref_lo[..., None]) / extent * side - 0.5  # mask index coordinate
    inside = tf.cast((u >= -0.5) & (u <= side - 0.5), tf.float32)
    u = tf.clip_by_value(u, 0.0, side - 1.0)
    i0 = tf.floor(u)
    frac = u - i0
    i0 = tf.cast(i0, tf.int32)
    i1 = tf.minimum(i0 + 1, side - 1)
    w = tf.one_hot(i0, side) * (1.0 - frac)[..., None] + tf.one_hot(i1, side) * frac[..., None]
    return w * inside[..., None]


def mask_targets(
    gt_masks: tf.Tensor,
    gt_boxes: tf.Tensor,
    matched_gt_index: tf.Tensor,
    rois: tf.Tensor,
    size: int = 28,
) -> tf.Tensor:
    """The matched GT mask of every RoI, resampled into the RoI's ``size x size`` frame.

    Args:
      gt_masks: uint8 / float ``[B, G, Mg, Mg]`` box-relative GT masks (batch key ``gt_masks``).
      gt_boxes: float32 ``[B, G, 4]`` the boxes those masks span (``gt_boxes``, input pixels).
      matched_gt_index: int ``[B, N]`` the GT row of each RoI (negatives: any value;
        out-of-range indices are clamped, weight such RoIs out of the loss).
      rois: float32 ``[B, N, 4]`` RoIs in the same pixels as ``gt_boxes``.
      size: M.

    Returns:
      float32 ``[B, N, M, M]`` in [0, 1]: the GT mask bilinearly sampled at the
      centres of the RoI's M x M bins (Detectron2's aligned RoIAlign with one
      sample per bin, of the full-image GT mask). Soft at the edges as in
      torchvision; threshold at 0.5 for Detectron2's binary targets.
    """
    gt_masks = tf.cast(gt_masks, tf.float32)
    side = gt_masks.shape[-1]
    if side is None:
        raise ValueError("mask_targets: gt_masks needs a static mask side Mg")
    num_gt = tf.shape(gt_masks)[1]
    index = tf.clip_by_value(tf.cast(matched_gt_index, tf.int32), 0, num_gt - 1)
    masks = tf.gather(gt_masks, index, batch_dims=1)  # [B, N, Mg, Mg]
    boxes = tf.gather(tf.cast(gt_boxes, tf.float32), index, batch_dims=1)  # [B, N, 4]
    rois = tf.cast(rois, tf.float32)
    wy = _axis_weights(rois[..., 0], rois[..., 2], boxes[..., 0], boxes[..., 2], size, side)
    wx = _axis_weights(rois[..., 1], rois[..., 3], boxes[..., 1], boxes[..., 3], size, side)
    return tf.einsum("bnsm,bnmk,bntk->bnst", wy, masks, wx)


# ---------------------------------------------------------------- loss


def mask_loss(
    mask_logits: tf.Tensor,
    classes: tf.Tensor,
    targets: tf.Tensor,
    weights: tf.Tensor,
    channels_last: bool = True,
) -> tf.Tensor:
    """Sigmoid cross-entropy of each RoI's GT-class mask, mean over positive RoIs' pixels.

    Args:
      mask_logits: ``[B, N, M, M, K]`` (``channels_last``) or ``[B, N, K, M, M]``.
      classes: int ``[B, N]`` GT label of each RoI (values of unweighted RoIs are ignored).
      targets: float32 ``[B, N, M, M]`` in [0, 1] (``mask_targets``).
      weights: float32 ``[B, N]``, 1 for positive RoIs, 0 otherwise.

    Returns:
      float32 scalar: ``sum_n w_n * mean_pixels(BCE_n) / max(sum_n w_n, 1)``, i.e.
      torchvision's / Detectron2's mean over all pixels of all positive RoIs.
    """
    logits = tf.cast(mask_logits, tf.float32)
    if not channels_last:
        logits = tf.transpose(logits, [0, 1, 3, 4, 2])
    num_classes = logits.shape[-1] or tf.shape(logits)[-1]
    cls = tf.clip_by_value(tf.cast(classes, tf.int32), 0, num_classes - 1)
    picked = tf.einsum("bnstk,bnk->bnst", logits, tf.one_hot(cls, num_classes, dtype=tf.float32))
    bce = tf.nn.sigmoid_cross_entropy_with_logits(labels=tf.cast(targets, tf.float32), logits=picked)
    weights = tf.cast(weights, tf.float32)
    per_roi = tf.reduce_mean(bce, axis=[2, 3])
    return tf.reduce_sum(per_roi * weights) / tf.maximum(tf.reduce_sum(weights), 1.0)


# ---------------------------------------------------------------- pasting


def _expanded_int_boxes(boxes, side: int, xp):
    """torchvision's ``expand_boxes`` by (M + 2) / M, then truncation to integers (toward zero)."""
    scale = (side + 2.0) / side
    cy, cx = (boxes[..., 0] + boxes[..., 2]) * 0.5, (boxes[..., 1] + boxes[..., 3]) * 0.5
    hh, hw = (boxes[..., 2] - boxes[..., 0]) * 0.5 * scale, (boxes[..., 3] - boxes[..., 1]) * 0.5 * scale
    return xp.stack([cy - hh, cx - hw, cy + hh, cx + hw], axis=-1)


def _paste_weights(start, stop, out_len: int, side: int):
    """Weights ``[..., out_len, side + 2]``: torch's bilinear resize of the padded mask into [start, stop]."""
    length = tf.maximum(stop - start + 1, 1)  # torchvision: int(x2 - x1 + 1), at least 1
    pos = tf.range(out_len)
    rel = pos - start[..., None]  # output pixel within the resized box
    inside = tf.cast((rel >= 0) & (rel < length[..., None]), tf.float32)
    n_in = side + 2
    src = (tf.cast(rel, tf.float32) + 0.5) * (n_in / tf.cast(length, tf.float32))[..., None] - 0.5
    src = tf.maximum(src, 0.0)  # torch clamps negative source coordinates to 0
    i0 = tf.minimum(tf.cast(tf.floor(src), tf.int32), n_in - 1)
    i1 = tf.minimum(i0 + 1, n_in - 1)
    frac = src - tf.cast(i0, tf.float32)
    w = tf.one_hot(i0, n_in) * (1.0 - frac)[..., None] + tf.one_hot(i1, n_in) * frac[..., None]
    return w * inside[..., None]


def paste_masks(masks: tf.Tensor, boxes: tf.Tensor, out_hw: tuple[int, int]) -> tf.Tensor:
    """Box-relative mask probabilities -> full-image probabilities (torchvision's ``paste_masks_in_image``).

    Args:
      masks: float32 ``[B, D, M, M]`` probabilities in each box's frame.
      boxes: float32 ``[B, D, 4]`` (y1, x1, y2, x2) in the output image's pixels.
      out_hw: (h, w), the output size: python ints (static: XLA-compilable) or
        int32 scalar tensors (serving, where the original size varies).

    Returns:
      float32 ``[B, D, h, w]``. Memory grows as B * D * h * w * 4 bytes (100
      detections at 800 x 1333: 427 MB per image): for evaluation use
      ``paste_mask_numpy`` one mask at a time.
    """
    masks = tf.cast(masks, tf.float32)
    side = masks.shape[-1]
    padded = tf.pad(masks, [[0, 0], [0, 0], [1, 1], [1, 1]])
    ib = tf.cast(_expanded_int_boxes(tf.cast(boxes, tf.float32), side, tf), tf.int32)
    h, w = (v if tf.is_tensor(v) else int(v) for v in out_hw)
    wy = _paste_weights(ib[..., 0], ib[..., 2], h, side)  # [B, D, h, M + 2]
    wx = _paste_weights(ib[..., 1], ib[..., 3], w, side)  # [B, D, w, M + 2]
    return tf.einsum("bdym,bdmk,bdxk->bdyx", wy, padded, wx)


def _paste_axis_numpy(start: int, stop: int, side: int):
    length = max(stop - start + 1, 1)
    n_in = side + 2
    src = np.maximum((np.arange(length) + 0.5) * (n_in / length) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = (src - i0).astype(np.float32)
    return length, i0, i1, frac


def paste_mask_numpy(mask: np.ndarray, box, out_hw: tuple[int, int]) -> np.ndarray:
    """``paste_masks`` of ONE mask ``[M, M]`` and box (y1, x1, y2, x2) -> float32 ``[h, w]``.

    Computes only the box's region (cheap per detection); evaluation pastes one
    detection at a time and encodes it to RLE straight away.
    """
    mask = np.asarray(mask, np.float32)
    side = mask.shape[-1]
    padded = np.pad(mask, 1)
    y1, x1, y2, x2 = (int(v) for v in _expanded_int_boxes(np.asarray(box, np.float32), side, np))
    hy, y0i, y1i, fy = _paste_axis_numpy(y1, y2, side)
    wx, x0i, x1i, fx = _paste_axis_numpy(x1, x2, side)
    rows = padded[y0i] * (1 - fy)[:, None] + padded[y1i] * fy[:, None]  # [hy, M + 2]
    region = rows[:, x0i] * (1 - fx) + rows[:, x1i] * fx  # [hy, wx]
    h, w = int(out_hw[0]), int(out_hw[1])
    out = np.zeros((h, w), np.float32)
    ya, yb, xa, xb = max(y1, 0), min(y1 + hy, h), max(x1, 0), min(x1 + wx, w)
    if ya < yb and xa < xb:
        out[ya:yb, xa:xb] = region[ya - y1 : yb - y1, xa - x1 : xb - x1]
    return out
