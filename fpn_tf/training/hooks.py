"""Small hooks around the training step: logging, checkpoints, preemption, evaluation.

``Trainer.fit`` calls ``begin(trainer)`` once, ``after_step(trainer, step, losses)``
after every step (``losses``: replica-mean Python floats) and ``end(trainer)`` on
the way out (also after an exception). A hook asks the loop to stop with
``trainer.request_stop(reason)``.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable

import tensorflow as tf
from absl import logging

from fpn_tf.summaries import write_scalars


class Hook:
    """Does nothing; subclasses override what they need."""

    def begin(self, trainer) -> None:
        pass

    def after_step(self, trainer, step: int, losses: dict[str, float]) -> None:
        pass

    def end(self, trainer) -> None:
        pass


def _format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class LoggingHook(Hook):
    """Every ``every`` steps (and the last): losses, LR, steps/s and ETA to the log and
    TensorBoard (``model_dir/train``; the chief only)."""

    def __init__(self, every: int):
        self.every = max(1, int(every))

    def begin(self, trainer) -> None:
        self.writer = (
            tf.summary.create_file_writer(os.path.join(trainer.model_dir, "train"))
            if trainer.is_chief
            else tf.summary.create_noop_writer()
        )
        self._t = None
        self._step = None

    def after_step(self, trainer, step, losses) -> None:
        now = time.perf_counter()
        if self._t is None:  # the first step includes tracing / compiling
            self._t, self._step = now, step
        if step % self.every and step != trainer.train_steps:
            return
        rate = (step - self._step) / (now - self._t) if step > self._step else 0.0
        self._t, self._step = now, step
        lr = float(trainer.optimizer.learning_rate)
        eta = _format_seconds((trainer.train_steps - step) / rate) if rate > 0 else "?"
        loss_text = "  ".join(f"{k} {v:.4f}" for k, v in sorted(losses.items()))
        logging.info(
            "step %d/%d  %s  lr %.5g  %.2f steps/s  ETA %s",
            step,
            trainer.train_steps,
            loss_text,
            lr,
            rate,
            eta,
        )
        scalars = {f"losses/{k}": v for k, v in losses.items()}
        scalars["learning_rate"] = lr
        scalars.update(trainer.extra_scalars())
        if rate > 0:
            scalars["steps_per_second"] = rate
        write_scalars(self.writer, scalars, step)

    def end(self, trainer) -> None:
        self.writer.flush()


class CheckpointHook(Hook):
    """A checkpoint every ``every`` steps (the loop also saves at its end)."""

    def __init__(self, every: int):
        self.every = max(1, int(every))

    def after_step(self, trainer, step, losses) -> None:
        if step % self.every == 0:
            trainer.save()


class PreemptionHook(Hook):
    """SIGTERM: vote to stop; after the next step every worker saves and stops. Main thread only.

    The vote is all-reduced with that step (``Trainer.vote_stop``), so under
    MultiWorkerMirroredStrategy a SIGTERM to one worker stops all at one step.
    """

    def begin(self, trainer) -> None:
        self.signal: int | None = None
        self._restore: Callable[[], object] = lambda: None
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, _frame):
            self.signal = signum
            trainer.vote_stop(f"signal {signum}")

        previous = signal.signal(signal.SIGTERM, handler)
        self._restore = lambda: signal.signal(signal.SIGTERM, previous)

    def end(self, trainer) -> None:
        self._restore()


class EvaluationHook(Hook):
    """Evaluates every ``every`` steps (and at the end) and keeps the best checkpoint.

    ``evaluate_fn(model, step) -> metrics`` (e.g. ``fpn_tf.evaluation.evaluate``
    on the eval split). The weights with the best ``metric`` (higher is better) so
    far are written to ``model_dir/best/ckpt`` with ``best/metrics.json``; their
    record survives restarts. Runs on the chief only.
    """

    def __init__(self, every: int, evaluate_fn: Callable, metric: str = "AP"):
        self.every = max(1, int(every))
        self.evaluate_fn = evaluate_fn
        self.metric = metric
        self._last = None

    def _best_file(self, trainer) -> str:
        return os.path.join(trainer.model_dir, "best", "metrics.json")

    def begin(self, trainer) -> None:
        self.best = -math.inf
        path = self._best_file(trainer)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                self.best = float(json.load(f)["metrics"].get(self.metric, -math.inf))

    def _run(self, trainer, step: int) -> None:
        if not trainer.is_chief or self._last == step:
            return
        self._last = step
        metrics = self.evaluate_fn(trainer.model, step)
        if self.metric not in metrics:
            raise KeyError(
                f"train.best_metric={self.metric!r} is not among the eval metrics {sorted(metrics)}"
            )
        value = float(metrics[self.metric])
        if value > self.best:
            self.best = value
            best_dir = os.path.join(trainer.model_dir, "best")
            os.makedirs(best_dir, exist_ok=True)
            best = tf.train.Checkpoint(model=trainer.model, step=trainer.step)
            prefix = best.write(os.path.join(best_dir, "ckpt"))
            with open(self._best_file(trainer), "w", encoding="utf-8") as f:
                json.dump({"step": step, "checkpoint": prefix, "metrics": metrics}, f, indent=2)
            logging.info("new best %s %.4f at step %d: %s", self.metric, value, step, prefix)

    def after_step(self, trainer, step, losses) -> None:
        if step % self.every == 0:
            self._run(trainer, step)

    def end(self, trainer) -> None:
        if trainer.completed:
            self._run(trainer, trainer.current_step())
