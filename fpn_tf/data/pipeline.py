"""tf.data input pipelines producing the batch dict of docs/design.md.

One batch::

    images      float32 [B, H, W, 3]  RGB 0..255, resized picture top-left, zero padded
    image_info  float32 [B, 6]        (orig_h, orig_w, valid_h, valid_w, scale_y, scale_x)
    gt_boxes    float32 [B, G, 4]     (y1, x1, y2, x2) input pixels; padded rows 0
    gt_classes  int32   [B, G]        labels 1..K-1; padded rows -1
    gt_masks    uint8   [B, G, M, M]  only with input.mask_size M > 0: each GT mask
                                      sampled over its box (data/masks.py); padded rows 0
    image_id    int64   [B]

Images are padded to a FIXED size so a jitted step traces once per orientation:
landscape images (h <= w) at most to ``padded_size((min_size, max_size))`` and
portrait ones to its transpose (``preprocess.fixed_padded_hw``); a batch never
mixes the two (aspect-ratio grouping with ``group_by_window``). For COCO-JSON
and synthetic data the sizes of all images are known beforehand, so each
orientation gets the smallest size that fits all of its images
(``records_padded_hw``; square synthetic images need only ``(min, min)``), and
when one size serves every image H and W are static in ``element_spec``.
Otherwise they are None there but every batch has one of the (at most two)
sizes listed in ``DatasetInfo.padded_hw``. Training batches have a static B;
the last evaluation batch may be smaller.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import numpy as np
import tensorflow as tf
from pycocotools.coco import COCO

from fpn_tf.config import DataConfig, InputConfig
from fpn_tf.data import preprocess
from fpn_tf.data.coco_json import ImageRecord, load_coco, records_from_coco
from fpn_tf.data.image_reading import decode_images, skipped_images  # noqa: F401  (re-exported)
from fpn_tf.data.label_map import LabelMap
from fpn_tf.data.masks import crop_masks
from fpn_tf.data.synthetic import default_synthetic_dir, write_synthetic_coco

AUTOTUNE = tf.data.AUTOTUNE


@dataclasses.dataclass
class DatasetInfo:
    """What the trainer / evaluator needs besides the batches.

    label_map: dataset category ids <-> labels 1..K-1 (``num_classes`` = K).
    num_examples: images in the split before sharding (-1: unknown).
    annotation_path: the COCO JSON of the split, when there is one.
    padded_hw: the (H, W) sizes batches can have (one or two).
    coco_gt: pycocotools ``COCO`` ground truth, built on first access.
    """

    label_map: LabelMap
    num_examples: int
    annotation_path: str | None = None
    image_dir: str | None = None
    padded_hw: tuple[tuple[int, int], ...] = ()
    coco_gt_fn: Callable[[], COCO] | None = dataclasses.field(default=None, repr=False)

    @functools.cached_property
    def coco_gt(self) -> COCO:
        if self.coco_gt_fn is None:
            raise ValueError("this dataset has no COCO ground truth")
        return self.coco_gt_fn()


def synthetic_split_dir(data: DataConfig, split: str) -> str:
    """Folder of the synthetic train / eval split (``data.train_dir`` / ``eval_dir`` or a cache folder)."""
    train = split == "train"
    given = data.train_dir if train else data.eval_dir
    if given:
        return given
    num = data.synthetic_num_train if train else data.synthetic_num_eval
    return default_synthetic_dir(
        "train" if train else "val",
        num,
        data.synthetic_image_size,
        data.synthetic_num_classes,
        data.synthetic_seed,
    )


def _coco_json_source(data: DataConfig, split: str) -> tuple[str, str]:
    train = split == "train"
    if data.source == "synthetic":
        num = data.synthetic_num_train if train else data.synthetic_num_eval
        return write_synthetic_coco(
            synthetic_split_dir(data, split),
            num,
            image_size=data.synthetic_image_size,
            num_classes=data.synthetic_num_classes,
            seed=data.synthetic_seed,
            split="train" if train else "val",
        )
    image_dir = data.train_dir if train else data.eval_dir
    annotations = data.train_annotations if train else data.eval_annotations
    prefix = "train" if train else "eval"
    if not image_dir or not annotations:
        raise ValueError(
            f"data.source=coco_json needs data.{prefix}_dir (image folder) and data.{prefix}_annotations "
            f"(instances JSON); got {image_dir!r} and {annotations!r}"
        )
    return image_dir, annotations


def records_dataset(records: list[ImageRecord]) -> tf.data.Dataset:
    """Records -> dataset of ``{"path", "image_id", "hw", "boxes" [n, 4], "classes" [n], "record_index"}``.

    Boxes are (y1, x1, y2, x2) original pixels; "hw" is the annotated image size;
    "record_index" is the position in ``records`` (``mask_fn`` looks masks up by it).
    """
    lengths = [len(r.labels) for r in records]
    boxes = np.concatenate([r.boxes.reshape(-1, 4) for r in records] or [np.zeros((0, 4))]).astype(np.float32)
    classes = np.concatenate([r.labels for r in records] or [np.zeros(0)]).astype(np.int32)
    return tf.data.Dataset.from_tensor_slices(
        {
            "path": tf.constant([r.path for r in records], tf.string),
            "image_id": tf.constant([r.image_id for r in records], tf.int64),
            "hw": tf.constant([[r.height, r.width] for r in records], tf.int32),
            "boxes": tf.RaggedTensor.from_row_lengths(boxes, lengths),
            "classes": tf.RaggedTensor.from_row_lengths(classes, lengths),
            "record_index": tf.range(len(records), dtype=tf.int64),
        }
    )


def mask_fn(records: list[ImageRecord], mask_size: int, max_boxes: int) -> Callable[[dict], dict]:
    """``fn(element) -> {"masks": uint8 [min(n, G), M, M]}`` for a ``records_dataset`` element.

    The segmentations stay in the Python ``records`` (no copy in the graph); a
    ``tf.numpy_function`` crops the first G of one image, one instance at a time
    (``masks.crop_masks``), so no full-image mask of every instance ever exists.
    """
    if any(r.segmentations is None for r in records):
        raise ValueError("mask_fn needs records loaded with masks (records_from_coco(..., with_masks=True))")

    def crop(index):
        r = records[int(index)]
        return crop_masks(r.segmentations[:max_boxes], r.boxes[:max_boxes], mask_size)

    def fn(element):
        masks = tf.numpy_function(crop, [element["record_index"]], tf.uint8, stateful=False)
        masks.set_shape([None, mask_size, mask_size])
        return {"masks": masks}

    return fn


def make_preprocess_fn(
    input_config: InputConfig,
    training: bool,
    seed: int = 0,
    padded_hw: dict[bool, tuple[int, int]] | None = None,
) -> Callable[[tf.Tensor, dict], dict]:
    """``fn(index, element) -> one example of the batch dict`` (no batch dimension).

    ``element``: ``{"image" uint8 [h, w, 3], "image_id", "boxes" [n, 4] original
    pixels, "classes" [n]}`` and, with masks, ``"masks"`` uint8 [n, M, M] relative
    to the boxes (they follow the flip; resize and padding leave them as they
    are). In training the image is flipped left-right with
    probability 1/2 (``input_config.random_flip``), decided by a stateless
    random draw seeded with ``(seed, index)``: reproducible runs.
    ``padded_hw`` maps portrait (h > w) -> the padded (H, W); default
    ``fixed_padded_hw`` for both orientations. With one entry the output
    shape is static.
    """
    if padded_hw is None:
        padded_hw = {o: preprocess.fixed_padded_hw(input_config, portrait=o) for o in (False, True)}
    static_hw = next(iter(padded_hw.values())) if len(set(padded_hw.values())) == 1 else None

    def fn(index, element):
        resized, info = preprocess.resize_image(
            element["image"], input_config.min_size, input_config.max_size
        )
        boxes = preprocess.clip_boxes(preprocess.resize_boxes(element["boxes"], info[4:6]), info[2:4])
        masks = element.get("masks")
        if training and input_config.random_flip:
            flip = tf.random.stateless_uniform([], seed=tf.stack([tf.cast(seed, tf.int64), index])) < 0.5
            resized, boxes = tf.cond(
                flip,
                lambda: preprocess.flip_left_right(resized, boxes, info[3]),
                lambda: (resized, boxes),
            )
            if masks is not None:
                masks = tf.cond(flip, lambda: preprocess.flip_masks_left_right(masks), lambda: masks)
        target = static_hw or tf.where(
            info[0] > info[1], tf.constant(padded_hw[True]), tf.constant(padded_hw[False])
        )
        gt_boxes, gt_classes = preprocess.pad_gt(boxes, element["classes"], input_config.max_gt_boxes)
        out = {
            "images": preprocess.pad_image(resized, target),
            "image_info": info,
            "gt_boxes": gt_boxes,
            "gt_classes": gt_classes,
            "image_id": tf.cast(element["image_id"], tf.int64),
        }
        if masks is not None:
            out["gt_masks"] = preprocess.pad_gt_masks(masks, input_config.max_gt_boxes)
        return out

    return fn


def records_padded_hw(records: list[ImageRecord], input_config: InputConfig) -> dict[bool, tuple[int, int]]:
    """The smallest fixed padded (H, W) per orientation (portrait: h > w) that fits every record.

    Never larger than ``preprocess.fixed_padded_hw``; square synthetic images at
    min_size 128 give (128, 128) instead of (128, 192).
    """
    out = {}
    for portrait in (False, True):
        sizes = np.asarray(
            [(r.height, r.width) for r in records if (r.height > r.width) == portrait], np.float64
        )
        if len(sizes) == 0:
            continue
        s = np.minimum(input_config.min_size / sizes.min(1), input_config.max_size / sizes.max(1))
        new = np.maximum(np.floor(sizes * s[:, None]), 1).astype(np.int64).max(0)
        out[portrait] = preprocess.padded_size(tuple(int(v) for v in new), input_config.size_divisibility)
    return out


def _batch(ds: tf.data.Dataset, batch_size: int, training: bool, single_shape: bool) -> tf.data.Dataset:
    if single_shape or batch_size == 1:
        return ds.batch(batch_size, drop_remainder=training)
    return ds.group_by_window(
        key_func=lambda ex: tf.cast(ex["image_info"][0] > ex["image_info"][1], tf.int64),
        reduce_func=lambda _key, window: window.batch(batch_size, drop_remainder=training),
        window_size=batch_size,
    )


def _tfds_source(
    data: DataConfig, input_config: InputConfig, split: str, training: bool, input_context, seed
):
    """(unbatched examples, DatasetInfo, padded sizes) of a tfds COCO split."""
    import tensorflow_datasets as tfds  # slow to import; only this source needs it

    from fpn_tf.data.tfds_coco import check_tfds_masks, load_tfds_coco, tfds_coco_ground_truth

    if input_config.mask_size > 0:
        check_tfds_masks(data.tfds_name, data.tfds_data_dir or None)
    tfds_split = data.train_split if split == "train" else data.eval_split
    read_config = tfds.ReadConfig(input_context=input_context, shuffle_seed=seed)
    ds, label_map, num_examples = load_tfds_coco(
        tfds_split,
        data.tfds_data_dir or None,
        data.tfds_download,
        data.tfds_name,
        read_config=read_config,
        shuffle_files=training,
    )
    padded_hw = {o: preprocess.fixed_padded_hw(input_config, portrait=o) for o in (False, True)}
    info = DatasetInfo(
        label_map,
        num_examples,
        coco_gt_fn=lambda: tfds_coco_ground_truth(
            tfds_split, data.tfds_data_dir or None, data.tfds_download, data.tfds_name
        ),
    )
    return ds, info, padded_hw


def _coco_json_records_source(data: DataConfig, input_config: InputConfig, split: str, input_context):
    """(records dataset, DatasetInfo, padded sizes, masks_of or None) of a COCO-JSON split
    (the synthetic source is a COCO-JSON folder too), sharded over input pipelines."""
    with_masks = input_config.mask_size > 0
    image_dir, annotation_path = _coco_json_source(data, split)
    coco = load_coco(annotation_path, data.structure_policy)
    records, label_map, _stats = records_from_coco(coco, image_dir, with_masks=with_masks)
    if not records:
        raise ValueError(f"{annotation_path} lists no images")
    masks_of = mask_fn(records, input_config.mask_size, input_config.max_gt_boxes) if with_masks else None
    padded_hw = records_padded_hw(records, input_config)
    ds = records_dataset(records)
    if input_context and input_context.num_input_pipelines > 1:
        ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    info = DatasetInfo(
        label_map,
        len(records),
        annotation_path=annotation_path,
        image_dir=image_dir,
        coco_gt_fn=lambda: coco,
    )
    return ds, info, padded_hw, masks_of


def build_dataset(
    data: DataConfig,
    input_config: InputConfig,
    split: str,
    batch_size: int,
    training: bool,
    input_context: tf.distribute.InputContext | None = None,
    *,
    seed: int = 0,
) -> tuple[tf.data.Dataset, DatasetInfo]:
    """The input pipeline of one split.

    Args:
      data: where the images come from (``data.source``: synthetic | coco_json | tfds).
      input_config: resize / pad / flip / max_gt_boxes.
      split: "train" or "eval".
      batch_size: the GLOBAL batch size; with an ``input_context`` each pipeline
        batches ``input_context.get_per_replica_batch_size(batch_size)``.
      training: True -> shard, seeded shuffle, repeat forever, random flip, full
        batches only. False -> deterministic order, no flip, one pass.
      input_context: from ``strategy.distribute_datasets_from_function``.
      seed: shuffle and flip seed.

    Returns:
      ``(dataset of batch dicts, DatasetInfo)``.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if data.source not in ("synthetic", "coco_json", "tfds"):
        raise ValueError(f"data.source must be synthetic, coco_json or tfds, got {data.source!r}")
    per_replica = input_context.get_per_replica_batch_size(batch_size) if input_context else batch_size
    if per_replica < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pipeline_id = input_context.input_pipeline_id if input_context else 0
    if not isinstance(input_config.mask_size, int) or input_config.mask_size < 0:
        raise ValueError(f"input.mask_size must be an int >= 0 (0: no masks), got {input_config.mask_size!r}")
    masks_of = None

    if data.source == "tfds":
        ds, info, padded_hw = _tfds_source(data, input_config, split, training, input_context, seed)
    else:
        ds, info, padded_hw, masks_of = _coco_json_records_source(data, input_config, split, input_context)

    single_shape = len(set(padded_hw.values())) == 1
    info.padded_hw = tuple(sorted(set(padded_hw.values())))

    if training:
        ds = ds.shuffle(max(data.shuffle_buffer, 1), seed=seed, reshuffle_each_iteration=True).repeat()
    if data.source != "tfds":
        # Skipping an evaluation image would silently lower the AP: always fatal there.
        ds = decode_images(ds, data.bad_image_policy if training else "error", masks_of)
    fn = make_preprocess_fn(input_config, training, seed=seed * 1009 + pipeline_id, padded_hw=padded_hw)
    ds = ds.enumerate().map(fn, num_parallel_calls=AUTOTUNE)
    ds = _batch(ds, per_replica, training, single_shape)
    # The trainer saves the iterator's position with each checkpoint: the only stateful
    # function here is the skipped-image log (``_report_skipped``), not part of the order.
    options = tf.data.Options()
    options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
    return ds.prefetch(AUTOTUNE).with_options(options), info
