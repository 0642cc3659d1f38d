"""Faster R-CNN with a Feature Pyramid Network (FPN §4–§5).

``build_faster_rcnn()`` returns a Keras functional model (a ``Detector``)::

    images [B, H, W, 3] float32 RGB 0..255 ─┐
    image_info [B, 6] ──────────────────────┴─> PixelNormalization -> ResNet + FPN
        -> RPNHead (every level) -> ProposalGenerator -> RoIPooler (P2..P5, eq. 1)
        -> box head (2fc) -> DetectionGenerator -> detections (original pixels)

Shapes: B images, H/W padded input size, N proposals per image, S sampled RoIs per
image, K classes including background, D detections per image.
"""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from fpn_tf.config import ModelConfig, to_dict
from fpn_tf.detector_types import BOX_HEADS
from fpn_tf.models import fast_rcnn
from fpn_tf.models import rpn as rpn_lib
from fpn_tf.models.box_heads import build_box_head
from fpn_tf.models.detection_generator import DetectionGenerator, ToOriginalPixels
from fpn_tf.models.detector import (
    Detector,
    compute_policy,
    dtype_policy,
    image_seeds,
    pyramid_channels,
    with_generator_settings,
)
from fpn_tf.models.presets import resolve_model_config
from fpn_tf.models.roi_pooler import roi_pooler_from_config
from fpn_tf.ops import anchors as anchor_ops
from fpn_tf.ops.box_ops import to_original_pixels

LOSS_KEYS = ("rpn_objectness_loss", "rpn_box_loss", "rcnn_class_loss", "rcnn_box_loss", "total_loss")


def rpn_anchors_per_location(cfg: ModelConfig, levels: list[str]) -> int:
    """A (anchors per location), the same on every level for the shared RPN head."""
    level_sizes = rpn_lib.anchor_sizes_per_level(levels, cfg.anchors)
    counts = set(anchor_ops.num_anchors_per_location(level_sizes, cfg.anchors.aspect_ratios).values())
    if len(counts) != 1:
        raise ValueError(f"every level needs the same number of anchors for a shared head, got {counts}")
    return counts.pop()


@keras.saving.register_keras_serializable(package="fpn_tf")
class FasterRCNN(Detector):
    """Faster R-CNN + FPN.

    Call inputs: {"images": [B, H, W, 3] float32 RGB in [0, 255] (resized image at
    the top-left, zero padded), "image_info": [B, 6] float32}.

    Call outputs: detection_boxes [B, D, 4] float32 (y1, x1, y2, x2) in
    original-image pixels, detection_scores [B, D], detection_classes [B, D] int32
    contiguous labels 1..K-1 (0 = padding), num_detections [B] int32.

    ``config.compute_dtype="mixed_bfloat16"`` runs the backbone, FPN, RPN head and
    box head in bfloat16 with float32 variables (the same checkpoints as float32);
    their outputs are cast to float32 before any box or score maths.
    """

    loss_keys = LOSS_KEYS

    def build_layers(self, cfg: ModelConfig) -> None:
        in_channels = self.build_first_stage(cfg)
        self.build_second_stage(cfg, in_channels)

    def build_first_stage(self, cfg: ModelConfig) -> int:
        """Normaliser, pyramid, RPN head and proposal generator; returns the pyramid's channels."""
        specs = self.build_pyramid(cfg)
        self.levels = list(specs)
        in_channels = pyramid_channels(specs)
        num_anchors = rpn_anchors_per_location(cfg, self.levels)
        with dtype_policy(compute_policy(cfg)):
            self.rpn_head = rpn_lib.RPNHead(
                num_anchors, cfg.rpn.conv_channels or in_channels, name="rpn_head"
            )
        self.proposal_generator = rpn_lib.ProposalGenerator(
            to_dict(cfg.anchors), to_dict(cfg.rpn), self.levels, dtype="float32", name="proposal_generator"
        )
        self.proposals_to_original = ToOriginalPixels(dtype="float32", name="proposals_to_original")
        return in_channels

    def build_second_stage(self, cfg: ModelConfig, in_channels: int) -> None:
        """RoI pooler, box head and detection generator (§4.2)."""
        r = cfg.roi_head
        if r.head not in BOX_HEADS:
            raise ValueError(f"unknown roi_head.head {r.head!r}; valid heads: {', '.join(BOX_HEADS)}")
        # The convs and fcs run under compute_dtype; the RoI pooler reads the features
        # in their own dtype (it computes in float32).
        with dtype_policy(compute_policy(cfg)):
            self.box_head = build_box_head(cfg, in_channels)
        self.roi_pooler = roi_pooler_from_config(
            cfg, self.levels, r.pooler_resolution, r.sampling_ratio, name="roi_pooler"
        )
        self.detection_generator = DetectionGenerator(
            r.score_threshold,
            r.nms_iou,
            r.detections_per_image,
            r.detection_pre_nms_topk,
            r.box_coder_weights,
            dtype="float32",
            name="detection_generator",
        )

    def propose(self, images, image_info, training=False, with_anchors=False) -> dict:
        """normalise -> pyramid -> RPN head -> proposals (the first stage).

        Returns {"features", "rpn_outputs", "proposals"} and, ``with_anchors``,
        "anchors" (built once and shared by the proposals and the RPN losses).
        """
        features = self.pyramid_features(images, image_info, training=training)
        rpn_outputs = self.rpn_head(features, training=training)
        raw = {"features": features, "rpn_outputs": rpn_outputs}
        if with_anchors:
            raw["anchors"] = self.proposal_generator.anchors(rpn_outputs["objectness"])
        raw["proposals"] = self.proposal_generator(
            rpn_outputs, image_info, training=training, anchors=raw.get("anchors")
        )
        return raw

    def forward(self, images, image_info, training=False, targets=None, step=None) -> dict:
        """First stage, then (with targets: sampled RoIs ->) RoI pooling -> box head.

        Returns ``propose``'s dict plus "samples" (with targets), "class_logits"
        [B, N or S, K] and "box_deltas" [B, N or S, K, 4] (S sampled RoIs per image).
        """
        raw = self.propose(images, image_info, training=targets is not None, with_anchors=targets is not None)
        rois = raw["proposals"]["boxes"]
        if targets is not None:
            raw["samples"] = fast_rcnn.sample_rois(
                rois,
                raw["proposals"]["valid"],
                tf.cast(targets["gt_boxes"], tf.float32),
                tf.cast(targets["gt_classes"], tf.int32),
                image_seeds(targets, step, stage=1),
                self.config.roi_head,
            )
            rois = raw["samples"]["rois"]
        pooled = self.roi_pooler(raw["features"], rois)
        raw["class_logits"], raw["box_deltas"] = self.box_head(pooled, training=training)
        return raw

    def rpn_loss_terms(self, raw, targets, step=None) -> dict[str, tf.Tensor]:
        """RPN objectness + box losses (§4.1)."""
        return rpn_lib.rpn_losses(
            raw["rpn_outputs"],
            raw["anchors"],
            self.levels,
            tf.cast(targets["gt_boxes"], tf.float32),
            tf.cast(targets["gt_classes"], tf.int32),
            image_seeds(targets, step, stage=0),
            self.config.rpn,
        )

    def loss_terms(self, raw, targets, step=None) -> dict[str, tf.Tensor]:
        """RPN objectness + box losses (§4.1) and Fast R-CNN class + box losses (§4.2)."""
        result = self.rpn_loss_terms(raw, targets, step)
        result.update(
            fast_rcnn.rcnn_losses(
                raw["class_logits"], raw["box_deltas"], raw["samples"], self.config.roi_head
            )
        )
        return result

    def postprocess(self, raw, image_info) -> dict:
        proposals = raw["proposals"]
        return self.detection_generator(
            raw["class_logits"], raw["box_deltas"], proposals["boxes"], proposals["valid"], image_info
        )

    def proposal_outputs(self, images, image_info) -> dict[str, tf.Tensor]:
        """Test-time RPN proposals (for AR, Table 1).

        Returns proposal_boxes [B, N, 4] in original pixels, proposal_scores [B, N],
        num_proposals [B] int32, N = rpn.post_nms_topk_test; padded rows are 0.
        """
        image_info = tf.cast(image_info, tf.float32)
        proposals = self.propose(images, image_info)["proposals"]
        mask = tf.cast(proposals["valid"], tf.float32)
        return {
            "proposal_boxes": to_original_pixels(proposals["boxes"], image_info) * mask[..., None],
            "proposal_scores": proposals["scores"],
            "num_proposals": tf.reduce_sum(tf.cast(proposals["valid"], tf.int32), axis=1),
        }

    def served_config(self) -> ModelConfig:
        """``config`` with the detection generator's settings as they are now (they may be changed)."""
        roi_head = with_generator_settings(self.config.roi_head, self.detection_generator)
        return dataclasses.replace(self.config, roi_head=roi_head)


def build_faster_rcnn(
    num_classes: int | None = None,
    backbone: str | dict | None = None,
    config: ModelConfig | None = None,
    preset: str | None = None,
    **overrides,
) -> FasterRCNN:
    """Builds Faster R-CNN + FPN with the paper's defaults.

    Args:
      num_classes: classes including background (default 91, torchvision's COCO ids).
      backbone: "resnet50" (default), "resnet101", "resnet18", "resnet34", or the
        whole section as a dict, e.g. {"name": "resnet18", "width_multiplier": 0.5}.
      config: a full ModelConfig; ``num_classes``/``backbone`` override it.
      preset: instead of ``config``, a named configuration of the type (its ``presets`` in
        ``fpn_tf.detector_types``), e.g. "torchvision_v1" (torchvision's
        fasterrcnn_resnet50_fpn graph, for its imported weights).
      **overrides: ModelConfig fields: a section as a dict of some of its keys (or its
        dataclass), e.g. ``fpn={"num_channels": 64}``; an unknown key is an error naming it.

    Returns:
      A FasterRCNN functional model; see its docstring for inputs and outputs.
    """
    cfg = resolve_model_config("faster_rcnn", num_classes, backbone, config, preset, overrides)
    return FasterRCNN(cfg)
