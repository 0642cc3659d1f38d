"""The ResNet body in bfloat16 with its frozen batch norms folded into the convs, and without.

    python bench/norm_fold.py --output=bench/results/norm_fold.json

Builds the R50 body (``build_resnet``, frozen BN) under ``mixed_bfloat16`` three times from one
seed: as built (``FoldableConv2D`` applies each norm: ``fpn_tf/layers/folded_conv.py``), with the
links cut (each norm runs as its own ``FusedBatchNormV3`` pass), and with the norms replaced by
identities (the floor: no norm work at all; wrong outputs, timing only). Times a forward pass at
``--size`` (832×1344 = 800×1333 padded), the three alternating call by call, median of
``--repeats`` after one warm-up call each.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

from absl import app, flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

FLAGS = flags.FLAGS
flags.DEFINE_string("size", "832x1344", "input HxW")
flags.DEFINE_integer("repeats", 7, "timed calls per variant")
flags.DEFINE_string("output", "", "also write the results as JSON here")

VARIANTS = ("folded", "separate norms", "identity norms")


def build_body(variant: str):
    import keras

    from fpn_tf.config import BackboneConfig
    from fpn_tf.layers.frozen_batch_norm import FrozenBatchNorm
    from fpn_tf.models.resnet import build_resnet

    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        keras.utils.set_random_seed(0)
        body = build_resnet(BackboneConfig(name="resnet50"))
    finally:
        keras.config.set_dtype_policy("float32")
    for layer in body.layers:
        if variant != "folded" and isinstance(layer, FrozenBatchNorm):
            layer.folded_into().unfold()  # the norm runs itself
            if variant == "identity norms":
                layer.call = lambda inputs, training=None: inputs
    return body


def main(argv):
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(len(os.sched_getaffinity(0)))
    tf.config.threading.set_inter_op_parallelism_threads(1)
    height, width = (int(v) for v in FLAGS.size.lower().split("x"))
    x = tf.constant(np.random.default_rng(0).uniform(-1, 1, (1, height, width, 3)).astype(np.float32))
    functions = {}
    for variant in VARIANTS:
        body = build_body(variant)
        functions[variant] = tf.function(lambda x, body=body: body(x, training=False))
        tf.nest.map_structure(lambda t: t.numpy(), functions[variant](x))  # trace + warm-up
    times = {v: [] for v in VARIANTS}
    for _ in range(FLAGS.repeats):
        for variant, function in functions.items():
            start = time.perf_counter()
            tf.nest.map_structure(lambda t: t.numpy(), function(x))
            times[variant].append(time.perf_counter() - start)
    medians = {v: statistics.median(t) for v, t in times.items()}
    print(f"\nResNet-50 body, bfloat16, {height}x{width}, median of {FLAGS.repeats} (seconds):")
    for variant, seconds in medians.items():
        print(f"  {variant:16s} {seconds:.3f}")
    if FLAGS.output:
        report = {"size": [height, width], "repeats": FLAGS.repeats, "load_average": os.getloadavg(),
                  "median_s": medians, "times_s": times}  # fmt: skip
        with open(FLAGS.output, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    app.run(main)
