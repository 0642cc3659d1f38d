"""pytest set-up shared by every test module.

The CPU is split into two logical devices before TensorFlow initialises, so
MirroredStrategy tests can run two replicas on a CPU-only machine (TF refuses to
change virtual devices once it has initialised them). Tests that use a single
device are unaffected: ops run on the first logical CPU as before.
"""

from __future__ import annotations

import os

import pytest

NUM_LOGICAL_CPUS = 2


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "slow: training runs, subprocesses and fresh-process loads (seconds to minutes each); "
        "run in CI, skip with -m 'not slow' for the quick loop",
    )
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    from fpn_tf.training.distribute import configure_logical_cpus

    configure_logical_cpus(NUM_LOGICAL_CPUS)
    assert len(tf.config.list_logical_devices("CPU")) == NUM_LOGICAL_CPUS


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory):
    """One tiny Faster R-CNN trained on 20 shape images until it detects them (shared).

    Returns a dict: ``config`` (ModelConfig), ``checkpoint`` (a tf.train.Checkpoint
    prefix holding ``model``), ``data`` (the 20 images, batch layout of
    docs/design.md), ``first_losses`` / ``last_losses`` (total loss of the first /
    last 20 steps). The overfit, bfloat16 and export tests use it; it costs ~400
    small steps, so those tests are marked slow.
    """
    import keras
    import numpy as np
    import tensorflow as tf
    from tiny import cycle_batches, draw_shape_images, tiny_model_config, train_tiny

    import fpn_tf

    keras.utils.set_random_seed(0)
    cfg = tiny_model_config(num_classes=4)
    model = fpn_tf.build_faster_rcnn(config=cfg)
    data = draw_shape_images(20, size=128, seed=0)
    tensors = {k: tf.constant(v) for k, v in data.items()}
    losses = train_tiny(model, cycle_batches(tensors), steps=400)
    prefix = tf.train.Checkpoint(model=model).write(str(tmp_path_factory.mktemp("trained_tiny") / "model"))
    return {
        "config": cfg,
        "checkpoint": prefix,
        "data": data,
        "first_losses": np.array(losses[:20]),
        "last_losses": np.array(losses[-20:]),
    }
