"""``--xla auto``: whether to XLA-compile the training step, per device type, from measurements.

- CPU: off. Measured with ``bench/xla_step_time.py`` (demo config, steps/s
  after the first step, XLA and non-XLA runs alternating) on this project's
  2-core CPU machine: see the table in docs/distributed.md. Quiet, XLA runs at
  0.72-0.94x the steps/s without it on one device and ties (0.97-1.08x) under
  MirroredStrategy; under load it falls to 0.3-0.6x. oneDNN's bfloat16 (AMX)
  kernels are used only outside XLA, and compiling costs time: no gain to pay for.
- GPU: on. Not measurable here (no GPU): XLA fuses the element-wise box,
  sampler and RoIAlign maths that otherwise run as many small kernels;
  ``scripts/gpu_check.sh`` times both on the GPU it runs on.
- TPU: on (TPUs run compiled programs only).

The step compiles once (tests/test_xla_compile.py), so the choice is about
steady-state speed, not recompilation.
"""

from __future__ import annotations

import tensorflow as tf
from absl import logging

AUTO_XLA = {"CPU": False, "GPU": True, "TPU": True}
_REASONS = {
    "CPU": "no faster than without XLA on CPU, measured: docs/distributed.md",
    "GPU": "XLA fuses the box / sampler / RoIAlign maths on GPU",
    "TPU": "TPUs run compiled programs only",
}


def device_type(strategy: tf.distribute.Strategy | None = None) -> str:
    """ "CPU", "GPU" or "TPU": where ``strategy`` (default: the current one) runs its replicas."""
    strategy = strategy or tf.distribute.get_strategy()
    devices = list(getattr(strategy.extended, "worker_devices", ()) or ())
    kinds = {tf.DeviceSpec.from_string(d).device_type for d in devices}
    kinds.discard(None)
    if len(kinds) == 1:
        return kinds.pop().upper()
    if tf.config.list_logical_devices("TPU"):
        return "TPU"
    return "GPU" if tf.config.list_logical_devices("GPU") else "CPU"


def auto_xla(strategy: tf.distribute.Strategy | None = None) -> bool:
    """The ``AUTO_XLA`` choice for the strategy's device type; logs the choice and why."""
    kind = device_type(strategy)
    choice = AUTO_XLA.get(kind, False)
    reason = _REASONS.get(kind, "unknown device type")
    logging.info("--xla auto: %s on %s (%s)", "on" if choice else "off", kind, reason)
    return choice
