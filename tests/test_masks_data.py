"""Instance masks in the data: COCO polygons / RLE -> box-relative M x M masks through tf.data."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from fpn_tf.config import DataConfig, InputConfig
from fpn_tf.data.coco_json import load_coco_json
from fpn_tf.data.masks import (
    SegmentationError,
    check_segmentation,
    crop_mask,
    encode_binary_mask,
    rle_string_counts,
)
from fpn_tf.data.pipeline import build_dataset
from fpn_tf.data.synthetic import write_synthetic_coco

H, W = 48, 64
# An L shape (asymmetric left-right, so a missed flip shows), box x 6..30, y 4..28.
L_POLY = [6, 4, 14, 4, 14, 20, 30, 20, 30, 28, 6, 28]


def _full(poly) -> np.ndarray:
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([poly], H, W)))


def _disk(cy, cx, r) -> np.ndarray:
    yy, xx = np.mgrid[0:H, 0:W] + 0.5
    return (np.hypot(yy - cy, xx - cx) <= r).astype(np.uint8)


def _ann(i, seg, bbox, crowd=0):
    return {
        "id": i,
        "image_id": 1,
        "category_id": 1,
        "bbox": bbox,
        "area": 1.0,
        "iscrowd": crowd,
        "segmentation": seg,
    }


def _write(folder, annotations) -> tuple[str, str]:
    os.makedirs(os.path.join(folder, "img"), exist_ok=True)
    Image.fromarray(np.full((H, W, 3), 90, np.uint8)).save(os.path.join(folder, "img", "a.png"))
    path = os.path.join(folder, "ann.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(
            {
                "images": [{"id": 1, "file_name": "a.png", "height": H, "width": W}],
                "categories": [{"id": 1, "name": "thing"}],
                "annotations": annotations,
            },
            f,
        )
    return os.path.join(folder, "img"), path


def _scene_annotations():
    disk = _disk(30, 48, 9)
    rle = encode_binary_mask(disk)  # compressed (string counts)
    uncompressed = {"size": [H, W], "counts": [int(c) for c in rle_string_counts(rle["counts"])]}
    return [
        _ann(1, [L_POLY], [6, 4, 24, 24]),
        _ann(2, rle, [39, 21, 18, 18]),
        _ann(3, uncompressed, [39, 21, 18, 18]),
        _ann(4, [[0, 0, 10, 0, 10, 10]], [0, 0, 10, 10], crowd=1),  # crowd: neither box nor mask target
    ], disk


def _input(**kw) -> InputConfig:
    base = dict(min_size=96, max_size=128, size_divisibility=32, max_gt_boxes=5, mask_size=16)
    return InputConfig(**{**base, **kw})


def _paste_nearest(mask, box, hw) -> np.ndarray:
    """Box-relative mask -> image pixels by nearest lookup at pixel centres (test helper)."""
    out = np.zeros(hw, np.uint8)
    y1, x1, y2, x2 = box
    m = mask.shape[0]
    for r in range(int(np.floor(y1)), int(np.ceil(y2))):
        for c in range(int(np.floor(x1)), int(np.ceil(x2))):
            i, j = int((r + 0.5 - y1) / (y2 - y1) * m), int((c + 0.5 - x1) / (x2 - x1) * m)
            if 0 <= i < m and 0 <= j < m and 0 <= r < hw[0] and 0 <= c < hw[1]:
                out[r, c] = mask[i, j]
    return out


def _iou(a, b) -> float:
    return float(np.sum((a > 0) & (b > 0)) / max(np.sum((a > 0) | (b > 0)), 1))


# ---------------------------------------------------------------- checking segmentations


@pytest.mark.parametrize(
    "seg, message",
    [
        (None, "polygons or an RLE dict"),
        ([], "polygons or an RLE dict"),
        ([[1, 2, 3, 4, 5]], "polygon 0 must be a flat list"),
        ([[1, 2, 3, 4]], "polygon 0"),  # two points: pycocotools would read it as a bbox
        ([[0, 0, 5, 0, 5, 5], [1, 2, "x", 4, 5, 6]], "polygon 1"),
        ([[0, 0, 5, float("nan"), 5, 5]], "polygon 0"),
        ({"size": [H + 1, W], "counts": [H * W]}, "differs from the image size"),
        ({"size": [H, W], "counts": [5, 3]}, f"sum to 8, not height \\* width = {H * W}"),
        ({"size": [H, W], "counts": [H * W + 1, -1]}, "non-negative"),
        ({"size": [H, W], "counts": "53"}, "sum to 8"),
        ({"size": [H, W], "counts": "5\x7f"}, "invalid character"),
        ({"size": [H, W]}, "counts must be a string or a list"),
    ],
)
def test_malformed_segmentations_name_the_annotation(seg, message):
    with pytest.raises(SegmentationError, match=message) as err:
        check_segmentation(seg, H, W, "annotation 17 of image 3")
    assert "annotation 17 of image 3" in str(err.value)


def test_rle_string_decoder_matches_pycocotools():
    rng = np.random.default_rng(0)
    for _ in range(20):
        m = (rng.uniform(size=(H, W)) < rng.uniform()).astype(np.uint8)
        counts = rle_string_counts(mask_utils.encode(np.asfortranarray(m))["counts"])
        flat = np.repeat(np.arange(len(counts)) % 2, counts).astype(np.uint8)
        np.testing.assert_array_equal(flat.reshape(W, H).T, m)


def test_polygon_and_rle_crops_agree_with_the_full_raster():
    full = _full(L_POLY)
    box = (4.0, 6.0, 28.0, 30.0)
    poly = crop_mask(check_segmentation([L_POLY], H, W, "a"), box, 24)  # 1 mask pixel = 1 image pixel
    rle = crop_mask(check_segmentation(encode_binary_mask(full), H, W, "b"), box, 24)
    np.testing.assert_array_equal(poly, full[4:28, 6:30])
    np.testing.assert_array_equal(rle, full[4:28, 6:30])
    assert crop_mask(check_segmentation([L_POLY], H, W, "a"), box, 112).dtype == np.uint8


def test_coco_json_errors_name_the_annotation(tmp_path):
    image_dir, path = _write(tmp_path, [_ann(41, {"size": [H, W], "counts": [7]}, [0, 0, 5, 5])])
    records, _, _ = load_coco_json(path, image_dir)  # box-only loading never reads segmentations
    assert records[0].segmentations is None and len(records[0].boxes) == 1
    from fpn_tf.data.coco_json import load_coco, records_from_coco

    with pytest.raises(SegmentationError, match="annotation 41 of image 1: RLE counts sum to 7"):
        records_from_coco(load_coco(path), image_dir, with_masks=True)


# ---------------------------------------------------------------- the pipeline


def test_batches_carry_box_relative_masks(tmp_path):
    annotations, disk = _scene_annotations()
    image_dir, path = _write(tmp_path, annotations)
    data = DataConfig(source="coco_json", eval_dir=image_dir, eval_annotations=path)
    ds, _ = build_dataset(data, _input(), "eval", batch_size=1, training=False)
    assert ds.element_spec["gt_masks"].shape.as_list() == [None, 5, 16, 16]
    batch = next(iter(ds))
    masks, boxes = batch["gt_masks"].numpy()[0], batch["gt_boxes"].numpy()[0]
    info = batch["image_info"].numpy()[0]
    assert masks.dtype == np.uint8 and set(np.unique(masks)) <= {0, 1}
    assert masks[3:].max() == 0 and batch["gt_classes"].numpy()[0].tolist() == [1, 1, 1, -1, -1]
    np.testing.assert_array_equal(masks[1], masks[2])  # compressed and uncompressed RLE: same mask
    # Pasted back at the resized image (scale 2), each mask matches its resized full-image mask.
    hw = (int(info[2]), int(info[3]))
    up = np.kron(np.stack([_full(L_POLY), disk]), np.ones((2, 2), np.uint8))
    assert _iou(_paste_nearest(masks[0], boxes[0], hw), up[0]) > 0.9
    assert _iou(_paste_nearest(masks[1], boxes[1], hw), up[1]) > 0.9


def test_masks_follow_the_flip_and_the_truncation(tmp_path):
    annotations, _ = _scene_annotations()
    image_dir, path = _write(tmp_path, annotations)
    data = DataConfig(source="coco_json", train_dir=image_dir, train_annotations=path, shuffle_buffer=1)
    plain, _ = build_dataset(data, _input(random_flip=False), "train", batch_size=1, training=True)
    ref = next(iter(plain))
    flips = 0
    ds, _ = build_dataset(data, _input(max_gt_boxes=2), "train", batch_size=1, training=True)
    assert ds.element_spec["gt_masks"].shape.as_list() == [1, 2, 16, 16]
    for batch in ds.take(12):
        masks, boxes = batch["gt_masks"].numpy()[0], batch["gt_boxes"].numpy()[0]
        if np.allclose(boxes, ref["gt_boxes"].numpy()[0, :2]):
            np.testing.assert_array_equal(masks, ref["gt_masks"].numpy()[0, :2])
        else:
            flips += 1
            valid_w = batch["image_info"].numpy()[0, 3]
            want = ref["gt_boxes"].numpy()[0, :2] * [1, -1, 1, -1] + [0, valid_w, 0, valid_w]
            np.testing.assert_allclose(boxes, want[:, [0, 3, 2, 1]], atol=1e-4)
            np.testing.assert_array_equal(masks, ref["gt_masks"].numpy()[0, :2, :, ::-1])
    assert 0 < flips < 12


# ---------------------------------------------------------------- synthetic and tfds


def test_synthetic_writes_exact_visible_masks(tmp_path):
    image_dir, path = write_synthetic_coco(str(tmp_path / "syn"), 12, image_size=128, num_classes=6, seed=5)
    with open(path, encoding="utf-8") as f:
        coco = json.load(f)
    assert coco["info"]["version"] == "2"
    anns = coco["annotations"]
    assert anns
    for ann in anns:
        m = mask_utils.decode(check_segmentation(ann["segmentation"], 128, 128, f"ann {ann['id']}"))
        x, y, w, h = ann["bbox"]
        ys, xs = np.nonzero(m)
        assert len(ys) > 0.5 * ann["area"], ann["id"]  # occluded by at most 20 %, then some
        assert ys.min() >= np.floor(y) and ys.max() < np.ceil(y + h) and xs.min() >= np.floor(x)
        assert xs.max() < np.ceil(x + w)
        assert abs(int(m.sum()) - ann["area"]) <= 0.25 * ann["area"] + 4
    data = DataConfig(source="coco_json", eval_dir=image_dir, eval_annotations=path)
    ds, _ = build_dataset(data, _input(min_size=128, max_size=128, max_gt_boxes=8), "eval", 4, False)
    for batch in ds:
        masks, classes = batch["gt_masks"].numpy(), batch["gt_classes"].numpy()
        assert (masks.reshape(*classes.shape, -1).max(-1) == (classes > 0)).all()


def test_tfds_coco_has_no_masks_and_says_so(tmp_path):
    features = tfds.builder("coco/2017").info.features
    assert set(features["objects"].keys()) == {"area", "bbox", "id", "is_crowd", "label"}
    data = DataConfig(source="tfds", tfds_name="coco/2017", eval_split="validation")
    with tfds.testing.mock_data(num_examples=2):
        ds, _ = build_dataset(data, dataclasses.replace(_input(), mask_size=0), "eval", 1, False)
        assert "gt_masks" not in ds.element_spec
        with pytest.raises(ValueError, match=r"tfds 'coco/2017' has none: .*no segmentation.*coco_json"):
            build_dataset(data, _input(), "eval", 1, False)


def test_cropping_100_large_instances_holds_one_full_mask_at_a_time():
    """800 x 1333 image, 100 RLE + 100 polygon instances: peak memory stays near ONE full-image mask."""
    import tracemalloc

    from fpn_tf.data.masks import crop_masks

    h, w = 800, 1333
    rng = np.random.default_rng(0)
    segs, polys, boxes = [], [], []
    for _ in range(100):
        y, x = rng.uniform(0, h - 200), rng.uniform(0, w - 200)
        size = rng.uniform(20, 200)
        full = np.zeros((h, w), np.uint8)
        full[int(y) : int(y + size), int(x) : int(x + size)] = 1
        segs.append(check_segmentation(encode_binary_mask(full), h, w, "a"))
        polys.append([[x, y, x + size, y, x + size, y + size, x, y + size]])
        boxes.append([y, x, y + size, x + size])
    del full
    tracemalloc.start()
    masks = crop_masks(segs, np.asarray(boxes), 112)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert masks.shape == (100, 112, 112) and masks.reshape(100, -1).mean(1).min() > 0.9
    assert peak < 4 * h * w, peak  # all 100 at once would be 100 * h * w bytes
    tracemalloc.start()
    from_polys = crop_masks(polys, np.asarray(boxes), 112)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < masks.nbytes + h * w // 4  # polygons: rasterised in the box frame, no full mask at all
    assert np.mean(from_polys != masks) < 0.02
