"""Running fpn_tf's ONNX and OpenVINO exports, without TensorFlow (numpy + the runtime only).

    from fpn_tf.export.portable_runtime import run_onnx, run_openvino
    outputs = run_onnx("detector.onnx", images)      # uint8 [B, H, W, 3] RGB at the export's size
    outputs["detection_boxes"]                       # [B, D, 4] (y1, x1, y2, x2), input-image pixels

The outputs are those of the SavedModel (fpn_tf/export/serving.py, fpn_tf/export/portable.py).
Shapes: B images, H/W the export's fixed input size, D detections per image.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

INPUT_NAME = "images"


def onnx_runner(path: str) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """An onnxruntime (CPU) session for an ONNX export: ``runner(images)`` -> outputs by name."""
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return lambda images: dict(zip(names, session.run(names, {INPUT_NAME: images})))


def openvino_runner(path: str, precision: str = "f32") -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """An OpenVINO IR export compiled for the CPU: ``runner(images)`` -> outputs by name.

    ``precision`` is OpenVINO's ``INFERENCE_PRECISION_HINT``: "f32" (the SavedModel's
    numbers, within ~1e-3), or "bf16" — OpenVINO's own default on CPUs with
    AVX512-BF16 / AMX, where scores move more and near-tied detections can swap places.
    """
    import openvino as ov

    core = ov.Core()
    model = core.read_model(path)
    names = [o.get_any_name() for o in model.outputs]  # the compiled outputs may add aliases
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision})

    def run(images):
        result = compiled(images)
        return {name: result[o] for name, o in zip(names, compiled.outputs)}

    return run


def run_onnx(path: str, images: np.ndarray) -> dict[str, np.ndarray]:
    """Runs an ONNX export once: uint8 images [B, H, W, 3] -> outputs by name (``onnx_runner``)."""
    return onnx_runner(path)(images)


def run_openvino(path: str, images: np.ndarray, precision: str = "f32") -> dict[str, np.ndarray]:
    """Runs an OpenVINO IR export once: uint8 images [B, H, W, 3] -> outputs (``openvino_runner``)."""
    return openvino_runner(path, precision)(images)
