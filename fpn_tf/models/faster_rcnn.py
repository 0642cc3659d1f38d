"""Faster R-CNN with a Feature Pyramid Network (FPN §4–§5).

``build_faster_rcnn()`` returns a Keras functional model::

    images [B, H, W, 3] float32 RGB 0..255 ─┐
    image_info [B, 6] ──────────────────────┴─> PixelNormalization -> ResNet + FPN
        -> RPNHead (every level) -> ProposalGenerator -> RoIPooler (P2..P5)
        -> FastRCNNHead -> DetectionGenerator -> detections (original pixels)

The same layers serve inference (the functional graph), training
(``compute_losses``), proposal evaluation (``predict_proposals``) and export.
"""

from __future__ import annotations

import contextlib
import dataclasses

import keras
import tensorflow as tf

from fpn_tf.config import ModelConfig, from_dict, to_dict
from fpn_tf.layers.normalization import PixelNormalization
from fpn_tf.models import roi_head as roi_lib
from fpn_tf.models import rpn as rpn_lib
from fpn_tf.models.conv5_head import Conv5Head
from fpn_tf.models.fpn_backbone import build_fpn_backbone, fpn_output_specs
from fpn_tf.models.presets import preset_config
from fpn_tf.ops import anchors as anchor_ops

BOX_HEADS = ("2fc", "conv5")
LOSS_KEYS = ("rpn_objectness_loss", "rpn_box_loss", "rcnn_class_loss", "rcnn_box_loss", "total_loss")
COMPUTE_DTYPES = ("float32", "mixed_bfloat16")


@contextlib.contextmanager
def _dtype_policy(name: str | None):
    """Builds layers under the Keras dtype policy ``name`` (None: leave the global one)."""
    if name is None:
        yield
        return
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _build_box_head(cfg: ModelConfig, in_channels: int) -> keras.layers.Layer:
    """The RoI head of ``cfg.roi_head.head``: "2fc" (FPN §4.2) or "conv5" (res5, Table 3(a))."""
    r = cfg.roi_head
    if r.head == "conv5":
        return Conv5Head(cfg.num_classes, cfg.backbone, in_channels, name="box_head")
    return roi_lib.FastRCNNHead(cfg.num_classes, r.fc_dim, r.num_fc, name="box_head")


def _roi_levels(levels: list[str], min_level: int, max_level: int) -> list[str]:
    """Levels the RoI head pools from: P-levels within [min, max], or the only level."""
    if len(levels) == 1:
        return list(levels)
    chosen = [lv for lv in levels if min_level <= int(lv[1:]) <= max_level]
    if not chosen:
        raise ValueError(f"no pyramid level among {levels} lies in RoI levels [{min_level}, {max_level}]")
    return chosen


@keras.saving.register_keras_serializable(package="fpn_tf")
class FasterRCNN(keras.Model):
    """Faster R-CNN + FPN as a Keras functional model.

    Call inputs: {"images": [B, H, W, 3] float32 RGB in [0, 255] (resized image
    at the top-left, zero padded), "image_info": [B, 6] float32
    (orig_h, orig_w, valid_h, valid_w, scale_y, scale_x)}.

    Call outputs (inference): detection_boxes [B, D, 4] float32 (y1, x1, y2, x2)
    in original-image pixels, detection_scores [B, D] float32, detection_classes
    [B, D] int32 contiguous labels 1..num_classes-1 (0 = padding), num_detections
    [B] int32; D = roi_head.detections_per_image. With ``rpn_only`` the outputs are
    the proposals instead (see ``predict_proposals``).

    ``config.compute_dtype="mixed_bfloat16"`` runs the backbone, FPN, RPN head and
    box head in bfloat16 with float32 variables (the same checkpoints as float32);
    their outputs are cast to float32 before any box or score maths.
    """

    def __init__(self, config: ModelConfig | dict | None = None, **kwargs):
        if config is None:
            config = ModelConfig()
        elif isinstance(config, dict):
            config = from_dict(ModelConfig, config)
        cfg = config
        if cfg.roi_head.head not in BOX_HEADS:
            raise ValueError(
                f"unknown roi_head.head {cfg.roi_head.head!r}; valid heads: {', '.join(BOX_HEADS)}"
            )
        if cfg.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"compute_dtype={cfg.compute_dtype!r} is not supported; "
                f"use one of {', '.join(COMPUTE_DTYPES)}"
            )
        # The convs and fcs run under compute_dtype ("float32" keeps the global policy,
        # e.g. a trainer's); box, score and proposal maths is always float32, and the
        # RoI pooler reads the features in their own dtype (it computes in float32).
        compute_policy = None if cfg.compute_dtype == "float32" else cfg.compute_dtype
        specs = fpn_output_specs(cfg.backbone, cfg.fpn)
        levels = list(specs)
        level_sizes = rpn_lib.anchor_sizes_per_level(levels, cfg.anchors)
        num_anchors = set(
            anchor_ops.num_anchors_per_location(level_sizes, cfg.anchors.aspect_ratios).values()
        )
        if len(num_anchors) != 1:
            raise ValueError(
                f"every level needs the same number of anchors for a shared head, got {num_anchors}"
            )
        channels = {c for c, _ in specs.values()}
        if len(channels) != 1:
            raise ValueError(f"pyramid levels differ in channels {channels}; the shared RPN head needs one")
        (in_channels,) = channels
        roi_levels = _roi_levels(levels, cfg.roi_head.min_level, cfg.roi_head.max_level)
        r = cfg.roi_head

        normalizer = PixelNormalization(
            cfg.input.pixel_mean, cfg.input.pixel_std, dtype="float32", name="pixel_normalization"
        )
        with _dtype_policy(compute_policy):
            pyramid = build_fpn_backbone(cfg.backbone, cfg.fpn, name="pyramid")
            rpn_head = rpn_lib.RPNHead(
                num_anchors.pop(), cfg.rpn.conv_channels or in_channels, name="rpn_head"
            )
            box_head = _build_box_head(cfg, in_channels)
        proposal_generator = rpn_lib.ProposalGenerator(
            to_dict(cfg.anchors), to_dict(cfg.rpn), levels, dtype="float32", name="proposal_generator"
        )
        roi_pooler = roi_lib.RoIPooler(
            roi_levels,
            r.pooler_resolution,
            r.sampling_ratio,
            r.aligned,
            r.canonical_size,
            r.canonical_level,
            dtype="float32",
            autocast=False,
            name="roi_pooler",
        )
        detection_generator = roi_lib.DetectionGenerator(
            r.score_threshold,
            r.nms_iou,
            r.detections_per_image,
            r.detection_pre_nms_topk,
            r.box_coder_weights,
            dtype="float32",
            name="detection_generator",
        )

        images = keras.Input(shape=(None, None, 3), name="images", dtype="float32")
        image_info = keras.Input(shape=(6,), name="image_info", dtype="float32")
        features = pyramid(normalizer(images, image_info))
        rpn_outputs = rpn_head(features)
        proposals = proposal_generator(rpn_outputs, image_info)
        if cfg.rpn_only:
            outputs = {
                "proposal_boxes": roi_lib.ToOriginalPixels(dtype="float32", name="proposals_to_original")(
                    proposals["boxes"], image_info
                ),
                "proposal_scores": proposals["scores"],
            }
        else:
            pooled = roi_pooler(features, proposals["boxes"])
            class_logits, box_deltas = box_head(pooled)
            outputs = detection_generator(
                class_logits, box_deltas, proposals["boxes"], proposals["valid"], image_info
            )
        super().__init__(inputs={"images": images, "image_info": image_info}, outputs=outputs, **kwargs)

        self.config = cfg
        self.levels = levels
        self.normalizer = normalizer
        self.pyramid = pyramid
        self.rpn_head = rpn_head
        self.proposal_generator = proposal_generator
        self.roi_pooler = roi_pooler
        self.box_head = box_head
        self.detection_generator = detection_generator

    def get_config(self):
        return {"config": to_dict(self.config), "name": self.name}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    # ------------------------------------------------------------------ training
    def compute_losses(self, batch: dict, training: bool = True, step=0) -> dict[str, tf.Tensor]:
        """Losses of one batch (the dict of docs/design.md).

        ``step`` (scalar int) and each image's ``image_id`` seed the anchor and RoI
        samplers, so the samples of an image do not depend on how a batch is split
        across replicas. Returns scalar float32 losses keyed by LOSS_KEYS (the RoI
        losses are 0 with ``rpn_only``); weight decay is the trainer's business.
        """
        images = batch["images"]
        image_info = tf.cast(batch["image_info"], tf.float32)
        gt_boxes = tf.cast(batch["gt_boxes"], tf.float32)
        gt_classes = tf.cast(batch["gt_classes"], tf.int32)
        batch_size = tf.shape(images)[0]
        if "image_id" in batch:
            ids = tf.cast(tf.math.floormod(tf.cast(batch["image_id"], tf.int64), 2**31 - 1), tf.int32)
        else:
            ids = tf.range(batch_size, dtype=tf.int32)
        step = tf.cast(0 if step is None else step, tf.int32)

        def seeds(stage: int) -> tf.Tensor:
            return tf.stack([ids, tf.fill([batch_size], step * 2 + stage)], axis=1)

        features = self.pyramid(self.normalizer(images, image_info), training=training)
        rpn_outputs = self.rpn_head(features, training=training)
        anchors = self.proposal_generator.anchors(rpn_outputs["objectness"])
        result = rpn_lib.rpn_losses(
            rpn_outputs, anchors, self.levels, gt_boxes, gt_classes, seeds(0), self.config.rpn
        )
        if self.config.rpn_only:
            result["rcnn_class_loss"] = tf.constant(0.0)
            result["rcnn_box_loss"] = tf.constant(0.0)
        else:
            proposals = self.proposal_generator(rpn_outputs, image_info, training=True)
            samples = roi_lib.sample_rois(
                proposals["boxes"], proposals["valid"], gt_boxes, gt_classes, seeds(1), self.config.roi_head
            )
            pooled = self.roi_pooler(features, samples["rois"])
            class_logits, box_deltas = self.box_head(pooled, training=training)
            result.update(roi_lib.rcnn_losses(class_logits, box_deltas, samples, self.config.roi_head))
        result["total_loss"] = tf.add_n([result[k] for k in LOSS_KEYS[:-1]])
        return result

    # --------------------------------------------------------------- inference
    def predict_proposals(self, images, image_info) -> dict[str, tf.Tensor]:
        """Test-time RPN proposals (for AR, Table 1).

        Returns proposal_boxes [B, K, 4] in original pixels, proposal_scores [B, K],
        num_proposals [B] int32, K = rpn.post_nms_topk_test; padded rows are 0.
        """
        image_info = tf.cast(image_info, tf.float32)
        features = self.pyramid(self.normalizer(images, image_info), training=False)
        proposals = self.proposal_generator(self.rpn_head(features), image_info, training=False)
        boxes = roi_lib.to_original_pixels(proposals["boxes"], image_info)
        mask = tf.cast(proposals["valid"], tf.float32)
        return {
            "proposal_boxes": boxes * mask[..., None],
            "proposal_scores": proposals["scores"],
            "num_proposals": tf.reduce_sum(tf.cast(proposals["valid"], tf.int32), axis=1),
        }

    def trainable_weight_count(self) -> int:
        """Number of values in conv/dense kernels and biases (the usual 'parameters')."""
        return int(sum(int(tf.size(w)) for w in self.weights if "kernel" in w.path or "bias" in w.path))


def build_faster_rcnn(
    num_classes: int | None = None,
    backbone: str | None = None,
    config: ModelConfig | None = None,
    preset: str | None = None,
    **overrides,
) -> FasterRCNN:
    """Builds Faster R-CNN + FPN with the paper's defaults.

    Args:
      num_classes: classes including background (default 91, torchvision's COCO ids).
      backbone: "resnet50" (default), "resnet101", "resnet18", "resnet34".
      config: a full ModelConfig; ``num_classes``/``backbone`` override it.
      preset: instead of ``config``, a named configuration of
        ``fpn_tf.models.presets.PRESETS``, e.g. "torchvision_v1" (torchvision's
        fasterrcnn_resnet50_fpn graph, for its imported weights).
      **overrides: top-level ModelConfig fields, e.g. ``rpn_only=True``.

    Returns:
      A FasterRCNN functional model; see its docstring for inputs and outputs.
    """
    if preset is not None:
        if config is not None:
            raise ValueError("build_faster_rcnn: pass either config or preset, not both")
        config = preset_config(preset)
    cfg = dataclasses.replace(config) if config is not None else ModelConfig()
    if num_classes is not None:
        cfg.num_classes = int(num_classes)
    if backbone is not None:
        cfg.backbone = dataclasses.replace(cfg.backbone, name=backbone)
    if overrides:
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(
                f"unknown build_faster_rcnn argument(s) {unknown}; ModelConfig fields: {sorted(known)}"
            )
        cfg = dataclasses.replace(cfg, **overrides)
    return FasterRCNN(cfg)
