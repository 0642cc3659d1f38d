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
``model_dir`` resumes from the newest readable checkpoint (a damaged newer one
is logged at ERROR with its files and skipped) with the same weights, optimizer
slots and LR schedule position, and the input continues its example order
(``fpn_tf.training.input_state``: each pipeline's position is saved beside the
checkpoint).

Stopping on a signal is coordinated: every step all-reduces each worker's stop
vote (1 after SIGTERM, see ``PreemptionHook``), so under MultiWorkerMirroredStrategy
every worker sees a SIGTERM sent to any one of them after the same step, and
all save that step's checkpoint together (a save is collective) and return.
Why not ``tf.distribute.experimental.PreemptionCheckpointHandler``: it saves
through its own CheckpointManager and exits the process itself, which would
bypass the input position, the hooks and the caller; the vote costs one scalar
all-reduce per step and behaves the same under every strategy.

Logging, periodic checkpoints, SIGTERM and evaluation are hooks
(``fpn_tf.training.hooks``); the experiment wiring (config -> model, data,
hooks) is ``fpn_tf.training.experiment``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from collections.abc import Callable

import keras
import tensorflow as tf
from absl import logging

from fpn_tf.checkpoints import load_init_checkpoint, restore_newest_intact
from fpn_tf.config import TrainConfig
from fpn_tf.training import distribute
from fpn_tf.training.hooks import CheckpointHook, Hook, LoggingHook, PreemptionHook
from fpn_tf.training.input_state import InputState
from fpn_tf.training.optimizer import (
    MIXED_PRECISION_POLICIES,
    build_optimizer,
    loss_scale_scalars,
    postprocess_gradients,
    weight_decay_mask,
)

DatasetFn = Callable[[tf.distribute.InputContext], tf.data.Dataset]


@dataclasses.dataclass
class TrainResult:
    """What a ``Trainer.fit`` run ended with."""

    step: int  # global step reached (== train_steps unless stopped early)
    losses: dict[str, float]  # replica-mean losses of the last step run ({} if none ran)
    checkpoint: str | None  # path prefix of the last checkpoint written
    steps_per_second: float  # over the run, compile step excluded (0 if < 2 steps)
    stopped_early: bool = False  # by SIGTERM / SIGINT or the end of the dataset


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
        self._build(model_fn)
        self._restore_or_init(init_checkpoint)
        self._replica_gradients = tf.function(self._replica_gradients_fn, jit_compile=self.xla)
        self._train_step = tf.function(self._train_step_fn)
        self._stop_reason: str | None = None
        self._stop_vote: str | None = None  # this process's reason to stop (a signal)
        self.completed = False
        self.input = InputState(self.strategy, model_dir)

    def _build(self, model_fn: Callable[[], keras.Model]) -> None:
        """Model, optimizer and step counter under the strategy and the precision policy."""
        train_config, mixed_precision = self.config, self.mixed_precision
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

    def _restore_or_init(self, init_checkpoint: str | None) -> None:
        """Resumes from ``model_dir``'s newest intact checkpoint, else loads ``init_checkpoint``."""
        model_dir, train_config = self.model_dir, self.config
        os.makedirs(model_dir, exist_ok=True)
        self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer, step=self.step)
        self._write_dir = model_dir if self.is_chief else self._worker_tmp_dir()
        self.manager = tf.train.CheckpointManager(
            self.checkpoint,
            directory=self._write_dir,
            max_to_keep=train_config.max_checkpoints_to_keep,
            step_counter=self.step,
        )
        latest, status, self.damaged_checkpoints = restore_newest_intact(self.checkpoint, model_dir)
        if latest:
            try:
                status.assert_existing_objects_matched()
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

    def _train_step_fn(self, batch, stop_vote):
        """One step on a distributed batch (taken from the iterator eagerly, outside
        this function: a ``next()`` that fails inside a tf.function has already run
        the stateful ops that do not depend on the batch, e.g. the step counters).

        Returns the replica-mean losses and the sum of every replica's ``stop_vote``."""

        def replica_step(batch, stop_vote):
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
            # tf.identity: a copy on this replica's device (MirroredStrategy's all-reduce
            # finds no destination for the input tensor itself)
            votes = tf.distribute.get_replica_context().all_reduce(
                tf.distribute.ReduceOp.SUM, tf.identity(stop_vote)
            )
            return losses, votes

        per_replica, votes = self.strategy.run(replica_step, args=(batch, stop_vote))
        self.step.assign_add(1)
        losses = {
            k: self.strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None) for k, v in per_replica.items()
        }
        return losses, self.strategy.reduce(tf.distribute.ReduceOp.MEAN, votes, axis=None)

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
        """Writes a checkpoint at the current step; returns its path (chief's).

        The input position first: a model checkpoint that exists has its input state."""
        step = int(self.step.numpy())
        self.input.save(step)
        path = self.manager.save(checkpoint_number=step)
        self.input.prune({int(p.rsplit("-", 1)[1]) for p in self.manager.checkpoints})
        self._saved_step = step
        if not self.is_chief:
            shutil.rmtree(self._write_dir, ignore_errors=True)
        return self._chief_path(path)

    def _chief_path(self, path: str | None) -> str | None:
        """The chief's copy of a checkpoint (non-chief workers write to a temp dir)."""
        if path is None or self.is_chief:
            return path
        return os.path.join(self.model_dir, os.path.basename(path))

    def request_stop(self, reason: str) -> None:
        """Asks the loop to stop after this step (it saves before returning)."""
        logging.warning("%s", reason)
        self._stop_reason = reason

    def vote_stop(self, reason: str) -> None:
        """Asks every worker to stop after the next step (e.g. on SIGTERM; signal-safe)."""
        self._stop_vote = reason

    def current_step(self) -> int:
        return int(self.step.numpy())

    def extra_scalars(self) -> dict[str, float]:
        """Scalars beside the losses (mixed_float16: the loss scale and the skipped steps)."""
        return {f"mixed_precision/{k}": v for k, v in loss_scale_scalars(self.optimizer).items()}

    def default_hooks(self) -> list[Hook]:
        return [
            LoggingHook(self.config.log_every),
            CheckpointHook(self.config.checkpoint_every),
            PreemptionHook(),
        ]

    def _check_step(self, step: int, losses: dict[str, float], votes: float) -> None:
        """Stops on a stop vote of any worker; raises on a non-finite total_loss."""
        if votes > 0:
            reason = self._stop_vote or "a stop request from another worker"
            self.request_stop(f"{reason}: saving at step {step} on every worker and stopping")
        if not math.isfinite(losses["total_loss"]):
            raise FloatingPointError(
                f"non-finite total_loss at step {step}: {losses}. Stopped without saving; "
                f"the last good checkpoint is {self.manager.latest_checkpoint}"
            )

    def fit(self, dataset_fn: DatasetFn, hooks: list[Hook] | None = None) -> TrainResult:
        """Trains from the current step up to ``train_steps``.

        ``dataset_fn(input_context)`` returns this input pipeline's dataset of
        per-replica batches (batch dicts, see docs/design.md); it should repeat.
        ``hooks`` default to ``default_hooks()`` (logging, checkpoints every
        ``checkpoint_every`` steps, SIGTERM). The loop saves at its end, also when a
        hook stops it, and on KeyboardInterrupt (then re-raises). A non-finite
        ``total_loss`` raises FloatingPointError without saving, so the last
        checkpoint is the last good state.
        """
        hooks = self.default_hooks() if hooks is None else hooks
        start = self.current_step()
        if start >= self.train_steps:
            logging.info("step %d >= train_steps %d: nothing to train", start, self.train_steps)
            return TrainResult(start, {}, self.restored_from, 0.0)
        self.input.start(dataset_fn, start)
        step, losses, t_first, step_first = start, {}, None, start
        self._stop_reason, self._stop_vote, self.completed = None, None, False
        for hook in hooks:
            hook.begin(self)
        try:
            while step < self.train_steps and self._stop_reason is None:
                try:
                    batch = self.input.next()
                except StopIteration:
                    self.request_stop(f"the training dataset ended at step {step}; stopping")
                    break
                losses, votes = self._train_step(batch, tf.constant(float(self._stop_vote is not None)))
                losses, step = {k: float(v) for k, v in losses.items()}, self.current_step()
                self._check_step(step, losses, float(votes))
                if t_first is None:  # the first step includes tracing / compiling
                    t_first, step_first = time.perf_counter(), step
                for hook in hooks:
                    hook.after_step(self, step, losses)
            if self._saved_step != self.current_step():
                self.save()
            self.completed = self._stop_reason is None
        except KeyboardInterrupt:
            logging.warning("interrupted: saving at step %d", self.current_step())
            self.save()
            raise
        finally:
            for hook in hooks:
                hook.end(self)
        elapsed = (time.perf_counter() - t_first) if t_first is not None else 0.0
        rate = (step - step_first) / elapsed if elapsed > 0 else 0.0
        return TrainResult(
            step,
            losses,
            self._chief_path(self.manager.latest_checkpoint),
            rate,
            stopped_early=self._stop_reason is not None,
        )
