"""Mask R-CNN on the FPN (He et al. 2017): Faster R-CNN + a mask branch.

``build_mask_rcnn()`` returns a ``MaskRCNN`` (a ``FasterRCNN`` subclass, the same
forward / losses / postprocess plus the mask branch)::

    training:  sampled RoIs (positives first) -> first S+ slots -> mask RoIAlign
               14x14 on P2..P5 (eq. 1) -> MaskHead -> logits [B, S+, 28, 28, K]
               loss: sigmoid CE of the GT class's channel against the GT mask
               resampled into each positive RoI (fpn_tf.ops.mask_ops)
    inference: detections (box branch) -> the same boxes in input pixels ->
               mask RoIAlign -> MaskHead -> the detected class's channel,
               sigmoid -> detection_masks [B, D, 28, 28] (box-relative)

S+ = int(roi_head.positive_fraction * roi_head.batch_size_per_image): the
sampler places at most that many positives, first, so a fixed-size subset holds
them all (static shapes); negatives in it are weighted out of the loss.

Box-relative masks are pasted into image pixels by ``fpn_tf.ops.mask_ops.paste_masks``
(torchvision's ``paste_masks_in_image``) outside the model: in evaluation, in
``scripts/predict.py`` and, optionally, in the SavedModel.

Shapes: B images, S+ mask RoIs per image, D detections per image, M mask side
(28), K classes including background, G ground-truth boxes, Mg GT mask side.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from fpn_tf.config import ModelConfig
from fpn_tf.models.detector import compute_policy, dtype_policy
from fpn_tf.models.faster_rcnn import LOSS_KEYS as BOX_LOSS_KEYS
from fpn_tf.models.faster_rcnn import FasterRCNN
from fpn_tf.models.mask_head import ClassMasks, MaskHead, ToInputPixels
from fpn_tf.models.presets import resolve_model_config
from fpn_tf.models.roi_pooler import roi_pooler_from_config
from fpn_tf.ops import mask_ops

LOSS_KEYS = BOX_LOSS_KEYS[:-1] + ("mask_loss", "total_loss")


def mask_rois_per_image(cfg: ModelConfig) -> int:
    """S+: the sampled-RoI slots that can hold positives (all of them, positives first)."""
    r = cfg.roi_head
    return max(int(r.batch_size_per_image * r.positive_fraction), 1)


@keras.saving.register_keras_serializable(package="fpn_tf")
class MaskRCNN(FasterRCNN):
    """Mask R-CNN + FPN.

    Call inputs: as ``FasterRCNN``. Call outputs: ``FasterRCNN``'s detections plus
    ``detection_masks`` float32 [B, D, M, M]: each detection's mask probability
    on an M x M grid over its box (M = 2 * mask_head.pooler_resolution = 28;
    padding rows 0).

    Training batches need ``gt_masks`` [B, G, Mg, Mg] (``input.mask_size`` > 0:
    each GT mask cropped to its box, ``fpn_tf.data.masks``).
    """

    loss_keys = LOSS_KEYS

    def build_layers(self, cfg: ModelConfig) -> None:
        if cfg.roi_head.head != "2fc":
            raise ValueError(f"mask_rcnn supports roi_head.head '2fc' only, got {cfg.roi_head.head!r}")
        super().build_layers(cfg)
        m = cfg.mask_head
        with dtype_policy(compute_policy(cfg)):
            self.mask_head = MaskHead(cfg.num_classes, m.num_convs, m.conv_channels, name="mask_head")
        self.mask_pooler = roi_pooler_from_config(
            cfg, self.levels, m.pooler_resolution, m.sampling_ratio, name="mask_pooler"
        )
        self.detections_to_input = ToInputPixels(dtype="float32", name="detections_to_input")
        self.class_masks = ClassMasks(dtype="float32", name="class_masks")

    def forward(self, images, image_info, training=False, targets=None, step=None) -> dict:
        """``FasterRCNN.forward``; with targets also "mask_logits" [B, S+, M, M, K] (first S+ samples)."""
        raw = super().forward(images, image_info, training=training, targets=targets, step=step)
        if targets is not None:
            rois = raw["samples"]["rois"][:, : mask_rois_per_image(self.config)]
            pooled = self.mask_pooler(raw["features"], rois)
            raw["mask_logits"] = self.mask_head(pooled, training=training)
        return raw

    def loss_terms(self, raw, targets, step=None) -> dict[str, tf.Tensor]:
        """Faster R-CNN's losses plus the mask loss on the positive RoIs."""
        if "gt_masks" not in targets:
            raise ValueError(
                "model.type mask_rcnn trains on instance masks but the batch has no 'gt_masks': "
                "set model.input.mask_size (e.g. 56) so the input pipeline provides them"
            )
        result = super().loss_terms(raw, targets, step)
        logits = raw["mask_logits"]
        count = logits.shape[1]
        samples = raw["samples"]
        labels = samples["labels"][:, :count]
        weights = tf.cast(labels > 0, tf.float32) * samples["weights"][:, :count]
        mask_targets = mask_ops.mask_targets(
            targets["gt_masks"],
            tf.cast(targets["gt_boxes"], tf.float32),
            samples["matched_gt"][:, :count],
            samples["rois"][:, :count],
            size=logits.shape[2],
        )
        loss = mask_ops.mask_loss(logits, labels, tf.stop_gradient(mask_targets), weights)
        result["mask_loss"] = loss * self.config.mask_head.loss_weight
        return result

    def postprocess(self, raw, image_info) -> dict:
        outputs = dict(super().postprocess(raw, image_info))
        boxes = self.detections_to_input(outputs["detection_boxes"], image_info)
        logits = self.mask_head(self.mask_pooler(raw["features"], boxes))
        outputs["detection_masks"] = self.class_masks(logits, outputs["detection_classes"])
        return outputs


def build_mask_rcnn(
    num_classes: int | None = None,
    backbone: str | dict | None = None,
    config: ModelConfig | None = None,
    preset: str | None = None,
    **overrides,
) -> MaskRCNN:
    """Builds Mask R-CNN + FPN (``build_faster_rcnn``'s arguments).

    ``preset="torchvision_v1"`` is torchvision's ``maskrcnn_resnet50_fpn`` graph
    (for its COCO weights, ``fpn_tf.models.weights_torchvision_mask``).

    Returns:
      A MaskRCNN functional model; see its docstring for inputs and outputs.
    """
    cfg = resolve_model_config("mask_rcnn", num_classes, backbone, config, preset, overrides)
    return MaskRCNN(cfg)
