"""RetinaNet on the feature pyramid P3–P7 (Lin et al. 2017b, "Focal Loss for Dense Object Detection").

``build_retinanet()`` returns a Keras functional model (a ``Detector``)::

    images [B, H, W, 3] float32 RGB 0..255 ─┐
    image_info [B, 6] ──────────────────────┴─> PixelNormalization -> ResNet + FPN (P3..P7)
        -> RetinaNetHead (shared by the levels) -> DenseDetectionGenerator
        -> detections (original pixels; per-class NMS inside the graph and the SavedModel)

Training: every anchor is matched to the ground truth (IoU >= 0.5 positive, < 0.4
background, in between ignored; each GT's best anchors positive too), and the
sigmoid focal loss (α 0.25, γ 2) over all non-ignored anchors plus a box loss on
the positives are normalised by the number of positive anchors.

Label convention: labels are 1..K-1 with 0 the background, as everywhere in
fpn_tf. By default the class head has K-1 sigmoid channels per anchor, channel c
for label c + 1, and background is "all channels off" (the paper, Detectron2).
``retinanet.background_channel`` adds torchvision's unused channel 0 (trained
towards 0, never reported), the layout of torchvision's weights.

Where the implementations differ (options in RetinaNetConfig / FPNConfig): P6
from C5 (paper, Detectron2: ``fpn.extra_block: conv_c5``) or from P5
(torchvision v1: ``conv_p5``); box loss smooth-L1 β 0.1 (Detectron2) or L1
(torchvision); normalisation per batch (Detectron2, without its moving average)
or per image (torchvision); anchor sizes exact or truncated to integers.

Shapes: B images, H/W padded input size, h/w a level's map size, A anchors per
location, T anchors of all levels, G ground-truth boxes per image, K classes
including background, Kc class channels per anchor, D detections per image.
"""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from fpn_tf.config import ModelConfig, RetinaNetConfig, to_dict
from fpn_tf.detector_types import BOX_LOSSES, LOSS_NORMALIZATIONS
from fpn_tf.models.dense_detection_generator import DenseDetectionGenerator
from fpn_tf.models.detector import (
    Detector,
    compute_policy,
    dtype_policy,
    pyramid_channels,
    with_generator_settings,
)
from fpn_tf.models.presets import resolve_model_config
from fpn_tf.models.retinanet_head import RetinaNetHead
from fpn_tf.ops import box_coder, losses, matcher

LOSS_KEYS = ("class_loss", "box_loss", "total_loss")

# Matching all anchors against the padded GT fuses well under XLA (see fpn_tf.models.rpn).
_match_boxes_xla = tf.function(matcher.match_boxes, jit_compile=True, reduce_retracing=True)


def class_channels(cfg: ModelConfig) -> int:
    """Kc, sigmoid class channels per anchor: K-1, or K with ``background_channel``."""
    if cfg.num_classes < 2:
        raise ValueError(f"model.num_classes must count background and >= 1 class, got {cfg.num_classes}")
    return cfg.num_classes if cfg.retinanet.background_channel else cfg.num_classes - 1


def _check_config(cfg: ModelConfig) -> None:
    r = cfg.retinanet
    if r.box_loss not in BOX_LOSSES:
        raise ValueError(f"unknown retinanet.box_loss {r.box_loss!r}; valid: {', '.join(BOX_LOSSES)}")
    if r.loss_normalization not in LOSS_NORMALIZATIONS:
        raise ValueError(
            f"unknown retinanet.loss_normalization {r.loss_normalization!r}; "
            f"valid: {', '.join(LOSS_NORMALIZATIONS)}"
        )
    if r.topk_candidates < 1 or r.detections_per_image < 1:
        raise ValueError("retinanet.topk_candidates and retinanet.detections_per_image must be >= 1")


def flatten_levels(head_outputs: dict, levels: list[str], channels: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Concatenated levels: class logits [B, T, Kc] and box deltas [B, T, 4]."""
    logits, deltas = [], []
    for level in levels:
        c = head_outputs["class_logits"][level]
        batch = tf.shape(c)[0]
        logits.append(tf.reshape(c, [batch, -1, channels]))
        deltas.append(tf.reshape(head_outputs["box_deltas"][level], [batch, -1, 4]))
    return tf.concat(logits, axis=1), tf.concat(deltas, axis=1)


def retinanet_losses(
    logits: tf.Tensor,
    deltas: tf.Tensor,
    anchors: tf.Tensor,
    gt_boxes: tf.Tensor,
    gt_classes: tf.Tensor,
    cfg: RetinaNetConfig,
) -> dict[str, tf.Tensor]:
    """Focal loss on every non-ignored anchor, box loss on the positives (§4, §5).

    Args:
      logits: [B, T, Kc] class logits (Kc = K-1, or K with a background channel);
      deltas: [B, T, 4]; anchors: [T, 4] input pixels.
      gt_boxes: [B, G, 4] input pixels; gt_classes: [B, G] int32 labels, -1 padded.

    Returns:
      {"class_loss", "box_loss"} float32 scalars, each divided by the number of
      positive anchors (of the batch, or of each image then averaged: ``cfg.loss_normalization``).
    """
    matched, labels, _ = _match_boxes_xla(
        anchors,
        gt_boxes,
        gt_classes > 0,
        positive_threshold=cfg.positive_iou,
        negative_threshold=cfg.negative_iou,
        allow_low_quality_matches=cfg.allow_low_quality_matches,
    )
    positive = tf.cast(labels == matcher.POSITIVE, tf.float32)  # [B, T]
    counted = tf.cast(labels != matcher.IGNORED, tf.float32)
    anchor_class = tf.gather(gt_classes, matched, batch_dims=1)  # [B, T] label 1..K-1
    channels = logits.shape[-1]
    # Channel of label k: k with a background channel (torchvision), else k - 1.
    channel = anchor_class if cfg.background_channel else anchor_class - 1
    targets = tf.one_hot(channel, channels) * positive[..., None]
    focal = losses.sigmoid_focal_loss(logits, tf.stop_gradient(targets), cfg.focal_alpha, cfg.focal_gamma)
    class_per_anchor = tf.reduce_sum(focal, axis=-1) * counted

    gt = tf.gather(gt_boxes, matched, batch_dims=1)
    box_targets = box_coder.encode_boxes(gt, anchors[None], weights=cfg.box_coder_weights)
    box = losses.box_regression_loss(deltas, tf.stop_gradient(box_targets), cfg.box_loss, cfg.smooth_l1_beta)
    box_per_anchor = box * positive

    num_positive = tf.reduce_sum(positive, axis=1)  # [B]
    if cfg.loss_normalization == "image":
        norm = tf.maximum(num_positive, 1.0)
        class_loss = tf.reduce_mean(tf.reduce_sum(class_per_anchor, axis=1) / norm)
        box_loss = tf.reduce_mean(tf.reduce_sum(box_per_anchor, axis=1) / norm)
    else:
        norm = tf.maximum(tf.reduce_sum(num_positive), 1.0)
        class_loss = tf.reduce_sum(class_per_anchor) / norm
        box_loss = tf.reduce_sum(box_per_anchor) / norm
    return {"class_loss": class_loss * cfg.class_loss_weight, "box_loss": box_loss * cfg.box_loss_weight}


@keras.saving.register_keras_serializable(package="fpn_tf")
class RetinaNet(Detector):
    """RetinaNet + FPN (P3..P7 by default).

    Call inputs / outputs as ``FasterRCNN``: {"images": [B, H, W, 3] float32 RGB
    0..255, "image_info": [B, 6]} -> detection_boxes [B, D, 4] (y1, x1, y2, x2)
    original-image pixels, detection_scores [B, D], detection_classes [B, D] int32
    labels 1..K-1 (0 = padding), num_detections [B] int32.

    ``config.compute_dtype="mixed_bfloat16"`` runs the backbone, FPN and head in
    bfloat16 (float32 variables); scores and boxes are computed in float32.
    """

    loss_keys = LOSS_KEYS

    def build_layers(self, cfg: ModelConfig) -> None:
        _check_config(cfg)
        specs = self.build_pyramid(cfg)
        self.levels = list(specs)
        in_channels = pyramid_channels(specs)
        r = cfg.retinanet
        self.detection_generator = DenseDetectionGenerator(
            to_dict(cfg.anchors), to_dict(r), self.levels, dtype="float32", name="detection_generator"
        )
        self.num_class_channels = class_channels(cfg)
        with dtype_policy(compute_policy(cfg)):
            self.head = RetinaNetHead(
                self.detection_generator.num_anchors,
                self.num_class_channels,
                conv_channels=r.conv_channels or in_channels,
                num_convs=r.num_convs,
                norm=r.norm,
                prior_probability=r.prior_probability,
                name="head",
            )

    def forward(self, images, image_info, training=False, targets=None, step=None) -> dict:
        """normalise -> pyramid -> head; returns {"features", "head_outputs"}."""
        features = self.pyramid_features(images, image_info, training=training)
        head_outputs = self.head(features, training=training)
        return {"features": features, "head_outputs": head_outputs}

    def loss_terms(self, raw, targets, step=None) -> dict[str, tf.Tensor]:
        head_outputs = raw["head_outputs"]
        anchors = self.detection_generator.anchors(head_outputs["class_logits"])
        logits, deltas = flatten_levels(head_outputs, self.levels, self.num_class_channels)
        return retinanet_losses(
            logits,
            deltas,
            tf.concat([anchors[level] for level in self.levels], axis=0),
            tf.cast(targets["gt_boxes"], tf.float32),
            tf.cast(targets["gt_classes"], tf.int32),
            self.config.retinanet,
        )

    def postprocess(self, raw, image_info) -> dict:
        return self.detection_generator(raw["head_outputs"], image_info)

    def served_config(self) -> ModelConfig:
        """``config`` with the inference settings the detection generator runs with now."""
        retinanet = with_generator_settings(self.config.retinanet, self.detection_generator)
        return dataclasses.replace(self.config, retinanet=retinanet)


def build_retinanet(
    num_classes: int | None = None,
    backbone: str | dict | None = None,
    config: ModelConfig | None = None,
    preset: str | None = None,
    **overrides,
) -> RetinaNet:
    """Builds RetinaNet + FPN with the paper's defaults (P3..P7, P6 from C5, 9 anchors).

    Args:
      num_classes: classes including background (default 91, torchvision's COCO ids).
      backbone: "resnet50" (default), "resnet101", "resnet18", "resnet34", or the
        whole section as a dict, e.g. {"name": "resnet18", "width_multiplier": 0.5}.
      config: a full ModelConfig of type "retinanet" (build it with
        ``from_dict(ModelConfig, {"type": "retinanet", ...})`` or ``load_config``,
        which apply RetinaNet's defaults); ``num_classes``/``backbone`` override it.
      preset: instead of ``config``, a preset of ``PRESETS["retinanet"]``:
        "torchvision_v1" is torchvision's ``retinanet_resnet50_fpn`` graph, for its
        weights (``fpn_tf.models.weights_torchvision_retinanet``).
      **overrides: top-level ModelConfig fields.

    Returns:
      A RetinaNet functional model; see its docstring for inputs and outputs.
    """
    cfg = resolve_model_config("retinanet", num_classes, backbone, config, preset, overrides)
    return RetinaNet(cfg)
