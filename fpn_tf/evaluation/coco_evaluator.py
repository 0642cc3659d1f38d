"""COCO box AP and proposal AR with pycocotools.

- ``evaluate_detections``: the standard COCO detection metrics (AP at IoU
  0.50:0.95, AP50, AP75, APs/m/l and the ARs), as in the FPN paper's Tables 2–4.
- ``evaluate_proposals``: class-agnostic average recall of proposals, AR@100,
  AR@1000 and ARs/m/l@1000 (paper §5.1, Table 1; Hosang et al.'s AR over IoU
  0.50:0.95 as computed by COCO). pycocotools' ``summarize()`` only reports
  s/m/l recall at its last maxDets, so these are read from COCOeval's recall
  array directly.
- ``evaluate_detections(..., iou_type="segm")``: the same twelve metrics for
  instance masks (mask AP of Mask R-CNN), scored on RLE masks.
- ``evaluate_segment_ar``: class-agnostic average recall of segment
  proposals, AR@10/100/1000 and ARs/m/l@1000 with ``iouType="segm"`` and
  ``useCats=0`` (paper §6, Table 6).

pycocotools prints to stdout; everything here runs with stdout redirected.
Metrics follow pycocotools: a value of -1 means the GT holds no object in that
range (e.g. APs when there are no small objects). Empty detections are valid
input and give AP 0 (no crash).

Model outputs are (y1, x1, y2, x2) boxes in original-image pixels with
contiguous labels; ``detections_to_coco`` / ``proposals_to_coco`` turn them into
COCO result dicts (``bbox`` = [x, y, w, h]) with dataset category ids. Masks
come as box-relative probabilities ``[B, D, M, M]``; each is pasted into the
original image (``mask_ops.paste_mask_numpy``, torchvision's rule), thresholded
at 0.5 and encoded as RLE one at a time, so no ``[D, h, w]`` array is held.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from collections.abc import Iterable

import numpy as np
import pycocotools.mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from fpn_tf.ops.mask_ops import paste_mask_numpy

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
SEGMENT_PROPOSAL_METRICS = ("AR@10", "AR@100", "AR@1000", "ARs@1000", "ARm@1000", "ARl@1000")
IOU_TYPES = ("bbox", "segm")


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


def _load_results(coco_gt: COCO, results: list[dict], iou_type: str = "bbox") -> COCO:
    """``coco_gt.loadRes`` that also accepts an empty result list."""
    need = {"image_id", "category_id", "score", "bbox" if iou_type == "bbox" else "segmentation"}
    for r in results[:1]:
        missing = need - set(r)
        if missing:
            raise ValueError(f"{iou_type} result dicts need {sorted(need)}; missing {missing}")
    if iou_type == "segm":
        # loadRes takes the area of a result from its bbox when both are given; for
        # masks the area must be the mask's own (as Detectron2: drop the boxes).
        results = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
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


def _check_gt_segmentations(coco_gt: COCO) -> None:
    for ann in coco_gt.dataset.get("annotations", []):
        if not ann.get("segmentation"):
            raise ValueError(
                f"mask metrics need a segmentation for every ground-truth annotation; annotation "
                f"{ann.get('id')} of image {ann.get('image_id')} has none (tfds coco/2017 stores no masks: "
                "use the COCO instances JSON)"
            )


def _run_cocoeval(
    coco_gt: COCO, results: list[dict], image_ids, use_cats: bool, max_dets, iou_type: str = "bbox"
) -> COCOeval:
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    if iou_type == "segm":
        _check_gt_segmentations(coco_gt)
    coco_dt = _load_results(coco_gt, results, iou_type)
    evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
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
    coco_gt: COCO | str | dict,
    detections: list[dict],
    image_ids: Iterable[int] | None = None,
    iou_type: str = "bbox",
) -> dict[str, float]:
    """COCO box (or mask) metrics of ``detections`` against ``coco_gt``.

    Args:
        coco_gt: ground truth (COCO object, instances JSON path, or its dict);
            with ``iou_type="segm"`` every annotation needs a ``segmentation``.
        detections: ``{"image_id", "category_id", "bbox": [x, y, w, h] pixels,
            "score"}`` per detection (dataset category ids), plus
            ``"segmentation"`` (RLE) for ``iou_type="segm"``.
        image_ids: evaluate these images only (default: every GT image).
        iou_type: "bbox" (box AP) or "segm" (mask AP, IoU of RLE masks).

    Returns:
        ``{"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100",
        "ARs", "ARm", "ARl"}`` as fractions in [0, 1] (-1: no GT in that range).
    """
    coco_gt = load_coco(coco_gt)
    evaluator = _run_cocoeval(
        coco_gt, list(detections), image_ids, use_cats=True, max_dets=(1, 10, 100), iou_type=iou_type
    )
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


def evaluate_segment_ar(
    coco_gt: COCO | str | dict, proposals: list[dict], image_ids: Iterable[int] | None = None
) -> dict[str, float]:
    """Class-agnostic average recall of segment proposals (paper §6, Table 6).

    Args:
        coco_gt: ground truth with a ``segmentation`` for every annotation.
        proposals: ``{"image_id", "segmentation": RLE, "score"}`` per proposal
            (a ``category_id`` is ignored); the best 1000 per image are used.
        image_ids: evaluate these images only (default: every GT image).

    Returns:
        ``{"AR@10", "AR@100", "AR@1000", "ARs@1000", "ARm@1000", "ARl@1000"}``:
        mask recall averaged over IoU 0.50:0.05:0.95, -1 without GT. Object size
        ranges use the GT ``area`` (COCO's segment area), as COCOeval does.
    """
    coco_gt = load_coco(coco_gt)
    any_category = coco_gt.getCatIds()[0] if coco_gt.getCatIds() else 1
    results = [{**p, "category_id": any_category} for p in proposals]
    evaluator = _run_cocoeval(
        coco_gt, results, image_ids, use_cats=False, max_dets=(10, 100, 1000), iou_type="segm"
    )
    recall = evaluator.eval["recall"]  # [T, 1, areas, maxDets]
    index = {name: i for i, name in enumerate(evaluator.params.areaRngLbl)}
    return {
        "AR@10": _mean_recall(recall[:, :, index["all"], 0]),
        "AR@100": _mean_recall(recall[:, :, index["all"], 1]),
        "AR@1000": _mean_recall(recall[:, :, index["all"], 2]),
        "ARs@1000": _mean_recall(recall[:, :, index["small"], 2]),
        "ARm@1000": _mean_recall(recall[:, :, index["medium"], 2]),
        "ARl@1000": _mean_recall(recall[:, :, index["large"], 2]),
    }


def mask_to_rle(mask: np.ndarray) -> dict:
    """Binary ``[h, w]`` -> COCO RLE with ``str`` counts (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def pasted_mask_rle(mask: np.ndarray, box, image_hw, threshold: float = 0.5) -> dict:
    """One box-relative probability mask ``[M, M]`` + its box (y1, x1, y2, x2 original
    pixels) -> the RLE of ``paste_mask_numpy(...) > threshold`` at ``image_hw``."""
    return mask_to_rle(paste_mask_numpy(mask, box, image_hw) > threshold)


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
    masks=None,
    image_hw=None,
) -> list[dict]:
    """Batched model detections → COCO result dicts.

    Args:
        image_ids: [B] dataset image ids.
        boxes: [B, D, 4] (y1, x1, y2, x2) in original-image pixels.
        scores: [B, D]; classes: [B, D] contiguous labels 1..K-1.
        num_detections: [B] valid rows per image (the rest is padding).
        label_map: maps labels to dataset category ids (``to_category_id``);
            None keeps the labels as category ids.
        masks: optional [B, D, M, M] box-relative mask probabilities; each
            detection then also gets ``"segmentation"`` (RLE of the pasted mask
            > 0.5, see ``pasted_mask_rle``).
        image_hw: [B, 2] original (height, width) per image; needed with masks
            (``image_info[:, :2]``).
    """
    image_ids = np.asarray(image_ids).reshape(-1)
    boxes, scores = np.asarray(boxes, np.float64), np.asarray(scores, np.float64)
    classes, num_detections = np.asarray(classes), np.asarray(num_detections).reshape(-1)
    if boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [B, D, 4], got shape {boxes.shape}")
    if not (len(image_ids) == len(boxes) == len(scores) == len(classes) == len(num_detections)):
        raise ValueError("image_ids, boxes, scores, classes and num_detections differ in batch size")
    if masks is not None:
        masks, image_hw = _check_masks(masks, image_hw, boxes.shape[:2])
    out = []
    for i, image_id in enumerate(image_ids):
        n = int(num_detections[i])
        if n == 0:
            continue
        labels = classes[i, :n]
        categories = label_map.to_category_id(labels) if label_map is not None else labels
        for k, (box, score, category) in enumerate(
            zip(_yxyx_to_xywh(boxes[i, :n]), scores[i, :n], categories)
        ):
            out.append(
                {
                    "image_id": int(image_id),
                    "category_id": int(category),
                    "bbox": [round(float(v), 3) for v in box],
                    "score": float(score),
                }
            )
            if masks is not None:
                out[-1]["segmentation"] = pasted_mask_rle(masks[i, k], boxes[i, k], image_hw[i])
    return out


def _check_masks(masks, image_hw, batch_dets):
    masks = np.asarray(masks, np.float32)
    if masks.ndim != 4 or masks.shape[:2] != tuple(batch_dets) or masks.shape[2] != masks.shape[3]:
        raise ValueError(f"masks must be [B, D, M, M] matching boxes {tuple(batch_dets)}, got {masks.shape}")
    if image_hw is None:
        raise ValueError("masks need image_hw: [B, 2] original (height, width) of each image")
    image_hw = np.asarray(image_hw).reshape(-1, 2).round().astype(np.int64)
    if len(image_hw) != batch_dets[0]:
        raise ValueError(f"image_hw has {len(image_hw)} rows for a batch of {batch_dets[0]}")
    return masks, image_hw


def proposals_to_coco(image_ids, boxes, scores, num_proposals, masks=None, image_hw=None) -> list[dict]:
    """Batched proposals ([B, N, 4] yxyx original pixels, [B, N], [B]) → COCO dicts (no category).

    With ``masks`` [B, N, M, M] (box-relative probabilities over ``boxes``) and
    ``image_hw`` [B, 2], each proposal also gets its pasted ``"segmentation"``
    (RLE), for ``evaluate_segment_ar``.
    """
    image_ids = np.asarray(image_ids).reshape(-1)
    boxes, scores = np.asarray(boxes, np.float64), np.asarray(scores, np.float64)
    num_proposals = np.asarray(num_proposals).reshape(-1)
    if masks is not None:
        masks, image_hw = _check_masks(masks, image_hw, boxes.shape[:2])
    out = []
    for i, image_id in enumerate(image_ids):
        n = int(num_proposals[i])
        for k, (box, score) in enumerate(zip(_yxyx_to_xywh(boxes[i, :n]), scores[i, :n])):
            out.append({"image_id": int(image_id), "bbox": [float(v) for v in box], "score": float(score)})
            if masks is not None:
                out[-1]["segmentation"] = pasted_mask_rle(masks[i, k], boxes[i, k], image_hw[i])
    return out
