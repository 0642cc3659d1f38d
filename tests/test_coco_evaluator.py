"""pycocotools AP / AR on hand-made ground truth with known answers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fpn_tf.data.label_map import LabelMap
from fpn_tf.evaluation import coco_evaluator as ce

# (image_id, category_id, [x, y, w, h]): a small (20²), a medium (50²) and a large (120²) object.
GT = [
    (1, 3, [10.0, 10.0, 20.0, 20.0]),
    (1, 7, [100.0, 40.0, 50.0, 50.0]),
    (2, 7, [30.0, 60.0, 120.0, 120.0]),
    (3, 3, [0.0, 0.0, 50.0, 40.0]),
]


def gt_dict() -> dict:
    return {
        "images": [{"id": i, "height": 256, "width": 256, "file_name": f"{i}.png"} for i in (1, 2, 3)],
        "categories": [{"id": 3, "name": "three"}, {"id": 7, "name": "seven"}],
        "annotations": [
            {"id": k + 1, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for k, (i, c, b) in enumerate(GT)
        ],
    }


def perfect() -> list[dict]:
    return [{"image_id": i, "category_id": c, "bbox": list(b), "score": 0.9} for i, c, b in GT]


def test_perfect_detections_give_ap_one():
    metrics = ce.evaluate_detections(gt_dict(), perfect())
    assert set(metrics) == set(ce.DETECTION_METRICS)
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"):
        assert metrics[key] == pytest.approx(1.0), key


def test_empty_detections_give_zero():
    metrics = ce.evaluate_detections(gt_dict(), [])
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"):
        assert metrics[key] == 0.0, key


def test_ap_at_a_known_iou(tmp_path):
    """One detection per GT, each with IoU 0.62: matched at thresholds 0.50, 0.55, 0.60 → AP 0.3."""
    dets = []
    for i, c, (x, y, w, h) in GT:
        # shift right by d: IoU = (w - d) / (w + d) = 0.62  →  d = w * 0.38 / 1.62
        d = w * 0.38 / 1.62
        dets.append({"image_id": i, "category_id": c, "bbox": [x + d, y, w, h], "score": 0.8})
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt_dict()))
    metrics = ce.evaluate_detections(str(path), dets)
    assert metrics["AP50"] == pytest.approx(1.0)
    assert metrics["AP75"] == pytest.approx(0.0)
    assert metrics["AP"] == pytest.approx(0.3)


def test_wrong_category_and_image_subset():
    dets = perfect()
    dets[0]["category_id"] = 7  # the small box labelled "seven": a false positive and a miss
    metrics = ce.evaluate_detections(gt_dict(), dets)
    assert metrics["APs"] == pytest.approx(0.0)
    assert metrics["APl"] == pytest.approx(1.0)
    only_2 = ce.evaluate_detections(gt_dict(), dets, image_ids=[2])
    assert only_2["AP"] == pytest.approx(1.0)
    assert only_2["APs"] == -1.0  # image 2 has no small object: pycocotools' "no GT"
    with pytest.raises(ValueError, match="not in the ground truth"):
        ce.evaluate_detections(gt_dict(), dets, image_ids=[99])


def test_proposal_recall_at_100_and_1000():
    """Image 2's only box is found by its 150th proposal: in AR@1000 but not in AR@100."""
    gt = gt_dict()
    rng = np.random.default_rng(0)
    proposals = []
    for i, _, b in GT:
        if i == 2:
            proposals.append({"image_id": i, "bbox": list(b), "score": 0.01})
        else:
            proposals.append({"image_id": i, "bbox": list(b), "score": 0.9})
    for k in range(149):  # 149 higher-scored junk boxes far from image 2's object
        x, y = rng.uniform(200, 240, 2)
        proposals.append({"image_id": 2, "bbox": [x, y, 5.0, 5.0], "score": 0.5 + k * 1e-3})
    ar = ce.evaluate_proposals(gt, proposals)
    assert set(ar) == set(ce.PROPOSAL_METRICS)
    assert ar["AR@1000"] == pytest.approx(1.0)
    assert ar["AR@100"] == pytest.approx(0.75)  # 3 of 4 objects
    assert ar["ARs@1000"] == pytest.approx(1.0)
    assert ar["ARm@1000"] == pytest.approx(1.0)
    assert ar["ARl@1000"] == pytest.approx(1.0)
    none = ce.evaluate_proposals(gt, [])
    assert none["AR@1000"] == 0.0


def test_class_agnostic_proposals_ignore_categories():
    proposals = [{"image_id": i, "bbox": list(b), "score": 1.0, "category_id": 3} for i, _, b in GT]
    assert ce.evaluate_proposals(gt_dict(), proposals)["AR@100"] == pytest.approx(1.0)


def test_detections_to_coco_converts_boxes_labels_and_padding():
    label_map = LabelMap([7, 3], ["seven", "three"])  # labels: 3 -> 1, 7 -> 2
    boxes = np.zeros((2, 3, 4), np.float32)
    boxes[0, 0] = (10, 20, 50, 80)  # y1, x1, y2, x2
    boxes[0, 1] = (0, 0, 5, 5)
    boxes[1, 0] = (1, 2, 3, 4)
    scores = np.array([[0.9, 0.5, 0.0], [0.7, 0.0, 0.0]], np.float32)
    classes = np.array([[1, 2, 0], [2, 0, 0]], np.int32)
    out = ce.detections_to_coco([11, 12], boxes, scores, classes, [2, 1], label_map)
    assert len(out) == 3
    assert out[0]["score"] == pytest.approx(0.9)
    assert {**out[0], "score": 0.9} == {
        "image_id": 11,
        "category_id": 3,
        "bbox": [20.0, 10.0, 60.0, 40.0],
        "score": 0.9,
    }
    assert out[1]["category_id"] == 7 and out[1]["bbox"] == [0.0, 0.0, 5.0, 5.0]
    assert out[2]["image_id"] == 12 and out[2]["bbox"] == [2.0, 1.0, 2.0, 2.0]
    assert ce.detections_to_coco([11], boxes[:1], scores[:1], classes[:1], [0], label_map) == []
    with pytest.raises(ValueError, match="batch size"):
        ce.detections_to_coco([11, 12, 13], boxes, scores, classes, [2, 1])


def test_model_outputs_round_trip_to_ap_one():
    """GT → (y1, x1, y2, x2) model-style outputs → COCO dicts → AP 1."""
    label_map = LabelMap([3, 7], ["three", "seven"])
    image_ids = [1, 2, 3]
    boxes = np.zeros((3, 4, 4), np.float32)
    classes = np.zeros((3, 4), np.int32)
    scores = np.zeros((3, 4), np.float32)
    counts = [0, 0, 0]
    for i, c, (x, y, w, h) in GT:
        row = image_ids.index(i)
        boxes[row, counts[row]] = (y, x, y + h, x + w)
        classes[row, counts[row]] = label_map.label_of(c)
        scores[row, counts[row]] = 0.8
        counts[row] += 1
    dets = ce.detections_to_coco(image_ids, boxes, scores, classes, counts, label_map)
    assert ce.evaluate_detections(gt_dict(), dets)["AP"] == pytest.approx(1.0)
    props = ce.proposals_to_coco(image_ids, boxes, scores, counts)
    assert ce.evaluate_proposals(gt_dict(), props)["AR@100"] == pytest.approx(1.0)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="annotations"):
        ce.evaluate_detections({"images": [], "categories": []}, [])
    with pytest.raises(ValueError, match="missing"):
        ce.evaluate_detections(gt_dict(), [{"image_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}])


# ---------------------------------------------------------------- masks (segm)


def _disk_in(box, hw=(256, 256), shift=0) -> np.ndarray:
    x, y, w, h = box
    yy, xx = np.mgrid[0 : hw[0], 0 : hw[1]] + 0.5
    return (((yy - y - h / 2) / (h / 2)) ** 2 + ((xx - x - w / 2 - shift) / (w / 2)) ** 2 <= 1).astype(
        np.uint8
    )


def segm_gt_dict() -> dict:
    """GT of ``GT`` whose masks are the ellipses inscribed in the boxes (RLE), plus one polygon object."""
    gt = gt_dict()
    for ann, (_, _, box) in zip(gt["annotations"], GT):
        m = _disk_in(box)
        ann["segmentation"] = ce.mask_to_rle(m)
        ann["area"] = float(m.sum())
    triangle = [200.0, 200.0, 250.0, 200.0, 225.0, 250.0]
    gt["annotations"].append(
        {"id": 9, "image_id": 3, "category_id": 7, "bbox": [200.0, 200.0, 50.0, 50.0], "area": 1250.0,
         "iscrowd": 0, "segmentation": [triangle]}
    )  # fmt: skip
    return gt


def _gt_masks(gt: dict) -> list[tuple[int, int, np.ndarray, list]]:
    coco = ce.load_coco(gt)
    return [(a["image_id"], a["category_id"], coco.annToMask(a), a["bbox"]) for a in gt["annotations"]]


def test_perfect_masks_give_segm_ap_one_and_shifted_ones_less():
    gt = segm_gt_dict()
    objects = _gt_masks(gt)
    perfect_masks = [
        {"image_id": i, "category_id": c, "segmentation": ce.mask_to_rle(m), "score": 0.9, "bbox": b}
        for i, c, m, b in objects
    ]
    metrics = ce.evaluate_detections(gt, perfect_masks, iou_type="segm")
    assert set(metrics) == set(ce.DETECTION_METRICS)
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"):
        assert metrics[key] == pytest.approx(1.0), key
    # the same masks moved right by 3 pixels: all still found at IoU 0.5, fewer at the strict thresholds
    shifted = [{**d, "segmentation": ce.mask_to_rle(np.roll(m, 3, axis=1))} for d, (_, _, m, _) in
               zip(perfect_masks, objects)]  # fmt: skip
    worse = ce.evaluate_detections(gt, shifted, iou_type="segm")
    assert worse["AP50"] == pytest.approx(1.0)
    assert 0.2 < worse["AP"] < 0.9 and worse["APs"] < worse["APl"]
    # boxes stay perfect: box AP of the shifted masks' dicts is still 1 (the box is not read for segm)
    assert ce.evaluate_detections(gt, shifted)["AP"] == pytest.approx(1.0)
    assert ce.evaluate_detections(gt, [], iou_type="segm")["AP"] == 0.0


def test_box_relative_masks_round_trip_through_detections_to_coco():
    """GT masks cropped to their boxes at 28 x 28 (the data path), pasted back like torchvision: AP50 1."""
    from fpn_tf.data.masks import crop_mask

    gt = segm_gt_dict()
    by_image: dict[int, list] = {}
    for i, c, m, (x, y, w, h) in _gt_masks(gt):
        box = np.asarray([y, x, y + h, x + w], np.float32)
        by_image.setdefault(i, []).append((c, box, crop_mask(ce.mask_to_rle(m), box, 28)))
    label_map = LabelMap([3, 7], ["three", "seven"])
    ids = sorted(by_image)
    d = max(len(v) for v in by_image.values())
    boxes, masks = np.zeros((len(ids), d, 4), np.float32), np.zeros((len(ids), d, 28, 28), np.float32)
    classes, num = np.zeros((len(ids), d), np.int32), np.zeros(len(ids), np.int32)
    for row, i in enumerate(ids):
        for k, (c, box, m) in enumerate(by_image[i]):
            boxes[row, k], masks[row, k], classes[row, k] = box, m, label_map.label_of(c)
        num[row] = len(by_image[i])
    dets = ce.detections_to_coco(
        ids,
        boxes,
        np.full(classes.shape, 0.9),
        classes,
        num,
        label_map,
        masks=masks,
        image_hw=[[256, 256]] * 3,
    )
    assert len(dets) == 5 and all(set(r["segmentation"]) == {"size", "counts"} for r in dets)
    metrics = ce.evaluate_detections(gt, dets, iou_type="segm")
    assert metrics["AP50"] == pytest.approx(1.0) and metrics["AP"] > 0.8
    with pytest.raises(ValueError, match="image_hw"):
        ce.detections_to_coco(ids, boxes, np.ones(classes.shape), classes, num, masks=masks)
    with pytest.raises(ValueError, match=r"\[B, D, M, M\]"):
        ce.detections_to_coco(
            ids, boxes, np.ones(classes.shape), classes, num, masks=masks[:, :1], image_hw=[[1, 1]] * 3
        )


def test_segm_needs_gt_segmentations_and_result_segmentations():
    with pytest.raises(ValueError, match="annotation 1 of image 1 has none"):
        ce.evaluate_detections(gt_dict(), perfect(), iou_type="segm")
    with pytest.raises(ValueError, match="missing {'segmentation'}"):
        ce.evaluate_detections(segm_gt_dict(), perfect(), iou_type="segm")
    with pytest.raises(ValueError, match="iou_type"):
        ce.evaluate_detections(gt_dict(), perfect(), iou_type="keypoints")


def test_segment_proposal_recall_at_10_100_1000():
    """Class-agnostic segment AR: image 2's object is proposed 50th (AR@10 misses it), image 3's 150th."""
    gt = segm_gt_dict()
    rng = np.random.default_rng(0)
    proposals = []
    late = {2: 0.02, 3: 0.01}
    for i, _, m, _ in _gt_masks(gt):
        score = late.get(i, 0.9) if not (i == 3 and m.sum() < 1300) else 0.9  # the triangle is found early
        proposals.append({"image_id": i, "segmentation": ce.mask_to_rle(m), "score": score, "category_id": 3})
    for image_id, count in ((2, 49), (3, 149)):
        for k in range(count):  # higher-scored junk segments far from the objects
            junk = np.zeros((256, 256), np.uint8)
            y, x = rng.integers(230, 250, 2)
            junk[y : y + 4, x : x + 4] = 1
            proposals.append(
                {"image_id": image_id, "segmentation": ce.mask_to_rle(junk), "score": 0.5 + k * 1e-3}
            )
    ar = ce.evaluate_segment_ar(gt, proposals)
    assert set(ar) == set(ce.SEGMENT_PROPOSAL_METRICS)
    # 5 objects: image 1's two and the triangle early; image 2's ellipse 50th; image 3's ellipse 150th
    assert ar["AR@10"] == pytest.approx(3 / 5)
    assert ar["AR@100"] == pytest.approx(4 / 5)
    assert ar["AR@1000"] == pytest.approx(1.0)
    assert ar["ARs@1000"] == ar["ARm@1000"] == ar["ARl@1000"] == pytest.approx(1.0)
    assert ce.evaluate_segment_ar(gt, [])["AR@1000"] == 0.0
