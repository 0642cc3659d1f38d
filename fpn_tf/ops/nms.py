"""Padded, batched greedy non-maximum suppression with static output shapes.

Semantics are torchvision's ``nms``: boxes are visited in descending score
order (equal scores: lower index first) and a box is suppressed when its IoU
with an already kept box is *greater* than ``iou_threshold``. Boxes whose
score is not greater than ``score_threshold`` are never kept. The output is
padded to ``max_output_size`` with a validity mask, so shapes are static and
every function here compiles under ``tf.function(jit_compile=True)``.

Two implementations give the same result, and ``method="auto"`` picks the
one that measured fastest on CPU in each context (1.3-20x faster than the
other and than ``tf.image.non_max_suppression_padded``'s batched path, which
also differs from greedy NMS: it suppresses at IoU == threshold and drops
boxes whose coordinates are all <= 0):

- ``"kernel"``: TensorFlow's C++ ``NonMaxSuppressionV4`` per image inside
  ``tf.map_fn``; used when not compiling with XLA. Refused under XLA, whose
  lowering of the op builds an N x N IoU matrix and breaks score ties
  differently.
- ``"tiled"``: a vectorised exact greedy NMS over tiles of score-sorted boxes:
  a tile is checked against the boxes kept so far, then resolved internally
  by a fixed-point iteration; the loop stops once every image has
  ``max_output_size`` boxes. Used while tracing for XLA (``jit_compile=True``).
"""

from __future__ import annotations

import math

import tensorflow as tf

from fpn_tf.ops.xla import in_xla_context as _in_xla_context

_METHODS = ("auto", "kernel", "tiled")


def _check_inputs(boxes, scores, max_output_size, iou_threshold, method, tile_size):
    if boxes.shape.rank != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [batch, num_boxes, 4], got shape {boxes.shape}")
    if scores.shape.rank != 2:
        raise ValueError(f"scores must be [batch, num_boxes], got shape {scores.shape}")
    if not isinstance(max_output_size, int) or max_output_size < 1:
        raise ValueError(f"max_output_size must be a positive Python int, got {max_output_size!r}")
    if not 0.0 <= float(iou_threshold) <= 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold}")
    if not isinstance(tile_size, int) or tile_size < 1:
        raise ValueError(f"tile_size must be a positive int, got {tile_size!r}")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")


def _pairwise_iou(kept: tf.Tensor, kept_area: tf.Tensor, cand: tf.Tensor, cand_area: tf.Tensor):
    """IoU [B, K, T] of kept [B, K, 4] against candidates [B, T, 4], torchvision's arithmetic.

    Zero-area pairs give NaN (0 / 0), which compares False, so they never suppress.
    """
    k = kept[:, :, None, :]
    c = cand[:, None, :, :]
    h = tf.maximum(tf.minimum(k[..., 2], c[..., 2]) - tf.maximum(k[..., 0], c[..., 0]), 0.0)
    w = tf.maximum(tf.minimum(k[..., 3], c[..., 3]) - tf.maximum(k[..., 1], c[..., 1]), 0.0)
    inter = w * h
    return inter / (kept_area[:, :, None] + cand_area[:, None, :] - inter)


def _descending_order(scores: tf.Tensor) -> tf.Tensor:
    """argsort [B, N] of scores, descending, equal scores by lower index, also under XLA.

    XLA's CPU top_k is not stable, so each score is made a unique int64 key: the
    float's bits mapped to an order-preserving int32, then the reversed index.
    """
    scores = tf.where(tf.equal(scores, 0.0), tf.zeros_like(scores), scores)  # -0.0 ties with 0.0
    bits = tf.bitcast(scores, tf.int32)
    ordered = tf.where(bits < 0, tf.bitwise.bitwise_xor(bits, 0x7FFFFFFF), bits)
    n = tf.shape(scores)[-1]
    key = tf.cast(ordered, tf.int64) * (2**32) + tf.cast(n - 1 - tf.range(n), tf.int64)
    return tf.math.top_k(key, k=n, sorted=True).indices


def _nms_tiled(boxes, scores, max_output_size, iou_threshold, score_threshold, tile_size=512):
    """Exact greedy NMS by tiles; returns indices [B, M] into the input and valid [B, M].

    One function on purpose: the tiled suppression loop body and its carried state are
    one XLA while_loop; splitting it would only move the loop state between helpers.
    """
    batch = tf.shape(boxes)[0]
    num_boxes = tf.shape(boxes)[1]
    m = max_output_size
    if boxes.shape[1] is not None:  # no wider tiles than the boxes
        tile_size = max(1, min(tile_size, boxes.shape[1]))
    order = _descending_order(scores)
    sorted_boxes = tf.gather(boxes, order, batch_dims=1)
    sorted_scores = tf.gather(scores, order, batch_dims=1)
    num_tiles = (num_boxes + tile_size - 1) // tile_size
    pad = num_tiles * tile_size - num_boxes
    sorted_boxes = tf.pad(sorted_boxes, [[0, 0], [0, pad], [0, 0]])
    candidate = tf.pad(sorted_scores > score_threshold, [[0, 0], [0, pad]])
    area = (sorted_boxes[..., 3] - sorted_boxes[..., 1]) * (sorted_boxes[..., 2] - sorted_boxes[..., 0])
    lower = tf.range(tile_size)[:, None] < tf.range(tile_size)[None, :]  # [T, T]: row before column
    slots = -(-m // tile_size) * tile_size  # kept-box buffers hold whole tiles, plus one spare slot

    def suppressed_by_kept(tile, tile_area, count, kept_boxes, kept_area):
        """[B, T]: tile boxes overlapping a box kept earlier, scanning only the used slots."""
        filled = tf.minimum(count, m)[:, None]
        num_chunks = (tf.reduce_max(filled) + tile_size - 1) // tile_size

        def chunk(j, hit):
            first = j * tile_size
            kept = tf.slice(kept_boxes, [0, first, 0], [-1, tile_size, 4])
            area_j = tf.slice(kept_area, [0, first], [-1, tile_size])
            used = (first + tf.range(tile_size))[None, :] < filled
            overlap = tf.logical_and(
                _pairwise_iou(kept, area_j, tile, tile_area) > iou_threshold, used[..., None]
            )
            return j + 1, tf.logical_or(hit, tf.reduce_any(overlap, axis=1))

        _, hit = tf.while_loop(
            lambda j, hit: j < num_chunks, chunk, (tf.constant(0), tf.zeros_like(tile_area, tf.bool))
        )
        return hit

    def cond(t, count, kept_boxes, kept_area, kept_pos):
        return tf.logical_and(t < num_tiles, tf.reduce_min(count) < m)

    def body(t, count, kept_boxes, kept_area, kept_pos):
        start = t * tile_size
        tile = tf.slice(sorted_boxes, [0, start, 0], [-1, tile_size, 4])
        tile_area = tf.slice(area, [0, start], [-1, tile_size])
        alive = tf.slice(candidate, [0, start], [-1, tile_size])
        cross = suppressed_by_kept(tile, tile_area, count, kept_boxes, kept_area)
        alive = tf.logical_and(alive, tf.logical_not(cross))
        # Inside the tile: keep[i] = alive[i] and no kept j < i overlaps i. The iteration is
        # exact for the first s boxes after s steps, and its only fixed point is greedy's.
        suppresses = tf.logical_and(_pairwise_iou(tile, tile_area, tile, tile_area) > iou_threshold, lower)

        def step(keep, _):
            hit = tf.reduce_any(tf.logical_and(keep[:, :, None], suppresses), axis=1)
            return tf.logical_and(alive, tf.logical_not(hit)), keep

        keep, _ = tf.while_loop(
            lambda keep, previous: tf.reduce_any(tf.not_equal(keep, previous)),
            step,
            step(alive, alive),
        )
        # Append this tile's kept boxes to the compact buffers; the spare slot takes the rest.
        slot = count[:, None] + tf.cumsum(tf.cast(keep, tf.int32), axis=1) - 1  # [B, T]
        slot = tf.where(tf.logical_and(keep, slot < m), slot, slots)
        where = tf.stack([tf.broadcast_to(tf.range(batch)[:, None], tf.shape(slot)), slot], axis=-1)
        kept_boxes = tf.tensor_scatter_nd_update(kept_boxes, where, tile)
        kept_area = tf.tensor_scatter_nd_update(kept_area, where, tile_area)
        kept_pos = tf.tensor_scatter_nd_update(
            kept_pos, where, start + tf.broadcast_to(tf.range(tile_size), tf.shape(slot))
        )
        count = count + tf.reduce_sum(tf.cast(keep, tf.int32), axis=1)
        return t + 1, count, kept_boxes, kept_area, kept_pos

    init = (
        tf.constant(0),
        tf.zeros([batch], tf.int32),
        tf.zeros([batch, slots + 1, 4], boxes.dtype),
        tf.zeros([batch, slots + 1], boxes.dtype),
        tf.zeros([batch, slots + 1], tf.int32),
    )
    _, count, _, _, kept_pos = tf.while_loop(cond, body, init)
    valid = tf.range(m)[None, :] < tf.minimum(count, m)[:, None]
    order = tf.pad(order, [[0, 0], [0, 1]])  # a valid target for padded slots, also when N = 0
    indices = tf.gather(order, kept_pos[:, :m], batch_dims=1)
    return tf.where(valid, indices, 0), valid


def _nms_kernel(boxes, scores, max_output_size, iou_threshold, score_threshold):
    """TensorFlow's C++ greedy NMS per image; returns indices [B, M] and valid [B, M]."""

    def one_image(args):
        image_boxes, image_scores = args
        indices, num_valid = tf.raw_ops.NonMaxSuppressionV4(
            boxes=image_boxes,
            scores=image_scores,
            max_output_size=max_output_size,
            iou_threshold=iou_threshold,
            score_threshold=score_threshold,
            pad_to_max_output_size=True,
        )
        return indices, num_valid

    indices, num_valid = tf.map_fn(
        one_image,
        (boxes, scores),
        fn_output_signature=(
            tf.TensorSpec([max_output_size], tf.int32),
            tf.TensorSpec([], tf.int32),
        ),
    )
    valid = tf.range(max_output_size)[None, :] < num_valid[:, None]
    return tf.where(valid, indices, 0), valid


def non_max_suppression_padded(
    boxes: tf.Tensor,
    scores: tf.Tensor,
    max_output_size: int,
    iou_threshold: float,
    score_threshold: float = -math.inf,
    method: str = "auto",
    tile_size: int = 512,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Greedy NMS per image with a padded, static-shape output.

    Args:
      boxes: float32 [B, N, 4], ``(y1, x1, y2, x2)`` with y1 <= y2, x1 <= x2 (any
        pixel frame).
      scores: float32 [B, N].
      max_output_size: Python int M, the most boxes kept per image.
      iou_threshold: a box is suppressed if its IoU with a kept box is > this.
      score_threshold: only boxes with score > this are kept (so ``-inf`` scores
        never are).
      method: ``"auto"`` (tiled under XLA, kernel otherwise), ``"kernel"`` (not
        under XLA) or ``"tiled"``; all give the same result.
      tile_size: boxes per tile of the tiled method.

    Returns:
      indices: int32 [B, M] into N, kept boxes in descending score order (ties:
        lower index first); padded slots hold 0.
      valid: bool [B, M], True for the kept boxes (a prefix of each row).
    """
    boxes = tf.convert_to_tensor(boxes, tf.float32)
    scores = tf.convert_to_tensor(scores, tf.float32)
    _check_inputs(boxes, scores, max_output_size, iou_threshold, method, tile_size)
    if method == "auto":
        method = "tiled" if _in_xla_context() else "kernel"
    elif method == "kernel" and _in_xla_context():
        raise ValueError(
            "method='kernel' cannot be compiled with XLA: XLA's lowering of NonMaxSuppressionV4 "
            "orders equal scores differently and builds an N x N IoU matrix; use 'auto' or 'tiled'"
        )
    if method == "kernel":
        return _nms_kernel(boxes, scores, max_output_size, float(iou_threshold), float(score_threshold))
    return _nms_tiled(boxes, scores, max_output_size, float(iou_threshold), float(score_threshold), tile_size)


def batched_nms_padded(
    boxes: tf.Tensor,
    scores: tf.Tensor,
    groups: tf.Tensor,
    max_output_size: int,
    iou_threshold: float,
    score_threshold: float = -math.inf,
    method: str = "auto",
    tile_size: int = 512,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Greedy NMS run independently within each group (class or level), in one call.

    Boxes of different groups are moved apart by ``group * span`` before one NMS
    (torchvision's ``batched_nms`` trick), with ``span = max - min + 1`` of the
    image's coordinates, so that boxes of different groups never overlap, also
    for negative coordinates. The shift rounds coordinates (float32), so IoUs
    within ~1e-6 of the threshold may decide differently than per-group NMS.

    Args:
      boxes: float32 [B, N, 4], ``(y1, x1, y2, x2)``.
      scores: float32 [B, N].
      groups: int32 [B, N], group id >= 0 of each box.
      max_output_size, iou_threshold, score_threshold, method, tile_size: as in
        ``non_max_suppression_padded``.

    Returns:
      indices int32 [B, M] and valid bool [B, M], as ``non_max_suppression_padded``:
      the kept boxes of all groups together, in descending score order.
    """
    boxes = tf.convert_to_tensor(boxes, tf.float32)
    groups = tf.convert_to_tensor(groups)
    if groups.shape.rank != 2:
        raise ValueError(f"groups must be [batch, num_boxes], got shape {groups.shape}")
    if not groups.dtype.is_integer:
        raise ValueError(f"groups must be an integer tensor, got {groups.dtype.name}")
    low = tf.reduce_min(boxes, axis=[1, 2], keepdims=True)
    high = tf.reduce_max(boxes, axis=[1, 2], keepdims=True)
    offsets = tf.cast(groups, tf.float32)[..., None] * (high - low + 1.0)
    return non_max_suppression_padded(
        boxes + offsets, scores, max_output_size, iou_threshold, score_threshold, method, tile_size
    )
