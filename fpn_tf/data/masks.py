"""COCO instance segmentations -> fixed-size masks cropped to their ground-truth box.

Shapes: n annotations of one image, Mg side of the GT mask crops (``input.mask_size``),
h/w the original image size.

A ground-truth mask reaches the batch as ``Mg x Mg`` samples of the instance inside
its (clipped) box, never as a full-image mask: sample ``(i, j)`` is the value
of the pycocotools full-resolution raster (the mask COCOeval scores) at the
original-image point ``(y1 + (i + 0.5) * bh / Mg, x1 + (j + 0.5) * bw / Mg)``,
the centres of an ``Mg x Mg`` grid over the box. Because it is relative to the
box, it is unchanged by the image resize and the padding, and the horizontal
flip reverses its columns (``preprocess.flip_masks_left_right``).

- Polygons are rasterised directly in the box frame (Detectron2's
  ``rasterize_polygons_within_box``): no full-image raster at all.
- RLE (compressed string or uncompressed counts) is decoded for one instance
  at a time (``h x w`` uint8), sampled bilinearly at the grid centres and
  thresholded at 0.5.

pycocotools' polygon raster sets pixel ``(r, c)`` when the point ``(x=c, y=r)``
lies inside the polygon, i.e. the polygon is shifted by half a pixel against
pixel centres; the box-frame raster reproduces that so both paths agree with
COCOeval's masks.

pycocotools decodes an RLE whose counts do not sum to ``h * w`` by writing
past its buffer: every RLE is checked here (``check_segmentation``) first.
"""

from __future__ import annotations

import numpy as np
import pycocotools.mask as mask_utils


class SegmentationError(ValueError):
    """A malformed ``segmentation`` (the message names the annotation)."""


def rle_string_counts(counts: str | bytes) -> list[int]:
    """Decodes a compressed COCO RLE string into run lengths (pycocotools' ``rleFrString``)."""
    data = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    out: list[int] = []
    p = 0
    while p < len(data):
        x, k, more = 0, 0, True
        while more:
            if p >= len(data):
                raise ValueError("truncated compressed RLE string")
            c = data[p] - 48
            if not 0 <= c < 64:
                raise ValueError(f"invalid character {chr(data[p])!r} in a compressed RLE string")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    return out


def check_segmentation(seg, height: int, width: int, where: str):
    """Validates one annotation's ``segmentation`` and returns it in a form pycocotools reads.

    Args:
      seg: polygons ``[[x0, y0, x1, y1, ...], ...]`` (pixels), or an RLE dict
        ``{"size": [h, w], "counts": str | bytes | [int, ...]}``.
      height, width: the image's size; an RLE must have exactly this size.
      where: names the annotation in errors (e.g. "annotation 7 of image 3").

    Returns:
      Polygons as a list of float lists, or a compressed RLE dict (``counts`` bytes).

    Raises:
      SegmentationError: naming ``where`` for a missing or empty segmentation,
        a polygon of fewer than 3 points, an odd or non-finite coordinate list,
        an RLE of another size, or RLE counts that are negative or do not sum
        to ``h * w``.
    """
    if isinstance(seg, dict):
        return _check_rle(seg, height, width, where)
    if not isinstance(seg, (list, tuple)) or not seg:
        raise SegmentationError(f"{where}: segmentation must be polygons or an RLE dict, got {seg!r:.80}")
    polygons = []
    for k, poly in enumerate(seg):
        try:
            xy = np.asarray(poly, np.float64)
        except (TypeError, ValueError):
            xy = None
        if xy is None or xy.ndim != 1 or len(xy) % 2 or len(xy) < 6 or not np.isfinite(xy).all():
            raise SegmentationError(
                f"{where}: polygon {k} must be a flat list of >= 3 finite (x, y) points, got {poly!r:.80}"
            )
        polygons.append([float(v) for v in xy])
    return polygons


def _check_rle(seg: dict, height: int, width: int, where: str) -> dict:
    size, counts = seg.get("size"), seg.get("counts")
    if not isinstance(size, (list, tuple)) or [int(v) for v in size] != [height, width]:
        raise SegmentationError(f"{where}: RLE size {size!r} differs from the image size [{height}, {width}]")
    if isinstance(counts, list):
        runs = counts
    elif isinstance(counts, (str, bytes)):
        try:
            runs = rle_string_counts(counts)
        except ValueError as e:
            raise SegmentationError(f"{where}: {e}") from None
    else:
        raise SegmentationError(f"{where}: RLE counts must be a string or a list of ints, got {counts!r:.80}")
    if any((not isinstance(c, (int, np.integer))) or c < 0 for c in runs):
        raise SegmentationError(f"{where}: RLE counts must be non-negative ints")
    if sum(runs) != height * width:
        raise SegmentationError(
            f"{where}: RLE counts sum to {sum(runs)}, not height * width = {height * width}"
        )
    if isinstance(counts, list):
        return mask_utils.frPyObjects({"size": [height, width], "counts": list(counts)}, height, width)
    return {"size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def _grid(lo: float, hi: float, size: int) -> np.ndarray:
    """Centres of ``size`` equal bins over ``[lo, hi]``."""
    return lo + (np.arange(size) + 0.5) * (hi - lo) / size


def _polygons_in_box(polygons: list[list[float]], box, size: int) -> np.ndarray:
    y1, x1, y2, x2 = (float(v) for v in box)
    sy, sx = size / max(y2 - y1, 1e-6), size / max(x2 - x1, 1e-6)
    moved = []
    for poly in polygons:
        p = np.asarray(poly, np.float64).copy()
        # frame pixel j tests frame point j; it must test original point
        # x1 + (j + 0.5) * bw / Mg - 0.5 (pycocotools' half-pixel shift, see the module docstring)
        p[0::2] = (p[0::2] - x1 + 0.5) * sx - 0.5
        p[1::2] = (p[1::2] - y1 + 0.5) * sy - 0.5
        moved.append(p.tolist())
    rles = mask_utils.frPyObjects(moved, size, size)
    return mask_utils.decode(mask_utils.merge(rles))


def _bilinear_taps(points: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index taps and weights of bilinear sampling at pixel coordinates ``points`` (centres at k + 0.5)."""
    u = np.clip(points - 0.5, 0.0, n - 1)
    lo = np.floor(u).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    return lo, hi, u - lo


def _rle_in_box(rle: dict, box, size: int) -> np.ndarray:
    full = mask_utils.decode(rle)  # [h, w] uint8 of ONE instance
    h, w = full.shape
    y1, x1, y2, x2 = (float(v) for v in box)
    ylo, yhi, fy = _bilinear_taps(_grid(y1, y2, size), h)
    xlo, xhi, fx = _bilinear_taps(_grid(x1, x2, size), w)

    def tap(rows, cols):  # gathers [Mg, Mg] from the uint8 raster; no float copy of the full image
        return full[np.ix_(rows, cols)].astype(np.float32)

    top = tap(ylo, xlo) * (1 - fx) + tap(ylo, xhi) * fx
    bottom = tap(yhi, xlo) * (1 - fx) + tap(yhi, xhi) * fx
    value = top * (1 - fy[:, None]) + bottom * fy[:, None]
    return (value >= 0.5).astype(np.uint8)


def crop_mask(seg, box, size: int) -> np.ndarray:
    """One instance's mask sampled on an ``size x size`` grid over ``box``.

    Args:
      seg: a segmentation as returned by ``check_segmentation``.
      box: (y1, x1, y2, x2) original pixels.
      size: Mg.

    Returns:
      uint8 ``[Mg, Mg]`` in {0, 1}.
    """
    if isinstance(seg, dict):
        return _rle_in_box(seg, box, size)
    return _polygons_in_box(seg, box, size)


def crop_masks(segmentations: list, boxes: np.ndarray, size: int) -> np.ndarray:
    """``crop_mask`` for each of the n annotations of one image -> uint8 ``[n, Mg, Mg]``."""
    out = np.zeros((len(segmentations), size, size), np.uint8)
    for k, (seg, box) in enumerate(zip(segmentations, np.asarray(boxes).reshape(-1, 4))):
        out[k] = crop_mask(seg, box, size)
    return out


def encode_binary_mask(mask: np.ndarray) -> dict:
    """uint8/bool ``[h, w]`` -> COCO compressed RLE with a JSON-ready ``str`` counts."""
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
