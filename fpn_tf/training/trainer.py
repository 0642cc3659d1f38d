"""The distributed training loop (a custom loop, not ``model.fit``).

Why custom: under Keras 3.15 ``model.fit`` fails with MirroredStrategy +
``jit_compile`` and with MultiWorkerMirroredStrategy (keras-team/keras#20585).

One training step, per replica (``strategy.run``):

1. ``_replica_gradients`` — ``tf.function(jit_compile=xla)``: the model's
   ``compute_losses(batch, training=True, step=...)`` and the gradient of
   ``total_loss / num_replicas_in_sync`` (times the dynamic loss scale under
   mixed_float16). This holds all the model's compute, so it is what XLA gets.
2. outside XLA: the gradients are summed over replicas
   (``ReplicaContext.all_reduce``), L2 weight decay is added and the global norm
   clipped (``postprocess_gradients``), and the Keras optimizer applies them.
   Measured on 2 logical CPUs with MirroredStrategy: XLA-compiling the
   all-reduce + apply fails ("Trying to access resource …/replica_1/… located
   in device CPU:1 from device CPU:0"), and a nested tf.function around
   ``optimizer.apply`` fails (its ``merge_call`` cannot run inside one).

Losses are reduced with ``strategy.reduce(MEAN)`` for logging. State is
``tf.train.Checkpoint(model, optimizer, step)``: a restart with the same
``model_dir`` resumes from the last checkpoint's step with the same weights,
optimizer slots and LR schedule position (the input pipeline restarts; it is
not part of the checkpoint).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable

import keras
import tensorflow as tf
import yaml
from absl import logging
from tensorflow.core.framework import summary_pb2

from fpn_tf.config import ExperimentConfig, TrainConfig, to_dict
from fpn_tf.data.pipeline import build_dataset
from fpn_tf.models.faster_rcnn import build_faster_rcnn
from fpn_tf.models.weights_keras_applications import load_keras_applications_backbone
from fpn_tf.models.weights_torchvision import load_torchvision_backbone
from fpn_tf.training import distribute
from fpn_tf.training.optimizer import (
    MIXED_PRECISION_POLICIES,
    build_optimizer,
    loss_scale_scalars,
    postprocess_gradients,
    weight_decay_mask,
)
from fpn_tf.training.xla_choice import auto_xla

DatasetFn = Callable[[tf.distribute.InputContext], tf.data.Dataset]


@dataclasses.dataclass
class TrainResult:
    """What a ``Trainer.fit`` run ended with."""

    step: int  # global step reached (== train_steps unless stopped early)
    losses: dict[str, float]  # replica-mean losses of the last step run ({} if none ran)
    checkpoint: str | None  # path prefix of the last checkpoint written
    steps_per_second: float  # over the run, compile step excluded (0 if < 2 steps)
    stopped_early: bool = False  # by SIGTERM / SIGINT or the end of the dataset


def load_init_checkpoint(model: keras.Model, path: str) -> None:
    """Initialises ``model`` (or its backbone) from ``path`` before training.

    The hook for pretrained weights, used only when ``model_dir`` holds no
    checkpoint of its own. Formats, by file name:

    - ``*.weights.h5`` (Keras ``save_weights``): loaded into ``model.backbone``
      if the model has that attribute or a layer named "backbone", else into
      the whole model;
    - other ``*.h5``: a Keras-applications ImageNet ResNet file, loaded into the
      ResNet body (``weights_keras_applications.load_keras_applications_backbone``);
    - ``*.pth`` / ``*.pt`` / ``*.npz``: a torchvision ResNet (ImageNet) state
      dict, or the backbone of a torchvision detector
      (``weights_torchvision.load_torchvision_backbone``);
    - a TF checkpoint (prefix, directory or ``*.index``) written by this
      trainer (``model/...``) or by ``tf.train.Checkpoint(backbone=...)``:
      every variable present in both is restored, the rest keep their init.
    """
    if path.endswith((".h5", ".pth", ".pt", ".npz")) and not os.path.exists(path):
        raise FileNotFoundError(f"init checkpoint {path} does not exist")
    if path.endswith(".weights.h5"):
        _backbone_or_model(model).load_weights(path)
        logging.info("initialised %s from %s", _backbone_or_model(model).name, path)
        return
    if path.endswith(".h5"):
        result = load_keras_applications_backbone(model, path)
        logging.info("initialised the ResNet body from %s (%d layers)", path, len(result.loaded))
        return
    if path.endswith((".pth", ".pt", ".npz")):
        result = load_torchvision_backbone(model, path)
        logging.info("initialised the ResNet body from %s (%d tensors)", path, len(result.loaded))
        return
    prefix = path[: -len(".index")] if path.endswith(".index") else path
    if os.path.isdir(prefix):
        latest = tf.train.latest_checkpoint(prefix)
        if latest is None:
            raise FileNotFoundError(f"init checkpoint directory {prefix} holds no TF checkpoint")
        prefix = latest
    if not tf.io.gfile.exists(prefix + ".index"):
        raise FileNotFoundError(
            f"init checkpoint {path!r} is neither a weights file (.weights.h5, .h5, .pth, .pt, "
            f".npz) nor a TF checkpoint ({prefix}.index does not exist)"
        )
    names = {name.split("/")[0] for name, _ in tf.train.list_variables(prefix)}
    if "model" in names:
        tf.train.Checkpoint(model=model).restore(prefix).expect_partial()
    elif "backbone" in names:
        tf.train.Checkpoint(backbone=_backbone_or_model(model)).restore(prefix).expect_partial()
    else:
        raise ValueError(
            f"init checkpoint {prefix} holds neither a 'model' nor a 'backbone' object "
            f"(top-level names: {sorted(names)})"
        )
    logging.info("initialised from TF checkpoint %s", prefix)


def _backbone_or_model(model: keras.Model) -> keras.Model:
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, keras.layers.Layer):
        return backbone
    try:
        return model.get_layer("backbone")
    except ValueError:
        return model


class Trainer:
    """Builds model + optimizer under a strategy and runs the training loop.

    Args:
        model_fn: () -> keras.Model with ``compute_losses(batch, training, step)``
            returning a dict of scalar losses including ``total_loss``; called
            inside ``strategy.scope()`` under the mixed-precision policy.
        train_config: optimisation settings (LR, decay, clipping, checkpoints).
        model_dir: checkpoints, TensorBoard logs (``train/``) go here.
        strategy: a tf.distribute strategy (default: the current one).
        xla: compile the per-replica loss + gradient with XLA.
        mixed_precision: float32 | mixed_float16 | mixed_bfloat16.
        train_steps: length of the run (default ``train_config.train_steps``);
            the LR schedule's decay boundaries are fractions of it.
        init_checkpoint: weights for a fresh start (``load_init_checkpoint``).
    """

    def __init__(
        self,
        model_fn: Callable[[], keras.Model],
        train_config: TrainConfig,
        model_dir: str,
        strategy: tf.distribute.Strategy | None = None,
        xla: bool = False,
        mixed_precision: str = "float32",
        train_steps: int | None = None,
        init_checkpoint: str | None = None,
    ):
        if mixed_precision not in MIXED_PRECISION_POLICIES:
            raise ValueError(
                f"mixed_precision must be one of {', '.join(MIXED_PRECISION_POLICIES)}, "
                f"got {mixed_precision!r}"
            )
        self.config = train_config
        self.model_dir = model_dir
        self.strategy = strategy or tf.distribute.get_strategy()
        self.xla = bool(xla)
        self.mixed_precision = mixed_precision
        self.train_steps = int(train_config.train_steps if train_steps is None else train_steps)
        if self.train_steps < 1:
            raise ValueError(f"train_steps must be >= 1, got {self.train_steps}")
        replicas = self.strategy.num_replicas_in_sync
        if train_config.batch_size % replicas:
            raise ValueError(
                f"train.batch_size={train_config.batch_size} is not divisible by the "
                f"{replicas} replicas of the strategy"
            )
        self.is_chief = distribute.is_chief(self.strategy)

        previous_policy = keras.config.dtype_policy()
        keras.config.set_dtype_policy(mixed_precision)
        try:
            with self.strategy.scope():
                self.model = model_fn()
                self.optimizer = build_optimizer(train_config, mixed_precision, self.train_steps)
                self.optimizer.build(self.model.trainable_variables)
                self.step = tf.Variable(
                    0,
                    dtype=tf.int64,
                    trainable=False,
                    name="global_step",
                    aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
                )
        finally:
            keras.config.set_dtype_policy(previous_policy)
        if not hasattr(self.model, "compute_losses"):
            raise TypeError(
                f"{type(self.model).__name__} has no compute_losses(batch, training, step) method"
            )
        self._variables = list(self.model.trainable_variables)
        self._decay_mask = weight_decay_mask(self.model)
        self._moving_statistics = [
            v
            for layer in self.model._flatten_layers(include_self=False, recursive=True)
            if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
            for v in (layer.moving_mean, layer.moving_variance)
            if v is not None
        ]

        os.makedirs(model_dir, exist_ok=True)
        self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer, step=self.step)
        self._write_dir = model_dir if self.is_chief else self._worker_tmp_dir()
        self.manager = tf.train.CheckpointManager(
            self.checkpoint,
            directory=self._write_dir,
            max_to_keep=train_config.max_checkpoints_to_keep,
            step_counter=self.step,
        )
        latest = tf.train.latest_checkpoint(model_dir)
        if latest:
            try:
                self.checkpoint.restore(latest).assert_existing_objects_matched()
            except AssertionError as e:
                raise ValueError(
                    f"{latest} does not fit this model / optimizer (was model_dir trained with another "
                    f"config?): {str(e)[:400]}"
                ) from None
            logging.info("resumed from %s at step %d", latest, int(self.step.numpy()))
        elif init_checkpoint:
            load_init_checkpoint(self.model, init_checkpoint)
        self.restored_from = latest
        self._saved_step = int(self.step.numpy()) if latest else None

        self._replica_gradients = tf.function(self._replica_gradients_fn, jit_compile=self.xla)
        self._train_step = tf.function(self._train_step_fn)
        self._stop_signal: int | None = None

    def _worker_tmp_dir(self) -> str:
        task_type, task_id = distribute.task_info(self.strategy)
        return os.path.join(self.model_dir, f".tmp_{task_type}_{task_id}")

    # -- the step ---------------------------------------------------------------

    def _replica_gradients_fn(self, batch: dict, step: tf.Tensor):
        """Per replica: losses and gradients of total_loss / num_replicas (XLA part)."""
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        with tf.GradientTape() as tape:
            losses = self.model.compute_losses(batch, training=True, step=step)
            losses = {k: tf.cast(v, tf.float32) for k, v in losses.items()}
            loss = losses["total_loss"] / float(replicas)
            if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
                loss = self.optimizer.scale_loss(loss)
        grads = tape.gradient(loss, self._variables)
        # read here, after the forward pass updated them (outputs of this function
        # carry its device, which the MultiWorker all-reduce needs)
        statistics = [tf.convert_to_tensor(v.value) for v in self._moving_statistics]
        return losses, grads, statistics

    def _train_step_fn(self, batch):
        """One step on a distributed batch (taken from the iterator eagerly, outside
        this function: a ``next()`` that fails inside a tf.function has already run
        the stateful ops that do not depend on the batch, e.g. the step counters)."""

        def replica_step(batch):
            losses, grads, statistics = self._replica_gradients(batch, self.step.read_value())
            present = [i for i, g in enumerate(grads) if g is not None]
            summed = tf.distribute.get_replica_context().all_reduce(
                tf.distribute.ReduceOp.SUM, [grads[i] for i in present]
            )
            grads = list(grads)
            for i, g in zip(present, summed):
                grads[i] = g
            loss_scale = 1.0
            if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
                loss_scale = self.optimizer.dynamic_scale
            grads = postprocess_gradients(
                grads,
                self._variables,
                self._decay_mask,
                self.config.weight_decay,
                self.config.gradient_clip_norm,
                loss_scale=loss_scale,
            )
            self.optimizer.apply(grads, self._variables)
            self._average_moving_statistics(statistics)
            return losses

        per_replica = self.strategy.run(replica_step, args=(batch,))
        self.step.assign_add(1)
        return {
            k: self.strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None) for k, v in per_replica.items()
        }

    def _average_moving_statistics(self, statistics: list[tf.Tensor]) -> None:
        """Sets trainable BatchNorms' moving mean / variance to their mean over replicas.

        Keras creates them with aggregation "none": under tf.distribute each
        replica (and worker) updates its own copy from its own batch, so the
        copies drift apart and a checkpoint holds replica 0's. Averaging after
        every step keeps them identical everywhere; as the update is linear, the
        result is the moving average of the replica-mean batch statistics.
        """
        if not self._moving_statistics or self.strategy.num_replicas_in_sync == 1:
            return
        ctx = tf.distribute.get_replica_context()
        means = ctx.all_reduce(tf.distribute.ReduceOp.MEAN, statistics)
        for v, mean in zip(self._moving_statistics, means):
            v.assign(mean)

    # -- the loop ---------------------------------------------------------------

    def save(self) -> str:
        """Writes a checkpoint at the current step; returns its path (chief's)."""
        step = int(self.step.numpy())
        path = self.manager.save(checkpoint_number=step)
        self._saved_step = step
        if not self.is_chief:
            shutil.rmtree(self._write_dir, ignore_errors=True)
        return self._chief_path(path)

    def _chief_path(self, path: str | None) -> str | None:
        """The chief's copy of a checkpoint (non-chief workers write to a temp dir)."""
        if path is None or self.is_chief:
            return path
        return os.path.join(self.model_dir, os.path.basename(path))

    def fit(self, dataset_fn: DatasetFn) -> TrainResult:
        """Trains from the current step up to ``train_steps``.

        ``dataset_fn(input_context)`` returns this input pipeline's dataset of
        per-replica batches (batch dicts, see docs/design.md); it should repeat.
        Checkpoints every ``checkpoint_every`` steps and at exit, including on
        SIGTERM (finishes the step, saves, returns with ``stopped_early``) and
        KeyboardInterrupt (saves, re-raises). A non-finite ``total_loss`` raises
        FloatingPointError without saving, so the last checkpoint is the last
        good state.
        """
        cfg = self.config
        start = int(self.step.numpy())
        if start >= self.train_steps:
            logging.info("step %d >= train_steps %d: nothing to train", start, self.train_steps)
            return TrainResult(start, {}, self.restored_from, 0.0)
        dataset = self.strategy.distribute_datasets_from_function(dataset_fn)
        iterator = iter(dataset)
        writer = (
            tf.summary.create_file_writer(os.path.join(self.model_dir, "train"))
            if self.is_chief
            else tf.summary.create_noop_writer()
        )
        restore_handlers = self._install_signal_handlers()
        step, losses = start, {}
        t_first = t_log = None
        step_first = step_log = start
        stopped_early = False
        try:
            while step < self.train_steps:
                try:
                    batch = next(iterator)
                except StopIteration:
                    logging.warning("the training dataset ended at step %d; stopping", step)
                    stopped_early = True
                    break
                out = self._train_step(batch)
                losses = {k: float(v) for k, v in out.items()}
                step = int(self.step.numpy())
                if not math.isfinite(losses["total_loss"]):
                    raise FloatingPointError(
                        f"non-finite total_loss at step {step}: {losses}. Stopped without saving; "
                        f"the last good checkpoint is {self.manager.latest_checkpoint}"
                    )
                now = time.perf_counter()
                if t_first is None:  # the first step includes tracing / compiling
                    t_first = t_log = now
                    step_first = step_log = step
                if step % cfg.log_every == 0 or step == self.train_steps:
                    rate = (step - step_log) / (now - t_log) if step > step_log else 0.0
                    self._log(writer, step, losses, rate)
                    t_log, step_log = now, step
                if step % cfg.checkpoint_every == 0:
                    self.save()
                if self._stop_signal is not None:
                    logging.warning("signal %d: saving at step %d and stopping", self._stop_signal, step)
                    stopped_early = True
                    break
        except KeyboardInterrupt:
            logging.warning("interrupted: saving at step %d", int(self.step.numpy()))
            self.save()
            raise
        finally:
            restore_handlers()
            writer.flush()
        if self._saved_step != int(self.step.numpy()):
            self.save()
        elapsed = (time.perf_counter() - t_first) if t_first is not None else 0.0
        rate = (step - step_first) / elapsed if t_first is not None and elapsed > 0 else 0.0
        return TrainResult(
            step, losses, self._chief_path(self.manager.latest_checkpoint), rate, stopped_early
        )

    def _log(self, writer, step: int, losses: dict[str, float], steps_per_second: float) -> None:
        lr = float(self.optimizer.learning_rate)
        remaining = self.train_steps - step
        eta = _format_seconds(remaining / steps_per_second) if steps_per_second > 0 else "?"
        loss_text = "  ".join(f"{k} {v:.4f}" for k, v in sorted(losses.items()))
        scaling = loss_scale_scalars(self.optimizer)  # mixed_float16: scale and skipped steps
        loss_text += "".join(f"  {k} {v:g}" for k, v in scaling.items())
        logging.info(
            "step %d/%d  %s  lr %.5g  %.2f steps/s  ETA %s",
            step,
            self.train_steps,
            loss_text,
            lr,
            steps_per_second,
            eta,
        )
        scalars = {f"losses/{k}": v for k, v in losses.items()}
        scalars.update({f"mixed_precision/{k}": v for k, v in scaling.items()})
        scalars["learning_rate"] = lr
        if steps_per_second > 0:
            scalars["steps_per_second"] = steps_per_second
        write_scalars(writer, scalars, step)

    def _install_signal_handlers(self) -> Callable[[], None]:
        """SIGTERM → finish the step, checkpoint, stop. Main thread only."""
        self._stop_signal = None
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def handler(signum, _frame):
            self._stop_signal = signum

        previous = signal.signal(signal.SIGTERM, handler)
        return lambda: signal.signal(signal.SIGTERM, previous)


def write_scalars(writer: tf.summary.SummaryWriter, scalars: dict[str, float], step: int) -> None:
    """Writes TensorBoard scalar summaries without importing the tensorboard package.

    ``tf.summary.scalar`` lives in the (optional) tensorboard package, which
    tensorflow-cpu does not install; this writes the same event records
    (plugin "scalars") with TF's own ``tf.summary.write``.
    """
    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = "scalars"
    with writer.as_default(step=step):
        for name, value in scalars.items():
            tf.summary.write(name, tf.constant(float(value), tf.float32), metadata=metadata)
    writer.flush()


def _format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def faster_rcnn_model_fn(config: ExperimentConfig) -> Callable[[], keras.Model]:
    """The ``model_fn`` of ``config``: ``build_faster_rcnn(config=config.model)``."""
    return lambda: build_faster_rcnn(config=config.model)


def train_dataset_fn(config: ExperimentConfig, model_dir: str | None = None, chief: bool = True) -> DatasetFn:
    """The ``dataset_fn`` of ``config``: ``build_dataset`` on the train split.

    Checks that ``model.num_classes`` fits the data's label map; the chief
    writes the label map to ``model_dir/label_map.json`` (read by export).
    """

    def dataset_fn(input_context: tf.distribute.InputContext) -> tf.data.Dataset:
        dataset, info = build_dataset(
            config.data,
            config.model.input,
            split="train",
            batch_size=config.train.batch_size,  # global; build_dataset divides by the replicas
            training=True,
            input_context=input_context,
            seed=config.train.seed,
        )
        if info.label_map.num_classes != config.model.num_classes:
            raise ValueError(
                f"model.num_classes={config.model.num_classes} but the training data has "
                f"{len(info.label_map)} categories; set model.num_classes={info.label_map.num_classes} "
                "(the categories + background)"
            )
        if chief and model_dir:
            with open(os.path.join(model_dir, "label_map.json"), "w", encoding="utf-8") as f:
                f.write(info.label_map.to_json())
        return dataset

    return dataset_fn


def train(
    config: ExperimentConfig,
    model_dir: str,
    strategy_name: str = "one_device",
    num_gpus: int | None = None,
    xla: bool | None = None,
    mixed_precision: str = "float32",
    train_steps: int | None = None,
    batch_size: int | None = None,
    init_checkpoint: str | None = None,
    strategy: tf.distribute.Strategy | None = None,
    model_fn: Callable[[], keras.Model] | None = None,
    dataset_fn: DatasetFn | None = None,
) -> TrainResult:
    """Trains ``config``'s model into ``model_dir`` (resuming if it holds a checkpoint).

    Args:
        config: the experiment; ``train_steps`` / ``batch_size`` override
            ``config.train`` and the result is written to ``model_dir/config.yaml``.
        strategy_name, num_gpus: see ``fpn_tf.training.distribute.make_strategy``
            (ignored when ``strategy`` is given).
        xla: compile the per-replica step with XLA; None = ``auto_xla(strategy)``
            (per device type, see fpn_tf/training/xla_choice.py).
        mixed_precision: float32 | mixed_float16 | mixed_bfloat16.
        init_checkpoint: initial weights for a fresh run (``load_init_checkpoint``).
        model_fn, dataset_fn: default to ``build_faster_rcnn(config.model)`` and
            ``build_dataset(config.data, ...)`` on the train split.
    """
    if strategy is None:
        strategy = distribute.make_strategy(strategy_name, num_gpus=num_gpus)
    train_cfg = config.train
    if train_steps is not None:
        train_cfg = dataclasses.replace(train_cfg, train_steps=int(train_steps))
    if batch_size is not None:
        train_cfg = dataclasses.replace(train_cfg, batch_size=int(batch_size))
    config = dataclasses.replace(config, train=train_cfg)
    if xla is None:
        xla = auto_xla(strategy)
    keras.utils.set_random_seed(train_cfg.seed)
    os.makedirs(model_dir, exist_ok=True)
    if distribute.is_chief(strategy):
        with open(os.path.join(model_dir, "config.yaml"), "w", encoding="utf-8") as f:
            yaml.safe_dump(to_dict(config), f, sort_keys=False)
    logging.info(
        "training %d steps, global batch %d on %d replica(s) (%s), xla=%s, %s",
        train_cfg.train_steps,
        train_cfg.batch_size,
        strategy.num_replicas_in_sync,
        type(strategy).__name__,
        xla,
        mixed_precision,
    )
    trainer = Trainer(
        model_fn or faster_rcnn_model_fn(config),
        train_cfg,
        model_dir,
        strategy=strategy,
        xla=xla,
        mixed_precision=mixed_precision,
        init_checkpoint=init_checkpoint,
    )
    return trainer.fit(dataset_fn or train_dataset_fn(config, model_dir, trainer.is_chief))
