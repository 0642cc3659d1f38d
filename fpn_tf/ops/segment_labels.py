"""Label rules of the FPN segmentation proposals (paper Appendix A), pure TF.

Shapes: B images, G ground-truth objects per image, Mg side of the box-relative
GT masks, T locations per image over every (MLP, level) pair, h/w a level's map.

A *location* is one cell of one level's map seen by one MLP. Locations are
ordered MLP-major, then level (finest first), then row-major cells: the head
(``fpn_tf.models.segment_head``) flattens its outputs in the same order. Cell
``(i, j)`` of level P_k is centred at image point ``((i + 0.5) 2^k, (j + 0.5) 2^k)``
(the centre of the pixels it covers) and its mask output covers the square
*window* of side ``(1 + padding) × canonical scale`` centred there.

Rules (each pinned by tests/test_segment_proposals.py):

- scale of an object = max(height, width) of its MASK. The batch holds each mask
  sampled on an Mg × Mg grid over its GT box; the mask's own extent is read from
  the rows / columns of that grid holding any pixel (exact to one grid step,
  ``box / Mg``), so an occluded or loosely boxed object is measured by what is
  visible. An object whose crop holds no pixel falls back to its box.
- (level, MLP): the canonical scale nearest in log space; canonical scales are
  ``scales[k - 2]`` for the 5×5 MLP on P_k and ``√2`` times that for the 7×7 MLP
  (half octaves). ``max_scale_distance`` > 0 (octaves) leaves objects farther
  than that from every canonical scale without positives (single-level baseline).
- positives: at the object's (level, MLP), the 3 × 3 cells around the cell holding
  the object's centre (the mask box's centre): "within 2^k pixels of that
  location (±1 cell)". A location claimed by several objects takes the one whose
  centre is nearest. Every other location inside the image is a negative (trains
  the score only); locations centred in the zero padding are ignored (-1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import tensorflow as tf

HALF_OCTAVE = math.sqrt(2.0)


@dataclass(frozen=True)
class Entry:
    """One (level, MLP) pair: its canonical object scale and mask window side (pixels)."""

    level: int
    kernel: int  # 5 or 7
    scale: float
    window: float

    @property
    def stride(self) -> int:
        return 2**self.level


def canonical_entries(
    levels: list[int], mlps: tuple[int, ...], scales: tuple[float, ...], padding: float
) -> list[Entry]:
    """The (level, MLP) pairs in location order (MLP-major, then level).

    ``scales[k - 2]`` is P_k's canonical scale for the 5×5 MLP; the 7×7 MLP's is
    √2 larger (paper: "a 128√2 scale mask is predicted by the 7×7 MLP on P4").
    The window is ``(1 + padding)`` × the scale: 40, 80, ..., 640 px by default.
    """
    entries = []
    for kernel in mlps:
        if kernel not in (5, 7):
            raise ValueError(f"segment.mlps holds window sizes 5 and/or 7, got {kernel}")
        factor = 1.0 if kernel == 5 else HALF_OCTAVE
        for level in levels:
            if not 0 <= level - 2 < len(scales):
                raise ValueError(
                    f"segment.scales has {len(scales)} values (P2..P{len(scales) + 1}) "
                    f"but the head runs on P{level}"
                )
            scale = float(scales[level - 2]) * factor
            entries.append(Entry(level, kernel, scale, scale * (1.0 + padding)))
    return entries


def assign_entries(object_scales: tf.Tensor, entries: list[Entry], max_distance: float = 0.0) -> tf.Tensor:
    """int32 ``[...]``: the entry whose canonical scale is nearest in log space (-1: none).

    Args:
      object_scales: float ``[...]`` max(h, w) per object (pixels, > 0).
      entries: ``canonical_entries``.
      max_distance: > 0: objects farther than this many octaves from every
        canonical scale get -1.
    """
    log_scale = tf.math.log(tf.maximum(tf.cast(object_scales, tf.float32), 1e-6)) / math.log(2.0)
    canonical = tf.constant([math.log2(e.scale) for e in entries], tf.float32)
    distance = tf.abs(log_scale[..., None] - canonical)  # [..., E]
    index = tf.cast(tf.argmin(distance, axis=-1), tf.int32)
    if max_distance > 0:
        index = tf.where(tf.reduce_min(distance, axis=-1) <= max_distance + 1e-6, index, -1)
    return index


def location_geometry(sizes: list[tuple], entries: list[Entry]) -> dict[str, tf.Tensor]:
    """Per location (``T = sum over entries of h * w``): where it is and what it predicts.

    Args:
      sizes: ``(h, w)`` (ints or scalar tensors) of each entry's level, in entry order.

    Returns:
      ``centres`` float32 [T, 2] (y, x) pixels; ``windows`` float32 [T, 4] (y1, x1,
      y2, x2) the mask's region; ``cells`` int32 [T, 2] (row, col); ``entry``
      int32 [T]; ``stride`` float32 [T].
    """
    parts = {k: [] for k in ("centres", "windows", "cells", "entry", "stride")}
    for index, (entry, (h, w)) in enumerate(zip(entries, sizes)):
        rows, cols = tf.meshgrid(tf.range(h), tf.range(w), indexing="ij")
        cells = tf.reshape(tf.stack([rows, cols], axis=-1), [-1, 2])
        centres = (tf.cast(cells, tf.float32) + 0.5) * float(entry.stride)
        half = entry.window / 2.0
        n = tf.shape(cells)[0]
        parts["centres"].append(centres)
        parts["windows"].append(tf.concat([centres - half, centres + half], axis=-1))
        parts["cells"].append(cells)
        parts["entry"].append(tf.fill([n], index))
        parts["stride"].append(tf.fill([n], float(entry.stride)))
    return {k: tf.concat(v, axis=0) for k, v in parts.items()}


def mask_extent_boxes(gt_boxes: tf.Tensor, gt_masks: tf.Tensor) -> tf.Tensor:
    """float32 ``[B, G, 4]``: the tight box of each box-relative mask ``[B, G, Mg, Mg]`` (pixels).

    Grid row ``i`` samples ``y1 + (i + 0.5) bh / Mg``, so rows ``first..last`` with
    pixels span ``[y1 + first bh / Mg, y1 + (last + 1) bh / Mg]``. Empty masks keep their box.
    """
    boxes = tf.cast(gt_boxes, tf.float32)
    on = tf.cast(gt_masks, tf.float32) > 0.5
    side = gt_masks.shape[-1]

    def span(any_on, lo, hi):  # any_on [B, G, Mg]
        first = tf.cast(tf.argmax(tf.cast(any_on, tf.int32), axis=-1), tf.float32)
        last = side - 1 - tf.cast(tf.argmax(tf.cast(any_on[..., ::-1], tf.int32), axis=-1), tf.float32)
        extent = hi - lo
        return lo + first * extent / side, lo + (last + 1.0) * extent / side

    y1, y2 = span(tf.reduce_any(on, axis=-1), boxes[..., 0], boxes[..., 2])
    x1, x2 = span(tf.reduce_any(on, axis=-2), boxes[..., 1], boxes[..., 3])
    tight = tf.stack([y1, x1, y2, x2], axis=-1)
    has_pixels = tf.reduce_any(on, axis=[-2, -1])
    return tf.where(has_pixels[..., None], tight, boxes)


def segment_labels(
    object_boxes: tf.Tensor,
    object_valid: tf.Tensor,
    geometry: dict[str, tf.Tensor],
    entries: list[Entry],
    image_info: tf.Tensor,
    max_distance: float = 0.0,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Labels of every location (module docstring).

    Args:
      object_boxes: float32 ``[B, G, 4]`` the boxes that define scale and centre
        (``mask_extent_boxes``), input pixels.
      object_valid: bool ``[B, G]`` real objects (padding rows False).
      geometry: ``location_geometry`` of the feature maps.
      image_info: ``[B, 6]``; locations centred beyond ``valid_h / valid_w`` are ignored.

    Returns:
      labels int32 ``[B, T]``: 1 positive, 0 negative, -1 ignored; matched int32
      ``[B, T]``: the object of each positive (0 elsewhere).
    """
    boxes = tf.cast(object_boxes, tf.float32)
    centre = (boxes[..., 0:2] + boxes[..., 2:4]) * 0.5  # [B, G, 2]
    scale = tf.reduce_max(boxes[..., 2:4] - boxes[..., 0:2], axis=-1)
    assigned = assign_entries(scale, entries, max_distance)  # [B, G]
    assigned = tf.where(object_valid, assigned, -1)

    stride = geometry["stride"][None, :, None]  # [1, T, 1]
    # the cell holding each object's centre, on each location's level: [B, T, G, 2]
    centre_cell = tf.floor(centre[:, None, :, :] / stride[..., None])
    cells = tf.cast(geometry["cells"], tf.float32)[None, :, None, :]
    near = tf.reduce_all(tf.abs(cells - centre_cell) <= 1.0, axis=-1)  # [B, T, G]
    same_entry = tf.equal(geometry["entry"][None, :, None], assigned[:, None, :])
    positive = near & same_entry
    distance = tf.reduce_sum(tf.square(geometry["centres"][None, :, None, :] - centre[:, None, :, :]), -1)
    distance = tf.where(positive, distance, float("inf"))
    matched = tf.cast(tf.argmin(distance, axis=-1), tf.int32)
    is_pos = tf.reduce_any(positive, axis=-1)

    valid_hw = tf.cast(image_info, tf.float32)[:, None, 2:4]  # [B, 1, 2]
    inside = tf.reduce_all(geometry["centres"][None] < valid_hw, axis=-1)  # [B, T]
    labels = tf.where(is_pos, 1, tf.where(inside, 0, -1))
    return tf.cast(labels, tf.int32), tf.where(is_pos, matched, 0)
