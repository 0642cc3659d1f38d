"""fpn_tf.data: label map, synthetic dataset, COCO-JSON and tfds loaders, the batch pipeline."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from fpn_tf.config import DataConfig, InputConfig
from fpn_tf.data.coco_json import load_coco_json
from fpn_tf.data.label_map import LabelMap
from fpn_tf.data.pipeline import build_dataset
from fpn_tf.data.synthetic import SHAPES, write_synthetic_coco
from fpn_tf.data.tfds_coco import COCO_CATEGORY_IDS, load_tfds_coco, tfds_coco_ground_truth

# ---------------------------------------------------------------- label map


def test_label_map_round_trips():
    lm = LabelMap([90, 1, 7], ["toothbrush", "person", "train"])
    assert (
        lm.num_classes == 4
        and lm.category_ids == [1, 7, 90]
        and lm.names == ["person", "train", "toothbrush"]
    )
    np.testing.assert_array_equal(lm.to_label([90, 1, 7, 7]), [3, 1, 2, 2])
    np.testing.assert_array_equal(lm.to_category_id(np.array([[3, 1], [2, 2]])), [[90, 1], [7, 7]])
    assert lm.to_label(7).shape == () and int(lm.to_label(7)) == 2
    assert LabelMap.from_json(lm.to_json()) == lm
    assert json.loads(lm.to_json()) == {
        "category_ids": [1, 7, 90],
        "names": ["person", "train", "toothbrush"],
    }
    np.testing.assert_array_equal(
        lm.to_category_id_tf(tf.constant([[3, 0, -1], [1, 2, 3]])).numpy(), [[90, 0, 0], [1, 7, 90]]
    )
    np.testing.assert_array_equal(lm.to_label_tf(tf.constant([7, 90, 5])).numpy(), [2, 3, -1])
    assert lm.name(0) == "background" and lm.name(3) == "toothbrush"
    with pytest.raises(ValueError, match=r"\[5\]"):
        lm.to_label([1, 5])
    with pytest.raises(ValueError, match="foreground label"):
        lm.to_category_id([0])
    with pytest.raises(ValueError, match="duplicate"):
        LabelMap([1, 1], ["a", "b"])
    with pytest.raises(ValueError, match="category_ids"):
        LabelMap.from_json('{"ids": [1]}')


# ---------------------------------------------------------------- synthetic


@pytest.fixture(scope="module")
def synthetic_train(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic") / "train"
    return write_synthetic_coco(str(out), 60, image_size=128, num_classes=5, seed=3)


def test_synthetic_is_deterministic_and_not_rewritten(synthetic_train, tmp_path):
    image_dir, ann = synthetic_train
    again_dir, again_ann = write_synthetic_coco(
        str(tmp_path / "again"), 60, image_size=128, num_classes=5, seed=3
    )
    with open(ann, "rb") as a, open(again_ann, "rb") as b:
        assert a.read() == b.read()
    for name in ("000001.png", "000037.png"):
        np.testing.assert_array_equal(
            np.asarray(Image.open(os.path.join(image_dir, name))),
            np.asarray(Image.open(os.path.join(again_dir, name))),
        )
    stamp = os.stat(again_ann).st_mtime_ns
    os.utime(os.path.join(again_dir, "000001.png"), (0, 0))
    write_synthetic_coco(str(tmp_path / "again"), 60, image_size=128, num_classes=5, seed=3)
    assert os.stat(again_ann).st_mtime_ns == stamp
    assert os.stat(os.path.join(again_dir, "000001.png")).st_mtime_ns == 0  # images untouched too
    _, val_ann = write_synthetic_coco(
        str(tmp_path / "val"), 60, image_size=128, num_classes=5, seed=3, split="val"
    )
    with open(ann) as a, open(val_ann) as b:
        assert json.load(a)["annotations"] != json.load(b)["annotations"]


def test_synthetic_content_is_multi_scale(synthetic_train):
    image_dir, ann = synthetic_train
    with open(ann) as f:
        coco = json.load(f)
    assert [c["name"] for c in coco["categories"]] == list(SHAPES[:5])
    assert len(coco["images"]) == 60 and len(os.listdir(image_dir)) == 60
    boxes = np.array([a["bbox"] for a in coco["annotations"]])
    size = np.sqrt(boxes[:, 2] * boxes[:, 3])
    assert 0.2 < np.mean(size < 32) < 0.5  # about a third are COCO-small
    assert size.min() < 12 and size.max() > 70
    assert (
        np.all(boxes[:, :2] >= 0)
        and np.all(boxes[:, 0] + boxes[:, 2] <= 128)
        and np.all(boxes[:, 1] + boxes[:, 3] <= 128)
    )
    per_image = np.bincount([a["image_id"] for a in coco["annotations"]], minlength=61)[1:]
    assert per_image.max() <= 6 and (per_image == 0).any() and per_image.mean() > 1.5
    assert set(a["category_id"] for a in coco["annotations"]) == {1, 2, 3, 4, 5}
    for a in coco["annotations"]:
        assert (
            0.3 * a["bbox"][2] * a["bbox"][3] < a["area"] <= a["bbox"][2] * a["bbox"][3] + 0.01
        )  # area rounded to 0.01
    first = np.asarray(Image.open(os.path.join(image_dir, "000001.png")))
    assert first.shape == (128, 128, 3) and first.std() > 10  # a cluttered background, not a flat colour


# ---------------------------------------------------------------- COCO JSON


def _write_coco(folder, images, annotations, categories=None):
    """images: (file_name, h, w); writes the PNGs (when the name is plain) and the JSON."""
    img_dir = folder / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for k, (name, h, w) in enumerate(images, start=1):
        if "/" not in name and not name.startswith("missing"):
            Image.fromarray(np.full((h, w, 3), 40 * k, np.uint8)).save(img_dir / name)
        entries.append({"id": k, "file_name": name, "height": h, "width": w})
    anns = [{"id": k, "iscrowd": 0, "area": 1.0, **a} for k, a in enumerate(annotations, start=1)]
    cats = categories or [{"id": 3, "name": "cat"}, {"id": 18, "name": "dog"}]
    path = folder / "instances.json"
    path.write_text(json.dumps({"images": entries, "annotations": anns, "categories": cats}))
    return str(img_dir), str(path)


def test_coco_json_edge_cases(tmp_path, caplog):
    image_dir, ann = _write_coco(
        tmp_path,
        [("a.png", 20, 30), ("b.png", 30, 20)],
        [
            {"image_id": 1, "category_id": 18, "bbox": [2, 3, 10, 5]},
            {"image_id": 1, "category_id": 3, "bbox": [25, -4, 10, 10]},  # partly outside: clipped
            {"image_id": 1, "category_id": 3, "bbox": [31, 2, 5, 5]},  # fully outside: zero area
            {"image_id": 1, "category_id": 3, "bbox": [4, 4, 0, 6]},  # zero width
            {"image_id": 1, "category_id": 3, "bbox": [0, 0, 8, 8], "iscrowd": 1},
        ],
    )
    with caplog.at_level(logging.WARNING, logger="fpn_tf.data.coco_json"):
        records, lm, stats = load_coco_json(ann, image_dir)
    assert lm.category_ids == [3, 18] and lm.names == ["cat", "dog"]
    a, b = records
    assert (a.image_id, a.height, a.width, a.path) == (1, 20, 30, os.path.join(image_dir, "a.png"))
    np.testing.assert_allclose(a.boxes, [[3, 2, 8, 12], [0, 25, 6, 30]])
    np.testing.assert_array_equal(a.labels, [2, 1])
    np.testing.assert_allclose(a.crowd_boxes, [[0, 0, 8, 8]])
    assert b.boxes.shape == (0, 4) and b.labels.shape == (0,)  # kept without annotations
    assert (stats.num_images, stats.num_boxes, stats.num_crowd, stats.num_clipped) == (2, 2, 1, 1)
    assert stats.num_zero_area_dropped == 2 and stats.num_images_without_boxes == 1
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "dropped 2 boxes with zero area" in warnings[0]


def test_coco_json_missing_file_and_escapes(tmp_path):
    image_dir, ann = _write_coco(tmp_path / "m", [("a.png", 8, 8), ("missing.png", 8, 8)], [])
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_coco_json(ann, image_dir)
    outside = tmp_path / "secret.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(outside)
    for name in ("../../secret.png", str(outside)):
        image_dir, ann = _write_coco(tmp_path / "e", [(name, 8, 8)], [])
        with pytest.raises(ValueError, match="secret.png.*outside the image folder"):
            load_coco_json(ann, image_dir)
    image_dir, ann = _write_coco(
        tmp_path / "c", [("a.png", 8, 8)], [{"image_id": 1, "category_id": 5, "bbox": [0, 0, 2, 2]}]
    )
    with pytest.raises(ValueError, match="category_id 5"):
        load_coco_json(ann, image_dir)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_coco_json(str(tmp_path / "nope.json"), image_dir)


# ---------------------------------------------------------------- pipeline

BATCH_KEYS = {
    "images": tf.float32,
    "image_info": tf.float32,
    "gt_boxes": tf.float32,
    "gt_classes": tf.int32,
    "image_id": tf.int64,
}


def test_train_batch_matches_the_documented_format(synthetic_train):
    image_dir, ann = synthetic_train
    data = DataConfig(source="coco_json", train_dir=image_dir, train_annotations=ann, shuffle_buffer=16)
    cfg = InputConfig(min_size=96, max_size=160, size_divisibility=32, max_gt_boxes=8)
    ds, info = build_dataset(data, cfg, "train", 4, training=True, seed=1)
    assert info.num_examples == 60 and info.label_map.num_classes == 6 and info.padded_hw == ((96, 96),)
    spec = ds.element_spec
    assert {k: s.dtype for k, s in spec.items()} == BATCH_KEYS
    assert spec["images"].shape == (4, 96, 96, 3) and spec["gt_boxes"].shape == (4, 8, 4)
    assert (
        spec["gt_classes"].shape == (4, 8)
        and spec["image_info"].shape == (4, 6)
        and spec["image_id"].shape == (4,)
    )
    batches = list(ds.take(20).as_numpy_iterator())  # 80 images: more than one epoch (repeat)
    again = list(build_dataset(data, cfg, "train", 4, training=True, seed=1)[0].take(2).as_numpy_iterator())
    for key in BATCH_KEYS:
        np.testing.assert_array_equal(batches[0][key], again[0][key])  # seeded shuffle and flip
    ids = np.concatenate([b["image_id"] for b in batches])
    assert set(ids) == set(range(1, 61))
    assert not np.array_equal(ids[:60], np.arange(1, 61))  # shuffled
    with open(ann) as f:
        coco = json.load(f)
    flipped = 0
    for b in batches[:5]:
        for k in range(4):
            np.testing.assert_allclose(b["image_info"][k], [128, 128, 96, 96, 0.75, 0.75])
            anns = [a for a in coco["annotations"] if a["image_id"] == b["image_id"][k]]
            n = min(len(anns), 8)
            assert np.all(b["gt_classes"][k, n:] == -1) and np.all(b["gt_boxes"][k, n:] == 0)
            yxyx = (
                np.array([[y, x, y + h, x + w] for x, y, w, h in (a["bbox"] for a in anns)]).reshape(-1, 4)
                * 0.75
            )
            got = b["gt_boxes"][k, :n]
            mirrored = np.stack([yxyx[:, 0], 96 - yxyx[:, 3], yxyx[:, 2], 96 - yxyx[:, 1]], -1)
            assert np.allclose(got, yxyx[:n], atol=1e-3) or np.allclose(got, mirrored[:n], atol=1e-3)
            flipped += not np.allclose(got, yxyx[:n], atol=1e-3)
            np.testing.assert_array_equal(b["gt_classes"][k, :n], [a["category_id"] for a in anns][:n])
    assert flipped > 0


def test_eval_pipeline_is_exact_ordered_and_groups_orientations(tmp_path):
    image_dir, ann = _write_coco(
        tmp_path,
        [("l1.png", 20, 40), ("p1.png", 40, 20), ("l2.png", 30, 30), ("p2.png", 50, 10), ("l3.png", 10, 50)],
        [
            {"image_id": 1, "category_id": 3, "bbox": [4, 2, 10, 6]},
            {"image_id": 2, "category_id": 18, "bbox": [1, 1, 5, 5]},
        ],
    )
    data = DataConfig(source="coco_json", eval_dir=image_dir, eval_annotations=ann)
    cfg = InputConfig(min_size=32, max_size=64, size_divisibility=16, max_gt_boxes=3)
    ds, info = build_dataset(data, cfg, "eval", 2, training=False)
    assert info.padded_hw == ((32, 64), (64, 32))
    assert info.coco_gt.getImgIds() == [1, 2, 3, 4, 5]
    batches = list(ds.as_numpy_iterator())  # the dataset ends
    ids = [b["image_id"].tolist() for b in batches]
    assert sorted(sum(ids, [])) == [1, 2, 3, 4, 5]
    assert ids == [
        b["image_id"].tolist()
        for b in build_dataset(data, cfg, "eval", 2, training=False)[0].as_numpy_iterator()
    ]
    for b in batches:
        portrait = b["image_info"][:, 0] > b["image_info"][:, 1]
        assert portrait.all() or not portrait.any()  # one orientation per batch
        assert b["images"].shape[1:3] == ((64, 32) if portrait[0] else (32, 64))
    by_id = {int(i): (b, k) for b in batches for k, i in enumerate(b["image_id"])}
    b, k = by_id[1]
    np.testing.assert_allclose(b["image_info"][k], [20, 40, 32, 64, 1.6, 1.6])
    np.testing.assert_allclose(
        b["gt_boxes"][k], [[2 * 1.6, 4 * 1.6, 8 * 1.6, 14 * 1.6], [0] * 4, [0] * 4], rtol=1e-6
    )
    np.testing.assert_array_equal(b["gt_classes"][k], [1, -1, -1])
    np.testing.assert_allclose(b["images"][k], 40.0)  # the PNG's grey value, resized; no padding needed
    b, k = by_id[3]  # 30 x 30 -> 32 x 32, padded to 32 x 64
    np.testing.assert_allclose(b["images"][k, :, :32], 120.0)
    assert b["images"][k, :, 32:].max() == 0
    b, k = by_id[4]  # 50 x 10: the short side would be 32 but the long side binds (64)
    np.testing.assert_allclose(b["image_info"][k], [50, 10, 64, 12, 64 / 50, 12 / 10], rtol=1e-6)
    assert np.all(b["gt_classes"][k] == -1)  # background-only images are kept


def test_sharding_with_an_input_context(synthetic_train):
    image_dir, ann = synthetic_train
    data = DataConfig(source="coco_json", eval_dir=image_dir, eval_annotations=ann)
    cfg = InputConfig(min_size=64, max_size=64, max_gt_boxes=4)
    ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=1, num_replicas_in_sync=2)
    ds, _ = build_dataset(data, cfg, "eval", 8, training=False, input_context=ctx)
    ids = np.concatenate([b["image_id"] for b in ds.as_numpy_iterator()])
    assert ds.element_spec["images"].shape[1:] == (64, 64, 3)
    np.testing.assert_array_equal(ids, np.arange(2, 61, 2))  # pipeline 1 of 2, batches of 8 / 2


def test_synthetic_source_generates_on_first_use(tmp_path):
    data = DataConfig(
        source="synthetic",
        train_dir=str(tmp_path / "tr"),
        eval_dir=str(tmp_path / "ev"),
        synthetic_num_train=6,
        synthetic_num_eval=3,
        synthetic_image_size=64,
        synthetic_num_classes=2,
    )
    cfg = InputConfig(min_size=64, max_size=64, max_gt_boxes=6)
    ds, info = build_dataset(data, cfg, "eval", 2, training=False)
    assert os.path.isfile(tmp_path / "ev" / "annotations.json") and not os.path.exists(tmp_path / "tr")
    assert info.label_map.names == ["square", "disk"] and info.num_examples == 3
    assert [b["image_id"].tolist() for b in ds.as_numpy_iterator()] == [[1, 2], [3]]


# ---------------------------------------------------------------- tfds


def test_tfds_missing_data_fails_fast_with_instructions(tmp_path):
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match="tfds build coco/2017"):
        load_tfds_coco("validation", data_dir=str(tmp_path))
    assert time.monotonic() - start < 5


def test_tfds_mock_data_loads_and_batches(tmp_path):
    with tfds.testing.mock_data(num_examples=4):
        ds, lm, _ = load_tfds_coco("validation", data_dir=str(tmp_path))
        assert lm.num_classes == 81 and lm.category_ids == list(COCO_CATEGORY_IDS)
        assert lm.names[0] == "person" and lm.category_ids[-1] == 90
        for ex in ds.take(2):
            h, w = ex["image"].shape[:2]
            boxes = ex["boxes"].numpy()
            assert ex["image"].dtype == tf.uint8 and ex["classes"].dtype == tf.int32
            assert np.all((ex["classes"].numpy() >= 1) & (ex["classes"].numpy() <= 80))
            assert np.all(boxes[:, 2] > boxes[:, 0]) and np.all(boxes[:, 3] > boxes[:, 1])
            assert np.all(boxes >= 0) and np.all(boxes[:, 2] <= h) and np.all(boxes[:, 3] <= w)

        data = DataConfig(source="tfds", tfds_data_dir=str(tmp_path), eval_split="validation")
        cfg = InputConfig(min_size=64, max_size=96, size_divisibility=32, max_gt_boxes=50)
        ds, info = build_dataset(data, cfg, "eval", 2, training=False)
        batches = list(ds.as_numpy_iterator())
        assert sum(len(b["image_id"]) for b in batches) == 4
        for b in batches:
            assert {k: v.dtype for k, v in b.items()} == {k: d.as_numpy_dtype for k, d in BATCH_KEYS.items()}
            assert b["images"].shape[1:3] in info.padded_hw and b["gt_boxes"].shape[1:] == (50, 4)
        assert len(info.coco_gt.getImgIds()) == 4

        train, _ = build_dataset(
            dataclasses.replace(data, train_split="validation"), cfg, "train", 2, training=True
        )
        batch = next(iter(train))
        assert batch["images"].shape[0] == 2 and batch["images"].shape[1:3] in info.padded_hw


def test_tfds_ground_truth_matches_the_converted_boxes(tmp_path):
    with tfds.testing.mock_data(num_examples=2):
        coco = tfds_coco_ground_truth("validation", data_dir=str(tmp_path))
        ds, lm, _ = load_tfds_coco("validation", data_dir=str(tmp_path))
        assert len(coco.getImgIds()) == 2 and len(coco.getCatIds()) == 80
        for ex in ds:
            anns = coco.imgToAnns[int(ex["image_id"])]
            assert {(a["image_id"], len(a["bbox"])) for a in anns} <= {(int(ex["image_id"]), 4)}
            kept = [a for a in anns if not a["iscrowd"] and a["bbox"][2] > 0 and a["bbox"][3] > 0]
            y1, x1, y2, x2 = ex["boxes"].numpy().T
            xywh = np.stack([x1, y1, x2 - x1, y2 - y1], -1)
            np.testing.assert_allclose(xywh, np.array([a["bbox"] for a in kept]).reshape(-1, 4), atol=1e-3)
            np.testing.assert_array_equal(
                lm.to_label([a["category_id"] for a in kept]), ex["classes"].numpy()
            )
