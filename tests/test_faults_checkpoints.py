"""Faults in a training directory's checkpoints, and the input order across a resume.

A damaged newest checkpoint (its .data file cut short, its .index garbage) is
named in an ERROR log and the resume falls back to the newest intact one; none
intact is an error naming them all; readers (evaluate / export / predict) name
the damaged files. Every test checks that the damaged files were left as they
were (hashes before and after). The trainer runs ``TinyDetector``
(tests/test_training.py) so these tests take seconds.
"""

from __future__ import annotations

import hashlib
import logging
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from test_training import make_model, tiny_examples, train_config, weights

from fpn_tf.checkpoints import DamagedCheckpointError, checkpoint_prefix, restore_weights
from fpn_tf.training import distribute
from fpn_tf.training.trainer import Trainer


def shuffled_dataset_fn(examples: dict, global_batch: int):
    """Seeded shuffle, reshuffled every epoch, repeated: the order differs at every step."""

    def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        ds = tf.data.Dataset.from_tensor_slices(examples)
        ds = ds.shard(ctx.num_input_pipelines, ctx.input_pipeline_id).shuffle(16, seed=3).repeat()
        return ds.batch(ctx.get_per_replica_batch_size(global_batch), drop_remainder=True)

    return dataset_fn


def file_hashes(paths) -> dict[str, str]:
    out = {}
    for path in paths:
        with open(path, "rb") as f:
            out[path] = hashlib.sha256(f.read()).hexdigest()
    return out


def trained_dir(tmp_path, steps: int = 6, strategy=None) -> str:
    """``steps`` steps of TinyDetector with a checkpoint every 2: ckpt-2, ckpt-4, ..."""
    model_dir = str(tmp_path / "run")
    keras.utils.set_random_seed(0)
    trainer = Trainer(
        make_model, train_config(train_steps=steps, checkpoint_every=2), model_dir, strategy=strategy
    )
    trainer.fit(shuffled_dataset_fn(tiny_examples(16), 4))
    return model_dir


def truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def checkpoint_values(prefix: str) -> dict[str, np.ndarray]:
    reader = tf.train.load_checkpoint(prefix)
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map() if k.startswith("model/")}


def assert_model_holds(model: keras.Model, prefix: str) -> None:
    """Every model variable equals its value in checkpoint ``prefix``."""
    fresh = make_model()
    tf.train.Checkpoint(model=fresh).read(prefix).expect_partial()
    for a, b in zip(weights(model), weights(fresh)):
        np.testing.assert_array_equal(a, b)


def damaged_messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("damage", ["truncated_data", "garbage_index"])
def test_fault_damaged_latest_checkpoint_falls_back(tmp_path, caplog, damage):
    """newest checkpoint truncated (.data cut in half) or its .index garbage -> ERROR log naming its files;
    the resume continues from the newest intact one (its input position too)"""
    model_dir = trained_dir(tmp_path)
    latest = os.path.join(model_dir, "ckpt-6")
    if damage == "truncated_data":
        truncate(latest + ".data-00000-of-00001")
    else:
        with open(latest + ".index", "wb") as f:
            f.write(os.urandom(200))
    damaged_files = [latest + ".index", latest + ".data-00000-of-00001"]
    before = file_hashes(damaged_files)

    with caplog.at_level(logging.INFO, logger="absl"):
        keras.utils.set_random_seed(5)
        trainer = Trainer(make_model, train_config(train_steps=8, checkpoint_every=2), model_dir)
    assert trainer.restored_from == os.path.join(model_dir, "ckpt-4")
    assert trainer.damaged_checkpoints == [latest]
    assert int(trainer.step.numpy()) == 4
    assert_model_holds(trainer.model, trainer.restored_from)
    errors = damaged_messages(caplog)
    assert any(f"checkpoint {latest} is damaged" in m and damaged_files[1] in m for m in errors), errors
    assert any("RESUMING FROM AN OLDER CHECKPOINT" in r.getMessage() for r in caplog.records)
    assert file_hashes(damaged_files) == before  # left for inspection, not rewritten

    # the resumed run continues ckpt-4's input order: equal to 8 steps straight
    with caplog.at_level(logging.INFO, logger="absl"):
        trainer.fit(shuffled_dataset_fn(tiny_examples(16), 4))
    assert any(
        "input position restored from" in r.getMessage() and "input-4" in r.getMessage()
        for r in caplog.records
    )
    keras.utils.set_random_seed(0)
    straight = Trainer(
        make_model, train_config(train_steps=8, checkpoint_every=2), str(tmp_path / "straight")
    )
    straight.fit(shuffled_dataset_fn(tiny_examples(16), 4))
    for a, b in zip(weights(trainer.model), weights(straight.model)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_fault_every_checkpoint_damaged(tmp_path, caplog):
    """every checkpoint of the training directory damaged -> DamagedCheckpointError naming each; nothing is
    trained from scratch or rewritten"""
    model_dir = trained_dir(tmp_path)
    prefixes = [os.path.join(model_dir, f"ckpt-{s}") for s in (6, 4, 2)]
    for prefix in prefixes:
        truncate(prefix + ".data-00000-of-00001")
    before = file_hashes(
        sorted(os.path.join(model_dir, f) for f in os.listdir(model_dir) if f.startswith("ckpt"))
    )
    with caplog.at_level(logging.INFO, logger="absl"), pytest.raises(DamagedCheckpointError) as info:
        Trainer(make_model, train_config(train_steps=8), model_dir)
    message = str(info.value)
    assert all(p in message for p in prefixes), message
    assert "no intact checkpoint" in message
    assert len(damaged_messages(caplog)) == 3
    assert file_hashes(before) == before


def test_fault_reader_of_a_damaged_checkpoint(tmp_path):
    """evaluate / export / predict given a training directory whose newest checkpoint is truncated ->
    DamagedCheckpointError naming its files and the older intact ones"""
    model_dir = trained_dir(tmp_path)
    latest = os.path.join(model_dir, "ckpt-6")
    truncate(latest + ".data-00000-of-00001")
    before = file_hashes([latest + ".data-00000-of-00001"])
    prefix = checkpoint_prefix(model_dir)
    assert prefix == latest
    with pytest.raises(DamagedCheckpointError) as info:
        restore_weights(make_model(), prefix)
    message = str(info.value)
    assert f"checkpoint {latest} is damaged" in message
    assert latest + ".data-00000-of-00001" in message and "bytes" in message
    assert os.path.join(model_dir, "ckpt-4") in message and os.path.join(model_dir, "ckpt-2") in message
    assert file_hashes(before) == before
    restore_weights(make_model(), os.path.join(model_dir, "ckpt-4"))  # the named older one works


def test_fault_garbled_checkpoint_state_file(tmp_path, caplog):
    """the training directory's 'checkpoint' state file garbled -> TensorFlow's WARNING naming it
    ("Checkpoint ignored"); the resume finds the newest ckpt-N.index itself"""
    model_dir = trained_dir(tmp_path)
    with open(os.path.join(model_dir, "checkpoint"), "w") as f:
        f.write("model_checkpoint_path: {{{ not a proto")
    with caplog.at_level(logging.WARNING):
        trainer = Trainer(make_model, train_config(train_steps=8), model_dir)
    assert trainer.restored_from == os.path.join(model_dir, "ckpt-6")
    state_file = os.path.join(model_dir, "checkpoint")
    assert any(
        r.levelno >= logging.WARNING and state_file in r.getMessage() and "ignored" in r.getMessage()
        for r in caplog.records
    )


def test_fault_resume_keeps_the_input_order_under_mirrored(tmp_path):
    """run stopped at step 4 and resumed to 8 over 2 mirrored CPUs, shuffled data -> weights equal to 8 steps
    straight (the input position is saved with the checkpoint)"""
    strategy = distribute.make_strategy("mirrored")
    examples = tiny_examples(16, seed=4)
    cfg = train_config(train_steps=8, checkpoint_every=1000)

    keras.utils.set_random_seed(0)
    straight = Trainer(make_model, cfg, str(tmp_path / "straight"), strategy=strategy)
    straight.fit(shuffled_dataset_fn(examples, 4))

    keras.utils.set_random_seed(0)
    first = Trainer(make_model, train_config(train_steps=4), str(tmp_path / "run"), strategy=strategy)
    first.fit(shuffled_dataset_fn(examples, 4))
    state_dir = os.path.join(tmp_path, "run", "input_state", "pipeline-0-of-1")
    assert sorted(os.listdir(state_dir)) == ["input-4.data-00000-of-00001", "input-4.index"]
    keras.utils.set_random_seed(9)
    second = Trainer(make_model, cfg, str(tmp_path / "run"), strategy=strategy)
    second.fit(shuffled_dataset_fn(examples, 4))
    for a, b in zip(weights(second.model), weights(straight.model)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

    # without the saved position the order restarts and the weights differ: the test can fail
    keras.utils.set_random_seed(0)
    third = Trainer(make_model, train_config(train_steps=4), str(tmp_path / "again"), strategy=strategy)
    third.fit(shuffled_dataset_fn(examples, 4))
    for name in os.listdir(os.path.join(tmp_path, "again", "input_state", "pipeline-0-of-1")):
        os.remove(os.path.join(tmp_path, "again", "input_state", "pipeline-0-of-1", name))
    fourth = Trainer(make_model, cfg, str(tmp_path / "again"), strategy=strategy)
    fourth.fit(shuffled_dataset_fn(examples, 4))
    assert max(np.abs(a - b).max() for a, b in zip(weights(fourth.model), weights(straight.model))) > 1e-4
