"""Checks a whole COCO-JSON dataset before training and lists every problem.

``check_coco_dataset`` reads the annotation file, checks every image entry,
annotation and category, and decodes every image with the training pipeline's
own decoder (``pipeline.decode_images``' fallback path, in parallel with tf.data),
so a dataset it passes is one the pipeline reads without skipping anything. The
training loaders stop at the first fault (or skip an undecodable image); this
check goes on and reports them all, each naming the image file or annotation id.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field

import tensorflow as tf

from fpn_tf.data.coco_json import read_annotation_json, resolve_image_path


@dataclass
class DatasetReport:
    num_images: int = 0
    num_annotations: int = 0
    problems: list[str] = field(default_factory=list)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_images(data: dict, image_dir: str, report: DatasetReport) -> dict[int, tuple[str, int, int]]:
    """``{image id: (path, h, w)}`` of the entries fit to decode; problems of the others."""
    images = {}
    counts = Counter(e.get("id") for e in data["images"] if isinstance(e, dict) and _is_int(e.get("id")))
    for k, entry in enumerate(data["images"]):
        where = f"images[{k}]" + (f" (id {entry.get('id')})" if isinstance(entry, dict) else "")
        if not isinstance(entry, dict):
            report.problems.append(f"{where}: not an object: {entry!r}")
            continue
        missing = [key for key in ("id", "file_name", "height", "width") if key not in entry]
        if missing:
            report.problems.append(f"{where}: no {', '.join(missing)}")
            continue
        if not _is_int(entry["id"]) or counts[entry["id"]] > 1:
            report.problems.append(f"{where}: the id must be a unique integer")
            continue
        h, w = entry["height"], entry["width"]
        if not (_is_int(h) and _is_int(w) and h > 0 and w > 0):
            report.problems.append(
                f"{where} {entry['file_name']}: height/width must be positive integers, got {h}x{w}"
            )
            continue
        try:
            path = resolve_image_path(image_dir, str(entry["file_name"]))
        except ValueError as e:
            report.problems.append(f"{where}: {e}")
            continue
        if not os.path.isfile(path):
            report.problems.append(f"{path}: image file not found (image {entry['id']})")
            continue
        images[entry["id"]] = (path, h, w)
    return images


def _check_box(ann: dict, where: str, image_hw: tuple[int, int] | None) -> str | None:
    bbox = ann.get("bbox")
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return f"{where}: bbox must be [x, y, width, height], got {bbox!r}"
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
        return f"{where}: bbox must hold 4 numbers, got {bbox!r}"
    if not all(math.isfinite(v) for v in bbox):
        return f"{where}: bbox has a non-finite coordinate (NaN or Inf): {bbox!r}"
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return f"{where}: bbox width and height must be > 0, got width {w}, height {h}"
    if image_hw is not None:
        ih, iw = image_hw
        if x >= iw or y >= ih or x + w <= 0 or y + h <= 0:
            return f"{where}: bbox {bbox} lies outside its {ih}x{iw} image"
    return None


def _check_annotations(data: dict, entries: dict, report: DatasetReport) -> None:
    categories = {c.get("id") for c in data["categories"] if isinstance(c, dict) and _is_int(c.get("id"))}
    if not categories:
        report.problems.append("the COCO JSON lists no categories")
    image_ids = {e.get("id") for e in data["images"] if isinstance(e, dict) and _is_int(e.get("id"))}
    ids = Counter(
        a.get("id") for a in data.get("annotations", []) if isinstance(a, dict) and _is_int(a.get("id"))
    )
    for k, ann in enumerate(data.get("annotations", [])):
        if not isinstance(ann, dict):
            report.problems.append(f"annotations[{k}]: not an object: {ann!r}")
            continue
        where = f"annotation {ann.get('id')} of image {ann.get('image_id')}"
        if not _is_int(ann.get("id")) or ids[ann.get("id")] > 1:
            report.problems.append(f"annotations[{k}] ({where}): the id must be a unique integer")
        if ann.get("image_id") not in image_ids:
            report.problems.append(f"{where}: image_id {ann.get('image_id')} is not in the images")
        if ann.get("category_id") not in categories:
            report.problems.append(f"{where}: category_id {ann.get('category_id')} is not in the categories")
        entry = entries.get(ann.get("image_id"))
        problem = _check_box(ann, where, entry[1:] if entry else None)
        if problem:
            report.problems.append(problem)


def _decoded_sizes(paths: list[str]) -> list[tuple[int, int] | None]:
    """(h, w) of each decoded image, None where it cannot be read or decoded."""
    from fpn_tf.data.image_reading import _decoded_or_flag  # the training pipeline's decode

    if not paths:
        return []
    ds = tf.data.Dataset.from_tensor_slices(paths).interleave(
        lambda p: _decoded_or_flag(p).map(lambda image, ok: (tf.shape(image)[:2], ok)),
        cycle_length=8,
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    return [(int(hw[0]), int(hw[1])) if ok else None for hw, ok in ds.as_numpy_iterator()]


def check_coco_dataset(annotation_path: str, image_dir: str, decode: bool = True) -> DatasetReport:
    """Every problem of a COCO instances JSON and its image folder (nothing is written).

    Args:
      annotation_path: the instances JSON.
      image_dir: the folder its ``file_name`` entries are relative to.
      decode: also decode every image and compare its size with the JSON's.
    """
    report = DatasetReport()
    try:
        data = read_annotation_json(annotation_path)
    except (OSError, ValueError) as e:
        report.problems.append(str(e))
        return report
    report.num_images = len(data["images"])
    report.num_annotations = len(data.get("annotations", []))
    entries = _check_images(data, image_dir, report)
    _check_annotations(data, entries, report)
    if decode:
        ordered = sorted(entries.items())
        sizes = _decoded_sizes([path for _id, (path, _h, _w) in ordered])
        for (image_id, (path, h, w)), got in zip(ordered, sizes):
            if got is None:
                report.problems.append(
                    f"{path}: cannot be decoded (image {image_id}; corrupt or not an image)"
                )
            elif got != (h, w):
                report.problems.append(
                    f"{path}: decodes to {got[0]}x{got[1]} but the JSON says {h}x{w} (image {image_id})"
                )
    return report
