"""Opt-in bfloat16 inference (ModelConfig.compute_dtype): float32 weights, float32 box maths,
the same detections as float32 on a trained tiny model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf
from tiny import tiny_model_config

import fpn_tf
from fpn_tf.models.faster_rcnn import FasterRCNN

CONFIDENT = 0.5  # float32 detections at least this sure must be found by bfloat16


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU [n, m] of (y1, x1, y2, x2) boxes a [n, 4] and b [m, 4]."""
    y1 = np.maximum(a[:, None, 0], b[None, :, 0])
    x1 = np.maximum(a[:, None, 1], b[None, :, 1])
    y2 = np.minimum(a[:, None, 2], b[None, :, 2])
    x2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(y2 - y1, 0, None) * np.clip(x2 - x1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a[:, None] + area_b[None, :] - inter)


@pytest.fixture(scope="module")
def trained_checkpoint(trained_tiny):
    """The shared tiny float32 model trained until it detects shapes (conftest)."""
    return trained_tiny["config"], trained_tiny["checkpoint"], trained_tiny["data"]


def _detect(model, data):
    inputs = {"images": tf.constant(data["images"]), "image_info": tf.constant(data["image_info"])}
    return {k: v.numpy() for k, v in tf.function(lambda x: model(x, training=False))(inputs).items()}


@pytest.mark.slow
def test_bfloat16_loads_float32_checkpoint_and_matches_float32_detections(trained_checkpoint):
    cfg, path, data = trained_checkpoint
    f32 = fpn_tf.build_faster_rcnn(config=cfg)
    bf16 = fpn_tf.build_faster_rcnn(config=dataclasses.replace(cfg, compute_dtype="mixed_bfloat16"))
    for model in (f32, bf16):
        tf.train.Checkpoint(model=model).read(path).assert_existing_objects_matched()

    # Weights stay float32; convs and fcs compute in bfloat16; box maths in float32.
    assert {v.dtype for v in bf16.weights} == {"float32"}
    resnet = bf16.pyramid.get_layer(cfg.backbone.name)
    assert {layer.compute_dtype for layer in resnet.layers[1:]} == {"bfloat16"}
    assert bf16.rpn_head.compute_dtype == "bfloat16" and bf16.box_head.compute_dtype == "bfloat16"
    for layer in (bf16.proposal_generator, bf16.roi_pooler, bf16.detection_generator):
        assert layer.compute_dtype == "float32"
    # ... and the same values as the float32 model.
    for a, b in zip(f32.weights, bf16.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())

    out32, out16 = _detect(f32, data), _detect(bf16, data)
    assert out16["detection_boxes"].dtype == np.float32 and out16["detection_classes"].dtype == np.int32
    confident, matched_ious = 0, []
    for i in range(len(data["images"])):
        n32, n16 = int(out32["num_detections"][i]), int(out16["num_detections"][i])
        keep = out32["detection_scores"][i, :n32] >= CONFIDENT
        if not keep.any():
            continue
        assert n16 > 0, f"image {i}: bfloat16 found nothing"
        boxes32 = out32["detection_boxes"][i, :n32][keep]
        classes32 = out32["detection_classes"][i, :n32][keep]
        iou = _iou(boxes32, out16["detection_boxes"][i, :n16])
        best = iou.argmax(axis=1)
        # The same object (IoU >= 0.75) every time; bfloat16 rounding of the box deltas
        # may move a box a little (e.g. IoU 0.84 once in 40), so tight overlap is asked of
        # the detections as a whole below, not of each.
        assert (iou.max(axis=1) >= 0.75).all(), f"image {i}: matched IoUs {iou.max(axis=1)}"
        matched_ious.extend(iou.max(axis=1).tolist())
        np.testing.assert_array_equal(out16["detection_classes"][i, :n16][best], classes32)
        np.testing.assert_allclose(
            out16["detection_scores"][i, :n16][best], out32["detection_scores"][i, :n32][keep], atol=0.1
        )
        confident += int(keep.sum())
    assert np.mean(matched_ious) >= 0.95 and np.mean(np.array(matched_ious) >= 0.9) >= 0.9
    # The trained model is sure about most of the objects drawn.
    assert confident >= int((data["gt_classes"] > 0).sum()) // 2


def test_compute_dtype_round_trips_and_rejects_unknown():
    cfg = tiny_model_config(num_classes=3, compute_dtype="mixed_bfloat16")
    model = fpn_tf.build_faster_rcnn(config=cfg)
    clone = FasterRCNN.from_config(model.get_config())
    assert clone.config.compute_dtype == "mixed_bfloat16"
    assert clone.box_head.compute_dtype == "bfloat16"
    with pytest.raises(ValueError, match="compute_dtype must be one of float32, mixed_bfloat16, got 'float1"):
        fpn_tf.build_faster_rcnn(config=tiny_model_config(compute_dtype="float16"))
