"""Client for a detector served by TensorFlow Serving: builds REST and gRPC requests.

    # REST (port 8501): base64 images to serving_default
    python scripts/serving_client.py --images a.jpg,b.png --server localhost:8501 --model_name fpn
    # gRPC (port 8500); needs `pip install --no-deps tensorflow-serving-api`
    python scripts/serving_client.py --images a.jpg --protocol grpc --server localhost:8500 --model_name fpn
    # no --server: print the request, or write it with --output (.json; .pb / .pbtxt for gRPC)
    python scripts/serving_client.py --images a.jpg --output request.json

``--signature`` picks the SavedModel signature (see fpn_tf/export/serving.py):
serving_default takes the encoded files, image_tensor decoded uint8 RGB pixels
(all images of one size), tf_example serialized tf.train.Examples holding the
file in ``image/encoded``. Detections come back as ``detection_boxes`` (y1, x1,
y2, x2 in original-image pixels), ``detection_scores``, ``detection_classes``
(category ids; names with ``--label_map``, e.g. the export's
assets/label_map.json) and ``num_detections``; a mask model (Mask R-CNN) adds
``detection_masks`` (box-relative 28x28 probabilities) and, when exported with
``--full_image_masks``, ``detection_masks_image`` (uint8 binary masks at the
original size). The printout gives each detection's mask area; ``--save_outputs
out.npz`` keeps every output array (masks included) for further use.

The REST path needs only numpy and Pillow; TensorFlow is imported for gRPC and
tf_example requests only.
"""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request

import numpy as np
from absl import app, flags

# The input name of each signature (fpn_tf.export.serving.SIGNATURE_INPUTS; a test checks both agree).
SIGNATURE_INPUTS = {
    "serving_default": "encoded_images",
    "image_tensor": "images",
    "tf_example": "serialized_examples",
}
STRING_SIGNATURES = ("serving_default", "tf_example")
OUTPUT_KEYS = (
    "detection_boxes",
    "detection_boxes_normalized",
    "detection_scores",
    "detection_classes",
    "num_detections",
)
# Mask models only (fpn_tf.export.serving.MASK_OUTPUT_KEYS; a test checks both agree).
MASK_OUTPUT_KEYS = ("detection_masks", "detection_masks_image")


def image_example(encoded: bytes) -> bytes:
    """A serialized tf.train.Example with the encoded image in ``image/encoded``."""
    import tensorflow as tf

    feature = tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded]))
    return tf.train.Example(
        features=tf.train.Features(feature={"image/encoded": feature})
    ).SerializeToString()


def decode_rgb(encoded: bytes) -> np.ndarray:
    """Encoded image -> uint8 [h, w, 3] RGB (Pillow; grayscale / alpha converted)."""
    from PIL import Image

    with Image.open(io.BytesIO(encoded)) as image:
        return np.asarray(image.convert("RGB"), np.uint8)


def signature_input(images: list[bytes], signature: str):
    """The tensor a signature takes for these encoded images.

    Returns a list of bytes (serving_default: the files; tf_example: serialized
    Examples) or a uint8 ``[B, h, w, 3]`` array (image_tensor).
    """
    if signature not in SIGNATURE_INPUTS:
        raise ValueError(f"unknown signature {signature!r}; choose one of {sorted(SIGNATURE_INPUTS)}")
    if not images:
        raise ValueError("no images to send")
    if signature == "serving_default":
        return list(images)
    if signature == "tf_example":
        return [image_example(b) for b in images]
    pixels = [decode_rgb(b) for b in images]
    sizes = sorted({p.shape[:2] for p in pixels})
    if len(sizes) > 1:
        raise ValueError(
            f"image_tensor takes one [B, h, w, 3] tensor: all images must have one size, got {sizes}; "
            "use serving_default for images of different sizes"
        )
    return np.stack(pixels)


def rest_request(images: list[bytes], signature: str = "serving_default") -> dict:
    """TF Serving's REST predict body (row format): ``{"signature_name", "instances"}``.

    Strings travel as ``{"b64": ...}`` (TF Serving decodes them to bytes);
    image_tensor instances are nested lists of 0..255 integers.
    """
    tensor = signature_input(images, signature)
    if signature in STRING_SIGNATURES:
        instances = [{"b64": base64.b64encode(b).decode("ascii")} for b in tensor]
    else:
        instances = tensor.tolist()
    return {"signature_name": signature, "instances": instances}


def rest_instances_to_tensor(request: dict):
    """The tensor TF Serving builds from a row-format request (the inverse of rest_request).

    Returns a list of bytes for the string signatures, else a uint8 array.
    """
    signature = request.get("signature_name", "serving_default")
    instances = request["instances"]
    if signature in STRING_SIGNATURES:
        return [base64.b64decode(item["b64"]) for item in instances]
    return np.asarray(instances, np.uint8)


def grpc_request(images: list[bytes], model_name: str, signature: str = "serving_default", version=None):
    """A ``tensorflow_serving.apis.predict_pb2.PredictRequest`` for these images."""
    import tensorflow as tf

    try:
        from tensorflow_serving.apis import predict_pb2
    except ImportError as e:
        raise ImportError(
            "gRPC needs tensorflow-serving-api; install it without its `tensorflow` dependency "
            "(which would replace tensorflow-cpu): pip install --no-deps tensorflow-serving-api"
        ) from e
    tensor = signature_input(images, signature)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = int(version)
    dtype = tf.string if signature in STRING_SIGNATURES else tf.uint8
    request.inputs[SIGNATURE_INPUTS[signature]].CopyFrom(tf.make_tensor_proto(tensor, dtype=dtype))
    return request


def rest_url(server: str, model_name: str, version=None) -> str:
    """``http://host:port/v1/models/<name>[/versions/<v>]:predict``."""
    base = server if server.startswith(("http://", "https://")) else f"http://{server}"
    path = f"/v1/models/{model_name}" + (f"/versions/{int(version)}" if version is not None else "")
    return base.rstrip("/") + path + ":predict"


def send_rest(server: str, model_name: str, request: dict, version=None, timeout: float = 60.0) -> dict:
    """POSTs a REST request; returns the outputs as numpy arrays with a batch axis."""
    data = json.dumps(request).encode("utf-8")
    http = urllib.request.Request(
        rest_url(server, model_name, version), data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(http, timeout=timeout) as response:
            body = json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
        detail = e.read().decode("utf-8", "replace")
        try:
            detail = json.loads(detail).get("error", detail)
        except ValueError:
            pass
        raise RuntimeError(f"TF Serving answered HTTP {e.code}: {detail}") from None
    except urllib.error.URLError as e:
        raise RuntimeError(f"cannot reach TF Serving at {http.full_url}: {e.reason}") from None
    predictions = body["predictions"]
    if predictions and isinstance(predictions[0], dict):  # one dict of outputs per instance
        return {k: np.asarray([p[k] for p in predictions]) for k in predictions[0]}
    return {"output": np.asarray(predictions)}


def send_grpc(server: str, request, timeout: float = 60.0) -> dict:
    """Sends a PredictRequest over an insecure channel; returns the outputs as numpy arrays."""
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    with grpc.insecure_channel(server) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        response = stub.Predict(request, timeout=timeout)
    return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}


def describe(outputs: dict, files: list[str], names: dict[int, str], min_score: float) -> str:
    lines = []
    for i, path in enumerate(files):
        n = int(outputs["num_detections"][i])
        kept = [j for j in range(n) if float(outputs["detection_scores"][i][j]) >= min_score]
        lines.append(f"{path}: {len(kept)} detection(s) with score >= {min_score}")
        for j in kept:
            cid = int(outputs["detection_classes"][i][j])
            box = ", ".join(f"{float(v):.1f}" for v in outputs["detection_boxes"][i][j])
            score = float(outputs["detection_scores"][i][j])
            line = f"  {names.get(cid, cid)} ({cid}) {score:.3f} box (y1, x1, y2, x2) [{box}]"
            lines.append(line + mask_summary(outputs, i, j))
    return "\n".join(lines)


def mask_summary(outputs: dict, i: int, j: int) -> str:
    """ ", mask …" for detection j of image i of a mask model, else ""."""
    if "detection_masks_image" in outputs:
        area = int(np.count_nonzero(np.asarray(outputs["detection_masks_image"][i][j])))
        return f", mask {area} px"
    if "detection_masks" in outputs:
        mask = np.asarray(outputs["detection_masks"][i][j], np.float32)
        return f", mask {np.mean(mask > 0.5):.0%} of its box"
    return ""


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Command-line flags (defined only when run as a script, so tests can import this module)."""
    flags.DEFINE_list("images", [], "Image files to send (comma separated).")
    flags.DEFINE_enum("signature", "serving_default", sorted(SIGNATURE_INPUTS), "SavedModel signature.")
    flags.DEFINE_enum("protocol", "rest", ["rest", "grpc"], "REST (port 8501) or gRPC (port 8500).")
    flags.DEFINE_string("server", None, "host:port (or URL for REST); none: print / write the request only.")
    flags.DEFINE_string("model_name", "fpn_faster_rcnn", "TF Serving's MODEL_NAME.")
    flags.DEFINE_integer("model_version", None, "A specific version; default: the one the server serves.")
    flags.DEFINE_string("output", None, "Without --server: write the request here (.json / .pb / .pbtxt).")
    flags.DEFINE_string("label_map", None, "Label map JSON (the export's assets/label_map.json) for names.")
    flags.DEFINE_float("min_score", 0.3, "Detections below this score are not printed.")
    flags.DEFINE_float("timeout", 60.0, "Request timeout in seconds.")
    flags.DEFINE_string("save_outputs", None, "With --server: also write every output array to this .npz.")


def main(argv):
    files = list(FLAGS.images) + list(argv[1:])
    if not files:
        raise app.UsageError("no images: pass --images a.jpg,b.png")
    images = []
    for path in files:
        with open(path, "rb") as f:
            images.append(f.read())
    if FLAGS.protocol == "rest":
        request = rest_request(images, FLAGS.signature)
    else:
        request = grpc_request(images, FLAGS.model_name, FLAGS.signature, FLAGS.model_version)

    if not FLAGS.server:
        if FLAGS.protocol == "rest":
            text = json.dumps(request)
        else:
            from google.protobuf import text_format

            text = text_format.MessageToString(request)
        if FLAGS.output and FLAGS.protocol == "grpc" and FLAGS.output.endswith(".pb"):
            with open(FLAGS.output, "wb") as f:
                f.write(request.SerializeToString())
        elif FLAGS.output:
            with open(FLAGS.output, "w", encoding="utf-8") as f:
                f.write(text)
        else:
            print(text)
        if FLAGS.output:
            print(f"wrote the {FLAGS.protocol} request for {len(files)} image(s) to {FLAGS.output}")
        return 0

    if FLAGS.protocol == "rest":
        outputs = send_rest(FLAGS.server, FLAGS.model_name, request, FLAGS.model_version, FLAGS.timeout)
    else:
        outputs = send_grpc(FLAGS.server, request, FLAGS.timeout)
    names = {}
    if FLAGS.label_map:
        with open(FLAGS.label_map, encoding="utf-8") as f:
            data = json.load(f)
        names = dict(zip(data["category_ids"], data["names"], strict=True))
    print(describe(outputs, files, names, FLAGS.min_score))
    if FLAGS.save_outputs:
        np.savez(FLAGS.save_outputs, **{k: np.asarray(v) for k, v in outputs.items()})
        print(f"wrote {', '.join(sorted(outputs))} to {FLAGS.save_outputs}")
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(main)
