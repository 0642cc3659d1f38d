"""Fast R-CNN training targets and losses on the pyramid's RoIs (FPN §4.2).

Training samples 512 RoIs per image with 25 % foreground (IoU ≥ 0.5), GT boxes added
to the proposals; the loss is softmax cross-entropy plus the class-specific box loss.

Shapes: B images, N proposals per image, G ground-truth boxes per image, S sampled
RoIs per image, K classes including background. Boxes are (y1, x1, y2, x2) float32
input pixels.
"""

from __future__ import annotations

import tensorflow as tf

from fpn_tf.config import RoIHeadConfig
from fpn_tf.ops import box_coder, losses, matcher, sampler


def sample_rois(
    proposals: tf.Tensor,
    proposal_valid: tf.Tensor,
    gt_boxes: tf.Tensor,
    gt_classes: tf.Tensor,
    seeds: tf.Tensor,
    cfg: RoIHeadConfig,
) -> dict[str, tf.Tensor]:
    """Fixed-size RoI sampling with targets (§4.2, Fast R-CNN).

    Args:
      proposals: [B, N, 4] input pixels; proposal_valid: [B, N] bool.
      gt_boxes: [B, G, 4] input pixels; gt_classes: [B, G] int32 (-1 padded).
      seeds: [B, 2] int32 per-image sampler seeds.

    Returns:
      rois [B, S, 4], labels [B, S] int32 (0 background), box_targets [B, S, 4]
      encoded with the head's weights, weights [B, S] float32 (0 for padding
      slots), matched_gt [B, S] int32 (index of each RoI's GT box: mask targets
      use it; meaningless where labels == 0), S = cfg.batch_size_per_image.
    """
    gt_valid = gt_classes > 0
    if cfg.add_gt_as_proposals:
        candidates = tf.concat([proposals, gt_boxes], axis=1)
        candidate_valid = tf.concat([proposal_valid, gt_valid], axis=1)
    else:
        candidates, candidate_valid = proposals, proposal_valid
    matched, labels, iou = matcher.match_boxes(
        candidates,
        gt_boxes,
        gt_valid,
        positive_threshold=cfg.foreground_iou,
        negative_threshold=cfg.background_iou_high,
        allow_low_quality_matches=False,
    )
    background = tf.logical_and(iou < cfg.background_iou_high, iou >= cfg.background_iou_low)
    labels = tf.where(labels == 1, labels, tf.where(background, 0, -1))
    labels = tf.where(candidate_valid, labels, -1)
    idx, sampled = sampler.sample_balanced(labels, cfg.batch_size_per_image, cfg.positive_fraction, seeds)
    rois = tf.gather(candidates, idx, batch_dims=1)
    matched_gt = tf.gather(matched, idx, batch_dims=1)
    gt_label = tf.gather(gt_classes, matched_gt, batch_dims=1)
    roi_labels = tf.where(sampled == 1, gt_label, 0)
    targets = box_coder.encode_boxes(
        tf.gather(gt_boxes, matched_gt, batch_dims=1), rois, weights=cfg.box_coder_weights
    )
    return {
        "rois": tf.stop_gradient(rois),
        "labels": tf.stop_gradient(roi_labels),
        "box_targets": tf.stop_gradient(targets),
        "weights": tf.cast(sampled >= 0, tf.float32),
        "matched_gt": tf.stop_gradient(matched_gt),
    }


def rcnn_losses(
    class_logits: tf.Tensor, box_deltas: tf.Tensor, samples: dict[str, tf.Tensor], cfg: RoIHeadConfig
) -> dict[str, tf.Tensor]:
    """Softmax cross-entropy and class-specific box loss, averaged over sampled RoIs.

    Args:
      class_logits: [B, S, K]; box_deltas: [B, S, K, 4]; samples: sample_rois output.
    """
    weights = samples["weights"]
    labels = samples["labels"]
    num = tf.maximum(tf.reduce_sum(weights), 1.0)
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=class_logits)
    class_loss = tf.reduce_sum(ce * weights) / num
    deltas = tf.gather(box_deltas, labels, batch_dims=2)  # [B, S, 4], the GT class's deltas
    foreground = tf.cast(labels > 0, tf.float32) * weights
    box = losses.box_regression_loss(deltas, samples["box_targets"], cfg.box_loss, cfg.smooth_l1_beta)
    box_loss = tf.reduce_sum(box * foreground) / num
    return {"rcnn_class_loss": class_loss * cfg.loss_weight, "rcnn_box_loss": box_loss * cfg.loss_weight}
