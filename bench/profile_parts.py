"""Where the inference time of fpn_tf's Faster R-CNN goes, part by part.

    python bench/profile_parts.py                      # 800x1333, batch 1
    python bench/profile_parts.py --size=512x512 --repeats=7 --output=parts.json

Each part runs as its own ``tf.function`` on the previous part's outputs: pixel
normalisation + ResNet body, FPN (+P6), RPN head, proposals (top-k, decode,
NMS), RoIAlign, box head (2 fc + predictors), detections (decode, per-class NMS).
The whole model, ``model(inputs, training=False)`` in one ``tf.function`` as the
benchmark's ``keras`` row runs it, is timed in the same rounds: the difference from
the sum of the parts is what only the whole graph costs (or saves).
Every part is timed in float32 without XLA (the ``keras`` benchmark), in float32
with XLA (``jit_compile=True``) and in ``compute_dtype="mixed_bfloat16"`` without
XLA; the FLOPs of each part come from its traced graph (``bench.flops``). These
are the numbers behind the choice of which part to compile with XLA and what
bfloat16 buys. Medians of ``--repeats`` calls after one warm-up call; the parts
of one repeat run back to back, so load from other processes hits all alike.
Note: the RoI pooler compiles its own gathers with XLA (``RoIPooler(jit_compile=True)``)
in every column.
"""

from __future__ import annotations

import dataclasses
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
flags.DEFINE_string("size", "800x1333", "image size HxW before padding")
flags.DEFINE_integer("batch", 1, "images per call")
flags.DEFINE_integer("repeats", 5, "timed calls per part and variant (medians are reported)")
flags.DEFINE_integer("threads", 0, "intra-op threads (0: the cores available)")
flags.DEFINE_integer("inter_op_threads", 1, "inter-op threads")
flags.DEFINE_string("output", None, "also write the results as JSON here")

PARTS = (
    "pixel normalisation + ResNet body",
    "FPN (lateral, top-down, smoothing, P6)",
    "RPN head (3x3 conv + 1x1 convs)",
    "proposals (top-k, decode, NMS)",
    "RoIAlign (multi-level)",
    "box head (2 fc + predictors)",
    "detections (decode, class NMS)",
)
WHOLE = "whole model (one tf.function)"
VARIANTS = (("float32", False), ("float32", True), ("mixed_bfloat16", False))


def build_model(compute_dtype: str):
    import keras

    from fpn_tf.config import ModelConfig
    from fpn_tf.models.faster_rcnn import build_faster_rcnn

    keras.utils.set_random_seed(0)
    return build_faster_rcnn(config=dataclasses.replace(ModelConfig(), compute_dtype=compute_dtype))


def make_inputs(model, height: int, width: int, batch: int) -> dict:
    import numpy as np
    import tensorflow as tf

    div = model.config.input.size_divisibility
    ph, pw = -(-height // div) * div, -(-width // div) * div
    images = np.zeros((batch, ph, pw, 3), np.float32)
    images[:, :height, :width] = np.random.default_rng(0).uniform(0, 255, (batch, height, width, 3))
    info = np.tile(np.array([[height, width, height, width, 1.0, 1.0]], np.float32), (batch, 1))
    return {"images": tf.constant(images), "image_info": tf.constant(info)}


def part_functions(model):
    """[(part, fn, args_from(outputs_so_far, inputs))] in execution order."""
    resnet = model.pyramid.get_layer(model.config.backbone.name)
    neck = model.pyramid.get_layer("fpn")
    extra = model.pyramid.get_layer("fpn_extra")

    def body(x):
        return resnet(model.normalizer(x["images"], x["image_info"]))

    def fpn(c):
        out = dict(neck(c))
        top = max(int(k[1:]) for k in out)
        for offset, level in enumerate(extra(out[f"P{top}"])):
            out[f"P{top + 1 + offset}"] = level
        return out

    def rpn_head(p):
        return model.rpn_head(p)

    def proposals(r, info):
        return model.proposal_generator(r, info)

    def roi_align(p, boxes):
        return model.roi_pooler(p, boxes)

    def box_head(pooled):
        return model.box_head(pooled)

    def detections(head, props, info):
        return model.detection_generator(head[0], head[1], props["boxes"], props["valid"], info)

    return [
        (PARTS[0], body, lambda o, x: (x,)),
        (PARTS[1], fpn, lambda o, x: (o[0],)),
        (PARTS[2], rpn_head, lambda o, x: (o[1],)),
        (PARTS[3], proposals, lambda o, x: (o[2], x["image_info"])),
        (PARTS[4], roi_align, lambda o, x: (o[1], o[3]["boxes"])),
        (PARTS[5], box_head, lambda o, x: (o[4],)),
        (PARTS[6], detections, lambda o, x: (o[5], o[3], x["image_info"])),
    ]


def materialise(out):
    import tensorflow as tf

    tf.nest.map_structure(lambda t: t.numpy(), out)


def profile(height: int, width: int, batch: int, repeats: int) -> list[dict]:
    """Per part and variant: median seconds, first-call seconds, GFLOP."""
    import tensorflow as tf

    from bench.flops import tf_flops

    models = {dtype: build_model(dtype) for dtype in ("float32", "mixed_bfloat16")}
    models["mixed_bfloat16"].set_weights(models["float32"].get_weights())
    inputs = make_inputs(models["float32"], height, width, batch)
    # Set up: trace / compile every part of every variant on its own chain of outputs.
    chains = {}
    rows = [{"part": name} for name in PARTS]
    for dtype, jit in VARIANTS:
        key = f"{'bf16' if dtype != 'float32' else 'f32'}_{'xla' if jit else 'graph'}"
        outputs, steps = [], []
        for row, (_name, fn, args_from) in zip(rows, part_functions(models[dtype])):
            function = tf.function(fn, jit_compile=jit)
            args = args_from(outputs, inputs)
            start = time.perf_counter()
            out = function(*args)
            materialise(out)
            row[f"{key}_first_call_s"] = time.perf_counter() - start
            if key == "f32_graph":
                row["gflop"] = tf_flops(function.get_concrete_function(*args)) / 1e9
            outputs.append(out)
            steps.append((function, args))
        whole = tf.function(lambda x, model=models[dtype]: model(x, training=False), jit_compile=jit)
        materialise(whole(inputs))
        chains[key] = steps + [(whole, (inputs,))]
    rows.append({"part": WHOLE, "gflop": sum(r["gflop"] for r in rows)})
    times = {key: [[] for _ in rows] for key in chains}
    for _ in range(repeats + 1):  # the first round is a warm-up
        for key, steps in chains.items():
            for k, (function, args) in enumerate(steps):
                start = time.perf_counter()
                materialise(function(*args))
                times[key][k].append(time.perf_counter() - start)
    for key in chains:
        for k, row in enumerate(rows):
            row[f"{key}_median_s"] = statistics.median(times[key][k][1:])
    return rows


def main(argv):
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(FLAGS.threads or len(os.sched_getaffinity(0)))
    tf.config.threading.set_inter_op_parallelism_threads(FLAGS.inter_op_threads)
    try:
        height, width = (int(v) for v in FLAGS.size.lower().split("x"))
    except ValueError:
        raise app.UsageError(f"--size {FLAGS.size!r} must look like HEIGHTxWIDTH") from None
    before = os.getloadavg()[0]
    rows = profile(height, width, FLAGS.batch, FLAGS.repeats)
    after = os.getloadavg()[0]
    print(f"\nper part, {height}x{width}, batch {FLAGS.batch}, median of {FLAGS.repeats} (seconds):")
    header = (
        f"{'part':40s} {'GFLOP':>7s} {'f32':>7s} {'GFLOP/s':>8s} {'f32 XLA':>8s} {'bf16':>7s} {'GFLOP/s':>8s}"
    )
    print(header + "\n" + "-" * len(header))
    totals = {"f32_graph": 0.0, "f32_xla": 0.0, "bf16_graph": 0.0}
    parts, whole = rows[:-1], rows[-1]
    for r in parts:
        for key in totals:
            totals[key] += r[f"{key}_median_s"]
        rate32 = r["gflop"] / r["f32_graph_median_s"]
        rate16 = r["gflop"] / r["bf16_graph_median_s"]
        print(
            f"{r['part']:40s} {r['gflop']:7.1f} {r['f32_graph_median_s']:7.3f} {rate32:8.1f} "
            f"{r['f32_xla_median_s']:8.3f} {r['bf16_graph_median_s']:7.3f} {rate16:8.1f}"
        )
    gflop = whole["gflop"]
    print(
        f"{'sum of parts':40s} {gflop:7.1f} {totals['f32_graph']:7.3f} {gflop / totals['f32_graph']:8.1f} "
        f"{totals['f32_xla']:8.3f} {totals['bf16_graph']:7.3f} {gflop / totals['bf16_graph']:8.1f}"
    )
    w32, w16 = whole["f32_graph_median_s"], whole["bf16_graph_median_s"]
    print(
        f"{WHOLE:40s} {gflop:7.1f} {w32:7.3f} {gflop / w32:8.1f} "
        f"{whole['f32_xla_median_s']:8.3f} {w16:7.3f} {gflop / w16:8.1f}"
    )
    print(f"\nload average before {before:.2f}, after {after:.2f}")
    if FLAGS.output:
        report = {
            "size": [height, width],
            "batch": FLAGS.batch,
            "repeats": FLAGS.repeats,
            "load_average_before": before,
            "load_average_after": after,
            "parts": rows,
        }
        with open(FLAGS.output, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    app.run(main)
