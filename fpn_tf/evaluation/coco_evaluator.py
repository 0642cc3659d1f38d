"""COCO box AP and proposal AR with pycocotools.

- ``evaluate_detections``: the standard COCO detection metrics (AP at IoU
  0.50:0.95, AP50, AP75, APs/m/l and the ARs), as in the FPN paper's Tables 2–4.
- ``evaluate_proposals``: class-agnostic average recall of proposals, AR@100,
  AR@1000 and ARs/m/l@1000 (paper §5.1, Table 1; Hosang et al.'s AR over IoU
  0.50:0.95 as computed by COCO). pycocotools' ``summarize()`` only reports
  s/m/l recall at its last maxDets, so these are read from COCOeval's recall
  array directly.

pycocotools prints to stdout; everything here runs with stdout redirected.
Metrics follow pycocotools: a value of -1 means the GT holds no object in that
range (e.g. APs when there are no small objects). Empty detections are valid
input and give AP 0 (no crash).

Model outputs are (y1, x1, y2, x2) boxes in original-image pixels with
contiguous labels; ``detections_to_coco`` / ``proposals_to_coco`` turn them into
COCO result dicts (``bbox`` = [x, y, w, h]) with dataset category ids.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from collections.abc import Iterable

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

DETECTION_METRICS = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)
PROPOSAL_METRICS = ("AR@100", "AR@1000", "ARs@1000", "ARm@1000", "ARl@1000")


def load_coco(coco_gt: COCO | str | dict) -> COCO:
    """A pycocotools COCO from a COCO object, an annotation JSON path, or its dict."""
    if isinstance(coco_gt, COCO):
        return coco_gt
    if isinstance(coco_gt, str):
        with open(coco_gt, encoding="utf-8") as f:
            dataset = json.load(f)
    elif isinstance(coco_gt, dict):
        dataset = copy.deepcopy(coco_gt)
    else:
        raise TypeError(f"coco_gt must be a COCO object, a JSON path or a dict, got {type(coco_gt).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in dataset:
            raise ValueError(f"COCO ground truth has no {key!r} list")
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _load_results(coco_gt: COCO, results: list[dict]) -> COCO:
    """``coco_gt.loadRes`` that also accepts an empty result list."""
    for r in results[:1]:
        missing = {"image_id", "category_id", "bbox", "score"} - set(r)
        if missing:
            raise ValueError(f"detection dicts need image_id, category_id, bbox, score; missing {missing}")
    with contextlib.redirect_stdout(io.StringIO()):
        if results:
            return coco_gt.loadRes(copy.deepcopy(results))
        empty = COCO()
        empty.dataset = {
            "images": list(coco_gt.dataset["images"]),
            "categories": copy.deepcopy(coco_gt.dataset.get("categories", [])),
            "annotations": [],
        }
        empty.createIndex()
        return empty


def _run_cocoeval(coco_gt: COCO, results: list[dict], image_ids, use_cats: bool, max_dets) -> COCOeval:
    coco_dt = _load_results(coco_gt, results)
    evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
    if image_ids is not None:
        image_ids = sorted({int(i) for i in image_ids})
        unknown = sorted(set(image_ids) - set(coco_gt.getImgIds()))
        if unknown:
            raise ValueError(f"image ids {unknown[:10]} are not in the ground truth")
        evaluator.params.imgIds = image_ids
    evaluator.params.useCats = int(use_cats)
    evaluator.params.maxDets = list(max_dets)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
    return evaluator


def evaluate_detections(
    coco_gt: COCO | str | dict, detections: list[dict], image_ids: Iterable[int] | None = None
) -> dict[str, float]:
    """COCO box metrics of ``detections`` against ``coco_gt``.

    Args:
        coco_gt: ground truth (COCO object, instances JSON path, or its dict).
        detections: ``{"image_id", "category_id", "bbox": [x, y, w, h] pixels,
            "score"}`` per detection (dataset category ids).
        image_ids: evaluate these images only (default: every GT image).

    Returns:
        ``{"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100",
        "ARs", "ARm", "ARl"}`` as fractions in [0, 1] (-1: no GT in that range).
    """
    coco_gt = load_coco(coco_gt)
    evaluator = _run_cocoeval(coco_gt, list(detections), image_ids, use_cats=True, max_dets=(1, 10, 100))
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.summarize()
    return {name: float(v) for name, v in zip(DETECTION_METRICS, evaluator.stats)}


def _mean_recall(recall: np.ndarray) -> float:
    valid = recall[recall > -1]
    return float(valid.mean()) if valid.size else -1.0


def evaluate_proposals(
    coco_gt: COCO | str | dict, proposals: list[dict], image_ids: Iterable[int] | None = None
) -> dict[str, float]:
    """Class-agnostic average recall of object proposals (paper Table 1).

    Args:
        coco_gt: ground truth (any category counts as an object).
        proposals: ``{"image_id", "bbox": [x, y, w, h], "score"}`` per proposal
            (a ``category_id`` is ignored); the best 1000 per image are used.
        image_ids: evaluate these images only (default: every GT image).

    Returns:
        ``{"AR@100", "AR@1000", "ARs@1000", "ARm@1000", "ARl@1000"}``: recall
        averaged over IoU 0.50:0.05:0.95 (COCO's definition), -1 without GT.
    """
    coco_gt = load_coco(coco_gt)
    any_category = coco_gt.getCatIds()[0] if coco_gt.getCatIds() else 1
    results = [{**p, "category_id": any_category} for p in proposals]
    evaluator = _run_cocoeval(coco_gt, results, image_ids, use_cats=False, max_dets=(100, 1000))
    # recall: [num_iou_thresholds, num_categories (1 when class-agnostic), num_areas, num_max_dets]
    recall = evaluator.eval["recall"]
    areas = evaluator.params.areaRngLbl  # ["all", "small", "medium", "large"]
    index = {name: i for i, name in enumerate(areas)}
    return {
        "AR@100": _mean_recall(recall[:, :, index["all"], 0]),
        "AR@1000": _mean_recall(recall[:, :, index["all"], 1]),
        "ARs@1000": _mean_recall(recall[:, :, index["small"], 1]),
        "ARm@1000": _mean_recall(recall[:, :, index["medium"], 1]),
        "ARl@1000": _mean_recall(recall[:, :, index["large"], 1]),
    }


def _yxyx_to_xywh(boxes: np.ndarray) -> np.ndarray:
    y1, x1, y2, x2 = (boxes[..., i] for i in range(4))
    return np.stack([x1, y1, x2 - x1, y2 - y1], axis=-1)


def detections_to_coco(
    image_ids,
    boxes,
    scores,
    classes,
    num_detections,
    label_map=None,
) -> list[dict]:
    """Batched model detections → COCO result dicts.

    Args:
        image_ids: [B] dataset image ids.
        boxes: [B, D, 4] (y1, x1, y2, x2) in original-image pixels.
        scores: [B, D]; classes: [B, D] contiguous labels 1..K.
        num_detections: [B] valid rows per image (the rest is padding).
        label_map: maps labels to dataset category ids (``to_category_id``);
            None keeps the labels as category ids.
    """
    image_ids = np.asarray(image_ids).reshape(-1)
    boxes, scores = np.asarray(boxes, np.float64), np.asarray(scores, np.float64)
    classes, num_detections = np.asarray(classes), np.asarray(num_detections).reshape(-1)
    if boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [B, D, 4], got shape {boxes.shape}")
    if not (len(image_ids) == len(boxes) == len(scores) == len(classes) == len(num_detections)):
        raise ValueError("image_ids, boxes, scores, classes and num_detections differ in batch size")
    out = []
    for i, image_id in enumerate(image_ids):
        n = int(num_detections[i])
        if n == 0:
            continue
        labels = classes[i, :n]
        categories = label_map.to_category_id(labels) if label_map is not None else labels
        for box, score, category in zip(_yxyx_to_xywh(boxes[i, :n]), scores[i, :n], categories):
            out.append(
                {
                    "image_id": int(image_id),
                    "category_id": int(category),
                    "bbox": [round(float(v), 3) for v in box],
                    "score": float(score),
                }
            )
    return out


def proposals_to_coco(image_ids, boxes, scores, num_proposals) -> list[dict]:
    """Batched proposals ([B, N, 4] yxyx original pixels, [B, N], [B]) → COCO dicts (no category)."""
    image_ids = np.asarray(image_ids).reshape(-1)
    boxes, scores = np.asarray(boxes, np.float64), np.asarray(scores, np.float64)
    num_proposals = np.asarray(num_proposals).reshape(-1)
    out = []
    for i, image_id in enumerate(image_ids):
        n = int(num_proposals[i])
        for box, score in zip(_yxyx_to_xywh(boxes[i, :n]), scores[i, :n]):
            out.append({"image_id": int(image_id), "bbox": [float(v) for v in box], "score": float(score)})
    return out
