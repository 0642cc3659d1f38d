"""Model weights in and out of checkpoints: the trainer's own, and initial weights.

The trainer writes ``tf.train.Checkpoint(model=..., optimizer=..., step=...)`` with a
``tf.train.CheckpointManager``; readers (evaluate, export, predict) need only
``model`` (``restore_model``). ``load_init_checkpoint`` starts a fresh run from
pretrained weights in any of the supported formats.
"""

from __future__ import annotations

import glob
import os
import re

import keras
import tensorflow as tf
from absl import logging

from fpn_tf.config import ModelConfig
from fpn_tf.models.weights_keras_applications import check_h5_file, load_keras_applications_backbone
from fpn_tf.models.weights_torchvision import load_torchvision_backbone


class DamagedCheckpointError(ValueError):
    """A checkpoint whose files cannot be read (truncated, corrupt or missing a part)."""


# What tf.train.Checkpoint.restore raises on unreadable files (measured, TF 2.21): a
# truncated .data file IndexError ("Read less bytes than requested"); a garbage, empty
# or cut .index and a missing .data file OpError; a flipped byte DataLossError
# ("Checksum does not match"). A ValueError (shape mismatch) means "does not fit".
READ_ERRORS = (tf.errors.OpError, IndexError)


def checkpoint_files(prefix: str) -> list[str]:
    """The files of checkpoint ``prefix``: its ``.index`` and ``.data-*`` shards."""
    return sorted(tf.io.gfile.glob(prefix + ".index") + tf.io.gfile.glob(prefix + ".data-*"))


def damaged_message(prefix: str, error: Exception) -> str:
    """``prefix`` is damaged: its files with their sizes, and TensorFlow's reason."""
    files = ", ".join(f"{f} ({tf.io.gfile.stat(f).length} bytes)" for f in checkpoint_files(prefix))
    reason = getattr(error, "message", None) or str(error)
    return f"checkpoint {prefix} is damaged (files: {files or 'none'}): {reason.strip()[:300]}"


def checkpoint_candidates(directory: str) -> list[str]:
    """The checkpoints of a training directory, newest (highest step) first.

    Those the ``checkpoint`` state file lists plus any ``ckpt-N.index`` beside it,
    so a damaged or missing state file does not hide the intact checkpoints.
    """
    prefixes = set()
    try:
        state = tf.train.get_checkpoint_state(directory)
    except Exception as e:  # noqa: BLE001 - a garbled state file: parse errors of several kinds
        logging.error(
            "%s: the checkpoint state file cannot be read (%s); looking for ckpt-*.index", directory, e
        )
        state = None
    if state is not None:
        for path in state.all_model_checkpoint_paths:
            path = path if os.path.isabs(path) else os.path.join(directory, path)
            if tf.io.gfile.exists(path + ".index"):
                prefixes.add(path)
    prefixes.update(
        p[: -len(".index")] for p in glob.glob(os.path.join(glob.escape(directory), "ckpt-*.index"))
    )

    def step(prefix: str) -> int:
        match = re.search(r"-(\d+)$", prefix)
        return int(match.group(1)) if match else -1

    return sorted(prefixes, key=step, reverse=True)


def restore_newest_intact(checkpoint: tf.train.Checkpoint, directory: str):
    """Restores the newest readable checkpoint of ``directory`` into ``checkpoint``.

    A damaged one is logged at ERROR with its files and skipped for the next older
    one. Returns ``(prefix, load status, damaged prefixes)``; ``(None, None, [])``
    for a directory without checkpoints. Raises DamagedCheckpointError naming
    every checkpoint when none is readable (nothing is started from scratch).
    """
    damaged = []
    for prefix in checkpoint_candidates(directory):
        try:
            status = checkpoint.restore(prefix)
        except READ_ERRORS as e:
            logging.error("%s; trying the next older checkpoint", damaged_message(prefix, e))
            damaged.append(prefix)
            continue
        if damaged:
            logging.warning(
                "RESUMING FROM AN OLDER CHECKPOINT %s: the newer %s could not be read (see the errors above)",
                prefix,
                ", ".join(damaged),
            )
        return prefix, status, damaged
    if damaged:
        raise DamagedCheckpointError(
            f"no intact checkpoint in {directory}: {', '.join(damaged)} are all damaged (see the errors "
            "logged above). Move them away to start from scratch, or restore a backup."
        )
    return None, None, []


def checkpoint_prefix(path: str) -> str:
    """A checkpoint prefix from a training directory (its latest), a prefix or a ``.index`` file."""
    prefix = path[: -len(".index")] if path.endswith(".index") else path
    if os.path.isdir(prefix):
        found = checkpoint_candidates(prefix)
        if not found:
            raise FileNotFoundError(
                f"{prefix} holds no TF checkpoint (no 'checkpoint' file, no ckpt-*.index)"
            )
        return found[0]
    if not tf.io.gfile.exists(prefix + ".index"):
        raise FileNotFoundError(f"{path} is neither a training directory nor a checkpoint prefix")
    return prefix


def restore_weights(model: keras.Model, prefix: str) -> None:
    """Reads ``model``'s variables from checkpoint ``prefix``; every variable must be found.

    Raises ValueError naming the variables a checkpoint cannot hold (not tracked by
    the object graph) or, when the checkpoint does not fit, the mismatch;
    DamagedCheckpointError naming the files when they cannot be read.
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
    try:
        status = checkpoint.restore(prefix).expect_partial()
    except READ_ERRORS as e:
        older = [p for p in checkpoint_candidates(os.path.dirname(prefix) or ".") if p != prefix]
        hint = f"; older checkpoints beside it: {', '.join(older)}" if older else ""
        raise DamagedCheckpointError(damaged_message(prefix, e) + hint) from None
    try:
        status.assert_existing_objects_matched()
    except AssertionError as e:
        raise ValueError(
            f"checkpoint {prefix} does not fit the model built from the config "
            f"(different backbone, num_classes or layers?): {str(e)[:500]}"
        ) from None


def restore_model(config: ModelConfig, path: str | None = None) -> keras.Model:
    """``build_model(config)`` (the detector of ``config.type``) with the weights of ``path``.

    ``path``: a training directory (latest checkpoint), a prefix or a ``.index``
    file; None keeps the fresh initialisation.
    """
    from fpn_tf.models.build import build_model

    model = build_model(config)
    if path:
        restore_weights(model, checkpoint_prefix(path))
    return model


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
        check_h5_file(path)  # names the file, where h5py says only "file signature not found"
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
