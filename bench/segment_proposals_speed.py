"""Model time per image of the Table 6 rows at a larger image size (random weights).

    python bench/segment_proposals_speed.py --size=800 --output=bench/results/segment_proposals_speed.json

``scripts/segment_proposals_table.py`` times each trained row on the 128-px images it
trains on; there the image pyramid's seven passes are cheap. Time does not depend
on the weights, so this builds every row of the same config
(``configs/segment_proposals_cpu.yaml`` through the table script's ``row_config``)
at ``--size`` × ``--size`` with random weights and times the model call (one image,
the 1000 proposals with their masks), alternating rows call by call. Medians of
``--repeats`` calls after one warm-up call each.
"""

from __future__ import annotations

import importlib.util
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
flags.DEFINE_string("config", os.path.join(_ROOT, "configs", "segment_proposals_cpu.yaml"), "experiment YAML")
flags.DEFINE_integer("size", 800, "square image side (pixels)")
flags.DEFINE_integer("repeats", 7, "timed calls per row")
flags.DEFINE_string("output", "", "also write the results as JSON here")


def _table_script():
    path = os.path.join(_ROOT, "scripts", "segment_proposals_table.py")
    spec = importlib.util.spec_from_file_location("segment_proposals_table", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["segment_proposals_table"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main(argv):
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np
    import tensorflow as tf

    from fpn_tf.config import load_config
    from fpn_tf.models.build import build_model

    table = _table_script()
    side = FLAGS.size
    base = load_config(FLAGS.config, [f"model.input.min_size={side}", f"model.input.max_size={side}"])
    image = np.random.default_rng(0).uniform(0, 255, (1, side, side, 3)).astype(np.float32)
    functions = {}
    for row in table.ROWS:
        keras.utils.set_random_seed(0)
        model = build_model(table.row_config(base, row).model)
        div = model.config.input.size_divisibility
        padded = -(-side // div) * div
        images = np.zeros((1, padded, padded, 3), np.float32)
        images[:, :side, :side] = image
        inputs = {
            "images": tf.constant(images),
            "image_info": tf.constant([[side, side, side, side, 1.0, 1.0]], tf.float32),
        }
        function = tf.function(lambda x, model=model: model(x, training=False))
        tf.nest.map_structure(lambda t: t.numpy(), function(inputs))  # trace + warm-up
        functions[row.key] = (row, function, inputs)
    times = {key: [] for key in functions}
    for _ in range(FLAGS.repeats):
        for key, (_row, function, inputs) in functions.items():
            start = time.perf_counter()
            tf.nest.map_structure(lambda t: t.numpy(), function(inputs))
            times[key].append(time.perf_counter() - start)
    results = {key: statistics.median(v) for key, v in times.items()}
    print(f"\nmodel call per image at {side}x{side}, median of {FLAGS.repeats} (random weights):")
    for key, (row, _f, _i) in functions.items():
        print(f"  {row.name:34s} {results[key]:.3f} s   (paper, M40 at 800 px: {row.paper[4]:.2f} s)")
    if FLAGS.output:
        report = {
            "size": side,
            "repeats": FLAGS.repeats,
            "config": os.path.relpath(FLAGS.config, _ROOT),
            "load_average": os.getloadavg(),
            "seconds_per_image": results,
        }
        with open(FLAGS.output, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    app.run(main)
