"""Exports a trained (or freshly built) detector: a SavedModel for TF Serving, or ONNX / OpenVINO.

    python scripts/export.py --model_dir runs/coco --export_dir saved_models --name fpn
    # -> saved_models/fpn/<next version>/ with serving_default, image_tensor, tf_example
    python scripts/export.py --model_dir runs/coco --format onnx --input_size 800x1333
    # -> saved_models/fpn_faster_rcnn.onnx: uint8 images [1, 800, 1333, 3] -> the same outputs
    python scripts/export.py --model_dir runs/coco --format openvino --input_size 800x1333
    # -> saved_models/fpn_faster_rcnn.xml + .bin (OpenVINO IR)

ONNX and OpenVINO exports take images of one fixed size (``--input_size``, default
the model's min_size x max_size) and batch (``--batch_size``), are float32, and need
the extras ``pip install 'fpn_tf[onnx]'`` / ``'fpn_tf[openvino]'`` (fpn_tf/export/portable.py).

``--model_dir`` is a training directory: the latest checkpoint is restored (the
trainer's ``tf.train.Checkpoint(model=...)``; optimizer state is ignored) and its
``config.yaml`` / ``label_map.json`` are used unless ``--config`` /
``--label_map`` say otherwise. Without ``--model_dir`` the model is freshly built
from ``--config`` (random weights: for trying the serving path).
See docs/serving.md for serving the result.

``--compute_dtype`` (default ``auto``): bfloat16 compute where the exporting CPU
has AVX512-BF16 or AMX, float32 otherwise (``fpn_tf.export.precision``); the
choice and the reason are written to ``assets/serving_precision.json``.
``--compute_dtype=float32`` exports float32 for servers without bfloat16 units.
"""

from __future__ import annotations

import time

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "Training directory with checkpoints; none: a freshly built model.")
flags.DEFINE_string("config", None, "Experiment YAML (default: <model_dir>/config.yaml, else defaults).")
flags.DEFINE_multi_string("override", [], "Config overrides key.path=value, e.g. model.num_classes=4.")
flags.DEFINE_string("export_dir", "saved_models", "Base directory: writes <export_dir>/<name>/<version>/.")
flags.DEFINE_string("name", "fpn_faster_rcnn", "Model name (TF Serving's MODEL_NAME).")
flags.DEFINE_integer("version", None, "Version number; default: one more than the highest existing.")
flags.DEFINE_integer(
    "max_image_pixels",
    50_000_000,
    "Largest height x width a request's image may have (checked before decoding).",
)
flags.DEFINE_bool(
    "full_image_masks",
    False,
    "Mask models: also serve detection_masks_image, uint8 binary masks at the original size "
    "(images over --full_image_max_pixels are refused).",
)
flags.DEFINE_integer("full_image_max_pixels", 1024 * 1024, "Cap on original h * w for detection_masks_image.")
flags.DEFINE_string("label_map", None, "Label map JSON (default: <model_dir>/label_map.json, else identity).")
flags.DEFINE_enum("format", "saved_model", ["saved_model", "onnx", "openvino"], "What to write.")
flags.DEFINE_string(
    "output", None, "onnx / openvino: the file (.onnx / .xml); default <export_dir>/<name>.onnx / .xml."
)
flags.DEFINE_string(
    "input_size", None, "onnx / openvino: fixed input HxW, e.g. 800x1333 (default min x max size)."
)
flags.DEFINE_integer("batch_size", 1, "onnx / openvino: fixed batch size.")
flags.DEFINE_enum(
    "compute_dtype",
    "auto",
    ["auto", "float32", "mixed_bfloat16"],
    "Served compute dtype; auto: mixed_bfloat16 on CPUs with AVX512-BF16 or AMX, else float32.",
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import dataclasses

    from fpn_tf import run_directory
    from fpn_tf.export import saved_model
    from fpn_tf.export.precision import resolve_serving_dtype

    start = time.perf_counter()
    config = run_directory.read_config(FLAGS.model_dir, FLAGS.config, FLAGS.override)
    # float32 variables either way: the checkpoint restores into a bfloat16-compute model.
    if FLAGS.format == "saved_model":
        compute_dtype, reason = resolve_serving_dtype(FLAGS.compute_dtype)
    else:
        compute_dtype, reason = "float32", f"--format {FLAGS.format} exports are float32"
    config.model = dataclasses.replace(config.model, compute_dtype=compute_dtype)
    logging.info("serving compute dtype %s (%s)", compute_dtype, reason)
    model = saved_model.restore_model(config.model, FLAGS.model_dir)
    label_map = run_directory.read_label_map(FLAGS.model_dir, FLAGS.label_map)
    if FLAGS.model_dir is None:
        logging.warning("no --model_dir: exporting a freshly initialised model (random weights)")
    if label_map is None:
        logging.warning(
            "no label map: detection_classes will be the contiguous labels 1..%d",
            config.model.num_classes - 1,
        )
    built = time.perf_counter()
    print(f"exporting {compute_dtype}: {reason}", flush=True)  # before the minutes of export
    if FLAGS.format != "saved_model":
        return export_portable(model, label_map)
    path = saved_model.export_saved_model(
        model,
        FLAGS.export_dir,
        FLAGS.name,
        version=FLAGS.version,
        label_map=label_map,
        max_image_pixels=FLAGS.max_image_pixels,
        full_image_masks=FLAGS.full_image_masks,
        full_image_max_pixels=FLAGS.full_image_max_pixels,
        precision_reason=reason,
    )
    done = time.perf_counter()
    print(
        f"exported {path} ({compute_dtype}: {reason}; "
        f"build/restore {built - start:.1f} s, export {done - built:.1f} s)"
    )


def parse_size(text: str) -> tuple[int, int]:
    """ "800x1333" -> (800, 1333)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise app.UsageError(f"--input_size must look like 800x1333, got {text!r}") from None
    return h, w


def export_portable(model, label_map) -> int:
    import os

    from fpn_tf.export import portable

    path = FLAGS.output or os.path.join(FLAGS.export_dir, FLAGS.name + portable.FORMAT_SUFFIX[FLAGS.format])
    input_hw = parse_size(FLAGS.input_size) if FLAGS.input_size else portable.default_input_hw(model)
    start = time.perf_counter()
    try:
        portable.export_portable(model, path, FLAGS.format, label_map, input_hw, FLAGS.batch_size)
    except (ValueError, FileExistsError, ImportError) as e:
        logging.error("%s", e)
        return 2
    print(
        f"exported {path} ({FLAGS.format}, float32, input uint8 [{FLAGS.batch_size}, {input_hw[0]}, "
        f"{input_hw[1]}, 3]) in {time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    app.run(main)
