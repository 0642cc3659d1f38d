"""Tests of the LR schedule, weight decay, the distributed loop and checkpoint resume.

The loop is exercised with ``TinyDetector``: a real (small) Keras model over the
batch dict of docs/design.md with a ``compute_losses(batch, training, step)``
method, so these tests do not depend on Faster R-CNN's speed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal

import keras
import numpy as np
import pytest
import tensorflow as tf
from tiny import tiny_model_config

from fpn_tf import run_directory
from fpn_tf.checkpoints import load_init_checkpoint
from fpn_tf.config import DataConfig, EvalConfig, ExperimentConfig, TrainConfig, load_config
from fpn_tf.data.label_map import LabelMap
from fpn_tf.evaluation.evaluate import evaluate, restore_model
from fpn_tf.export.saved_model import export_saved_model
from fpn_tf.models.faster_rcnn import LOSS_KEYS, build_faster_rcnn
from fpn_tf.models.weights_torchvision import torchvision_state_dict
from fpn_tf.training import distribute, optimizer
from fpn_tf.training.experiment import train
from fpn_tf.training.trainer import Trainer

IMAGE_SIZE = 32


class TinyDetector(keras.Model):
    """Predicts the first GT box (normalised) and its class from a 32×32 image.

    Layers: conv → BatchNorm (inference mode, trainable γ/β) → frozen conv →
    conv → LayerNorm → global pool → box / class dense heads. 12 trainable
    variables: 8 kernels/biases (decayed) and 4 norm parameters (not decayed).
    """

    def __init__(self, num_classes: int = 3, nan_from_step: int = -1, bn_training: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.nan_from_step = nan_from_step
        self.bn_training = bn_training  # False: BN normalises with its moving statistics
        self.conv1 = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="conv1")
        self.bn = keras.layers.BatchNormalization(name="bn")
        self.frozen = keras.layers.Conv2D(8, 3, padding="same", name="frozen", trainable=False)
        self.conv2 = keras.layers.Conv2D(16, 3, strides=2, padding="same", name="conv2")
        self.ln = keras.layers.LayerNormalization(name="ln")
        self.pool = keras.layers.GlobalAveragePooling2D()
        self.box = keras.layers.Dense(4, name="box")
        self.cls = keras.layers.Dense(num_classes, name="cls")

    def _heads(self, images, training=False):
        x = tf.nn.relu(self.bn(self.conv1(images / 255.0), training=training and self.bn_training))
        x = tf.nn.relu(self.frozen(x))
        x = self.pool(tf.nn.relu(self.ln(self.conv2(x))))
        return self.box(x), self.cls(x)

    def call(self, inputs, training=False):
        boxes, logits = self._heads(inputs["images"])
        hw = tf.cast(inputs["image_info"][:, 0:2], tf.float32)
        scale = tf.concat([hw, hw], axis=1)[:, None, :]
        probs = tf.nn.softmax(tf.cast(logits, tf.float32))[:, 1:]
        return {
            "detection_boxes": tf.cast(boxes, tf.float32)[:, None, :] * scale,
            "detection_scores": tf.reduce_max(probs, axis=1)[:, None],
            "detection_classes": tf.cast(tf.argmax(probs, axis=1) + 1, tf.int32)[:, None],
            "num_detections": tf.ones_like(hw[:, 0], tf.int32),
        }

    def compute_losses(self, batch, training=True, step=None):
        boxes, logits = self._heads(batch["images"], training)
        hw = batch["image_info"][:, 0:2]
        target = batch["gt_boxes"][:, 0] / tf.concat([hw, hw], axis=1)
        box_loss = tf.reduce_mean(tf.reduce_sum(tf.abs(tf.cast(boxes, tf.float32) - target), axis=1))
        class_loss = tf.reduce_mean(
            keras.losses.sparse_categorical_crossentropy(
                batch["gt_classes"][:, 0], tf.cast(logits, tf.float32), from_logits=True
            )
        )
        total = box_loss + class_loss
        if self.nan_from_step >= 0 and step is not None:
            total = tf.where(tf.cast(step, tf.int32) >= self.nan_from_step, float("nan"), total)
        return {"box_loss": box_loss, "class_loss": class_loss, "total_loss": total}


def make_model(**kwargs) -> TinyDetector:
    model = TinyDetector(**kwargs)
    model({"images": tf.zeros([1, IMAGE_SIZE, IMAGE_SIZE, 3]), "image_info": tf.ones([1, 6])})
    return model


def tiny_examples(num: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One coloured square per image: red → label 1, green → label 2."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 40, (num, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    boxes = np.zeros((num, 2, 4), np.float32)
    classes = -np.ones((num, 2), np.int32)
    for i in range(num):
        s = int(rng.integers(8, 17))
        y, x = (int(v) for v in rng.integers(0, IMAGE_SIZE - s, 2))
        label = int(rng.integers(1, 3))
        images[i, y : y + s, x : x + s, label - 1] = 230.0
        boxes[i, 0] = (y, x, y + s, x + s)
        classes[i, 0] = label
    info = np.tile(np.array([[IMAGE_SIZE, IMAGE_SIZE, IMAGE_SIZE, IMAGE_SIZE, 1, 1]], np.float32), (num, 1))
    return {
        "images": images,
        "image_info": info,
        "gt_boxes": boxes,
        "gt_classes": classes,
        "image_id": np.arange(1, num + 1, dtype=np.int64),
    }


def dataset_fn_for(examples: dict, global_batch: int, repeat: bool = True):
    """A ``dataset_fn(input_context)`` yielding per-replica batches, in order, sharded per worker."""

    def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        ds = tf.data.Dataset.from_tensor_slices(examples)
        if ctx.num_input_pipelines > 1:
            ds = ds.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
        ds = ds.batch(ctx.get_per_replica_batch_size(global_batch), drop_remainder=True)
        return ds.repeat() if repeat else ds

    return dataset_fn


def train_config(**kw) -> TrainConfig:
    base = dict(
        batch_size=4,
        train_steps=8,
        base_learning_rate=0.05,
        lr_decay_fractions=(),
        warmup_steps=0,
        weight_decay=1e-4,
        checkpoint_every=1000,
        log_every=1000,
    )
    base.update(kw)
    return TrainConfig(**base)


def weights(model: keras.Model) -> list[np.ndarray]:
    return [v.numpy() for v in model.weights]


def summary_tags(log_dir: str) -> dict[str, str]:
    """{tag: plugin name} of every summary in the TensorBoard event files of ``log_dir``."""
    tags = {}
    for name in os.listdir(log_dir):
        for event in tf.compat.v1.train.summary_iterator(os.path.join(log_dir, name)):
            for value in event.summary.value:
                tags[value.tag] = value.metadata.plugin_data.plugin_name
    return tags


# -- optimizer.py ----------------------------------------------------------------


def test_default_schedule_is_the_papers():
    """0.02 for 60k steps then 0.002 to 80k (§5.2), after a 1000-step linear warm-up."""
    schedule = optimizer.build_learning_rate_schedule(TrainConfig())
    assert schedule.boundaries == [60000]
    steps = [0, 500, 999, 1000, 30000, 59999, 60000, 79999]
    lrs = [float(schedule(s)) for s in steps]
    expected = [
        0.02 * 0.001,
        0.02 * (0.001 * 0.5 + 0.5),
        0.02 * (0.001 * 0.001 + 0.999),
        0.02,
        0.02,
        0.02,
        0.002,
        0.002,
    ]
    np.testing.assert_allclose(lrs, expected, rtol=1e-6)


def test_schedule_scales_with_train_steps_and_round_trips():
    cfg = TrainConfig(train_steps=1000, lr_decay_fractions=(0.5, 0.9), warmup_steps=10, warmup_factor=0.1)
    schedule = optimizer.build_learning_rate_schedule(cfg)
    assert schedule.boundaries == [500, 900]
    got = [float(schedule(s)) for s in (0, 5, 10, 499, 500, 899, 900)]
    np.testing.assert_allclose(got, [0.002, 0.011, 0.02, 0.02, 0.002, 0.002, 0.0002], rtol=1e-5)
    clone = optimizer.WarmupStepDecay.from_config(schedule.get_config())
    assert clone.get_config() == schedule.get_config()
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
    assert float(restored(700)) == pytest.approx(0.002)


def test_bad_schedule_settings_are_errors():
    with pytest.raises(ValueError, match="lr_decay_fractions"):
        optimizer.build_learning_rate_schedule(TrainConfig(lr_decay_fractions=(1.5,)))
    with pytest.raises(ValueError, match="increase"):
        optimizer.WarmupStepDecay(0.1, boundaries=(100, 50))
    with pytest.raises(ValueError, match="mixed_precision"):
        optimizer.build_optimizer(TrainConfig(), "float64")


def test_optimizer_kinds():
    sgd = optimizer.build_optimizer(TrainConfig())
    assert isinstance(sgd, keras.optimizers.SGD) and sgd.momentum == 0.9
    lso = optimizer.build_optimizer(TrainConfig(), "mixed_float16")
    assert isinstance(lso, keras.optimizers.LossScaleOptimizer)
    assert isinstance(lso.inner_optimizer, optimizer.ReducedGradientSGD)


def test_weight_decay_mask_skips_norm_and_frozen_variables():
    model = make_model()
    mask = optimizer.weight_decay_mask(model)
    names = [v.path for v in model.trainable_variables]
    decayed = sorted(n for n, m in zip(names, mask) if m)
    kept = sorted(n for n, m in zip(names, mask) if not m)
    assert len(names) == 12  # the frozen conv's kernel and bias are not trainable
    assert not any("frozen" in n for n in names)
    assert len(decayed) == 8 and all(n.endswith(("kernel", "bias")) for n in decayed)
    assert len(kept) == 4 and all(n.endswith(("gamma", "beta")) for n in kept)
    assert all(n.split("/")[-2] in ("bn", "ln") for n in kept)


def test_postprocess_gradients_adds_decay_then_clips():
    variables = [tf.constant([3.0, 4.0]), tf.constant([1.0])]
    grads = [tf.constant([0.0, 0.0]), tf.constant([2.0])]
    out = optimizer.postprocess_gradients(grads, variables, [True, False], 0.5)
    np.testing.assert_allclose(out[0], [1.5, 2.0])
    np.testing.assert_allclose(out[1], [2.0])
    # global norm of [1.5, 2, 2] is sqrt(10.25); clip to 1
    clipped = optimizer.postprocess_gradients(grads, variables, [True, False], 0.5, clip_norm=1.0)
    np.testing.assert_allclose(
        np.concatenate([c.numpy() for c in clipped]), np.array([1.5, 2, 2]) / 10.25**0.5
    )
    # scaled gradients (loss scale 8): decay and clip scale along
    scaled = optimizer.postprocess_gradients(
        [g * 8 for g in grads], variables, [True, False], 0.5, clip_norm=1.0, loss_scale=8.0
    )
    for s, c in zip(scaled, clipped):
        np.testing.assert_allclose(s.numpy() / 8, c.numpy(), rtol=1e-6)
    none = optimizer.postprocess_gradients([None, grads[1]], variables, [True, False], 0.5, clip_norm=1.0)
    assert none[0] is None and float(none[1][0]) == pytest.approx(1.0)


# -- trainer.py ------------------------------------------------------------------


def test_one_step_is_sgd_with_weight_decay_on_kernels_and_biases(tmp_path):
    """w1 = w0 - lr * (g + wd * w0) for kernels/biases, w0 - lr * g for norm params."""
    examples = tiny_examples(4)
    cfg = train_config(train_steps=1, base_learning_rate=0.1, weight_decay=0.05)
    keras.utils.set_random_seed(1)
    trainer = Trainer(make_model, cfg, str(tmp_path))
    model = trainer.model
    w0 = [v.numpy() for v in model.trainable_variables]
    batch = {k: tf.constant(v) for k, v in examples.items()}
    with tf.GradientTape() as tape:
        loss = model.compute_losses(batch, training=True, step=0)["total_loss"]
    grads = tape.gradient(loss, model.trainable_variables)
    result = trainer.fit(dataset_fn_for(examples, 4))
    assert result.step == 1 and result.losses["total_loss"] == pytest.approx(float(loss), rel=1e-5)
    mask = optimizer.weight_decay_mask(model)
    for v, w, g, decay in zip(model.trainable_variables, w0, grads, mask):
        expected = w - 0.1 * (g.numpy() + (0.05 * w if decay else 0.0))
        np.testing.assert_allclose(v.numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=v.path)
    frozen = model.get_layer("frozen").kernel
    assert not frozen.trainable


def test_loss_goes_down(tmp_path):
    examples = tiny_examples(32, seed=3)
    cfg = train_config(train_steps=150, batch_size=8, base_learning_rate=0.1, gradient_clip_norm=10.0)
    keras.utils.set_random_seed(0)
    trainer = Trainer(make_model, cfg, str(tmp_path))
    batch = {k: tf.constant(v) for k, v in examples.items()}
    before = float(trainer.model.compute_losses(batch)["total_loss"])
    result = trainer.fit(dataset_fn_for(examples, 8))
    after = float(trainer.model.compute_losses(batch)["total_loss"])
    assert result.step == 150
    assert after < 0.5 * before, (before, after)
    tags = summary_tags(os.path.join(tmp_path, "train"))
    assert {"losses/total_loss", "losses/box_loss", "learning_rate", "steps_per_second"} <= set(tags)
    assert set(tags.values()) == {"scalars"}  # TensorBoard's scalar plugin
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-150")


def _first_step(strategy, xla: bool, tmp_path, name: str):
    keras.utils.set_random_seed(7)
    cfg = train_config(train_steps=1, base_learning_rate=0.2, weight_decay=0.01, gradient_clip_norm=1.0)
    trainer = Trainer(make_model, cfg, str(tmp_path / name), strategy=strategy, xla=xla)
    result = trainer.fit(dataset_fn_for(tiny_examples(4, seed=5), 4))
    return result.losses, weights(trainer.model)


def test_mirrored_two_cpus_with_xla_matches_one_device(tmp_path):
    """Global batch of 4 split 2 + 2 over two logical CPUs, XLA step: same losses and weights."""
    single_losses, single_weights = _first_step(
        distribute.make_strategy("one_device"), False, tmp_path, "one"
    )
    mirrored = distribute.make_strategy("mirrored")
    assert mirrored.num_replicas_in_sync == 2
    losses, mirrored_weights = _first_step(mirrored, True, tmp_path, "mirrored")
    assert set(losses) == {"box_loss", "class_loss", "total_loss"}
    for k in losses:
        np.testing.assert_allclose(losses[k], single_losses[k], rtol=1e-4, err_msg=k)
    assert len(mirrored_weights) == len(single_weights) == 16
    for a, b in zip(mirrored_weights, single_weights):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert any(np.abs(a - b).max() > 0 for a, b in zip(single_weights, weights(make_model())))


def test_batchnorm_moving_statistics_agree_across_replicas(tmp_path):
    strategy = distribute.make_strategy("mirrored")
    trainer = Trainer(
        lambda: make_model(bn_training=True), train_config(train_steps=2), str(tmp_path), strategy
    )
    trainer.fit(dataset_fn_for(tiny_examples(4, seed=5), 4))
    for v in (trainer.model.bn.moving_mean, trainer.model.bn.moving_variance):
        first, second = (t.numpy() for t in strategy.experimental_local_results(v.value))
        np.testing.assert_array_equal(first, second)
    assert np.abs(trainer.model.bn.moving_mean.numpy()).max() > 0  # they were updated


def test_batch_size_must_divide_over_replicas(tmp_path):
    with pytest.raises(ValueError, match="divisible"):
        Trainer(
            make_model,
            train_config(batch_size=3),
            str(tmp_path),
            strategy=distribute.make_strategy("mirrored"),
        )


@pytest.mark.parametrize("mixed_precision", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_trains(tmp_path, mixed_precision):
    examples = tiny_examples(8)
    keras.utils.set_random_seed(0)
    trainer = Trainer(make_model, train_config(train_steps=3), str(tmp_path), mixed_precision=mixed_precision)
    assert trainer.model.conv1.compute_dtype == mixed_precision.split("_")[1]
    assert trainer.model.conv1.kernel.dtype == "float32"
    assert keras.config.dtype_policy().name == "float32"  # the global policy is restored
    result = trainer.fit(dataset_fn_for(examples, 4))
    assert result.step == 3 and np.isfinite(result.losses["total_loss"])


def test_resume_is_exact(tmp_path):
    """Stopping at step 4 and resuming to 8 equals training 8 steps straight."""
    examples = tiny_examples(4, seed=2)  # one batch, repeated: data order cannot differ
    cfg = train_config(train_steps=8, lr_decay_fractions=(0.5,), warmup_steps=3, checkpoint_every=3)

    keras.utils.set_random_seed(0)
    straight = Trainer(make_model, cfg, str(tmp_path / "straight"))
    straight.fit(dataset_fn_for(examples, 4))

    keras.utils.set_random_seed(0)
    first = Trainer(make_model, cfg, str(tmp_path / "resumed"))
    four_batches = {k: np.concatenate([v] * 4) for k, v in examples.items()}
    stopped = first.fit(dataset_fn_for(four_batches, 4, repeat=False))  # the dataset ends after 4 steps
    assert stopped.stopped_early and stopped.step == 4
    assert stopped.checkpoint.endswith("ckpt-4")
    saved = weights(first.model) + [v.numpy() for v in first.optimizer.variables]

    keras.utils.set_random_seed(123)  # a different init: everything must come from the checkpoint
    second = Trainer(make_model, cfg, str(tmp_path / "resumed"))
    assert second.restored_from.endswith("ckpt-4") and int(second.step.numpy()) == 4
    restored = weights(second.model) + [v.numpy() for v in second.optimizer.variables]
    for a, b in zip(saved, restored):
        np.testing.assert_array_equal(a, b)
    assert int(second.optimizer.iterations.numpy()) == 4
    second.fit(dataset_fn_for(examples, 4))
    assert int(second.step.numpy()) == 8
    for a, b in zip(weights(second.model), weights(straight.model)):
        np.testing.assert_array_equal(a, b)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = train_config(train_steps=10, checkpoint_every=2)
    trainer = Trainer(lambda: make_model(nan_from_step=5), cfg, str(tmp_path))
    with pytest.raises(FloatingPointError, match="non-finite total_loss at step 6.*ckpt-4"):
        trainer.fit(dataset_fn_for(tiny_examples(4), 4))
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-4")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint(tmp_path, signum):
    """SIGTERM: finish the step, save, return; Ctrl-C (SIGINT): save and re-raise."""
    examples = tiny_examples(4)

    def generator():
        for i in range(10_000):
            if i == 12:  # while the 3rd batch is read
                os.kill(os.getpid(), signum)
            yield {k: v[i % 4] for k, v in examples.items()}

    spec = {k: tf.TensorSpec(v.shape[1:], v.dtype) for k, v in examples.items()}

    def dataset_fn(ctx):
        return tf.data.Dataset.from_generator(generator, output_signature=spec).batch(4)

    trainer = Trainer(make_model, train_config(train_steps=1000), str(tmp_path))
    previous = signal.getsignal(signal.SIGTERM)
    if signum == signal.SIGINT:
        # Ctrl-C raises KeyboardInterrupt only under Python's default handler; a test run started in
        # the background (`cmd &` in a script) inherits SIGINT ignored, so set the default here.
        inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            with pytest.raises(KeyboardInterrupt):
                trainer.fit(dataset_fn)
        finally:
            signal.signal(signal.SIGINT, inherited)
        step = int(trainer.step.numpy())
    else:
        result = trainer.fit(dataset_fn)
        assert result.stopped_early
        step = result.step
    # The trainer's SIGTERM handler is gone again: the caller's is back.
    assert signal.getsignal(signal.SIGTERM) is previous
    assert 1 <= step < 1000
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith(f"ckpt-{step}")


def test_load_init_checkpoint_formats(tmp_path):
    keras.utils.set_random_seed(0)
    source = make_model()
    source.save_weights(str(tmp_path / "tiny.weights.h5"))
    tf.train.Checkpoint(model=source).write(str(tmp_path / "ckpt"))
    for path in (str(tmp_path / "tiny.weights.h5"), str(tmp_path / "ckpt"), str(tmp_path / "ckpt.index")):
        keras.utils.set_random_seed(1)
        target = make_model()
        load_init_checkpoint(target, path)
        for a, b in zip(weights(target), weights(source)):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(FileNotFoundError, match="neither a weights file"):
        load_init_checkpoint(make_model(), str(tmp_path / "missing"))


def test_init_checkpoint_from_a_torchvision_state_dict(tmp_path):
    """A .npz torchvision state dict initialises the ResNet body only."""
    keras.utils.set_random_seed(0)
    source = build_faster_rcnn(config=tiny_model_config())
    state = torchvision_state_dict(source)
    np.savez(tmp_path / "tv.npz", **state)
    keras.utils.set_random_seed(1)
    target = build_faster_rcnn(config=tiny_model_config())
    load_init_checkpoint(target, str(tmp_path / "tv.npz"))
    loaded = torchvision_state_dict(target)
    body = [k for k in state if k.startswith("backbone.body.")]
    assert len(body) > 50
    for k in body:
        np.testing.assert_array_equal(loaded[k], state[k], err_msg=k)
    assert not np.array_equal(
        loaded["backbone.fpn.inner_blocks.0.0.weight"], state["backbone.fpn.inner_blocks.0.0.weight"]
    )


def test_init_checkpoint_only_for_a_fresh_model_dir(tmp_path):
    keras.utils.set_random_seed(0)
    source = make_model()
    tf.train.Checkpoint(model=source).write(str(tmp_path / "init" / "ckpt"))
    init = str(tmp_path / "init" / "ckpt")
    trainer = Trainer(make_model, train_config(train_steps=2), str(tmp_path / "run"), init_checkpoint=init)
    for a, b in zip(weights(trainer.model), weights(source)):
        np.testing.assert_array_equal(a, b)
    trainer.fit(dataset_fn_for(tiny_examples(4), 4))
    trained = weights(trainer.model)
    again = Trainer(make_model, train_config(train_steps=2), str(tmp_path / "run"), init_checkpoint=init)
    for a, b in zip(weights(again.model), trained):
        np.testing.assert_array_equal(a, b)


# -- Faster R-CNN end to end ---------------------------------------------------


def tiny_experiment(tmp_path, train_steps: int = 4, **train_overrides) -> ExperimentConfig:
    """Tiny Faster R-CNN (tests/tiny.py) on 64 px synthetic shapes written under ``tmp_path``."""
    model = tiny_model_config(num_classes=4, image_size=64)
    model = dataclasses.replace(model, input=dataclasses.replace(model.input, random_flip=False))
    data = DataConfig(
        source="synthetic",
        train_dir=str(tmp_path / "data_train"),
        eval_dir=str(tmp_path / "data_eval"),
        synthetic_num_train=8,
        synthetic_num_eval=4,
        synthetic_image_size=64,
        synthetic_num_classes=3,
    )
    train = train_config(batch_size=2, train_steps=train_steps, base_learning_rate=0.01, **train_overrides)
    return ExperimentConfig(model=model, data=data, train=train, eval=EvalConfig(batch_size=2))


@pytest.mark.slow
def test_train_then_evaluate_faster_rcnn(tmp_path):
    """train() and evaluate() on the real model and data pipeline, over 2 mirrored CPUs."""
    config = tiny_experiment(tmp_path, train_steps=3, checkpoint_every=2)
    model_dir = str(tmp_path / "run")
    result = train(config, model_dir, strategy_name="mirrored", xla=False)
    assert result.step == 3 and result.checkpoint.endswith("ckpt-3")
    assert set(result.losses) == set(LOSS_KEYS) and np.isfinite(result.losses["total_loss"])
    assert sorted(os.listdir(model_dir)) == [
        "checkpoint",
        "ckpt-2.data-00000-of-00001",
        "ckpt-2.index",
        "ckpt-3.data-00000-of-00001",
        "ckpt-3.index",
        "config.yaml",
        "input_state",
        "label_map.json",
        "train",
    ]
    assert load_config(os.path.join(model_dir, "config.yaml")) == config
    metrics = evaluate(
        run_directory.read_config(model_dir, required=True), model_dir=model_dir, proposals=True
    )
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR@100", "AR@1000"):
        assert -1.0 <= metrics[key] <= 1.0, key
    assert metrics["num_images"] == 4
    with open(os.path.join(model_dir, "ckpt-3.metrics.json"), encoding="utf-8") as f:
        record = json.load(f)
    assert record["step"] == 3 and record["metrics"]["AP"] == metrics["AP"]
    assert {"eval/AP", "eval/AP50", "eval/AR@1000"} <= set(summary_tags(os.path.join(model_dir, "eval")))

    # the exported SavedModel (fpn_tf.export) evaluates to the same numbers
    label_map = LabelMap.from_json(open(os.path.join(model_dir, "label_map.json"), encoding="utf-8").read())
    model = restore_model(config, result.checkpoint)
    export_saved_model(model, str(tmp_path / "export"), "tiny", label_map=label_map)
    served = evaluate(config, saved_model=str(tmp_path / "export" / "tiny"))
    for key in ("AP", "AP50", "APs", "APm", "APl"):
        assert served[key] == pytest.approx(metrics[key], abs=1e-6), key
