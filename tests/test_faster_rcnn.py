"""Faster R-CNN + FPN: parameter counts, output contract, XLA, losses, overfitting."""

from __future__ import annotations

import contextlib
import io

import keras
import numpy as np
import pytest
import tensorflow as tf
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tiny import draw_shape_images, tiny_model_config

import fpn_tf
from fpn_tf.models.faster_rcnn import LOSS_KEYS


def _conv_dense_values(model: keras.Model) -> int:
    return sum(int(np.prod(w.shape)) for w in model.weights if w.path.endswith(("kernel", "bias")))


def test_default_model_matches_torchvision_parameter_count():
    model = fpn_tf.build_faster_rcnn()
    # torchvision fasterrcnn_resnet50_fpn: body 23,454,912 + FPN 3,344,384
    # + RPN 593,935 + RoI heads 14,362,055.
    assert _conv_dense_values(model) == 41_755_286
    assert _conv_dense_values(model.rpn_head) == 593_935
    assert _conv_dense_values(model.box_head) == 14_362_055
    assert model.trainable_weight_count() == 41_755_286


def test_build_rejects_unknown_argument():
    with pytest.raises(ValueError, match="rpn_onyl"):
        fpn_tf.build_faster_rcnn(rpn_onyl=True)


def test_inference_contract_in_original_pixels_under_xla():
    cfg = tiny_model_config(num_classes=5)
    model = fpn_tf.build_faster_rcnn(config=cfg)
    # Two images of different original sizes, resized into one padded 192x256 batch.
    images = np.zeros((2, 192, 256, 3), np.float32)
    images[0, :150, :200] = np.random.default_rng(0).uniform(0, 255, (150, 200, 3))
    images[1, :192, :96] = np.random.default_rng(1).uniform(0, 255, (192, 96, 3))
    info = np.array([[300, 400, 150, 200, 0.5, 0.5], [96, 48, 192, 96, 2.0, 2.0]], np.float32)
    inputs = {"images": tf.constant(images), "image_info": tf.constant(info)}
    # A low score threshold so that the untrained model produces detections.
    model.detection_generator.score_threshold = 0.0

    eager = model(inputs, training=False)
    compiled = tf.function(lambda x: model(x, training=False), jit_compile=True)(inputs)
    assert eager["detection_boxes"].shape == (2, 20, 4)
    assert eager["detection_scores"].shape == (2, 20)
    assert eager["detection_classes"].shape == (2, 20)
    assert eager["detection_classes"].dtype == tf.int32
    assert eager["num_detections"].shape == (2,)
    for out in (eager, compiled):
        n = out["num_detections"].numpy()
        assert (n > 0).all()
        boxes = out["detection_boxes"].numpy()
        # Original pixels: within 300x400 for image 0 and 96x48 for image 1.
        assert boxes[0, :, [0, 2]].max() <= 300 + 1e-3 and boxes[0, :, [1, 3]].max() <= 400 + 1e-3
        assert boxes[1, :, [0, 2]].max() <= 96 + 1e-3 and boxes[1, :, [1, 3]].max() <= 48 + 1e-3
        classes = out["detection_classes"].numpy()
        assert ((classes[0, : n[0]] >= 1) & (classes[0, : n[0]] <= 4)).all()
        assert (classes[0, n[0] :] == 0).all()
    np.testing.assert_allclose(compiled["num_detections"], eager["num_detections"])
    np.testing.assert_allclose(compiled["detection_scores"], eager["detection_scores"], atol=1e-4)
    np.testing.assert_allclose(compiled["detection_boxes"], eager["detection_boxes"], atol=1e-2)


def test_losses_finite_for_background_only_and_crowded_images():
    cfg = tiny_model_config(num_classes=3)
    model = fpn_tf.build_faster_rcnn(config=cfg)
    batch = draw_shape_images(2, size=128, seed=3)
    # Image 0: background only. Image 1: 500 GT boxes on a grid.
    rng = np.random.default_rng(0)
    g = 500
    gt = np.zeros((2, g, 4), np.float32)
    cls = -np.ones((2, g), np.int32)
    y = rng.uniform(0, 100, g)
    x = rng.uniform(0, 100, g)
    s = rng.uniform(4, 28, g)
    gt[1] = np.stack([y, x, y + s, x + s], axis=1)
    cls[1] = rng.integers(1, 3, g)
    batch["gt_boxes"], batch["gt_classes"] = gt, cls
    losses = model.compute_losses({k: tf.constant(v) for k, v in batch.items()}, training=True, step=0)
    assert set(losses) == set(LOSS_KEYS)
    for k, v in losses.items():
        assert np.isfinite(v.numpy()), k
    assert losses["rpn_box_loss"].numpy() > 0


@pytest.mark.slow
def test_train_step_compiles_with_xla_and_matches_graph_mode():
    cfg = tiny_model_config(num_classes=4)
    model = fpn_tf.build_faster_rcnn(config=cfg)
    batch = {k: tf.constant(v) for k, v in draw_shape_images(2, size=128, seed=1).items()}

    def loss_and_grads(b):
        with tf.GradientTape() as tape:
            losses = model.compute_losses(b, training=True, step=7)
        grads = tape.gradient(losses["total_loss"], model.trainable_variables)
        return losses, grads

    graph_losses, graph_grads = tf.function(loss_and_grads)(batch)
    xla_losses, xla_grads = tf.function(loss_and_grads, jit_compile=True)(batch)
    for k in LOSS_KEYS:
        np.testing.assert_allclose(xla_losses[k], graph_losses[k], rtol=2e-3, atol=1e-5)
    assert all(g is not None for g in xla_grads)
    norm = float(tf.linalg.global_norm(xla_grads))
    assert np.isfinite(norm) and norm > 0


def _coco_ap50(batch, outputs) -> float:
    images, annotations = [], []
    for i, image_id in enumerate(batch["image_id"].tolist()):
        images.append({"id": image_id, "height": 128, "width": 128})
        for box, label in zip(batch["gt_boxes"][i], batch["gt_classes"][i]):
            if label > 0:
                y1, x1, y2, x2 = box.tolist()
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": int(label),
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "area": (x2 - x1) * (y2 - y1),
                        "iscrowd": 0,
                    }
                )
    gt = COCO()
    gt.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c, "name": str(c)} for c in (1, 2, 3)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    dets = []
    for i, image_id in enumerate(batch["image_id"].tolist()):
        for j in range(int(outputs["num_detections"][i])):
            y1, x1, y2, x2 = outputs["detection_boxes"][i, j].tolist()
            dets.append(
                {
                    "image_id": image_id,
                    "category_id": int(outputs["detection_classes"][i, j]),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(outputs["detection_scores"][i, j]),
                }
            )
    assert dets, "the model found nothing"
    with contextlib.redirect_stdout(io.StringIO()):
        result = gt.loadRes(dets)
        ev = COCOeval(gt, result, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[1])


@pytest.mark.slow
def test_overfits_small_shape_dataset_to_high_ap50(trained_tiny):
    """400 Adam steps on 20 images (the shared fixture): loss halves, AP50 >= 0.9 on them."""
    assert np.mean(trained_tiny["last_losses"]) < 0.5 * np.mean(trained_tiny["first_losses"])
    model = fpn_tf.build_faster_rcnn(config=trained_tiny["config"])
    tf.train.Checkpoint(model=model).read(trained_tiny["checkpoint"]).assert_existing_objects_matched()
    data = trained_tiny["data"]
    outputs = {
        k: v.numpy()
        for k, v in model(
            {"images": tf.constant(data["images"]), "image_info": tf.constant(data["image_info"])}
        ).items()
    }
    assert _coco_ap50(data, outputs) >= 0.9


def test_checkpoint_holds_every_variable(tmp_path):
    # Keras-tracked lists/dicts of layers are invisible to tf.train.Checkpoint: every
    # variable (incl. FPN laterals/smoothing and the fc head) must round-trip.
    cfg = tiny_model_config(num_classes=3)
    source = fpn_tf.build_faster_rcnn(config=cfg)
    prefix = tf.train.Checkpoint(model=source).write(str(tmp_path / "ckpt"))
    saved = [name for name, _ in tf.train.list_variables(prefix) if name.startswith("model/")]
    assert len(saved) == len(source.weights)
    keras.utils.set_random_seed(123)
    target = fpn_tf.build_faster_rcnn(config=cfg)
    tf.train.Checkpoint(model=target).read(prefix).assert_consumed()
    for a, b in zip(source.weights, target.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
