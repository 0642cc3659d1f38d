"""pytest set-up shared by every test module.

The CPU is split into two logical devices before TensorFlow initialises, so
MirroredStrategy tests can run two replicas on a CPU-only machine (TF refuses to
change virtual devices once it has initialised them). Tests that use a single
device are unaffected: ops run on the first logical CPU as before.
"""

from __future__ import annotations

import os

NUM_LOGICAL_CPUS = 2


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: multi-process tests (tens of seconds); run in CI, skip with -m 'not slow'"
    )
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    from fpn_tf.training.distribute import configure_logical_cpus

    configure_logical_cpus(NUM_LOGICAL_CPUS)
    assert len(tf.config.list_logical_devices("CPU")) == NUM_LOGICAL_CPUS
