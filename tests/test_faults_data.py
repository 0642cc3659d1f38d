"""Faults in the user's data: broken annotation files, non-finite boxes, undecodable images,
and scripts/check_dataset.py. Each test checks the error names the file / annotation /
image and that the user's files are unchanged (hashes before and after)."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from fpn_tf.config import DataConfig, InputConfig
from fpn_tf.data import pipeline
from fpn_tf.data.coco_json import load_coco_json
from fpn_tf.data.pipeline import build_dataset
from tests.tiny import tree_hashes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_dataset(folder, bad: dict[str, bytes] | None = None, annotations=None, size=(24, 32)):
    """Four 24x32 PNGs (ids 1..4) with one box each; ``bad`` replaces files' bytes."""
    img_dir = folder / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    h, w = size
    images = []
    for k in range(1, 5):
        name = f"im{k}.png"
        Image.fromarray(np.full((h, w, 3), 50 * k, np.uint8)).save(img_dir / name)
        images.append({"id": k, "file_name": name, "height": h, "width": w})
    for name, data in (bad or {}).items():
        (img_dir / name).write_bytes(data)
    if annotations is None:
        annotations = [
            {"id": 10 + k, "image_id": k, "category_id": 1, "bbox": [2, 2, 10, 8], "iscrowd": 0, "area": 80}
            for k in range(1, 5)
        ]
    ann = folder / "instances.json"
    ann.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "a"}]})
    )
    return str(img_dir), str(ann)


def jpeg_bytes(h=24, w=32) -> bytes:
    return tf.io.encode_jpeg(tf.fill([h, w, 3], tf.constant(90, tf.uint8))).numpy()


# ------------------------------------------------------------------ annotation files


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not a COCO JSON file"),
        ("[1, 2]", "got a list"),
        ('{"images": [], "annotations": []}', "no 'categories' list"),
        ('{"categories": [], "annotations": []}', "no 'images' list"),
        ('{"images": {}, "categories": []}', "'images' must be a list, got dict"),
        ('{"images": [{"file_name": "a.png"}], "categories": []}', "each needs an 'id'"),
        (b"\xff\xfe{}", "not a COCO JSON file"),
    ],
)
def test_fault_broken_annotation_file_is_named(tmp_path, content, message):
    """Annotation file not JSON / a list / without categories or images -> ValueError naming the file."""
    path = tmp_path / "instances.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    before = tree_hashes(tmp_path)
    with pytest.raises(ValueError) as e:
        load_coco_json(str(path), str(tmp_path))
    assert str(path) in str(e.value) and message in str(e.value)
    assert tree_hashes(tmp_path) == before


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_fault_non_finite_box_names_the_annotation(tmp_path, bad):
    """COCO box with NaN / Inf -> ValueError naming the annotation id and image (not counted as clipped)."""
    anns = [
        {"id": 11, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]},
        {"id": 77, "image_id": 2, "category_id": 1, "bbox": [1, bad, 5, 5]},
    ]
    image_dir, ann = write_dataset(tmp_path, annotations=anns)
    before = tree_hashes(tmp_path)
    with pytest.raises(ValueError, match=r"annotation 77 of image 2: bbox has a non-finite coordinate"):
        load_coco_json(ann, image_dir)
    assert tree_hashes(tmp_path) == before


def test_fault_non_numeric_box_names_the_annotation(tmp_path):
    """COCO box holding a string -> ValueError naming the annotation id."""
    anns = [{"id": 5, "image_id": 3, "category_id": 1, "bbox": [1, "x", 5, 5]}]
    image_dir, ann = write_dataset(tmp_path, annotations=anns)
    with pytest.raises(ValueError, match=r"annotation 5 of image 3: bbox must hold 4 numbers"):
        load_coco_json(ann, image_dir)


@pytest.mark.parametrize(
    "change, message",
    [
        ("duplicate_image", r"duplicate image ids 2 \(pycocotools would keep only the last entry"),
        ("duplicate_annotation", r"duplicate annotation ids 11"),
        ("unknown_image", r"annotations 99 have an image_id that is not among the images"),
    ],
)
def test_fault_duplicate_ids_and_annotations_of_unknown_images_stop_training(
    tmp_path, change, message, caplog
):
    """Duplicate image / annotation ids, an annotation of no image -> the training data path stops naming
    them (pycocotools alone keeps one entry or ignores it); data.structure_policy=warn logs and goes on."""
    anns = [{"id": 10 + k, "image_id": k, "category_id": 1, "bbox": [2, 2, 10, 8]} for k in range(1, 5)]
    if change == "duplicate_annotation":
        anns[1]["id"] = 11
    if change == "unknown_image":
        anns.append({"id": 99, "image_id": 42, "category_id": 1, "bbox": [2, 2, 10, 8]})
    image_dir, ann = write_dataset(tmp_path, annotations=anns)
    if change == "duplicate_image":
        data = json.loads(open(ann).read())
        data["images"][2]["id"] = 2
        open(ann, "w").write(json.dumps(data))
    before = tree_hashes(tmp_path)
    data_cfg = DataConfig(source="coco_json", train_dir=image_dir, train_annotations=ann)
    cfg = InputConfig(min_size=24, max_size=32, size_divisibility=8, max_gt_boxes=2)
    with pytest.raises(ValueError, match=message) as e:
        build_dataset(data_cfg, cfg, "train", 1, training=True)
    assert ann in str(e.value) and "data.structure_policy=warn" in str(e.value)
    assert tree_hashes(tmp_path) == before
    import dataclasses

    with caplog.at_level(logging.WARNING):
        build_dataset(dataclasses.replace(data_cfg, structure_policy="warn"), cfg, "train", 1, training=True)
    assert any(re.search(message, m) for m in caplog.messages), caplog.messages


# ------------------------------------------------------------------ undecodable images


def _train_ids(image_dir, ann, policy: str, steps: int) -> list[int]:
    data = DataConfig(
        source="coco_json",
        train_dir=image_dir,
        train_annotations=ann,
        shuffle_buffer=8,
        bad_image_policy=policy,
    )
    cfg = InputConfig(min_size=24, max_size=32, size_divisibility=8, max_gt_boxes=2)
    ds, _ = build_dataset(data, cfg, "train", 1, training=True, seed=3)
    return [int(b["image_id"][0]) for b in ds.take(steps).as_numpy_iterator()]


def test_fault_undecodable_training_image_is_skipped_and_logged(tmp_path, caplog):
    """Corrupt / truncated / non-image training file, default policy -> skipped, path logged and counted."""
    truncated = jpeg_bytes()[:200]  # a JPEG header, then nothing
    image_dir, ann = write_dataset(tmp_path, bad={"im2.png": truncated, "im4.png": b"this is not an image"})
    before = tree_hashes(tmp_path)
    with caplog.at_level(logging.WARNING, logger="fpn_tf.data.pipeline"):
        ids = _train_ids(image_dir, ann, "skip", 12)
    assert len(ids) == 12 and set(ids) == {1, 3}  # training goes on with the readable images
    skipped = pipeline.skipped_images()
    for name in ("im2.png", "im4.png"):
        path = os.path.join(image_dir, name)
        assert skipped.get(path, 0) >= 1
        assert any(
            path in r.getMessage() and "skipping training image" in r.getMessage() for r in caplog.records
        )
    assert tree_hashes(tmp_path) == before


def test_fault_undecodable_image_with_error_policy_names_the_file(tmp_path):
    """Corrupt image, bad_image_policy=error (or in eval) -> error naming its path."""
    image_dir, ann = write_dataset(tmp_path, bad={"im3.png": b"\x89PNG\r\n\x1a\n garbage"})
    before = tree_hashes(tmp_path)
    bad_path = os.path.join(image_dir, "im3.png")
    with pytest.raises(tf.errors.InvalidArgumentError) as e:
        _train_ids(image_dir, ann, "error", 8)
    assert "could not read or decode image" in str(e.value) and bad_path in str(e.value)
    data = DataConfig(source="coco_json", eval_dir=image_dir, eval_annotations=ann)  # default policy: skip
    cfg = InputConfig(min_size=24, max_size=32, size_divisibility=8, max_gt_boxes=2)
    ds, _ = build_dataset(data, cfg, "eval", 1, training=False)
    with pytest.raises(tf.errors.InvalidArgumentError) as e:
        list(ds.as_numpy_iterator())
    assert bad_path in str(e.value)
    assert tree_hashes(tmp_path) == before


def test_fault_image_size_differs_from_annotations_names_the_file(tmp_path):
    """Image size differs from the JSON's height/width -> error naming its path (both policies)."""
    image_dir, ann = write_dataset(tmp_path)
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(os.path.join(image_dir, "im1.png"))
    with pytest.raises(tf.errors.InvalidArgumentError, match="im1.png"):
        _train_ids(image_dir, ann, "skip", 8)


# ------------------------------------------------------------------ scripts/check_dataset.py


@pytest.mark.slow
def test_fault_check_dataset_lists_every_problem(tmp_path):
    """scripts/check_dataset.py on a folder with several faults -> every one listed, exit status 1."""
    anns = [
        {"id": 11, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]},
        {"id": 12, "image_id": 1, "category_id": 9, "bbox": [1, 1, 5, 5]},  # unknown category
        {"id": 13, "image_id": 2, "category_id": 1, "bbox": [1, float("nan"), 5, 5]},
        {"id": 14, "image_id": 3, "category_id": 1, "bbox": [1, 1, -5, 5]},  # negative width
        {"id": 15, "image_id": 99, "category_id": 1, "bbox": [1, 1, 5, 5]},  # no such image
    ]
    image_dir, ann = write_dataset(tmp_path, annotations=anns, bad={"im4.png": b"GIF89a broken"})
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(os.path.join(image_dir, "im3.png"))
    before = tree_hashes(tmp_path)
    script = os.path.join(ROOT, "scripts", "check_dataset.py")
    env = {**os.environ, "PYTHONPATH": ROOT}
    done = subprocess.run(
        [sys.executable, script, "--images", image_dir, "--annotations", ann],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    out = done.stdout
    assert "annotation 12" in out and "category_id 9" in out
    assert "annotation 13" in out and "non-finite" in out
    assert "annotation 14" in out and "width" in out
    assert "annotation 15" in out and "image_id 99" in out
    assert os.path.join(image_dir, "im4.png") in out and "cannot be decoded" in out
    assert os.path.join(image_dir, "im3.png") in out and "10x10" in out
    assert "6 problem(s)" in out
    assert tree_hashes(tmp_path) == before

    image_dir, ann = write_dataset(tmp_path / "clean")
    done = subprocess.run(
        [sys.executable, script, "--images", image_dir, "--annotations", ann],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 image(s), 4 annotation(s): no problems" in done.stdout
