"""Deployment matrix: each detector in TF (the SavedModel's graph), onnxruntime and OpenVINO.

    .venv/bin/python bench/deployment_matrix.py                       # R50-FPN types at 800x1333
    .venv/bin/python bench/deployment_matrix.py --tiny --size 112x150  # seconds, for a smoke run

For every detector type it builds the model (random weights; the score layers
sharpened as in tests/test_portable_export.py so that there are detections to
compare), exports ONNX and OpenVINO IR at ``--size`` (fpn_tf/export/portable.py),
and times, in alternating rounds after ``--warmup`` calls, one uint8 image through:
TF float32 (``DetectionModule.serve_image_tensor``, what the SavedModel runs), TF
bfloat16 (where the CPU has AVX512-BF16 / AMX), onnxruntime float32, OpenVINO f32 and
OpenVINO bf16 (OpenVINO's CPU default on such CPUs). Agreement is against TF float32:
detections, the largest box difference (px) and score difference over them.
Prints a markdown table and writes ``--output`` (JSON with the CPU, its ISA and the
package versions). Compare ratios within one run: the CPU kind moves them.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import statistics
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
flags.DEFINE_list("types", ["faster_rcnn", "mask_rcnn", "retinanet", "segment_proposals"], "Detector types.")
flags.DEFINE_string("size", "800x1333", "Input HxW of the exports and the timed image.")
flags.DEFINE_bool("tiny", False, "Narrow ResNet-18 models at 128 px (a smoke run) instead of R50-FPN.")
flags.DEFINE_integer("repeats", 5, "Timed rounds (median reported).")
flags.DEFINE_integer("warmup", 1, "Untimed calls per implementation first.")
flags.DEFINE_string("output", "bench/results/deployment_matrix.json", "JSON output ('' for none).")

SCORE_LAYERS = {
    "faster_rcnn": ("class_logits",),
    "mask_rcnn": ("class_logits",),
    "retinanet": ("class_logits",),
    "segment_proposals": ("mlp5_score", "mlp7_score"),
}


def model_config(name: str):
    from fpn_tf.config import ModelConfig, SegmentProposalConfig

    if not FLAGS.tiny:
        return ModelConfig(type=name)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from tiny import tiny_model_config
    from tiny_retinanet import tiny_retinanet_config

    if name == "retinanet":
        return tiny_retinanet_config(image_size=128)
    base = tiny_model_config(image_size=128)
    masked = dataclasses.replace(base.input, mask_size=28)
    if name == "mask_rcnn":
        return dataclasses.replace(base, type=name, input=masked)
    if name == "segment_proposals":
        return dataclasses.replace(
            base, type=name, input=masked, segment=SegmentProposalConfig(hidden_dim=16)
        )
    return base


def sharpen(model, suffixes, factor: float) -> None:
    import numpy as np

    for variable in model.weights:
        if variable.path.endswith(tuple(f"{s}/kernel" for s in suffixes)):
            variable.assign(variable.numpy() * factor)
        elif variable.path.endswith(tuple(f"{s}/bias" for s in suffixes)):
            variable.assign(np.zeros(variable.shape, np.float32))


def agreement(reference: dict, outputs: dict) -> dict:
    """Each reference detection (top 100 proposals) against its nearest same-class output.

    By nearest box, not by index: near-equal scores may swap ranks between runtimes.
    """
    import numpy as np

    if "num_detections" in reference:
        n, m = int(reference["num_detections"][0]), int(outputs["num_detections"][0])
        ref_boxes, out_boxes = reference["detection_boxes"][0, :n], outputs["detection_boxes"][0, :m]
        ref_scores, out_scores = reference["detection_scores"][0, :n], outputs["detection_scores"][0, :m]
        ref_classes, out_classes = reference["detection_classes"][0, :n], outputs["detection_classes"][0, :m]
    else:
        n = m = 100
        ref_boxes, out_boxes = reference["proposal_boxes"][0, :n], outputs["proposal_boxes"][0, : n + 50]
        ref_scores, out_scores = reference["proposal_scores"][0, :n], outputs["proposal_scores"][0, : n + 50]
        ref_classes, out_classes = np.zeros(n), np.zeros(len(out_boxes))
    box_px, score, close = 0.0, 0.0, 0
    for i in range(n):
        distance = np.abs(out_boxes - ref_boxes[i]).max(axis=1) + np.where(
            out_classes == ref_classes[i], 0, 1e9
        )
        j = int(np.argmin(distance)) if len(distance) else -1
        if j < 0 or distance[j] >= 1e9:
            continue
        close += int(distance[j] <= 0.5)
        box_px, score = max(box_px, float(distance[j])), max(score, float(abs(out_scores[j] - ref_scores[i])))
    return {
        "detections": n,
        "same_count": n == m,
        "within_half_px": close,
        "max_box_px": box_px,
        "max_score": score,
    }


def implementations(name: str, folder: str, hw, bf16: bool) -> dict:
    """{label: (format, precision, callable(images) -> outputs)} for one detector type."""
    import keras
    import tensorflow as tf

    from fpn_tf.export import portable, portable_runtime
    from fpn_tf.export.serving import DetectionModule
    from fpn_tf.models.build import build_model

    keras.utils.set_random_seed(0)
    config = model_config(name)
    model = build_model(config)
    sharpen(model, SCORE_LAYERS[name], 25.0 if name != "segment_proposals" else 8.0)
    modules = {"float32": DetectionModule(model)}
    if bf16:
        fast = build_model(dataclasses.replace(config, compute_dtype="mixed_bfloat16"))
        for a, b in zip(fast.weights, model.weights):
            a.assign(b)
        modules["bfloat16"] = DetectionModule(fast)
    onnx_path, xml_path = os.path.join(folder, f"{name}.onnx"), os.path.join(folder, f"{name}.xml")
    start = time.perf_counter()
    portable.export_portable(model, onnx_path, "onnx", input_hw=hw)
    onnx_s = time.perf_counter() - start
    portable.onnx_to_openvino(onnx_path, xml_path)
    convert_s = time.perf_counter() - start - onnx_s
    print(f"{name}: ONNX export {onnx_s:.0f} s, OpenVINO conversion {convert_s:.0f} s")

    def tf_call(module):
        return lambda images: {
            k: v.numpy() for k, v in module.serve_image_tensor(tf.constant(images)).items()
        }

    impls = {f"tf {p}": ("TF SavedModel graph", p, tf_call(m)) for p, m in modules.items()}
    impls["onnxruntime float32"] = ("ONNX", "float32", portable_runtime.onnx_runner(onnx_path))
    for precision in ("f32", "bf16") if bf16 else ("f32",):
        impls[f"openvino {precision}"] = (
            "OpenVINO",
            precision,
            portable_runtime.openvino_runner(xml_path, precision),
        )
    return impls


def main(argv):
    del argv
    import numpy as np

    from fpn_tf.export.precision import cpu_info

    try:
        hw = tuple(int(v) for v in FLAGS.size.lower().split("x"))
        assert len(hw) == 2 and min(hw) > 0
    except (ValueError, AssertionError):
        raise app.UsageError(f"--size must look like 800x1333, got {FLAGS.size!r}") from None
    bf16 = bool({"avx512_bf16", "amx_bf16"} & set(cpu_info()["isa"]))
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (1, *hw, 3), dtype=np.uint8)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in FLAGS.types:
            impls = implementations(name, folder, hw, bf16)
            times = {label: [] for label in impls}
            for _, _, run in impls.values():
                for _ in range(FLAGS.warmup):
                    run(image)
            for _ in range(FLAGS.repeats):  # alternating: load on the machine hits every row alike
                for label, (_, _, run) in impls.items():
                    start = time.perf_counter()
                    run(image)
                    times[label].append(time.perf_counter() - start)
            reference = impls["tf float32"][2](image)
            base = statistics.median(times["tf float32"])
            for label, (fmt, precision, run) in impls.items():
                seconds = statistics.median(times[label])
                rows.append(
                    {
                        "type": name,
                        "format": fmt,
                        "precision": precision,
                        "seconds": seconds,
                        "vs_tf_float32": seconds / base,
                        **agreement(reference, run(image)),
                    }
                )
    print(format_table(rows))
    if FLAGS.output:
        versions = {}
        for package in (
            "tensorflow-cpu",
            "tensorflow",
            "keras",
            "tf2onnx",
            "onnx",
            "onnxruntime",
            "openvino",
        ):
            try:
                versions[package] = importlib.metadata.version(package)
            except importlib.metadata.PackageNotFoundError:
                pass
        info = {**cpu_info(), "cores": len(os.sched_getaffinity(0)), "versions": versions}
        record = {
            "machine": info,
            "size": list(hw),
            "tiny": FLAGS.tiny,
            "repeats": FLAGS.repeats,
            "rows": rows,
        }
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
        with open(FLAGS.output, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
        print(f"wrote {FLAGS.output}")


def format_table(rows: list[dict]) -> str:
    header = (
        "detector",
        "format",
        "precision",
        "s / image",
        "× TF fp32",
        "detections",
        "within 0.5 px",
        "max box Δ px",
        "max score Δ",
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        same = f"{r['within_half_px']}" + ("" if r["same_count"] else " (count differs)")
        cells = (
            r["type"],
            r["format"],
            r["precision"],
            f"{r['seconds']:.3f}",
            f"{r['vs_tf_float32']:.2f}",
            str(r["detections"]),
            same,
            f"{r['max_box_px']:.3f}",
            f"{r['max_score']:.1e}",
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    app.run(main)
