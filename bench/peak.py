"""This machine's measured float32 / bfloat16 matmul and convolution peak, in TensorFlow.

    python bench/peak.py            # prints the four rates once

The "peak" a model's GFLOP/s is compared with is what TensorFlow's own oneDNN
kernels reach on large, well-shaped problems on the cores this process may use,
measured in the same run as the model (a nominal peak from clock × FMA width
means little on a shared 2-vCPU virtual machine whose clock is unknown):

- matmul: ``[2048, 2048] @ [2048, 2048]`` (17.2 GFLOP);
- conv: a 3×3, 256 → 256 channel, stride-1 ``SAME`` convolution on a
  ``[1, 104, 168, 256]`` map (20.6 GFLOP), the shape of the FPN's smoothing and
  the RPN head's convolutions on P3 of an 832×1344 input.

Each is run in float32 and in bfloat16 (oneDNN's AVX512-BF16 or AMX kernels where
the CPU has them), without XLA, as the ``keras`` / ``keras_bf16`` benchmarks run.
A rate is the best of ``repeats`` calls (after one warm-up call): a peak is what
the machine *can* do, so the fastest call, the one least disturbed by other work
on the machine, is the estimate. A multiply-add is 2 FLOPs (as in bench/flops.py).
"""

from __future__ import annotations

import os
import sys
import time

MATMUL_N = 2048
CONV_SHAPE = (1, 104, 168, 256)  # B, h, w, C
CONV_KERNEL = (3, 3, 256, 256)
KINDS = ("matmul", "conv")
DTYPES = ("float32", "bfloat16")


def _flops(kind: str) -> int:
    if kind == "matmul":
        return 2 * MATMUL_N**3
    b, h, w, _ = CONV_SHAPE
    kh, kw, cin, cout = CONV_KERNEL
    return 2 * b * h * w * kh * kw * cin * cout


class PeakMeter:
    """Builds the four kernels once; ``measure()`` returns their GFLOP/s."""

    def __init__(self, repeats: int = 3):
        import numpy as np
        import tensorflow as tf

        self.repeats = repeats
        rng = np.random.default_rng(0)
        self._calls = {}
        for dtype in DTYPES:
            tf_dtype = tf.as_dtype(dtype)
            a = tf.cast(tf.constant(rng.standard_normal((MATMUL_N, MATMUL_N)), tf.float32), tf_dtype)
            b = tf.cast(tf.constant(rng.standard_normal((MATMUL_N, MATMUL_N)), tf.float32), tf_dtype)
            x = tf.cast(tf.constant(rng.standard_normal(CONV_SHAPE), tf.float32), tf_dtype)
            k = tf.cast(tf.constant(rng.standard_normal(CONV_KERNEL) * 0.02, tf.float32), tf_dtype)
            # Reduce to a scalar inside the function, so the timed call includes no copy out.
            matmul = tf.function(lambda a, b: tf.reduce_sum(tf.cast(tf.matmul(a, b)[:1, :1], tf.float32)))
            conv = tf.function(
                lambda x, k: tf.reduce_sum(tf.cast(tf.nn.conv2d(x, k, 1, "SAME")[:, :1, :1, :1], tf.float32))
            )
            self._calls[("matmul", dtype)] = (matmul, (a, b))
            self._calls[("conv", dtype)] = (conv, (x, k))
        for fn, args in self._calls.values():
            fn(*args).numpy()  # trace + warm-up

    def measure(self) -> dict[str, float]:
        """{"float32_matmul": GFLOP/s, "float32_conv": ..., "bfloat16_matmul": ..., ...}."""
        rates = {}
        for (kind, dtype), (fn, args) in self._calls.items():
            best = float("inf")
            for _ in range(self.repeats):
                start = time.perf_counter()
                fn(*args).numpy()
                best = min(best, time.perf_counter() - start)
            rates[f"{dtype}_{kind}"] = _flops(kind) / best / 1e9
        return rates


def summarise(samples: list[dict[str, float]]) -> dict[str, float]:
    """The best rate of each kernel over several ``measure()`` samples."""
    keys = samples[0].keys() if samples else ()
    return {key: max(s[key] for s in samples) for key in keys}


def main() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    meter = PeakMeter()
    for key, rate in summarise([meter.measure() for _ in range(3)]).items():
        print(f"{key:18s} {rate:8.1f} GFLOP/s")
    print(f"load average {os.getloadavg()[0]:.2f}, {len(os.sched_getaffinity(0))} cores", file=sys.stderr)


if __name__ == "__main__":
    main()
