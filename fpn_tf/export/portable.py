"""Exports that run outside TensorFlow: ONNX (onnxruntime) and OpenVINO IR.

One graph for both: the SavedModel's ``image_tensor`` signature at a FIXED input
size, so every shape in it is static (what converters and accelerators want)::

    images  uint8 [B, H, W, 3] RGB, H x W = ``input_hw`` (B = ``batch_size``)
      -> resize by the model's rule (a constant scale for a fixed size; bilinear as two
         matmuls, ``bilinear_resize_matrix``), zero pad to
         the stride multiple, the model, category ids from the label map
    -> the SavedModel's outputs (fpn_tf/export/serving.py): detection_boxes
       [B, D, 4] (y1, x1, y2, x2) in the input image's pixels, detection_boxes_normalized,
       detection_scores [B, D], detection_classes int32 [B, D] (category ids),
       num_detections [B]; detection_masks [B, D, M, M] for mask models;
       proposal_* for the segment proposer.

A photo of another size is resized (or letterboxed) to H x W by the caller, and its
boxes scaled back; or export at the camera's size. The graph is traced with the
model's separately compiled parts inlined (``fpn_tf.ops.xla.inline_compiled_parts``),
since converters cannot convert a nested function call.

- ONNX: ``tf2onnx`` (opset ``ONNX_OPSET``), checked with ``onnx.checker``; runs in
  onnxruntime's CPU provider (``fpn_tf.export.portable_runtime.run_onnx``).
- OpenVINO: the ONNX file read by OpenVINO's ONNX front end and saved as IR
  (``.xml`` + ``.bin``); ``portable_runtime.run_openvino`` runs it on the CPU.

Not here: LiteRT (``.tflite``). The TFLite converter needs Flex (TensorFlow) ops for
this graph, which the ai-edge-litert interpreter does not carry (``export_portable``
says so rather than write a file that cannot run).

Shapes: B images, H/W the fixed input size, D detections per image, M mask side.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import tensorflow as tf

from fpn_tf.data.label_map import LabelMap
from fpn_tf.data.preprocess import compute_resize, padded_size
from fpn_tf.export.portable_runtime import INPUT_NAME
from fpn_tf.export.serving import DetectionModule
from fpn_tf.ops.xla import inline_compiled_parts

FORMATS = ("onnx", "openvino")
FORMAT_SUFFIX = {"onnx": ".onnx", "openvino": ".xml"}  # the file each format is written to
ONNX_OPSET = 17
# What each format needs beyond fpn_tf's own dependencies (setup.py extras).
FORMAT_PACKAGES = {"onnx": ("tf2onnx", "onnx"), "openvino": ("tf2onnx", "onnx", "openvino")}


def default_input_hw(model) -> tuple[int, int]:
    """The landscape size the model resizes to: (min_size, max_size) (e.g. 800 x 1333)."""
    return int(model.config.input.min_size), int(model.config.input.max_size)


def fixed_size_plan(model, input_hw: tuple[int, int]) -> dict:
    """The resize of an H x W input: ``new_hw``, ``scale`` (new / input), ``padded_hw``, ``image_info``.

    Computed once with the same ``compute_resize`` the SavedModel runs per image.
    """
    h, w = (int(v) for v in input_hw)
    if h < 1 or w < 1:
        raise ValueError(f"input size must be positive, got {h} x {w}")
    cfg = model.config.input
    new_hw, scale = compute_resize(tf.constant([h, w], tf.int32), cfg.min_size, cfg.max_size)
    new_hw = tuple(int(v) for v in new_hw.numpy())
    scale = tuple(float(v) for v in scale.numpy())
    return {
        "new_hw": new_hw,
        "scale": scale,
        "padded_hw": tuple(int(v) for v in padded_size(new_hw, cfg.size_divisibility)),
        "image_info": (float(h), float(w), float(new_hw[0]), float(new_hw[1]), *scale),
    }


def bilinear_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """float32 ``[out_size, in_size]``: ``R @ x`` is ``tf.image.resize(x, bilinear)`` along one axis.

    TF's half-pixel rule: the source of output pixel i is ``(i + 0.5) * in / out - 0.5``,
    read between ``max(floor(s), 0)`` and ``min(ceil(s), in - 1)`` with weight
    ``s - floor(s)`` on the upper one. Why a matrix: converters turn TF's resize into
    ONNX ``Resize`` with float scales, whose output size can round one pixel short
    (e.g. 112 -> 95 rows came out 94); two matmuls have exact, static shapes.
    """
    source = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
    floor = np.floor(source)
    lower = np.maximum(floor, 0).astype(np.int64)
    upper = np.minimum(np.ceil(source), in_size - 1).astype(np.int64)
    weight = source - floor
    matrix = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    np.add.at(matrix, (rows, lower), 1.0 - weight)
    np.add.at(matrix, (rows, upper), weight)
    return matrix.astype(np.float32)


def fixed_size_function(
    model, label_map: LabelMap | None, input_hw: tuple[int, int], batch_size: int = 1
) -> tuple[tf.types.experimental.PolymorphicFunction, tf.TensorSpec]:
    """``(tf.function images uint8 [B, H, W, 3] -> outputs, its input spec)`` (module docstring)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    module = DetectionModule(model, label_map)
    plan = fixed_size_plan(model, input_hw)
    (h, w), (nh, nw), (ph, pw) = input_hw, plan["new_hw"], plan["padded_hw"]
    info_rows = [plan["image_info"]] * batch_size

    def detect(images):
        info = tf.constant(info_rows, tf.float32)  # made inside: a captured eager tensor would be an input
        x = tf.cast(images, tf.float32)
        if (nh, nw) != (h, w):
            x = tf.einsum("yh,bhwc->bywc", tf.constant(bilinear_resize_matrix(h, nh)), x)
            x = tf.einsum("xw,bywc->byxc", tf.constant(bilinear_resize_matrix(w, nw)), x)
        x = tf.pad(x, [[0, 0], [0, ph - nh], [0, pw - nw], [0, 0]])
        with inline_compiled_parts():
            return module.detection_outputs(x, info)

    spec = tf.TensorSpec([batch_size, int(h), int(w), 3], tf.uint8, name=INPUT_NAME)
    return tf.function(detect), spec


def _check_target(path: str, fmt: str) -> None:
    """``path`` ends in ``fmt``'s suffix and does not exist (never overwritten); its packages import."""
    suffix = FORMAT_SUFFIX[fmt]
    if not path.endswith(suffix):
        raise ValueError(f"a {fmt} export is written to a {suffix} file, got {path!r}")
    if os.path.exists(path):
        raise FileExistsError(f"{path} exists; choose a new path (exports never overwrite)")
    _require(fmt)


def _require(fmt: str) -> None:
    missing = []
    for package in FORMAT_PACKAGES[fmt]:
        try:
            __import__(package)
        except ImportError:
            missing.append(package)
    if missing:
        raise ImportError(
            f"--format {fmt} needs {', '.join(missing)}: pip install 'fpn_tf[{fmt}]' "
            f"(the extra pins versions that work with TF 2.21)"
        )


def export_portable(
    model,
    path: str,
    fmt: str,
    label_map: LabelMap | None = None,
    input_hw: tuple[int, int] | None = None,
    batch_size: int = 1,
) -> str:
    """Writes ``model`` as ``fmt`` ("onnx" -> ``path`` .onnx; "openvino" -> ``path`` .xml + .bin).

    Args:
      model: a detector that serves detections (``serving_problem()`` is None).
      path: the output file; it must not exist (never overwritten), and must end
        in ``.onnx`` / ``.xml``.
      label_map: category ids for ``detection_classes`` (None: labels 1..K-1).
      input_hw: the fixed input (height, width); default ``default_input_hw``.
      batch_size: the fixed batch size B.

    Returns:
      the written path.
    """
    if fmt not in FORMATS:
        if fmt in ("litert", "tflite"):
            raise ValueError(
                "LiteRT is not supported: the TFLite converter needs Flex ops for this graph, which "
                "the ai-edge-litert interpreter does not carry; use --format onnx or openvino"
            )
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    _check_target(path, fmt)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    function, spec = fixed_size_function(model, label_map, input_hw or default_input_hw(model), batch_size)
    if fmt == "onnx":
        _write_onnx(function, spec, path)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = os.path.join(tmp, "model.onnx")
            _write_onnx(function, spec, onnx_path)
            _write_openvino(onnx_path, path)
    return path


def _write_onnx(function, spec: tf.TensorSpec, path: str) -> None:
    """tf2onnx (outputs named by the SavedModel's keys), ``onnx.checker``, then renamed into place."""
    import onnx
    import tf2onnx

    proto, _ = tf2onnx.convert.from_function(function, input_signature=[spec], opset=ONNX_OPSET)
    expected = sorted(function.get_concrete_function(spec).structured_outputs)
    if sorted(o.name for o in proto.graph.output) != expected:  # tf2onnx names them by the dict keys
        raise RuntimeError(f"ONNX outputs {[o.name for o in proto.graph.output]} are not {expected}")
    onnx.checker.check_model(proto)  # full_check: strict shape inference, which tf2onnx Loops fail
    tmp = path + ".tmp"
    onnx.save(proto, tmp)
    os.replace(tmp, path)


def onnx_to_openvino(onnx_path: str, path: str) -> str:
    """An ONNX export -> OpenVINO IR at ``path`` (.xml + .bin; never overwritten); returns ``path``."""
    _check_target(path, "openvino")
    _write_openvino(onnx_path, path)
    return path


def _write_openvino(onnx_path: str, path: str) -> None:
    """OpenVINO's ONNX front end -> IR; each output keeps exactly its ONNX (SavedModel) name."""
    import onnx
    import openvino as ov

    converted = ov.convert_model(onnx_path)
    names = [o.name for o in onnx.load(onnx_path).graph.output]
    for output, name in zip(converted.outputs, names):
        # A converted tensor may carry several aliases (e.g. "SelectV2_1:0"); keep the key only.
        output.get_tensor().set_names({name})
    ov.save_model(converted, path)
