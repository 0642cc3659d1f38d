"""Anchor boxes on the feature pyramid (FPN §4.1).

The paper assigns one anchor area per level, 32², 64², 128², 256², 512² on
P2..P6, with aspect ratios 1:2, 1:1, 2:1, so 3 anchors per location; the
single-scale baselines of Table 1 put all five sizes on one level (15 per
location).

Anchors of a level are ordered ``(y, x, a)``: a head output ``[B, h, w, A * k]``
reshaped to ``[B, h * w * A, k]`` lines up with them. Within a location the
order is ratio-major, size-minor, as torchvision's ``AnchorGenerator``.
Boxes are ``(y1, x1, y2, x2)`` float32 in input pixels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow as tf


def _sizes_tuple(sizes: float | Sequence[float], level: str) -> tuple[float, ...]:
    if isinstance(sizes, (int, float)):
        sizes = (sizes,)
    sizes = tuple(float(s) for s in sizes)
    if not sizes or any(s <= 0 for s in sizes):
        raise ValueError(f"anchor sizes of level {level} must be positive numbers, got {sizes}")
    return sizes


def _ratios_tuple(aspect_ratios: Sequence[float]) -> tuple[float, ...]:
    ratios = tuple(float(r) for r in aspect_ratios)
    if not ratios or any(r <= 0 for r in ratios):
        raise ValueError(f"aspect_ratios must be positive numbers (height / width), got {ratios}")
    return ratios


def num_anchors_per_location(
    level_sizes: Mapping[str, float | Sequence[float]],
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
) -> dict[str, int]:
    """``{level: len(sizes of that level) * len(aspect_ratios)}``."""
    ratios = _ratios_tuple(aspect_ratios)
    return {level: len(_sizes_tuple(s, level)) * len(ratios) for level, s in level_sizes.items()}


def base_anchors(
    sizes: Sequence[float], aspect_ratios: Sequence[float], round_base: bool = False
) -> np.ndarray:
    """Anchors centred on the origin, ``[len(ratios) * len(sizes), 4]`` float32.

    ``h = sqrt(r) * size``, ``w = size / sqrt(r)`` (``r`` = height / width), box
    ``(-h/2, -w/2, h/2, w/2)``; computed in float32 in torchvision's order and,
    with ``round_base``, rounded half-to-even like ``torch.round``.
    """
    scales = np.asarray(sizes, dtype=np.float32)
    ratios = np.asarray(aspect_ratios, dtype=np.float32)
    h_ratios = np.sqrt(ratios)
    w_ratios = np.float32(1.0) / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    base = np.stack([-hs, -ws, hs, ws], axis=1) / np.float32(2.0)
    if round_base:
        base = np.round(base)  # half to even, as torch.round
    return base.astype(np.float32)


def _height_width(size_hw, level: str) -> tuple[tf.Tensor, tf.Tensor]:
    if tf.is_tensor(size_hw):
        if size_hw.shape.rank != 1 or size_hw.shape[0] != 2:
            raise ValueError(f"feature_sizes[{level!r}] must be (height, width), got shape {size_hw.shape}")
        size_hw = tf.unstack(size_hw, num=2)
    if len(size_hw) != 2:
        raise ValueError(f"feature_sizes[{level!r}] must be (height, width), got {size_hw!r}")
    return tuple(tf.cast(s, tf.int32) for s in size_hw)


def _stride_pair(stride, level: str) -> tuple:
    """(stride_y, stride_x) from one stride or a pair; python numbers must be positive."""
    pair = tuple(stride) if isinstance(stride, (tuple, list)) else (stride, stride)
    if len(pair) != 2:
        raise ValueError(f"stride of level {level} must be a number or (stride_y, stride_x), got {stride!r}")
    out = []
    for s in pair:
        if tf.is_tensor(s):
            out.append(tf.cast(s, tf.float32))
        elif float(s) <= 0:
            raise ValueError(f"stride of level {level} must be positive, got {stride!r}")
        else:
            out.append(float(s))
    return tuple(out)


def generate_anchors(
    feature_sizes: Mapping[str, tuple[int | tf.Tensor, int | tf.Tensor]],
    level_sizes: Mapping[str, float | Sequence[float]],
    strides: Mapping[str, int],
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    offset: float = 0.0,
    round_base: bool = False,
) -> dict[str, tf.Tensor]:
    """Anchors of every level that has sizes.

    Args:
      feature_sizes: ``{level: (height, width)}`` of each feature map: python
        ints, scalar int tensors, or an int tensor ``[2]`` (e.g.
        ``tf.shape(p)[1:3]`` inside a graph).
      level_sizes: ``{level: (size, ...)}`` anchor sizes (square-root of the
        area, pixels) of each level that gets anchors; output keys follow it.
      strides: ``{level: stride}`` in input pixels: a number, or a pair
        ``(stride_y, stride_x)`` of numbers or scalar tensors.
      aspect_ratios: heights / widths.
      offset: anchor centres are at ``(index + offset) * stride`` (0.0 as
        torchvision and Detectron2; 0.5 centres them on the pixel).
      round_base: round the centred base anchors to integers (torchvision).

    Returns:
      ``{level: [h * w * A, 4]}`` float32 ``(y1, x1, y2, x2)`` input pixels,
      ordered ``(y, x, a)``, ``A = len(aspect_ratios) * len(sizes)``.
    """
    ratios = _ratios_tuple(aspect_ratios)
    out = {}
    for level, sizes in level_sizes.items():
        sizes = _sizes_tuple(sizes, level)
        if level not in feature_sizes:
            raise ValueError(
                f"level {level} has anchor sizes but no feature size; "
                f"feature_sizes has {sorted(feature_sizes)}"
            )
        if level not in strides:
            raise ValueError(f"level {level} has anchor sizes but no stride; strides has {sorted(strides)}")
        height, width = _height_width(feature_sizes[level], level)
        stride_y, stride_x = _stride_pair(strides[level], level)
        base = tf.constant(base_anchors(sizes, ratios, round_base))  # [A, 4]
        centre_y = (tf.cast(tf.range(height), tf.float32) + offset) * stride_y  # [h]
        centre_x = (tf.cast(tf.range(width), tf.float32) + offset) * stride_x  # [w]
        grid_y, grid_x = tf.meshgrid(centre_y, centre_x, indexing="ij")  # [h, w]
        shifts = tf.stack([grid_y, grid_x, grid_y, grid_x], axis=-1)  # [h, w, 4]
        anchors = shifts[:, :, None, :] + base[None, None, :, :]  # [h, w, A, 4]
        out[level] = tf.reshape(anchors, [-1, 4])
    return out
