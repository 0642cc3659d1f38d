"""SavedModel export: layout, size, signatures, fresh-process parity, edge inputs, scripts.

One tiny model is exported once per module; a second Python process loads it
(as TF Serving would) and answers every request the tests check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
import yaml
from PIL import Image

from fpn_tf.config import ExperimentConfig, to_dict
from fpn_tf.data.label_map import LabelMap
from fpn_tf.data.preprocess import pad_image, preprocess_for_inference
from fpn_tf.export import saved_model as sm
from fpn_tf.export.serving import OUTPUT_KEYS, SIGNATURE_INPUTS
from fpn_tf.models.faster_rcnn import build_faster_rcnn
from tests.tiny import draw_shape_images, tiny_model_config

# Subprocesses, fresh-process loads and a trained model: not in the quick loop.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABEL_MAP = LabelMap([3, 7, 11], ["square", "disk", "triangle"])  # ids != labels on purpose


def run_python(args, timeout=300, **kwargs):
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kwargs
    )


def jpeg(image: np.ndarray) -> bytes:
    return tf.io.encode_jpeg(image, quality=95).numpy()


def shape_image(height: int, width: int, seed: int) -> np.ndarray:
    """A uint8 [height, width, 3] crop of a synthetic shapes image."""
    size = max(height, width)
    image = draw_shape_images(1, size=size, seed=seed)["images"][0]
    return image[:height, :width].astype(np.uint8)


def reference_detections(model, images: list[np.ndarray]) -> dict[str, np.ndarray]:
    """In-process predict: preprocess each image, pad to the batch max, eager model call."""
    cfg = model.config.input
    prepared = [preprocess_for_inference(tf.constant(im), cfg) for im in images]
    hw = np.max([p[0].shape[:2] for p in prepared], axis=0)
    batch = tf.stack([pad_image(p[0], hw) for p in prepared])
    info = tf.stack([p[1] for p in prepared])
    out = model({"images": batch, "image_info": info}, training=False)
    out = {k: v.numpy() for k, v in out.items()}
    valid = out["detection_classes"] > 0
    out["detection_classes"] = np.where(
        valid, LABEL_MAP.category_id_table().numpy()[out["detection_classes"]], 0
    )
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory, trained_tiny):
    """The shared trained tiny model (conftest), exported with every detection kept."""
    model = build_faster_rcnn(config=trained_tiny["config"])
    tf.train.Checkpoint(model=model).read(trained_tiny["checkpoint"]).assert_existing_objects_matched()
    model.detection_generator.score_threshold = 0.0  # every candidate, for a dense comparison
    base = str(tmp_path_factory.mktemp("saved_models"))
    path = sm.export_saved_model(model, base, "tiny", label_map=LABEL_MAP)
    return model, base, path


# --------------------------------------------------------------- fresh process
FRESH_PROCESS = textwrap.dedent(
    """
    import io, json, sys
    import numpy as np, tensorflow as tf
    from PIL import Image
    from fpn_tf.export.saved_model import load_exported

    path, inputs, out = sys.argv[1:4]
    data = {k: open(f"{inputs}/{k}.jpg", "rb").read() for k in ("a", "b")}
    loaded, label_map = load_exported(path)
    results, errors = {}, {}

    def run(key, signature, **kwargs):
        try:
            outputs = loaded.signatures[signature](**kwargs)
            for name, value in outputs.items():
                results[f"{key}/{name}"] = value.numpy()
        except tf.errors.InvalidArgumentError as e:
            errors[key] = {"type": type(e).__name__, "message": e.message}

    pair = tf.constant([data["a"], data["b"]])
    run("pair", "serving_default", encoded_images=pair)
    example = lambda b: tf.train.Example(features=tf.train.Features(feature={
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b]))})).SerializeToString()
    run("examples", "tf_example", serialized_examples=tf.constant([example(b) for b in pair.numpy()]))
    a = tf.constant(data["a"])
    run("twice_a", "serving_default", encoded_images=tf.stack([a, a]))
    decoded = tf.io.decode_jpeg(a)
    run("tensor_a", "image_tensor", images=tf.stack([decoded, decoded]))
    run("corrupt", "serving_default", encoded_images=tf.constant([a.numpy(), b"this is no image"]))
    run("truncated", "serving_default", encoded_images=tf.constant([a.numpy()[:40]]))
    run("after_corrupt", "serving_default", encoded_images=pair)
    run("empty", "serving_default", encoded_images=tf.constant([], tf.string))
    tiny = tf.io.encode_jpeg(np.full((1, 1, 3), 200, np.uint8))
    rows = np.linspace(0, 255, 4000, dtype=np.float32)[:, None, None]
    huge = tf.io.encode_jpeg(np.broadcast_to(rows, (4000, 6000, 3)).astype(np.uint8), quality=50)
    run("extremes", "serving_default", encoded_images=tf.stack([tiny, huge]))

    def pil(mode, fmt, size=(50, 40)):
        buf = io.BytesIO()
        Image.new(mode, size, 120 if mode == "L" else (200, 30, 30, 128)[: len(mode)]).save(buf, fmt)
        return buf.getvalue()

    formats = [pil("L", "PNG"), pil("RGBA", "PNG"), pil("RGB", "BMP"), pil("P", "GIF"), pil("L", "JPEG")]
    run("formats", "serving_default", encoded_images=tf.constant(formats))

    # TF1 session loader (the kind TF Serving's C++ loader is) on serving_default.
    with tf.Graph().as_default() as graph, tf.compat.v1.Session(graph=graph) as sess:
        meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], path)
        sig = meta.signature_def["serving_default"]
        fetch = {k: v.name for k, v in sig.outputs.items()}
        feed_name = sig.inputs["encoded_images"].name
        for key, batch in [("tf1_pair", [data["a"], data["b"]]), ("tf1_corrupt", [b"junk"]),
                           ("tf1_after_corrupt", [data["a"], data["b"]])]:
            try:
                for name, value in sess.run(fetch, {feed_name: np.array(batch, object)}).items():
                    results[f"{key}/{name}"] = value
            except tf.errors.InvalidArgumentError as e:
                errors[key] = {"type": type(e).__name__, "message": e.message}
    np.savez(out, **results)
    with open(out + ".json", "w") as f:
        json.dump({"errors": errors, "label_map": label_map.to_json()}, f)
    """
)


@pytest.fixture(scope="module")
def fresh(exported, tmp_path_factory):
    """Runs every request against the SavedModel in a second process."""
    _, _, path = exported
    tmp = tmp_path_factory.mktemp("fresh")
    image_a, image_b = shape_image(96, 160, seed=1), shape_image(150, 110, seed=2)
    (tmp / "a.jpg").write_bytes(jpeg(image_a))
    (tmp / "b.jpg").write_bytes(jpeg(image_b))
    script = tmp / "serve.py"
    script.write_text(FRESH_PROCESS)
    out = str(tmp / "results.npz")
    proc = run_python([str(script), path, str(tmp), out])
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out + ".json") as f:
        meta = json.load(f)
    results = dict(np.load(out))
    return results, meta["errors"], LabelMap.from_json(meta["label_map"]), (image_a, image_b)


def outputs_of(results, key):
    return {name: results[f"{key}/{name}"] for name in OUTPUT_KEYS}


def test_fresh_process_matches_in_process_predict(exported, fresh):
    model = exported[0]
    results, _, _, (image_a, image_b) = fresh
    served = outputs_of(results, "pair")
    # The reference decodes the same JPEG bytes with TensorFlow's decoder.
    decoded = [tf.io.decode_jpeg(jpeg(im)).numpy() for im in (image_a, image_b)]
    ref = reference_detections(model, decoded)
    assert served["detection_boxes"].shape == (2, 20, 4)
    np.testing.assert_array_equal(served["num_detections"], ref["num_detections"])
    assert served["num_detections"].min() > 0, "the test needs detections to compare"
    np.testing.assert_allclose(served["detection_boxes"], ref["detection_boxes"], atol=1e-3)
    np.testing.assert_allclose(served["detection_scores"], ref["detection_scores"], atol=1e-5)
    np.testing.assert_array_equal(served["detection_classes"], ref["detection_classes"])
    # Category ids of the label map, 0 in padded rows; boxes in original pixels.
    for i, (h, w) in enumerate([(96, 160), (150, 110)]):
        n = served["num_detections"][i]
        assert set(served["detection_classes"][i, :n]) <= {3, 7, 11}
        assert not served["detection_classes"][i, n:].any()
        boxes = served["detection_boxes"][i, :n]
        assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= h).all() and (boxes[:, [1, 3]] <= w).all()
        np.testing.assert_allclose(
            served["detection_boxes_normalized"][i], served["detection_boxes"][i] / [h, w, h, w], rtol=1e-6
        )
        assert (np.diff(served["detection_scores"][i, :n]) <= 0).all()


def test_tf1_session_loader_serves_encoded_images(fresh):
    """TF Serving loads SavedModels into a TF1 session: same detections, same error handling."""
    results, errors, _, _ = fresh
    for name in OUTPUT_KEYS:
        np.testing.assert_allclose(results[f"tf1_pair/{name}"], results[f"pair/{name}"], atol=1e-5)
        np.testing.assert_array_equal(results[f"tf1_after_corrupt/{name}"], results[f"tf1_pair/{name}"])
    assert "could not decode image" in errors["tf1_corrupt"]["message"]


def test_all_signatures_agree(fresh):
    results = fresh[0]
    for name in OUTPUT_KEYS:
        np.testing.assert_array_equal(results[f"examples/{name}"], results[f"pair/{name}"])
        np.testing.assert_array_equal(results[f"tensor_a/{name}"], results[f"twice_a/{name}"])


def test_corrupt_image_is_an_error_and_serving_goes_on(fresh):
    results, errors, _, _ = fresh
    assert errors["corrupt"]["type"] == "InvalidArgumentError"
    assert "could not decode image" in errors["corrupt"]["message"]
    assert errors["truncated"]["type"] == "InvalidArgumentError"
    assert errors["empty"]["type"] == "InvalidArgumentError"
    assert "no images" in errors["empty"]["message"]
    for name in OUTPUT_KEYS:
        np.testing.assert_array_equal(results[f"after_corrupt/{name}"], results[f"pair/{name}"])


def test_tiny_and_huge_images_and_formats(fresh):
    results, errors, _, _ = fresh
    assert "extremes" not in errors and "formats" not in errors
    out = outputs_of(results, "extremes")
    assert out["detection_boxes"].shape == (2, 20, 4)
    for i, (h, w) in enumerate([(1, 1), (4000, 6000)]):
        n = out["num_detections"][i]
        assert 0 <= n <= 20
        boxes = out["detection_boxes"][i, :n]
        assert np.isfinite(boxes).all()
        assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= h).all() and (boxes[:, [1, 3]] <= w).all()
        normalized = out["detection_boxes_normalized"][i]
        assert (normalized >= 0).all() and (normalized <= 1).all()
    # Grayscale and RGBA PNG, BMP, GIF, grayscale JPEG: all decoded to RGB and served.
    assert outputs_of(results, "formats")["num_detections"].shape == (5,)


def test_layout_versions_and_assets(exported):
    model, base, path = exported
    assert path == os.path.join(base, "tiny", "1")
    assert sorted(os.listdir(os.path.join(base, "tiny"))) == ["1"]  # no temporary left behind
    assert set(os.listdir(path)) >= {"saved_model.pb", "variables", "assets"}
    assert sm.read_label_map(path) == LABEL_MAP
    config = sm.read_model_config(path)
    assert config.roi_head.score_threshold == 0.0  # the value served, not the build default
    assert to_dict(config) == to_dict(sm.served_model_config(model))
    with pytest.raises(FileExistsError, match="already exists"):
        sm.export_saved_model(model, base, "tiny", version=1)
    with pytest.raises(ValueError, match="2 categories but the model has num_classes=4"):
        sm.export_saved_model(model, base, "other", label_map=LabelMap([1, 2], ["a", "b"]))
    with pytest.raises(ValueError, match="one non-hidden path component"):
        sm.export_saved_model(model, base, "a/b")
    assert sm.resolve_version_dir(os.path.join(base, "tiny")) == path


def test_next_version_number(exported, tmp_path):
    model = exported[0]
    os.makedirs(tmp_path / "m" / "7")
    os.makedirs(tmp_path / "m" / "not_a_version")
    assert sm.existing_versions(str(tmp_path / "m")) == [7]
    path = sm.export_saved_model(model, str(tmp_path), "m")
    assert path == str(tmp_path / "m" / "8")
    assert sm.read_label_map(path) == LabelMap([1, 2, 3], ["class_1", "class_2", "class_3"])  # identity


def test_variables_stored_once(exported):
    model, _, path = exported
    float32_bytes = sum(4 * int(np.prod(v.shape)) for v in model.variables)
    var_dir = os.path.join(path, "variables")
    stored = sum(os.path.getsize(os.path.join(var_dir, f)) for f in os.listdir(var_dir))
    assert float32_bytes < stored <= 1.1 * float32_bytes


def saved_model_cli(*args):
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    command = (
        [cli, *args]
        if os.path.exists(cli)
        else [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli", *args]
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def test_saved_model_cli_shows_three_signatures(exported):
    proc = saved_model_cli("show", "--dir", exported[2], "--all")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for signature, input_name in SIGNATURE_INPUTS.items():
        assert f"signature_def['{signature}']" in proc.stdout
        assert f"inputs['{input_name}']" in proc.stdout
    for key in OUTPUT_KEYS:
        assert f"outputs['{key}']" in proc.stdout
    assert "dtype: DT_UINT8" in proc.stdout and "dtype: DT_STRING" in proc.stdout


def test_saved_model_cli_runs_image_tensor(exported, tmp_path):
    """The TF1 session loader (as TF Serving) on a .npy input gives the in-process detections."""
    model, _, path = exported
    image = shape_image(120, 90, seed=3)
    np.save(tmp_path / "images.npy", image[None])
    proc = saved_model_cli(
        "run", "--dir", path, "--tag_set", "serve", "--signature_def", "image_tensor",
        "--inputs", f"images={tmp_path / 'images.npy'}", "--outdir", str(tmp_path / "out"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "detection_boxes" in proc.stdout + proc.stderr
    ref = reference_detections(model, [image])
    boxes = np.load(tmp_path / "out" / "detection_boxes.npy")
    np.testing.assert_allclose(boxes, ref["detection_boxes"], atol=1e-3)
    np.testing.assert_allclose(
        np.load(tmp_path / "out" / "detection_scores.npy"), ref["detection_scores"], atol=1e-5
    )
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "num_detections.npy"), ref["num_detections"])


# ------------------------------------------------------------------- scripts
def write_inputs(folder) -> list[tuple[int, int]]:
    os.makedirs(folder)
    sizes = [(96, 160), (150, 110)]
    for k, (h, w) in enumerate(sizes):
        Image.fromarray(shape_image(h, w, seed=10 + k)).save(os.path.join(folder, f"img{k}.png"))
    with open(os.path.join(folder, "broken.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff" + b"\x00" * 50)  # a JPEG header, then garbage
    with open(os.path.join(folder, "notes.txt"), "w") as f:
        f.write("not an image")  # not an image extension: ignored in a folder
    return sizes


def run_predict(model_arg: str, inputs, out) -> dict:
    proc = run_python(
        ["scripts/predict.py", model_arg, f"--inputs={inputs}", f"--output_dir={out}", "--min_score=0"]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipping" in proc.stderr and "broken.jpg" in proc.stderr
    with open(os.path.join(out, "detections.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def predicted(exported, tmp_path_factory):
    """predict.py on the module's SavedModel: (inputs folder, image sizes, JSON)."""
    tmp = tmp_path_factory.mktemp("predict")
    sizes = write_inputs(tmp / "images")
    return tmp / "images", sizes, run_predict(f"--saved_model={exported[2]}", tmp / "images", tmp / "out")


def test_predict_script_writes_json_and_pngs(predicted):
    _, sizes, result = predicted
    assert result["box_format"].startswith("y1, x1, y2, x2")
    assert [os.path.basename(s["file"]) for s in result["skipped"]] == ["broken.jpg"]
    assert len(result["images"]) == 2
    for entry, (h, w) in zip(result["images"], sizes, strict=True):
        assert (entry["height"], entry["width"]) == (h, w)
        assert entry["detections"], "score threshold 0 keeps the untrained model's detections"
        for det in entry["detections"]:
            assert det["category_id"] in (3, 7, 11)
            assert det["category_name"] == LABEL_MAP.names[LABEL_MAP.category_ids.index(det["category_id"])]
            y1, x1, y2, x2 = det["box"]
            assert 0 <= y1 <= y2 <= h and 0 <= x1 <= x2 <= w
        with Image.open(entry["visualization"]) as png:
            assert png.format == "PNG" and png.size == (w, h)


def test_export_script_fresh_model(tmp_path):
    config = ExperimentConfig(model=tiny_model_config())
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(to_dict(config)))
    (tmp_path / "labels.json").write_text(LABEL_MAP.to_json())
    args = [
        "scripts/export.py",
        f"--config={tmp_path / 'config.yaml'}",
        "--override=model.roi_head.detections_per_image=7",
        f"--label_map={tmp_path / 'labels.json'}",
        f"--export_dir={tmp_path / 'exports'}",
        "--name=shapes",
        "--version=3",
    ]
    proc = run_python(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = str(tmp_path / "exports" / "shapes" / "3")
    assert path in proc.stdout
    assert sm.read_label_map(path) == LABEL_MAP
    assert sm.read_model_config(path).roi_head.detections_per_image == 7
    proc = run_python(args)  # the same version again
    assert proc.returncode != 0 and "already exists" in proc.stderr


@pytest.fixture(scope="module")
def training_dir(exported, tmp_path_factory):
    """What the trainer leaves: a checkpoint of the module's model, config.yaml, label_map.json."""
    model = exported[0]
    run = tmp_path_factory.mktemp("run")
    tf.train.Checkpoint(model=model, step=tf.Variable(5, dtype=tf.int64)).save(str(run / "ckpt"))
    config = ExperimentConfig(model=tiny_model_config())
    config.model.roi_head.score_threshold = 0.0
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(config)))
    (run / "label_map.json").write_text(LABEL_MAP.to_json())
    restored = sm.restore_model(config.model, str(run))
    for a, b in zip(restored.variables, model.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    return str(run)


def assert_same_detections(a: list[dict], b: list[dict]):
    assert len(a) == len(b)
    np.testing.assert_allclose(sorted(d["score"] for d in a), sorted(d["score"] for d in b), atol=1e-5)
    unmatched = list(b)
    for det in a:
        match = next(
            (
                o
                for o in unmatched
                if o["category_id"] == det["category_id"] and np.allclose(o["box"], det["box"], atol=2e-3)
            ),
            None,
        )
        assert match is not None, f"no counterpart for {det}"
        unmatched.remove(match)


def test_scripts_from_a_training_dir(exported, training_dir, predicted, tmp_path):
    proc = run_python(
        ["scripts/export.py", f"--model_dir={training_dir}", f"--export_dir={tmp_path}", "--name=m"]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = str(tmp_path / "m" / "1")
    assert sm.read_label_map(path) == LABEL_MAP  # <model_dir>/label_map.json
    assert sm.read_model_config(path).roi_head.score_threshold == 0.0  # <model_dir>/config.yaml
    loaded, _ = sm.load_exported(path)
    for a, b in zip(loaded.model_variables, exported[0].variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())

    inputs, _, from_saved_model = predicted
    from_checkpoint = run_predict(f"--model_dir={training_dir}", inputs, tmp_path / "out")
    for a, b in zip(from_saved_model["images"], from_checkpoint["images"], strict=True):
        assert_same_detections(a["detections"], b["detections"])
