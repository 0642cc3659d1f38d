"""scripts/serving_client.py: REST / gRPC requests carry the tensors the SavedModel takes.

TF Serving itself cannot be installed here. The requests are checked against the
exported SavedModel's signatures, and the send paths against small local
stand-ins (an HTTP server and a gRPC PredictionService) that answer with the
real SavedModel in TF Serving's wire formats.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from fpn_tf.export import saved_model as sm
from fpn_tf.export.serving import OUTPUT_KEYS, SIGNATURE_INPUTS
from fpn_tf.models.faster_rcnn import build_faster_rcnn
from tests.tiny import draw_shape_images, tiny_model_config

# Subprocesses and fresh-process loads: not in the quick loop.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "serving_client", os.path.join(ROOT, "scripts", "serving_client.py")
)
client = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(client)

try:
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    HAVE_TF_SERVING = True
except ImportError:
    HAVE_TF_SERVING = False
needs_tf_serving = pytest.mark.skipif(
    not HAVE_TF_SERVING,
    reason="tensorflow_serving is not importable (pip install --no-deps tensorflow-serving-api)",
)


def encode(image: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    keras.utils.set_random_seed(0)
    model = build_faster_rcnn(config=tiny_model_config())
    model.detection_generator.score_threshold = 0.0
    path = sm.export_saved_model(model, str(tmp_path_factory.mktemp("exports")), "tiny")
    loaded, label_map = sm.load_exported(path)
    return loaded, label_map, path


@pytest.fixture(scope="module")
def images():
    """Two PNGs of one size and a JPEG of another."""
    pixels = draw_shape_images(3, size=112, seed=4)["images"].astype(np.uint8)
    return [encode(pixels[0], "PNG"), encode(pixels[1], "PNG"), encode(pixels[2][:80, :100], "JPEG")]


def call(loaded, signature: str, tensor) -> dict[str, np.ndarray]:
    dtype = tf.uint8 if signature == "image_tensor" else tf.string
    outputs = loaded.signatures[signature](**{SIGNATURE_INPUTS[signature]: tf.constant(tensor, dtype)})
    return {k: v.numpy() for k, v in outputs.items()}


def assert_outputs_equal(a: dict, b: dict):
    assert set(a) == set(b) == set(OUTPUT_KEYS)
    for key in OUTPUT_KEYS:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_signature_inputs_match_the_saved_model(served):
    loaded = served[0]
    assert client.SIGNATURE_INPUTS == SIGNATURE_INPUTS
    assert client.OUTPUT_KEYS == OUTPUT_KEYS
    for signature, name in SIGNATURE_INPUTS.items():
        fn = loaded.signatures[signature]
        assert set(fn.structured_input_signature[1]) == {name}
        assert set(fn.structured_outputs) == set(OUTPUT_KEYS)


def json_round_trip(request: dict) -> dict:
    return json.loads(json.dumps(request))


def test_rest_serving_default_round_trip(served, images):
    loaded = served[0]
    request = json_round_trip(client.rest_request(images, "serving_default"))
    assert request["signature_name"] == "serving_default"
    assert [set(item) for item in request["instances"]] == [{"b64"}] * 3
    tensor = client.rest_instances_to_tensor(request)
    assert tensor == images
    out = call(loaded, "serving_default", tensor)
    assert out["detection_boxes"].shape == (3, 20, 4)
    assert out["num_detections"].min() > 0


def test_rest_image_tensor_round_trip(served, images):
    loaded = served[0]
    request = json_round_trip(client.rest_request(images[:2], "image_tensor"))
    tensor = client.rest_instances_to_tensor(request)
    pixels = np.stack([tf.io.decode_png(b).numpy() for b in images[:2]])
    assert tensor.dtype == np.uint8 and tensor.shape == (2, 112, 112, 3)
    np.testing.assert_array_equal(tensor, pixels)
    # Lossless PNG: the same pixels sent raw or encoded give the same detections.
    assert_outputs_equal(call(loaded, "image_tensor", tensor), call(loaded, "serving_default", images[:2]))
    with pytest.raises(ValueError, match="all images must have one size"):
        client.rest_request(images, "image_tensor")


def test_rest_tf_example_round_trip(served, images):
    loaded = served[0]
    tensor = client.rest_instances_to_tensor(json_round_trip(client.rest_request(images, "tf_example")))
    parsed = tf.io.parse_example(tensor, {"image/encoded": tf.io.FixedLenFeature([], tf.string)})
    assert list(parsed["image/encoded"].numpy()) == images
    assert_outputs_equal(call(loaded, "tf_example", tensor), call(loaded, "serving_default", images))


@needs_tf_serving
def test_grpc_predict_request(images):
    for signature, dtype in [
        ("serving_default", tf.string),
        ("image_tensor", tf.uint8),
        ("tf_example", tf.string),
    ]:
        batch = images[:2]
        request = client.grpc_request(batch, "tiny", signature, version=3)
        assert isinstance(request, predict_pb2.PredictRequest)
        assert request.model_spec.name == "tiny"
        assert request.model_spec.signature_name == signature
        assert request.model_spec.version.value == 3
        assert list(request.inputs) == [SIGNATURE_INPUTS[signature]]
        proto = request.inputs[SIGNATURE_INPUTS[signature]]
        assert proto.dtype == dtype.as_datatype_enum
        value = tf.make_ndarray(proto)
        expected = client.signature_input(batch, signature)
        if signature == "image_tensor":
            np.testing.assert_array_equal(value, expected)
        else:
            assert value.shape == (2,) and list(value) == expected
        # A serialized request parses back to the same message (what goes over the wire).
        assert predict_pb2.PredictRequest.FromString(request.SerializeToString()) == request


# ------------------------------------------------------- stand-ins for TF Serving
class RestStandIn(BaseHTTPRequestHandler):
    """TF Serving's REST predict API (row format) on the loaded SavedModel."""

    loaded = None
    seen: list[str] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        self.seen.append(self.path)
        match = re.fullmatch(r"/v1/models/tiny(/versions/\d+)?:predict", self.path)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        signature = body.get("signature_name", "serving_default")
        if signature == "image_tensor":
            tensor = tf.constant(body["instances"], tf.uint8)
        else:
            tensor = tf.constant([base64.b64decode(item["b64"]) for item in body["instances"]])
        try:
            if not match:
                raise ValueError(f"Servable not found for request: {self.path}")
            outputs = self.loaded.signatures[signature](**{SIGNATURE_INPUTS[signature]: tensor})
            rows = [
                {k: v.numpy()[i].tolist() for k, v in outputs.items()} for i in range(int(tensor.shape[0]))
            ]
            self.reply(200, {"predictions": rows})
        except (tf.errors.InvalidArgumentError, ValueError) as e:
            self.reply(400 if match else 404, {"error": getattr(e, "message", str(e))})

    def reply(self, code: int, body: dict):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def rest_server(served):
    RestStandIn.loaded = served[0]
    server = ThreadingHTTPServer(("127.0.0.1", 0), RestStandIn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_rest_url():
    assert client.rest_url("localhost:8501", "fpn") == "http://localhost:8501/v1/models/fpn:predict"
    assert client.rest_url("https://h/", "fpn", 2) == "https://h/v1/models/fpn/versions/2:predict"


def test_send_rest(served, images, rest_server):
    loaded = served[0]
    for signature, batch in [("serving_default", images), ("image_tensor", images[:2])]:
        request = client.rest_request(batch, signature)
        outputs = client.send_rest(rest_server, "tiny", request, version=1)
        expected = call(loaded, signature, client.signature_input(batch, signature))
        for key in OUTPUT_KEYS:
            np.testing.assert_allclose(outputs[key], expected[key], rtol=1e-6, err_msg=key)
    assert RestStandIn.seen[-1] == "/v1/models/tiny/versions/1:predict"
    bad = client.rest_request([images[0], b"\x00 not an image"])
    with pytest.raises(RuntimeError, match="(?s)HTTP 400: .*could not decode image"):
        client.send_rest(rest_server, "tiny", bad)
    with pytest.raises(RuntimeError, match="HTTP 404"):
        client.send_rest(rest_server, "other", client.rest_request(images[:1]))


@needs_tf_serving
def test_send_grpc(served, images):
    import grpc

    loaded = served[0]

    class Servicer(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):  # noqa: N802 (the proto's name)
            fn = loaded.signatures[request.model_spec.signature_name or "serving_default"]
            inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
            response = predict_pb2.PredictResponse()
            response.model_spec.CopyFrom(request.model_spec)
            for key, value in fn(**inputs).items():
                response.outputs[key].CopyFrom(tf.make_tensor_proto(value.numpy()))
            return response

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        request = client.grpc_request(images, "tiny", "tf_example")
        outputs = client.send_grpc(f"127.0.0.1:{port}", request)
    finally:
        server.stop(None)
    assert_outputs_equal(outputs, call(loaded, "serving_default", images))


def run_client(args, timeout=180):
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        [sys.executable, "scripts/serving_client.py", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def test_cli(served, images, rest_server, tmp_path):
    files = []
    for k, data in enumerate(images):
        files.append(str(tmp_path / f"im{k}.{'png' if k < 2 else 'jpg'}"))
        with open(files[-1], "wb") as f:
            f.write(data)
    # No server: the REST request is written out.
    proc = run_client([f"--images={','.join(files)}", f"--output={tmp_path / 'request.json'}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(tmp_path / "request.json") as f:
        assert json.load(f) == client.rest_request(images)
    # A server: detections are printed, named by the export's label map.
    label_map = os.path.join(served[2], "assets", "label_map.json")
    proc = run_client(
        [
            f"--images={files[0]}",
            f"--server={rest_server}",
            "--model_name=tiny",
            f"--label_map={label_map}",
            "--min_score=0",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"im0\.png: \d+ detection\(s\) with score >= 0", proc.stdout)
    assert re.search(r"class_[123] \([123]\) 0\.\d{3} box \(y1, x1, y2, x2\)", proc.stdout)
    if HAVE_TF_SERVING:
        proc = run_client(
            [f"--images={files[0]}", "--protocol=grpc", "--model_name=tiny", f"--output={tmp_path / 'r.pb'}"]
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        with open(tmp_path / "r.pb", "rb") as f:
            assert predict_pb2.PredictRequest.FromString(f.read()) == client.grpc_request(images[:1], "tiny")
