"""COCO from TensorFlow Datasets (``coco/2017``, ``coco/2014``) in fpn_tf's per-image format.

tfds stores boxes normalised ``(ymin, xmin, ymax, xmax)`` and labels ``0..79``
in COCO's category order; they become ``(y1, x1, y2, x2)`` original pixels and
contiguous labels ``1..80`` (``label + 1``), whose ``LabelMap`` holds COCO's real
category ids (1..90 with gaps). Crowd boxes and boxes without area are dropped.

No instance masks: tfds ``coco/2017`` (and ``coco/2014``) stores per object only
``bbox``, ``label``, ``area``, ``id`` and ``is_crowd``, no ``segmentation`` (the
panoptic ``coco/2017_panoptic`` has a different label set of 133 things + stuff).
A mask model (``input.mask_size > 0``) pointed at tfds stops in
``check_tfds_masks`` with that explanation; instance masks come from
``data.source: coco_json`` (the COCO instances JSON) or the synthetic shapes.

Downloads are off by default: tfds retries for minutes when it may download
without a network, while a missing dataset with ``download=False`` fails at once.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from pycocotools.coco import COCO

from fpn_tf.data.label_map import LabelMap

# COCO's 80 detection categories (instances_*2017.json), sorted by id.
COCO_CATEGORY_IDS = (
    *range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70,
    *range(72, 83), *range(84, 91),
)  # fmt: skip
COCO_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
assert len(COCO_CATEGORY_IDS) == len(COCO_NAMES) == 80


def coco_label_map(tfds_names=None) -> LabelMap:
    """LabelMap of COCO's 80 categories; names from tfds when it has real ones."""
    names = COCO_NAMES
    if tfds_names is not None and len(tfds_names) == 80 and not all(str(n).isdigit() for n in tfds_names):
        names = tuple(tfds_names)
    return LabelMap(COCO_CATEGORY_IDS, names)


def _not_prepared_message(name: str, split: str, data_dir: str | None, error: Exception) -> str:
    where = data_dir or "the default tfds data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
    return (
        f"tfds dataset {name!r} (split {split!r}) is not prepared in {where}. Prepare it with "
        f"`tfds build {name} --data_dir {data_dir or '<dir>'}` (the COCO zips can be placed in "
        f"<dir>/downloads/manual), or pass download=True (data.tfds_download: true), or point "
        f"data.source: coco_json at a folder of COCO images and an instances JSON. ({error})"
    )


def check_tfds_masks(name: str = "coco/2017", data_dir: str | None = None) -> None:
    """Raises: ValueError, always, explaining that the tfds dataset ``name`` gives no instance masks here.

    Reads only the feature spec (works offline), so the message lists what the
    dataset does carry per object.
    """
    try:
        features = tfds.builder(name, data_dir=data_dir or None).info.features
        objects = features["objects"] if "objects" in features else {}
        carried = sorted(objects.keys()) if hasattr(objects, "keys") else []
    except Exception as e:  # any failure to read the spec still ends in the same advice
        carried = [f"<feature spec unavailable: {e}>"]
    raise ValueError(
        f"input.mask_size > 0 asks for instance masks, but tfds {name!r} has none: its objects carry "
        f"{carried} (no segmentation; fpn_tf reads masks only from COCO JSON). Use data.source: coco_json "
        f"with the COCO images and instances_*.json (polygons / RLE), or data.source: synthetic, "
        f"or set input.mask_size: 0 for a box-only model."
    )


def _load(split, data_dir, download, name, read_config=None, shuffle_files=False):
    try:
        return tfds.load(
            name,
            split=split,
            data_dir=data_dir or None,
            download=download,
            with_info=True,
            shuffle_files=shuffle_files,
            read_config=read_config,
        )
    except (AssertionError, FileNotFoundError, tf.errors.NotFoundError) as e:
        if download:
            raise
        raise FileNotFoundError(_not_prepared_message(name, split, data_dir, e)) from None


def _objects(example: dict) -> tuple[tf.Tensor, ...]:
    """(bbox [n, 4] normalised, label [n], is_crowd [n], area [n]) cut to a common length."""
    obj = example["objects"]
    n = tf.reduce_min(tf.stack([tf.shape(obj[k])[0] for k in ("bbox", "label", "is_crowd", "area")]))
    return obj["bbox"][:n], obj["label"][:n], obj["is_crowd"][:n], obj["area"][:n]


def convert_example(example: dict) -> dict:
    """One tfds COCO element -> fpn_tf's per-image element.

    Returns:
      ``{"image": uint8 [h, w, 3], "image_id": int64 [], "boxes": float32 [n, 4]
      (y1, x1, y2, x2) original pixels, clipped, "classes": int32 [n] labels 1..80}``
      without crowd boxes and boxes of zero area.
    """
    image = example["image"]
    hw = tf.cast(tf.shape(image)[:2], tf.float32)
    bbox, label, is_crowd, _ = _objects(example)
    boxes = tf.clip_by_value(bbox, 0.0, 1.0) * tf.stack([hw[0], hw[1], hw[0], hw[1]])
    has_area = tf.logical_and(boxes[:, 2] > boxes[:, 0], boxes[:, 3] > boxes[:, 1])
    keep = tf.logical_and(has_area, tf.logical_not(is_crowd))
    return {
        "image": image,
        "image_id": tf.cast(example["image/id"], tf.int64),
        "boxes": tf.reshape(tf.boolean_mask(boxes, keep), [-1, 4]),
        "classes": tf.cast(tf.boolean_mask(label, keep), tf.int32) + 1,
    }


def load_tfds_coco(
    split: str,
    data_dir: str | None = None,
    download: bool = False,
    name: str = "coco/2017",
    *,
    read_config: tfds.ReadConfig | None = None,
    shuffle_files: bool = False,
) -> tuple[tf.data.Dataset, LabelMap, int]:
    """Loads a tfds COCO split as per-image elements (see ``convert_example``).

    Args:
      split: tfds split ("train", "validation", "train[:1%]", ...).
      data_dir: tfds data folder (None: tfds' default).
      download: let tfds download and prepare (slow; needs the network).
      name: tfds name, "coco/2017" or "coco/2014".
      read_config, shuffle_files: passed to ``tfds.load`` (sharding with an
        ``input_context``, file shuffling for training).

    Returns:
      ``(dataset, label_map, num_examples)``; ``num_examples`` is -1 when tfds
      does not know it.

    Raises:
      FileNotFoundError: quickly, with preparation instructions, when the data is
        not there and ``download`` is False.
    """
    ds, info = _load(split, data_dir, download, name, read_config, shuffle_files)
    label = info.features["objects"]["label"]
    if label.num_classes != 80:
        raise ValueError(f"{name}: expected COCO's 80 detection classes, found {label.num_classes}")
    try:
        num_examples = int(info.splits[split].num_examples)
    except (KeyError, ValueError, TypeError):
        num_examples = -1
    ds = ds.map(convert_example, num_parallel_calls=tf.data.AUTOTUNE)
    return ds, coco_label_map(label.names), num_examples


def tfds_coco_ground_truth(
    split: str, data_dir: str | None = None, download: bool = False, name: str = "coco/2017"
) -> COCO:
    """A pycocotools ``COCO`` ground truth built from a tfds split (for COCOeval).

    Boxes are the tfds boxes in original pixels ([x, y, w, h]), ``area`` is COCO's
    (segment) area stored by tfds, crowd flags are kept. Reads every image once
    (to know its size).
    """
    ds, info = _load(split, data_dir, download, name)
    label_map = coco_label_map(info.features["objects"]["label"].names)

    def sizes(ex):
        bbox, label, is_crowd, area = _objects(ex)
        return tf.shape(ex["image"])[:2], ex["image/id"], bbox, label, is_crowd, area

    images, annotations = [], []
    ids = np.asarray(label_map.category_ids, np.int64)
    for hw, image_id, bbox, label, crowd, area in ds.map(
        sizes, num_parallel_calls=tf.data.AUTOTUNE
    ).as_numpy_iterator():
        h, w = int(hw[0]), int(hw[1])
        images.append({"id": int(image_id), "height": h, "width": w, "file_name": f"{int(image_id)}.jpg"})
        for k in range(len(label)):
            y1, x1, y2, x2 = (float(v) for v in np.clip(bbox[k], 0.0, 1.0) * [h, w, h, w])
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": int(image_id),
                    "category_id": int(ids[int(label[k])]),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": float(area[k]) if area[k] > 0 else (x2 - x1) * (y2 - y1),
                    "iscrowd": int(crowd[k]),
                }
            )
    coco = COCO()
    coco.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c, "name": n} for c, n in zip(label_map.category_ids, label_map.names)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco
