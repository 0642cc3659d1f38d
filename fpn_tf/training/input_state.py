"""The training input and its position, saved beside each checkpoint.

A resumed run continues the example order where the checkpointed step left it:
each input pipeline (one per worker) saves its ``tf.data`` iterator with
``tf.train.Checkpoint(iterator=...)`` to
``model_dir/input_state/pipeline-<i>-of-<n>/input-<step>`` just before the model
checkpoint of that step, and a resume from step S reads ``input-S`` back (also
after a fall-back to an older checkpoint). The iterator state holds the shuffle
buffer, its RNG and the elements already prefetched, so the order continues
exactly; the cost is a few batches of decoded images per pipeline on disk.

Why not ``strategy.distribute_datasets_from_function``: its DistributedIterator is
not trackable in TF 2.21 (``tf.train.Checkpoint(iterator=...)`` refuses it). So
the trainer iterates one ordinary iterator per pipeline, with the same
``InputContext`` that function would pass, takes one per-replica batch for each
local replica (the same order it would use) and hands them to the replicas with
``experimental_distribute_values_from_function``.

A dataset that cannot be saved (e.g. a stateful ``py_function``; ``build_dataset``
declares its own logging one harmless) is trained all the same, with one warning
that a resume restarts its order. A missing or unreadable input state does the
same: the order restarts, the weights are still resumed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

import tensorflow as tf
from absl import logging

from fpn_tf.checkpoints import READ_ERRORS, damaged_message
from fpn_tf.training import distribute


class InputState:
    """Iterates ``dataset_fn``'s dataset for this process's replicas and saves its position."""

    def __init__(self, strategy: tf.distribute.Strategy, model_dir: str):
        self.strategy = strategy
        self.context = distribute.input_context(strategy)
        self.local_replicas = distribute.local_replicas(strategy)
        ctx = self.context
        self.directory = os.path.join(
            model_dir, "input_state", f"pipeline-{ctx.input_pipeline_id}-of-{ctx.num_input_pipelines}"
        )
        self.iterator = None
        self._savable = True

    def start(self, dataset_fn: Callable[[tf.distribute.InputContext], tf.data.Dataset], step: int) -> None:
        """A fresh iterator, moved to ``step``'s saved position when there is one."""
        self.iterator = iter(dataset_fn(self.context))
        self._savable = True
        if step == 0:
            return
        prefix = self._prefix(step)
        if not tf.io.gfile.exists(prefix + ".index"):
            logging.warning(
                "no input position saved for step %d (%s): the input order restarts", step, prefix
            )
            return
        try:
            tf.train.Checkpoint(iterator=self.iterator).read(prefix).assert_consumed()
        except (*READ_ERRORS, AssertionError) as e:  # damaged, or saved from another pipeline
            logging.error(
                "%s (or the data / pipeline changed); the input order restarts", damaged_message(prefix, e)
            )
            self.iterator = iter(dataset_fn(self.context))
            return
        logging.info("input position restored from %s", prefix)

    def next(self):
        """The next distributed batch: one per-replica batch per local replica."""
        batches = [next(self.iterator) for _ in range(self.local_replicas)]
        local = self.local_replicas
        return self.strategy.experimental_distribute_values_from_function(
            lambda ctx: batches[ctx.replica_id_in_sync_group % local]
        )

    def save(self, step: int) -> None:
        """Writes the position at ``step`` (once per step the model is checkpointed at)."""
        if self.iterator is None or not self._savable:
            return
        try:
            tf.train.Checkpoint(iterator=self.iterator).write(self._prefix(step))
        except (tf.errors.FailedPreconditionError, tf.errors.UnimplementedError) as e:
            self._savable = False
            logging.warning(
                "the input pipeline's position cannot be saved (%s): a resume restarts its order",
                e.message.strip()[:300],
            )

    def prune(self, keep_steps: set[int]) -> None:
        """Removes the saved positions of steps whose model checkpoint is gone."""
        if not tf.io.gfile.isdir(self.directory):
            return
        for name in tf.io.gfile.listdir(self.directory):
            match = re.match(r"input-(\d+)\.", name)
            if match and int(match.group(1)) not in keep_steps:
                tf.io.gfile.remove(os.path.join(self.directory, name))

    def _prefix(self, step: int) -> str:
        return os.path.join(self.directory, f"input-{step}")
