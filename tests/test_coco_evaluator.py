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
