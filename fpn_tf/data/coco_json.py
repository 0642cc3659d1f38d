"""COCO instances JSON + an image folder -> per-image training records.

Reads the annotation file with pycocotools (its prints are silenced). Each image
becomes an ``ImageRecord`` whose boxes are ``(y1, x1, y2, x2)`` float32 in
original pixels, clipped to the image, with contiguous labels (``LabelMap``).
Images without annotations are kept (background-only images train the RPN and
the classifier's background class). Crowd boxes are not training targets; they
are kept apart in ``crowd_boxes`` (their masks are not read either: COCOeval
treats crowd regions as "ignore", not as objects to segment).
With ``with_masks`` each kept box also keeps its annotation's ``segmentation``
(validated by ``masks.check_segmentation``; cropped per image in the pipeline).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from pycocotools.coco import COCO

from fpn_tf.data.label_map import LabelMap
from fpn_tf.data.masks import check_segmentation
from fpn_tf.detector_types import STRUCTURE_POLICIES

_LOG = logging.getLogger(__name__)


@dataclass
class ImageRecord:
    """One image of a detection dataset.

    boxes: float32 ``[n, 4]`` (y1, x1, y2, x2) original pixels, clipped, area > 0.
    labels: int32 ``[n]`` contiguous labels ``1..K-1``.
    crowd_boxes: float32 ``[m, 4]`` crowd regions, same format (not training targets).
    segmentations: with masks, one checked ``segmentation`` per box (polygons or a
      compressed RLE dict, see ``masks.check_segmentation``); None without.
    """

    image_id: int
    path: str
    height: int
    width: int
    boxes: np.ndarray
    labels: np.ndarray
    crowd_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    segmentations: list | None = None


@dataclass
class CocoJsonStats:
    num_images: int = 0
    num_images_without_boxes: int = 0
    num_boxes: int = 0  # kept as training targets
    num_crowd: int = 0  # crowd boxes (kept apart)
    num_clipped: int = 0  # boxes partly outside the image, clipped
    num_zero_area_dropped: int = 0  # boxes with no area after clipping


def read_annotation_json(annotation_path: str) -> dict:
    """The parsed COCO instances JSON, its top-level layout checked.

    Raises:
      FileNotFoundError / ValueError naming ``annotation_path``: no such file, not
      UTF-8 JSON (with the line and column), not an object, no ``images`` or
      ``categories`` list, or an ``annotations`` entry that is not a list.
    """
    if not os.path.isfile(annotation_path):
        raise FileNotFoundError(f"COCO annotation file not found: {annotation_path}")
    try:
        with open(annotation_path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{annotation_path}: not a COCO JSON file: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"{annotation_path}: a COCO JSON file holds an object with 'images', 'annotations' and "
            f"'categories', got a {type(data).__name__}"
        )
    for key in ("images", "categories", "annotations"):
        if key not in data and key != "annotations":
            raise ValueError(f"{annotation_path}: the COCO JSON has no {key!r} list")
        if key in data and not isinstance(data[key], list):
            raise ValueError(f"{annotation_path}: {key!r} must be a list, got {type(data[key]).__name__}")
    return data


def id_problems(data: dict) -> list[str]:
    """What pycocotools' index would silently lose: duplicate image / annotation ids and
    annotations whose ``image_id`` is not among the images (one line per kind, with ids)."""

    def duplicates(entries) -> list:
        # Entries without an id are left to the index, whose error says each needs one.
        counts = Counter(e["id"] for e in entries if e.get("id") is not None)
        return sorted((i for i, n in counts.items() if n > 1), key=str)

    def listed(ids) -> str:
        return ", ".join(map(str, ids[:10])) + (f", ... ({len(ids)} in all)" if len(ids) > 10 else "")

    images = [e for e in data.get("images", []) if isinstance(e, dict)]
    annotations = [a for a in data.get("annotations", []) if isinstance(a, dict)]
    problems = []
    if dup := duplicates(images):
        problems.append(
            f"duplicate image ids {listed(dup)} (pycocotools would keep only the last entry of each)"
        )
    if dup := duplicates(annotations):
        problems.append(f"duplicate annotation ids {listed(dup)}")
    image_ids = {e.get("id") for e in images}
    dangling = [a.get("id") for a in annotations if "image_id" in a and a["image_id"] not in image_ids]
    if dangling:
        problems.append(
            f"annotations {listed(dangling)} have an image_id that is not among the images "
            "(they would be ignored)"
        )
    return problems


def load_coco(annotation_path: str, structure_policy: str = "error") -> COCO:
    """Loads a COCO instances JSON with pycocotools, without its prints.

    The file is read and checked by ``read_annotation_json`` (errors name the path).
    ``id_problems`` (duplicate ids, annotations of unknown images) raise with
    ``structure_policy="error"`` (``data.structure_policy``) and are logged with "warn".
    """
    if structure_policy not in STRUCTURE_POLICIES:
        raise ValueError(
            f"data.structure_policy must be one of {', '.join(STRUCTURE_POLICIES)}, got {structure_policy!r}"
        )
    data = read_annotation_json(annotation_path)
    problems = id_problems(data)
    if problems and structure_policy == "error":
        raise ValueError(
            f"{annotation_path}: "
            + "; ".join(problems)
            + ". Fix the file (scripts/check_dataset.py lists every "
            "problem) or set data.structure_policy=warn to train on what pycocotools keeps."
        )
    for problem in problems:
        _LOG.warning("%s: %s (data.structure_policy=warn)", annotation_path, problem)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = data
        try:
            coco.createIndex()
        except (KeyError, TypeError) as e:  # pycocotools indexes every entry by its "id"
            raise ValueError(
                f"{annotation_path}: an image, annotation or category entry is malformed "
                f"({type(e).__name__}: {e}); each needs an 'id' (annotations also 'image_id')"
            ) from None
    return coco


def resolve_image_path(image_dir: str, file_name: str) -> str:
    """``image_dir/file_name``, refusing names that escape ``image_dir``.

    Raises:
      ValueError: naming ``file_name`` when it is absolute outside ``image_dir``
        or climbs out with ``..``. The check is lexical, so an image folder that
        is itself a symlink works.
    """
    root = os.path.abspath(image_dir)
    full = os.path.abspath(os.path.join(root, file_name))
    if os.path.commonpath([root, full]) != root:
        raise ValueError(f"image file name {file_name!r} points outside the image folder {image_dir!r}")
    return full


def _xywh_to_yxyx(bbox, where: str) -> np.ndarray:
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise ValueError(f"{where}: bbox must be [x, y, width, height], got {bbox!r}")
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: bbox must hold 4 numbers, got {bbox!r}") from None
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise ValueError(f"{where}: bbox has a non-finite coordinate (NaN or Inf): {bbox!r}")
    return np.asarray([y, x, y + h, x + w], np.float64)


def _checked_image(info: dict, image_id, image_dir: str, check_files: bool) -> tuple[str, int, int]:
    """``(path, height, width)`` of one ``images`` entry, checked (errors name the image)."""
    for key in ("file_name", "height", "width"):
        if key not in info:
            raise ValueError(f"image {image_id} in the COCO JSON has no {key!r}")
    height, width = int(info["height"]), int(info["width"])
    if height <= 0 or width <= 0:
        raise ValueError(f"image {image_id} ({info['file_name']}) has size {height}x{width}")
    path = resolve_image_path(image_dir, info["file_name"])
    if check_files and not os.path.isfile(path):
        raise FileNotFoundError(f"image file {info['file_name']!r} (image {image_id}) not found: {path}")
    return path, height, width


def records_from_coco(
    coco: COCO, image_dir: str, check_files: bool = True, with_masks: bool = False
) -> tuple[list[ImageRecord], LabelMap, CocoJsonStats]:
    """Converts a loaded ``COCO`` object to records (sorted by image id).

    ``with_masks`` keeps (and checks) the ``segmentation`` of every kept box.

    Raises:
      FileNotFoundError: naming the first image file that does not exist
        (when ``check_files``).
      ValueError: a file name escaping ``image_dir``, an image without
        height/width, or an annotation whose category is not in ``categories``
        or whose bbox is not 4 finite numbers (naming the annotation id).
      masks.SegmentationError (a ValueError): with masks, naming the annotation
        whose segmentation is missing or malformed.
    """
    label_map = LabelMap.from_coco(coco)
    stats = CocoJsonStats()
    records = []
    zero_area_ids = []
    for image_id in sorted(coco.getImgIds()):
        path, height, width = _checked_image(coco.imgs[image_id], image_id, image_dir, check_files)
        boxes, labels, crowd, segmentations = [], [], [], []
        limit = np.asarray([height, width, height, width], np.float64)
        for ann in coco.imgToAnns.get(image_id, []):
            where = f"annotation {ann.get('id')} of image {image_id}"
            if not isinstance(ann.get("category_id"), int) or ann["category_id"] not in label_map:
                raise ValueError(f"{where}: category_id {ann.get('category_id')} is not in the categories")
            box = _xywh_to_yxyx(ann.get("bbox"), where)
            clipped = np.clip(box, 0.0, limit)
            if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
                stats.num_zero_area_dropped += 1
                zero_area_ids.append(ann.get("id"))
            elif ann.get("iscrowd", 0):
                stats.num_crowd += 1
                crowd.append(clipped)
            else:
                stats.num_clipped += not np.array_equal(clipped, box)
                if with_masks:
                    segmentations.append(check_segmentation(ann.get("segmentation"), height, width, where))
                boxes.append(clipped)
                labels.append(label_map.label_of(ann["category_id"]))
        stats.num_images += 1
        stats.num_boxes += len(boxes)
        stats.num_images_without_boxes += not boxes
        records.append(
            ImageRecord(
                image_id=int(image_id),
                path=path,
                height=height,
                width=width,
                boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
                labels=np.asarray(labels, np.int32),
                crowd_boxes=np.asarray(crowd, np.float32).reshape(-1, 4),
                segmentations=segmentations if with_masks else None,
            )
        )
    if zero_area_ids:
        _LOG.warning(
            "dropped %d boxes with zero area after clipping to their image (annotation ids %s%s)",
            len(zero_area_ids),
            zero_area_ids[:5],
            "..." if len(zero_area_ids) > 5 else "",
        )
    return records, label_map, stats


def load_coco_json(annotation_path: str, image_dir: str) -> tuple[list[ImageRecord], LabelMap, CocoJsonStats]:
    """Loads ``annotation_path`` (COCO instances JSON) with images in ``image_dir``.

    Returns ``(records, label_map, stats)``; see ``records_from_coco``.
    """
    return records_from_coco(load_coco(annotation_path), image_dir)
