"""Measures the training input pipeline's throughput (images per second).

    python scripts/benchmark_input.py                       # synthetic data, 800/1333 resize
    python scripts/benchmark_input.py --config=configs/x.yaml --batch_size=2 --num_batches=50

Builds ``fpn_tf.data.pipeline.build_dataset(..., training=True)`` exactly as the
trainer does (decode, resize, flip, pad, GT padding, aspect-ratio grouping) and
times ``--num_batches`` batches after ``--warmup`` batches. Compare the result with
the training step's images/s to see whether input is the bottleneck.
"""

from __future__ import annotations

import os
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "experiment YAML (default: built-in defaults, synthetic data)")
flags.DEFINE_multi_string("override", [], "config overrides, e.g. --override=model.input.min_size=512")
flags.DEFINE_integer("batch_size", 0, "global batch size (0: train.batch_size of the config)")
flags.DEFINE_integer("num_batches", 30, "batches to time")
flags.DEFINE_integer("warmup", 3, "batches before timing starts (fills the prefetch buffers)")


def main(argv):
    del argv
    from fpn_tf.config import load_config
    from fpn_tf.data.pipeline import build_dataset

    config = load_config(FLAGS.config, FLAGS.override)
    batch_size = FLAGS.batch_size or config.train.batch_size
    ds, info = build_dataset(
        config.data, config.model.input, "train", batch_size, training=True, seed=config.train.seed
    )
    it = iter(ds)
    for _ in range(FLAGS.warmup):
        next(it)
    start = time.perf_counter()
    images = 0
    for _ in range(FLAGS.num_batches):
        batch = next(it)
        images += int(batch["images"].shape[0])
    elapsed = time.perf_counter() - start
    spec = ds.element_spec["images"].shape
    print(
        f"source={config.data.source} examples={info.num_examples} batch={batch_size} "
        f"input={spec[1:3]} padded sizes={list(info.padded_hw)} cores={os.cpu_count()}"
    )
    print(f"{images / elapsed:.1f} images/s ({images} images in {elapsed:.2f} s)")


if __name__ == "__main__":
    app.run(main)
