"""IoU matching of boxes (anchors or proposals) to ground truth, in bounded memory.

Faster R-CNN's rule as used by FPN (§4.1 for the RPN, §4.2 for the RoI head): a
box whose largest IoU with a valid GT box is ``>= positive_threshold`` is
positive, ``< negative_threshold`` negative, and in between ignored. With
``allow_low_quality_matches`` every box that attains some GT's largest IoU
(ties included, largest IoU > 0) is positive too, and keeps its own best GT as
its match, as torchvision's ``Matcher.set_low_quality_matches_``.

~250k anchors against hundreds of GT boxes would make an IoU matrix of
gigabytes, so boxes are processed in chunks: a first pass over the chunks finds
each GT's largest IoU, a second labels the boxes. Peak memory is
``O(batch * chunk_size * G)``. Shapes are static; compiles under
``tf.function(jit_compile=True)``.
"""

from __future__ import annotations

import tensorflow as tf

from fpn_tf.ops import box_ops

POSITIVE = 1
NEGATIVE = 0
IGNORED = -1


def _chunk_iou(chunk: tf.Tensor, gt_boxes: tf.Tensor, gt_valid: tf.Tensor) -> tf.Tensor:
    """IoU ``[B, C, G]`` of a chunk (``[C, 4]`` or ``[B, C, 4]``) with GT; -1 for invalid GT."""
    iou = box_ops.pairwise_iou(chunk, gt_boxes)
    return tf.where(gt_valid[:, None, :], iou, -1.0)


def match_boxes(
    boxes: tf.Tensor,
    gt_boxes: tf.Tensor,
    gt_valid: tf.Tensor,
    positive_threshold: float,
    negative_threshold: float,
    allow_low_quality_matches: bool,
    chunk_size: int = 16384,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Matches every box to its best valid GT box and labels it.

    Args:
      boxes: ``[N, 4]`` (anchors shared by the batch) or ``[B, N, 4]``
        (per-image proposals), ``(y1, x1, y2, x2)``.
      gt_boxes: ``[B, G, 4]`` ``(y1, x1, y2, x2)``, same pixels as ``boxes``.
      gt_valid: ``[B, G]`` bool, False for padded rows (and any GT to ignore).
      positive_threshold: IoU at or above which a box is positive.
      negative_threshold: IoU below which a box is negative.
      allow_low_quality_matches: also make each GT's best boxes positive.
      chunk_size: boxes per chunk; N is padded up to a multiple of it.

    Returns:
      matched_gt_index: ``[B, N]`` int32 in ``[0, G)``, the box's best valid GT
        (0 when the image has no valid GT).
      labels: ``[B, N]`` int32, 1 positive, 0 negative, -1 ignored; all 0 in
        an image without valid GT.
      matched_iou: ``[B, N]`` float32 IoU with the matched GT (0 without GT).

    One function on purpose: the chunked IoU / argmax loop and the low-quality-match pass
    share their running state, and splitting them would pass that state through
    XLA-traced helpers with no gain in clarity.
    """
    if negative_threshold > positive_threshold:
        raise ValueError(
            f"negative_threshold ({negative_threshold}) must not exceed positive_threshold "
            f"({positive_threshold})"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    boxes = tf.cast(boxes, tf.float32)
    gt_boxes = tf.cast(gt_boxes, tf.float32)
    gt_valid = tf.cast(gt_valid, tf.bool)
    if boxes.shape.rank not in (2, 3) or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [N, 4] or [B, N, 4], got shape {boxes.shape}")
    if gt_boxes.shape.rank != 3 or gt_boxes.shape[-1] != 4:
        raise ValueError(f"gt_boxes must be [B, G, 4], got shape {gt_boxes.shape}")
    if gt_valid.shape.rank != 2:
        raise ValueError(f"gt_valid must be [B, G], got shape {gt_valid.shape}")
    shared = boxes.shape.rank == 2
    batch = tf.shape(gt_boxes)[0]
    num_boxes = boxes.shape[-2] if boxes.shape[-2] is not None else tf.shape(boxes)[-2]

    if gt_boxes.shape[1] == 0:  # no GT slots at all: everything is negative
        zeros = tf.zeros([batch, num_boxes], tf.int32)
        return zeros, zeros, tf.zeros([batch, num_boxes], tf.float32)

    if isinstance(num_boxes, int):
        chunk_size = max(1, min(chunk_size, num_boxes))
    num_chunks = (num_boxes + chunk_size - 1) // chunk_size
    padded = num_chunks * chunk_size
    # Chunks along a leading axis: [K, C, 4] (shared) or [K, B, C, 4]. Padded
    # boxes are zero: area 0, IoU 0 with everything; they are cut off at the end.
    if shared:
        chunks = tf.reshape(tf.pad(boxes, [[0, padded - num_boxes], [0, 0]]), [num_chunks, chunk_size, 4])
    else:
        chunks = tf.pad(boxes, [[0, 0], [0, padded - num_boxes], [0, 0]])
        chunks = tf.transpose(tf.reshape(chunks, [batch, num_chunks, chunk_size, 4]), [1, 0, 2, 3])

    # Pass 1: each GT's largest IoU over all boxes, [B, G] (-1 for invalid GT).
    def max_body(i, gt_max):
        iou = _chunk_iou(chunks[i], gt_boxes, gt_valid)
        return i + 1, tf.maximum(gt_max, tf.reduce_max(iou, axis=1))

    gt_max0 = tf.fill(tf.shape(gt_valid), tf.constant(-1.0, tf.float32))
    _, gt_max = tf.while_loop(
        lambda i, _: i < num_chunks, max_body, (tf.constant(0), gt_max0), parallel_iterations=1
    )

    # Pass 2: labels of each chunk.
    def label_body(i, index_ta, label_ta, iou_ta):
        iou = _chunk_iou(chunks[i], gt_boxes, gt_valid)  # [B, C, G]
        best_iou = tf.maximum(tf.reduce_max(iou, axis=2), 0.0)  # [B, C]
        best_gt = tf.argmax(iou, axis=2, output_type=tf.int32)
        labels = tf.where(best_iou >= positive_threshold, POSITIVE, IGNORED)
        labels = tf.where(best_iou < negative_threshold, NEGATIVE, labels)
        if allow_low_quality_matches:
            is_best = tf.logical_and(tf.equal(iou, gt_max[:, None, :]), gt_max[:, None, :] > 0.0)
            labels = tf.where(tf.reduce_any(is_best, axis=2), POSITIVE, labels)
        return (
            i + 1,
            index_ta.write(i, best_gt),
            label_ta.write(i, labels),
            iou_ta.write(i, best_iou),
        )

    def array(dtype):
        return tf.TensorArray(dtype, size=num_chunks, element_shape=tf.TensorShape([None, chunk_size]))

    _, index_ta, label_ta, iou_ta = tf.while_loop(
        lambda i, *_: i < num_chunks,
        label_body,
        (tf.constant(0), array(tf.int32), array(tf.int32), array(tf.float32)),
        parallel_iterations=1,
    )

    def unchunk(ta):  # [K, B, C] -> [B, N]
        stacked = tf.transpose(ta.stack(), [1, 0, 2])
        return tf.reshape(stacked, [batch, padded])[:, :num_boxes]

    matched_gt_index = unchunk(index_ta)
    labels = unchunk(label_ta)
    matched_iou = unchunk(iou_ta)
    has_gt = tf.reduce_any(gt_valid, axis=1, keepdims=True)  # [B, 1]
    labels = tf.where(has_gt, labels, NEGATIVE)
    static_shape = [gt_boxes.shape[0], num_boxes if isinstance(num_boxes, int) else None]
    for t in (matched_gt_index, labels, matched_iou):
        t.set_shape(static_shape)
    return matched_gt_index, labels, matched_iou
