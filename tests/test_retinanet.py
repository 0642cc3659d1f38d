"""RetinaNet + FPN: parameter counts, presets, output contract, XLA, focal loss, overfitting."""

from __future__ import annotations

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from test_faster_rcnn import _coco_ap50
from tiny import cycle_batches, draw_shape_images, train_tiny
from tiny_retinanet import tiny_retinanet_config

import fpn_tf
from fpn_tf.config import ModelConfig, RetinaNetConfig, from_dict, load_config, to_dict
from fpn_tf.models.build import build_model
from fpn_tf.models.dense_detection_generator import DenseDetectionGenerator
from fpn_tf.models.retinanet import LOSS_KEYS, retinanet_losses
from fpn_tf.models.retinanet_head import RetinaNetHead
from fpn_tf.ops.losses import sigmoid_focal_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _randomise_head(model, seed: int = 0) -> None:
    """A trained head's spread: He-scaled tower kernels, class logits around -2 (not all ~0.01)."""
    rng = np.random.default_rng(seed)
    for conv in [c for name in ("class", "box") for c, _ in model.head.tower(name)]:
        conv.kernel.assign(rng.normal(0, np.sqrt(2 / np.prod(conv.kernel.shape[:3])), conv.kernel.shape))
    head = model.head
    head.class_logits.kernel.assign(rng.normal(0, 0.05, head.class_logits.kernel.shape))
    head.class_logits.bias.assign(rng.normal(-2.0, 0.5, head.class_logits.bias.shape))
    head.box_deltas.kernel.assign(rng.normal(0, 0.01, head.box_deltas.kernel.shape))


# ------------------------------------------------------------------ structure and configs
def test_parameter_count_equals_torchvision_retinanet_resnet50_fpn():
    # torchvision retinanet_resnet50_fpn: body 23,454,912 + FPN (C3..C5, P6/P7 from P5) 3,936,000
    # + class head 2,374,491 (91 classes: 9 x 91 channels) + box head 2,249,596.
    model = fpn_tf.build_retinanet(preset="torchvision_v1")
    assert model.trainable_weight_count() == 34_014_999
    assert model.head.class_logits.kernel.shape == (3, 3, 256, 9 * 91)
    model = fpn_tf.build_retinanet(preset="torchvision_v1", num_classes=21)  # Pascal VOC
    assert model.trainable_weight_count() == 32_562_849
    # The default (Detectron2) layout has no background channel: 9 x 90 class channels.
    assert fpn_tf.build_retinanet().head.class_logits.kernel.shape[-1] == 9 * 90


def test_type_defaults_presets_and_anchor_sizes():
    cfg = from_dict(ModelConfig, {"type": "retinanet"})
    assert (cfg.fpn.min_level, cfg.fpn.extra_block, cfg.fpn.num_extra_levels) == (3, "conv_c5", 2)
    assert cfg.input.size_divisibility == 128 and cfg.retinanet == RetinaNetConfig()
    tv = from_dict(ModelConfig, {"type": "retinanet", "preset": "torchvision_v1", "num_classes": 21})
    assert (tv.fpn.min_level, tv.fpn.extra_block, tv.backbone.bn_epsilon) == (3, "conv_p5", 0.0)
    assert (tv.retinanet.box_loss, tv.retinanet.background_channel, tv.num_classes) == ("l1", True, 21)
    assert from_dict(ModelConfig, to_dict(tv)) == tv  # round trip through a plain dict
    # Faster R-CNN's defaults are untouched by RetinaNet's.
    assert from_dict(ModelConfig, {}).fpn.min_level == 2
    with pytest.raises(ValueError, match="valid presets: torchvision_v1"):
        fpn_tf.build_retinanet(preset="detectron2")
    for path in ("configs/demo_retinanet.yaml", "configs/retinanet_r50_fpn_coco.yaml"):
        assert load_config(os.path.join(ROOT, path)).model.type == "retinanet"
    gen = fpn_tf.build_retinanet(config=tiny_retinanet_config()).detection_generator
    np.testing.assert_allclose(gen.level_sizes["P3"], [12.0, 12.0 * 2 ** (1 / 3), 12.0 * 2 ** (2 / 3)])
    assert gen.num_anchors == 9


def test_layers_get_config_round_trip():
    cfg = tiny_retinanet_config()
    features = {
        f"P{k}": tf.random.stateless_normal([2, 2 ** (7 - k), 2 ** (7 - k), 32], [k, 0]) for k in range(3, 8)
    }
    for norm in ("none", "group_norm"):
        head = RetinaNetHead(9, 3, conv_channels=32, num_convs=2, norm=norm, prior_probability=0.02)
        out = head(features)
        clone = RetinaNetHead.from_config(head.get_config())
        clone(features)
        for a, b in zip(head.weights, clone.weights, strict=True):
            b.assign(a)
        again = clone(features)
        for kind in ("class_logits", "box_deltas"):
            for level in features:
                np.testing.assert_allclose(out[kind][level], again[kind][level], rtol=1e-6, atol=1e-6)
        assert out["class_logits"]["P3"].shape == (2, 16, 16, 27)
        assert out["box_deltas"]["P7"].shape == (2, 1, 1, 36)
        # 2 convs per tower (+ GN or bias) and the two output convs.
        assert sum(w.path.endswith("gamma") for w in head.weights) == (4 if norm == "group_norm" else 0)
        np.testing.assert_allclose(head.class_logits.bias.numpy(), -np.log(0.98 / 0.02), rtol=1e-6)
    gen = DenseDetectionGenerator(to_dict(cfg.anchors), to_dict(cfg.retinanet), list(features), name="gen")
    gen.score_threshold = 0.0
    clone = DenseDetectionGenerator.from_config(gen.get_config())
    assert clone.score_threshold == 0.0 and clone.get_config() == gen.get_config()
    info = tf.constant([[128, 128, 128, 128, 1, 1]] * 2, tf.float32)
    head_out = {k: {lv: tf.cast(v, tf.float32) for lv, v in d.items()} for k, d in out.items()}
    a, b = gen(head_out, info), clone(head_out, info)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_focal_loss_matches_formula():
    logits = np.array([-3.0, -0.5, 0.0, 2.0, 4.0], np.float32)
    targets = np.array([0.0, 1.0, 0.0, 1.0, 0.0], np.float32)
    p = 1 / (1 + np.exp(-logits))
    p_t = np.where(targets == 1, p, 1 - p)
    alpha_t = np.where(targets == 1, 0.25, 0.75)
    expected = -alpha_t * (1 - p_t) ** 2 * np.log(p_t)
    np.testing.assert_allclose(sigmoid_focal_loss(logits, targets, 0.25, 2.0), expected, rtol=1e-5)
    # gamma 0 and alpha < 0: plain binary cross-entropy.
    np.testing.assert_allclose(sigmoid_focal_loss(logits, targets, -1.0, 0.0), -np.log(p_t), rtol=1e-5)


def test_loss_targets_channels_and_normalisation():
    """One positive anchor per image; every other anchor background or ignored."""
    anchors = tf.constant([[0, 0, 10, 10], [0, 0, 10, 14], [50, 50, 60, 60], [0, 0, 30, 30]], tf.float32)
    gt_boxes = tf.constant([[[0, 0, 10, 10]], [[50, 50, 60, 60]]], tf.float32)
    gt_classes = tf.constant([[2], [1]], tf.int32)
    # IoU with the GT: image 0 anchors (1, 0.71, 0, 0.11): positive, positive, negative, negative;
    # image 1 (0, 0, 1, 0). Zero logits make the focal terms of all "on" / all "off" targets equal.
    deltas = tf.zeros([2, 4, 4])
    for background_channel, channels in ((False, 3), (True, 4)):
        cfg = RetinaNetConfig(background_channel=background_channel, box_loss="l1")
        logits = tf.zeros([2, 4, channels])
        out = retinanet_losses(logits, deltas, anchors, gt_boxes, gt_classes, cfg)
        off = 0.75 * 0.25 * np.log(2.0)  # alpha_t (1 - p_t)^2 CE at p = 0.5, target 0
        on = 0.25 * 0.25 * np.log(2.0)
        # image 0: 2 positives (anchors 0, 1 of class 2), image 1: 1 positive (anchor 2); 8 anchors counted.
        positives, counted = 3, 8
        expected = (positives * on + (counted * channels - positives) * off) / positives
        np.testing.assert_allclose(out["class_loss"], expected, rtol=1e-5)
        # The box loss is the L1 of the encoded targets of the 3 positives, / 3.
        assert float(out["box_loss"]) > 0
    # A background-only batch is finite and has no box loss.
    empty = retinanet_losses(tf.zeros([2, 4, 3]), deltas, anchors, gt_boxes, -tf.ones_like(gt_classes), cfg)
    assert float(empty["box_loss"]) == 0.0 and np.isfinite(float(empty["class_loss"]))


# ------------------------------------------------------------------ the model
def test_inference_contract_in_original_pixels_under_xla():
    model = fpn_tf.build_retinanet(config=tiny_retinanet_config(num_classes=5))
    _randomise_head(model)
    images = np.zeros((2, 128, 256, 3), np.float32)
    images[0, :100, :200] = np.random.default_rng(0).uniform(0, 255, (100, 200, 3))
    images[1, :128, :64] = np.random.default_rng(1).uniform(0, 255, (128, 64, 3))
    info = np.array([[200, 400, 100, 200, 0.5, 0.5], [64, 32, 128, 64, 2.0, 2.0]], np.float32)
    inputs = {"images": tf.constant(images), "image_info": tf.constant(info)}
    eager = model(inputs, training=False)
    compiled = tf.function(lambda x: model(x, training=False), jit_compile=True)(inputs)
    assert eager["detection_boxes"].shape == (2, 20, 4) and eager["detection_classes"].dtype == tf.int32
    for out in (eager, compiled):
        n = out["num_detections"].numpy()
        assert (n == 20).all()
        boxes = out["detection_boxes"].numpy()
        assert boxes[0, :, [0, 2]].max() <= 200 + 1e-3 and boxes[0, :, [1, 3]].max() <= 400 + 1e-3
        assert boxes[1, :, [0, 2]].max() <= 64 + 1e-3 and boxes[1, :, [1, 3]].max() <= 32 + 1e-3
        classes = out["detection_classes"].numpy()
        assert ((classes >= 1) & (classes <= 4)).all()
        assert (np.diff(out["detection_scores"].numpy(), axis=1) <= 0).all()
    np.testing.assert_allclose(compiled["detection_scores"], eager["detection_scores"], atol=1e-4)
    np.testing.assert_allclose(compiled["detection_boxes"], eager["detection_boxes"], atol=1e-2)
    np.testing.assert_array_equal(compiled["detection_classes"], eager["detection_classes"])
    # The score threshold holds: nothing of the untrained 0.01-prior head passes 0.05.
    quiet = fpn_tf.build_retinanet(config=tiny_retinanet_config(num_classes=5))
    assert int(tf.reduce_sum(quiet(inputs)["num_detections"])) == 0


@pytest.mark.slow
def test_train_step_compiles_with_xla_and_matches_graph_mode():
    model = build_model(tiny_retinanet_config(retinanet={"norm": "group_norm"}))
    batch = {k: tf.constant(v) for k, v in draw_shape_images(2, size=128, seed=1).items()}

    def loss_and_grads(b):
        with tf.GradientTape() as tape:
            losses = model.compute_losses(b, training=True, step=7)
        return losses, tape.gradient(losses["total_loss"], model.trainable_variables)

    graph_losses, _ = tf.function(loss_and_grads)(batch)
    xla_losses, xla_grads = tf.function(loss_and_grads, jit_compile=True)(batch)
    assert set(xla_losses) == set(LOSS_KEYS)
    for k in LOSS_KEYS:
        np.testing.assert_allclose(xla_losses[k], graph_losses[k], rtol=2e-3, atol=1e-5)
    assert all(g is not None for g in xla_grads)
    assert np.isfinite(float(tf.linalg.global_norm(xla_grads)))
    # At the 0.01 prior the focal loss of ~150k background pairs is small (the paper's point).
    assert 0.1 < float(graph_losses["class_loss"]) < 5.0


def test_checkpoint_holds_every_variable(tmp_path):
    cfg = tiny_retinanet_config(retinanet={"norm": "group_norm"})
    source = fpn_tf.build_retinanet(config=cfg)
    prefix = tf.train.Checkpoint(model=source).write(str(tmp_path / "ckpt"))
    saved = [name for name, _ in tf.train.list_variables(prefix) if name.startswith("model/")]
    assert len(saved) == len(source.weights)
    keras.utils.set_random_seed(123)
    target = fpn_tf.build_retinanet(config=cfg)
    tf.train.Checkpoint(model=target).read(prefix).assert_consumed()
    for a, b in zip(source.weights, target.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


STEPS = 500  # of batch 4 (~3 min on 2 shared cores)


@pytest.mark.slow
def test_overfits_small_shape_dataset_to_high_ap50():
    keras.utils.set_random_seed(0)
    model = fpn_tf.build_retinanet(config=tiny_retinanet_config(num_classes=4))
    data = draw_shape_images(20, size=128, seed=0)
    tensors = {k: tf.constant(v) for k, v in data.items()}
    # 2e-3, then 2e-4 for the last fifth (the 10x drop sharpens boxes and scores).
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([STEPS * 4 // 5], [2e-3, 2e-4])
    losses = train_tiny(model, cycle_batches(tensors), STEPS, learning_rate=schedule)
    print(f"\nloss {np.mean(losses[:20]):.3f} -> {np.mean(losses[-20:]):.3f}")
    assert np.mean(losses[-20:]) < 0.3 * np.mean(losses[:20])
    outputs = model({"images": data["images"], "image_info": data["image_info"]})
    outputs = {k: v.numpy() for k, v in outputs.items()}
    ap50 = _coco_ap50(data, outputs)
    print(f"AP50 {ap50:.3f}")
    assert ap50 >= 0.9


@pytest.mark.slow
def test_train_evaluate_export_predict_clis(tmp_path):
    """configs/demo_retinanet.yaml (shrunk) through scripts/train.py, export.py and predict.py."""
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "2"}
    shrink = [
        "model.backbone.width_multiplier=0.25",
        "model.fpn.num_channels=32",
        "model.retinanet.score_threshold=0.0",
        "model.retinanet.detections_per_image=10",
        "model.input.min_size=128",
        "model.input.max_size=128",
        f"data.train_dir={tmp_path / 'data'}",
        "data.synthetic_num_train=8",
        "data.synthetic_num_eval=4",
        "data.synthetic_image_size=128",
        "train.batch_size=2",
        "train.warmup_steps=1",
    ]
    overrides = [f"--override={o}" for o in shrink]

    def run(*args):
        done = subprocess.run(
            [sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    run_dir, export_dir = tmp_path / "run", tmp_path / "exports"
    config = os.path.join(ROOT, "configs", "demo_retinanet.yaml")
    run("scripts/train.py", f"--config={config}", f"--model_dir={run_dir}", "--train_steps=2",
        "--eval_after", *overrides)  # fmt: skip
    assert tf.train.latest_checkpoint(str(run_dir))
    assert load_config(str(run_dir / "config.yaml")).model.type == "retinanet"
    run("scripts/export.py", f"--model_dir={run_dir}", f"--export_dir={export_dir}", "--name=retina")
    from fpn_tf.export.saved_model import read_model_config

    served = read_model_config(str(export_dir / "retina" / "1"))
    assert served.type == "retinanet" and served.retinanet.detections_per_image == 10
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    image = draw_shape_images(1, size=96, seed=4)["images"][0]
    Image.fromarray(image.astype(np.uint8)).save(images / "a.png")
    out = tmp_path / "predicted"
    run("scripts/predict.py", f"--saved_model={export_dir / 'retina' / '1'}", f"--inputs={images}",
        f"--output_dir={out}", "--min_score=0")  # fmt: skip
    assert (out / "detections.json").exists()
