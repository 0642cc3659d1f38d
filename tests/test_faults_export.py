"""Faults around serving and exporting: oversized and corrupt images in a request, the
permissions of an exported version, and predict.py never overwriting a user's file."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from fpn_tf.export import saved_model as sm
from fpn_tf.export.serving import DEFAULT_MAX_IMAGE_PIXELS, DetectionModule
from fpn_tf.models.faster_rcnn import build_faster_rcnn
from tests.tiny import tiny_model_config, tree_hashes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def encoded(fmt: str, size=(50, 40), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 90 if mode == "L" else (200, 40, 40)).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    m = build_faster_rcnn(config=tiny_model_config())
    m.detection_generator.score_threshold = 0.0
    return m


@pytest.fixture(scope="module")
def module(model):
    return DetectionModule(model)


def _error(fn, *args) -> str:
    with pytest.raises(tf.errors.InvalidArgumentError) as e:
        fn(*args)
    return e.value.message


# --------------------------------------------------------------------- serving


@pytest.mark.slow
def test_fault_huge_png_is_refused_before_decoding(module):
    """8000x8000 PNG (~80 KB) in a request -> 'image too large: element 1 ... declares', never decoded."""
    huge = encoded("PNG", size=(8000, 8000), mode="L")
    assert len(huge) < 300_000 and 8000 * 8000 > DEFAULT_MAX_IMAGE_PIXELS
    message = _error(module.serve_encoded, tf.constant([encoded("JPEG"), huge]))
    assert "image too large: element 1 of the request declares 8000 x 8000 pixels" in message
    assert "50000000" in message
    # the same bytes inside a tf.Example
    example = tf.train.Example(
        features=tf.train.Features(
            feature={"image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[huge]))}
        )
    ).SerializeToString()
    assert "element 0 of the request declares 8000 x 8000" in _error(
        module.serve_tf_example, tf.constant([example])
    )
    out = module.serve_encoded(tf.constant([encoded("PNG")]))  # the server goes on
    assert out["detection_boxes"].shape == (1, 20, 4)


@pytest.mark.parametrize(
    "bad, message",
    [
        (b"this is no image", "could not decode image: element 2 of the request is not a JPEG, PNG"),
        (encoded("JPEG")[:60], "could not decode image: element 2 of the request is corrupt or truncated"),
        (encoded("PNG")[:40], "could not decode image: element 2 of the request is corrupt or truncated"),
        (b"", "could not decode image: element 2 of the request is not a JPEG"),
    ],
)
def test_fault_corrupt_element_of_a_batch_is_named(module, bad, message):
    """Request mixing valid and corrupt / truncated / empty images -> error naming the failing index."""
    batch = tf.constant([encoded("JPEG"), encoded("BMP"), bad, encoded("GIF")])
    assert message in _error(module.serve_encoded, batch)


def test_fault_pixel_cap_is_configurable_and_covers_tensors(model):
    """max_image_pixels=1000 -> a 50x40 image (declared or as a uint8 tensor) is refused naming its index."""
    small = DetectionModule(model, max_image_pixels=1000)
    message = _error(small.serve_encoded, tf.constant([encoded("GIF", size=(20, 20)), encoded("BMP")]))
    assert "image too large: element 1 of the request declares 40 x 50 pixels; the limit is 1000" in message
    tensor = tf.zeros([2, 40, 50, 3], tf.uint8)
    assert "element 0 of the request has 40 x 50 pixels" in _error(small.serve_image_tensor, tensor)
    out = small.serve_encoded(tf.constant([encoded("PNG", size=(25, 40))]))  # 1000 pixels: allowed
    assert out["num_detections"].shape == (1,)
    with pytest.raises(ValueError, match="max_image_pixels must be a positive integer"):
        DetectionModule(model, max_image_pixels=0)


# --------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    base = tmp_path_factory.mktemp("exports")
    old = os.umask(0o022)
    try:
        path = sm.export_saved_model(model, str(base), "tiny")
    finally:
        os.umask(old)
    return path


def test_fault_export_is_readable_by_other_users(exported):
    """Exported version folder (was 0700 from mkdtemp) -> dirs 0755 / files 0644 under umask 022."""
    modes = {}
    for dirpath, dirnames, filenames in os.walk(exported):
        for name in dirnames + filenames:
            modes[os.path.relpath(os.path.join(dirpath, name), exported)] = stat.S_IMODE(
                os.stat(os.path.join(dirpath, name)).st_mode
            )
    modes["."] = stat.S_IMODE(os.stat(exported).st_mode)
    assert {"saved_model.pb", "variables", "assets", "assets/label_map.json", "."} <= set(modes)
    for rel, mode in modes.items():
        is_dir = os.path.isdir(os.path.join(exported, rel))
        assert mode == (0o755 if is_dir else 0o644), (rel, oct(mode))


def test_fault_export_permissions_follow_the_umask(tmp_path):
    """Umask 027 -> the version tree gets 0750 / 0640 (the umask is respected, not overridden)."""
    tree = tmp_path / ".tmp-1-x"
    (tree / "variables").mkdir(parents=True)
    (tree / "saved_model.pb").write_bytes(b"x")
    (tree / "variables" / "v.index").write_bytes(b"y")
    os.chmod(tree, 0o700)
    old = os.umask(0o027)
    try:
        sm._usual_permissions(str(tree))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tree).st_mode) == 0o750
    assert stat.S_IMODE(os.stat(tree / "variables").st_mode) == 0o750
    assert stat.S_IMODE(os.stat(tree / "saved_model.pb").st_mode) == 0o640
    assert stat.S_IMODE(os.stat(tree / "variables" / "v.index").st_mode) == 0o640


# --------------------------------------------------------------------- predict.py


def run_predict(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "predict.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def _images(folder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(2):
        Image.fromarray(np.full((40, 60, 3), 60 * (k + 1), np.uint8)).save(folder / f"img{k}.png")


@pytest.mark.parametrize("where", ["same", "holds_input"])
def test_fault_predict_refuses_an_output_dir_holding_inputs(tmp_path, where):
    """predict.py --output_dir = input folder / holds an input -> refused, nothing written."""
    _images(tmp_path / "photos")
    before = tree_hashes(tmp_path)
    if where == "same":
        args = [f"--inputs={tmp_path / 'photos'}", f"--output_dir={tmp_path / 'photos'}"]
    else:
        args = [f"--inputs={tmp_path / 'photos' / 'img1.png'}", f"--output_dir={tmp_path / 'photos'}/"]
    done = run_predict("--saved_model=/nonexistent", *args)
    assert done.returncode != 0
    assert "--output_dir" in done.stderr and str(tmp_path / "photos") in done.stderr
    assert tree_hashes(tmp_path) == before


@pytest.mark.slow
def test_fault_predict_never_overwrites_existing_outputs(exported, tmp_path):
    """predict.py into a folder with img0.png / detections.json from before -> new names, old files intact."""
    _images(tmp_path / "photos")
    out = tmp_path / "out"
    out.mkdir()
    (out / "img0.png").write_bytes(b"the user's own file")
    (out / "detections.json").write_text('{"mine": true}')
    before = tree_hashes(tmp_path)
    for _ in range(2):
        done = run_predict(
            f"--saved_model={exported}",
            f"--inputs={tmp_path / 'photos'}",
            f"--output_dir={out}",
            "--min_score=0",
        )
        assert done.returncode == 0, done.stderr[-2000:]
    after = tree_hashes(tmp_path)
    assert {k: after[k] for k in before} == before  # every file that was there is unchanged
    new = sorted(set(after) - set(before))
    assert new == [
        "out/detections_1.json",
        "out/detections_2.json",
        "out/img0_1.png",
        "out/img0_2.png",
        "out/img1.png",
        "out/img1_1.png",
    ]
    with open(out / "detections_2.json") as f:
        result = json.load(f)
    assert [os.path.basename(e["visualization"]) for e in result["images"]] == ["img0_2.png", "img1_1.png"]
