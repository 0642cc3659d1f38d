"""Running fpn_tf's ONNX and OpenVINO exports, without TensorFlow (numpy + the runtime only).

    from fpn_tf.export.portable_runtime import run_onnx, run_openvino
    outputs = run_onnx("detector.onnx", images)      # uint8 [B, H, W, 3] RGB at the export's size
    outputs["detection_boxes"]                       # [B, D, 4] (y1, x1, y2, x2), input-image pixels

The outputs are those of the SavedModel (fpn_tf/export/serving.py, fpn_tf/export/portable.py).
Shapes: B images, H/W the export's fixed input size, D detections per image.
"""

from __future__ import annotations

import numpy as np

INPUT_NAME = "images"


def run_onnx(path: str, images: np.ndarray) -> dict[str, np.ndarray]:
    """Runs an ONNX export in onnxruntime (CPU): uint8 images [B, H, W, 3] -> outputs by name."""
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {INPUT_NAME: images})))


def run_openvino(path: str, images: np.ndarray, precision: str = "f32") -> dict[str, np.ndarray]:
    """Runs an OpenVINO IR export on the CPU: uint8 images [B, H, W, 3] -> outputs by name.

    ``precision`` is OpenVINO's ``INFERENCE_PRECISION_HINT``: "f32" (the SavedModel's
    numbers), or "bf16" — OpenVINO's own default on CPUs with AVX512-BF16 / AMX, where
    scores move by ~1e-3 and near-tied detections can swap places.
    """
    import openvino as ov

    core = ov.Core()
    model = core.read_model(path)
    names = [o.get_any_name() for o in model.outputs]  # the compiled outputs may add aliases
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision})
    result = compiled(images)
    return {name: result[o] for name, o in zip(names, compiled.outputs)}
