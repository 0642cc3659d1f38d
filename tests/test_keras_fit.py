"""Keras-native use of every detector: compile / fit / evaluate / predict / save / load_model.

``fit`` is checked against the custom training loop (fpn_tf/training/trainer.py)
step for step, on one device and under MirroredStrategy; ``predict`` on raw
images against the functional graph and the ground truth of a trained model.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf
from mask_shapes import add_masks
from test_training import dataset_fn_for, train_config
from tiny import draw_shape_images, tiny_model_config
from tiny_retinanet import tiny_retinanet_config

import fpn_tf
from fpn_tf.config import BackboneConfig, DataConfig, SegmentProposalConfig
from fpn_tf.models.build import build_model
from fpn_tf.ops.box_ops import pairwise_iou
from fpn_tf.training import distribute
from fpn_tf.training.trainer import Trainer

SIZE = 64
# Frozen norms: trainable BatchNorm sees per-replica batch statistics, so only a
# model without them can match one device exactly under MirroredStrategy.
FROZEN = BackboneConfig(name="resnet18", width_multiplier=0.25, freeze_at=0, norm="frozen_bn")


def _batches(examples: dict, batch_size: int) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices(examples).batch(batch_size, drop_remainder=True)


def test_fit_and_predict_name_what_is_wrong_with_their_data():
    model = fpn_tf.build_faster_rcnn(config=tiny_model_config(image_size=SIZE))
    model.compile(optimizer="sgd")
    with pytest.raises(ValueError, match="build_dataset"):
        model.fit(np.zeros((2, SIZE, SIZE, 3), np.float32), epochs=1, verbose=0)
    examples = draw_shape_images(2, size=SIZE)
    del examples["gt_boxes"]
    with pytest.raises(ValueError, match=r"lacks \['gt_boxes'\]"):
        model.fit(_batches(examples, 2), epochs=1, verbose=0)
    with pytest.raises(ValueError, match=r"RGB images \[B, h, w, 3\]"):
        model.predict(np.zeros((2, SIZE, SIZE), np.uint8), verbose=0)


@pytest.mark.slow
def test_fit_equals_the_custom_training_loop_on_one_device_and_mirrored(tmp_path):
    """Two SGD steps: fit (one device, 2-replica MirroredStrategy) == Trainer, weight for weight."""
    config = tiny_model_config(image_size=SIZE, backbone=FROZEN)
    examples = draw_shape_images(8, size=SIZE, seed=4)
    cfg = train_config(
        train_steps=2, batch_size=4, base_learning_rate=0.02, weight_decay=0.0, gradient_clip_norm=0.0
    )
    keras.utils.set_random_seed(0)
    initial = [w.numpy() for w in build_model(config).weights]
    keras.utils.set_random_seed(0)
    trainer = Trainer(lambda: build_model(config), cfg, str(tmp_path / "loop"))
    trainer.fit(dataset_fn_for(examples, 4, repeat=False))
    expected = [w.numpy() for w in trainer.model.weights]

    for name in ("one_device", "mirrored"):
        strategy = distribute.make_strategy(name)
        keras.utils.set_random_seed(0)
        with strategy.scope():
            model = build_model(config)
            model.compile(optimizer=keras.optimizers.SGD(0.02, momentum=cfg.momentum))
        history = model.fit(_batches(examples, 4), epochs=1, verbose=0).history
        assert set(history) == {
            "loss",
            "rpn_objectness_loss",
            "rpn_box_loss",
            "rcnn_class_loss",
            "rcnn_box_loss",
        }
        assert int(model.optimizer.iterations.numpy()) == 2
        for got, want, w in zip(model.weights, expected, trainer.model.weights):
            np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=2e-6, err_msg=f"{name}: {w.path}")
    moved = [np.abs(a - b).max() for a, b in zip(expected, initial)]
    assert max(moved) > 1e-3, "the steps changed the weights"


def _every_type_config(name: str):
    """Tiny configs with frozen norms: a few steps leave trainable BN's moving statistics far from
    the batch statistics, so evaluate() (inference mode) would not see what training did."""
    base = tiny_model_config(image_size=SIZE, backbone=FROZEN)
    masked = dataclasses.replace(base.input, mask_size=28)
    return {
        "faster_rcnn": base,
        "rpn": dataclasses.replace(base, type="rpn"),
        "mask_rcnn": dataclasses.replace(base, type="mask_rcnn", input=masked),
        "retinanet": tiny_retinanet_config(image_size=SIZE, backbone=dataclasses.asdict(FROZEN)),
        "segment_proposals": dataclasses.replace(
            base, type="segment_proposals", input=masked, segment=SegmentProposalConfig(hidden_dim=16)
        ),
    }[name]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rpn", "mask_rcnn", "retinanet", "segment_proposals"])
def test_every_detector_type_fits_evaluates_and_predicts(name):
    """(faster_rcnn: above.) fit logs every loss term and lowers the loss; predict takes raw images."""
    keras.utils.set_random_seed(0)
    model = build_model(_every_type_config(name))
    examples = add_masks(draw_shape_images(8, size=SIZE, seed=3))
    model.compile(optimizer=keras.optimizers.Adam(2e-3, global_clipnorm=10.0))
    # evaluate (test_step: fixed sampling) on the same batches before and after 6 steps
    before = model.evaluate(_batches(examples, 4), return_dict=True, verbose=0)
    history = model.fit(_batches(examples, 4).repeat(), epochs=2, steps_per_epoch=3, verbose=0).history
    names = {"loss" if k == "total_loss" else k for k in model.loss_keys}
    assert set(history) == names, history
    assert all(np.isfinite(v).all() for v in history.values())
    after = model.evaluate(_batches(examples, 4), return_dict=True, verbose=0)
    assert set(after) == set(before) == names and np.isfinite(list(after.values())).all()
    assert after["loss"] < before["loss"], (before, after)

    raw = examples["images"][:3].astype(np.uint8)
    predicted = model.predict(raw, batch_size=3, verbose=0)
    # The same graph on the pipeline's preprocessed batch (an eager call may order near-tied
    # scores of a barely trained model differently).
    # The batch layout of docs/design.md: padded to the stride multiple (RetinaNet's P7: 128).
    pad = -(-SIZE // model.config.input.size_divisibility) * model.config.input.size_divisibility - SIZE
    images = np.pad(raw.astype(np.float32), [(0, 0), (0, pad), (0, pad), (0, 0)])
    prepared = {"images": images, "image_info": examples["image_info"][:3]}
    direct = model.predict(prepared, batch_size=3, verbose=0)
    assert set(predicted) == set(direct) == set(model.output)
    for key, value in direct.items():
        np.testing.assert_allclose(predicted[key], value, rtol=1e-4, atol=1e-3, err_msg=key)


@pytest.mark.slow
def test_predict_on_raw_images_of_any_size_finds_the_objects(trained_tiny):
    """The trained tiny model: raw uint8 images at 128 px and rescaled to other sizes -> the GT boxes."""
    model = fpn_tf.build_faster_rcnn(config=trained_tiny["config"])
    tf.train.Checkpoint(model=model).read(trained_tiny["checkpoint"]).assert_existing_objects_matched()
    data = trained_tiny["data"]
    raw = np.clip(data["images"], 0, 255).astype(np.uint8)

    def recall(outputs, index, gt_scale_yx):
        gt = data["gt_boxes"][index][data["gt_classes"][index] > 0] * np.tile(gt_scale_yx, 2)
        boxes = outputs["detection_boxes"][: outputs["num_detections"]]
        if len(boxes) == 0:
            return 0.0
        iou = pairwise_iou(tf.constant(gt, tf.float32), tf.constant(boxes, tf.float32)).numpy()
        return float(np.mean(iou.max(axis=1) >= 0.5))

    predicted = model.predict(raw, batch_size=5, verbose=0)
    direct = model({"images": tf.constant(raw, tf.float32), "image_info": tf.constant(data["image_info"])})
    np.testing.assert_allclose(predicted["detection_boxes"], direct["detection_boxes"].numpy(), atol=1e-3)
    at_128 = [recall({k: v[i] for k, v in predicted.items()}, i, (1.0, 1.0)) for i in range(len(raw))]
    assert np.mean(at_128) >= 0.8, at_128

    sizes = [(96, 96), (160, 200), (256, 192), (128, 90)]
    resized = [
        tf.image.resize(raw[i], hw, antialias=True).numpy().round().astype(np.uint8)
        for i, hw in enumerate(sizes)
    ]
    ragged = tf.data.Dataset.from_generator(
        lambda: (image[None] for image in resized),
        output_signature=tf.TensorSpec([1, None, None, 3], tf.uint8),
    )
    outputs = model.predict(ragged, verbose=0)
    assert outputs["detection_boxes"].shape[0] == len(sizes)
    scaled = [
        recall({k: v[i] for k, v in outputs.items()}, i, (h / 128, w / 128)) for i, (h, w) in enumerate(sizes)
    ]
    assert np.mean(scaled) >= 0.75, scaled


@pytest.mark.slow
def test_real_pipeline_fit_with_coco_evaluation_then_save_load_and_fit_on(tmp_path):
    """build_dataset (synthetic COCO-JSON, real tf.data) -> fit + CocoEvaluation (val_AP per epoch)
    -> .keras -> load_model (safe_mode) with its optimizer: same predictions, fit goes on."""
    data = DataConfig(
        source="synthetic",
        train_dir=str(tmp_path / "train"),
        eval_dir=str(tmp_path / "eval"),
        synthetic_num_train=8,
        synthetic_num_eval=4,
        synthetic_image_size=SIZE,
    )
    keras.utils.set_random_seed(0)
    model = fpn_tf.build_faster_rcnn(config=tiny_model_config(image_size=SIZE))
    train, info = fpn_tf.build_dataset(data, model.config.input, "train", batch_size=2, training=True)
    assert info.label_map.num_classes == model.config.num_classes
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    callback = fpn_tf.CocoEvaluation(data)
    history = model.fit(train, epochs=2, steps_per_epoch=3, callbacks=[callback], verbose=0).history
    assert len(history["val_AP"]) == len(history["val_AP50"]) == 2
    assert all(0.0 <= v <= 1.0 for v in history["val_AP50"])
    assert [epoch for epoch, _ in callback.history] == [0, 1]
    assert callback.history[0][1]["num_images"] == 4
    with pytest.raises(ValueError, match="every_epochs"):
        fpn_tf.CocoEvaluation(data, every_epochs=0)

    path = str(tmp_path / "detector.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)  # safe_mode=True: no code is deserialised
    assert type(loaded) is type(model) and loaded.config == model.config
    assert int(loaded.optimizer.iterations.numpy()) == 6
    raw = draw_shape_images(2, size=SIZE, seed=1)["images"].astype(np.uint8)
    for key, value in model.predict(raw, verbose=0).items():
        np.testing.assert_allclose(loaded.predict(raw, verbose=0)[key], value, atol=1e-5, err_msg=key)
    loaded.fit(train, epochs=1, steps_per_epoch=2, verbose=0)
    assert int(loaded.optimizer.iterations.numpy()) == 8
