"""Restoring a model from the trainer's checkpoints (used by evaluate, export, predict).

The trainer writes ``tf.train.Checkpoint(model=..., optimizer=..., step=...)`` with a
``tf.train.CheckpointManager``; readers need only ``model``.
"""

from __future__ import annotations

import os

import keras
import tensorflow as tf

from fpn_tf.config import ModelConfig


def checkpoint_prefix(path: str) -> str:
    """A checkpoint prefix from a training directory (its latest), a prefix or a ``.index`` file."""
    prefix = path[: -len(".index")] if path.endswith(".index") else path
    if os.path.isdir(prefix):
        found = tf.train.latest_checkpoint(prefix)
        if found is None:
            raise FileNotFoundError(f"{prefix} holds no TF checkpoint (no 'checkpoint' file)")
        return found
    if not tf.io.gfile.exists(prefix + ".index"):
        raise FileNotFoundError(f"{path} is neither a training directory nor a checkpoint prefix")
    return prefix


def restore_weights(model: keras.Model, prefix: str) -> None:
    """Reads ``model``'s variables from checkpoint ``prefix``; every variable must be found.

    Raises ValueError naming the variables a checkpoint cannot hold (not tracked by
    the object graph) or, when the checkpoint does not fit, the mismatch.
    """
    checkpoint = tf.train.Checkpoint(model=model)
    # A variable the checkpoint's object graph cannot reach is neither saved nor
    # restored, and assert_existing_objects_matched does not notice it.
    reachable = {id(obj) for obj in tf.train.TrackableView(checkpoint).descendants()}
    untracked = [v.path for v in model.variables if id(v) not in reachable]
    if untracked:
        raise ValueError(
            f"{len(untracked)} model variable(s) are not tracked by tf.train.Checkpoint(model=...), so "
            f"no checkpoint holds them and {prefix} cannot restore them: {', '.join(untracked[:12])}"
            f"{' ...' if len(untracked) > 12 else ''} (sub-layers kept in a list or dict are not "
            "tracked by Keras 3 checkpoints; assign each to its own attribute)"
        )
    status = checkpoint.restore(prefix).expect_partial()
    try:
        status.assert_existing_objects_matched()
    except AssertionError as e:
        raise ValueError(
            f"checkpoint {prefix} does not fit the model built from the config "
            f"(different backbone, num_classes or layers?): {str(e)[:500]}"
        ) from None


def restore_model(config: ModelConfig, path: str | None = None) -> keras.Model:
    """``build_faster_rcnn(config)`` with the weights of checkpoint ``path``.

    ``path``: a training directory (latest checkpoint), a prefix or a ``.index``
    file; None keeps the fresh initialisation.
    """
    from fpn_tf.models.faster_rcnn import build_faster_rcnn

    model = build_faster_rcnn(config=config)
    if path:
        restore_weights(model, checkpoint_prefix(path))
    return model
