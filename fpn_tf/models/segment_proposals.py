"""FPN segmentation proposals (paper §6, Table 6, Appendix A).

``build_segment_proposer()`` returns a Keras functional model (a ``Detector``)::

    images [B, H, W, 3], image_info [B, 6] -> PixelNormalization -> ResNet + FPN (P2..P6, d = 128)
        -> SegmentProposalHead (5×5 and 7×7 "MLPs" on every level: score everywhere,
           M×M masks at the top N locations, no NMS) -> SegmentProposalOutputs

Outputs (original-image pixels): ``proposal_boxes`` [B, N, 4] the window each
mask covers, ``proposal_scores`` [B, N], ``proposal_masks`` [B, N, M, M]
probabilities over that window (paste with ``mask_ops.paste_mask_numpy``),
``num_proposals`` [B].

Training (``compute_losses``) labels every location (``fpn_tf.ops.segment_labels``),
samples ``batch_size_per_image`` (128) of them at 1 : 3 positives : negatives,
and computes the score loss (sigmoid cross-entropy, mean over the sampled) plus
``mask_loss_weight`` (10) × the mask loss (per-pixel sigmoid cross-entropy over
the sampled positives, targets = the GT mask resampled into the window).

``segment.image_pyramid`` makes the DeepMask-style baseline of Table 6: the
same head on one map (e.g. ``fpn.variant: c4``, ``segment.levels: [4]``), run
on every image scale at inference and merged to the top N; in training each
step's batch is resized by one of the scales in turn (scale jitter), and
objects farther than ``max_scale_distance`` octaves from the head's scale are
negatives.

Shapes: B images, H/W padded input size, G GT objects per image, Mg GT mask side,
T locations per image, N selected locations per image, M mask side.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from fpn_tf.config import ModelConfig
from fpn_tf.models.detector import Detector, compute_policy, dtype_policy, image_seeds, pyramid_channels
from fpn_tf.models.presets import resolve_model_config
from fpn_tf.models.segment_head import (
    MergeSegmentProposals,
    ResizeImages,
    SegmentProposalHead,
    SegmentProposalOutputs,
    level_number,
    resize_batch,
)
from fpn_tf.ops import mask_ops
from fpn_tf.ops import segment_labels as labels_lib
from fpn_tf.ops.sampler import sample_balanced

LOSS_KEYS = ("segment_score_loss", "segment_mask_loss", "total_loss")


@keras.saving.register_keras_serializable(package="fpn_tf")
class SegmentProposer(Detector):
    """FPN segment proposals; inputs as every Detector, outputs in the module docstring."""

    loss_keys = LOSS_KEYS

    def build_layers(self, cfg: ModelConfig) -> None:
        seg = cfg.segment
        specs = self.build_pyramid(cfg)
        names = list(specs)
        if seg.levels:
            missing = [k for k in seg.levels if not any(level_number(n) == k for n in names)]
            if missing:
                raise ValueError(f"model.segment.levels {list(seg.levels)} not all in the pyramid {names}")
            names = [n for n in names if level_number(n) in seg.levels]
        self.head_levels = names
        pyramid_channels({n: specs[n] for n in names})
        with dtype_policy(compute_policy(cfg)):
            self.head = SegmentProposalHead(
                names,
                seg.mlps,
                seg.hidden_dim,
                seg.mask_size,
                seg.scales,
                seg.padding,
                seg.proposals_per_image,
                name="segment_head",
            )
        self.outputs_layer = SegmentProposalOutputs(dtype="float32", name="segment_outputs")
        for i, factor in enumerate(seg.image_pyramid):
            setattr(self, f"resize{i}", ResizeImages(factor, cfg.input.size_divisibility, name=f"resize_{i}"))
        if seg.image_pyramid:
            self.merge = MergeSegmentProposals(seg.proposals_per_image, dtype="float32", name="merge_scales")

    def _features(self, images, image_info, training=False) -> dict:
        features = self.pyramid_features(images, image_info, training=training)
        return {n: features[n] for n in self.head_levels}

    def forward(self, images, image_info, training=False, targets=None, step=None) -> dict:
        """Inference: head outputs per image scale; training: sampled locations and their outputs."""
        seg = self.config.segment
        if targets is None:
            if not seg.image_pyramid:
                return {"scales": [(self.head(self._features(images, image_info), image_info), image_info)]}
            per_scale = []
            for i in range(len(seg.image_pyramid)):
                scaled, info = getattr(self, f"resize{i}")(images, image_info)
                per_scale.append((self.head(self._features(scaled, info), info), info))
            return {"scales": per_scale}
        return self._forward_train(images, image_info, targets, step, training)

    def _forward_train(self, images, image_info, targets, step, training) -> dict:
        seg = self.config.segment
        if "gt_masks" not in targets:
            raise ValueError("segment_proposals trains on masks: set model.input.mask_size > 0 (e.g. 28)")
        gt_boxes = tf.cast(targets["gt_boxes"], tf.float32)
        if seg.image_pyramid:  # scale jitter of the single-level baseline
            scales = tf.constant(seg.image_pyramid, tf.float32)
            step = tf.cast(0 if step is None else step, tf.int32)
            factor = tf.gather(scales, tf.math.floormod(step, len(seg.image_pyramid)))
            images, image_info = resize_batch(images, image_info, factor, self.config.input.size_divisibility)
            gt_boxes = gt_boxes * factor
        features = self._features(images, image_info, training=training)
        geometry = self.head.geometry(features)
        object_boxes = labels_lib.mask_extent_boxes(gt_boxes, targets["gt_masks"])
        valid = tf.cast(targets["gt_classes"], tf.int32) > 0
        labels, matched = labels_lib.segment_labels(
            object_boxes, valid, geometry, self.head.entries, image_info, seg.max_scale_distance
        )
        indices, sampled = sample_balanced(
            labels, seg.batch_size_per_image, seg.positive_fraction, image_seeds(targets, step)
        )
        head = self.head(features, image_info, indices=indices)
        return {
            "head": head,
            "sampled_labels": sampled,
            "sampled_gt": tf.gather(matched, indices, batch_dims=1),
            "gt_boxes": gt_boxes,
        }

    def loss_terms(self, raw, targets, step=None) -> dict[str, tf.Tensor]:
        """Score loss over the sampled locations + 10 × mask loss over the sampled positives."""
        head, sampled = raw["head"], raw["sampled_labels"]
        logits = tf.gather(head["score_logits"], head["indices"], batch_dims=1)
        seg = self.config.segment
        targets_s = mask_ops.mask_targets(
            targets["gt_masks"], raw["gt_boxes"], raw["sampled_gt"], head["windows"], seg.mask_size
        )
        return segment_losses(logits, head["mask_logits"], sampled, targets_s, seg.mask_loss_weight)

    def postprocess(self, raw, image_info) -> dict:
        outputs = [self.outputs_layer(head, info) for head, info in raw["scales"]]
        return outputs[0] if len(outputs) == 1 else self.merge(outputs)


def segment_losses(score_logits, mask_logits, sampled_labels, mask_targets, mask_weight: float) -> dict:
    """The two losses of Appendix A on N sampled locations per image.

    Args:
      score_logits: [B, N]; mask_logits: [B, N, M, M]; sampled_labels: [B, N]
        (1 positive, 0 negative, -1 unfilled slot); mask_targets: [B, N, M, M] in [0, 1].
      mask_weight: the mask loss's weight (10: "10× higher weight than the score loss").

    Returns:
      ``segment_score_loss``: sigmoid cross-entropy, mean over sampled locations;
      ``segment_mask_loss``: ``mask_weight`` × the per-pixel sigmoid cross-entropy
      averaged over the pixels of the positives (negatives do not train masks).
    """
    sampled = tf.cast(sampled_labels >= 0, tf.float32)
    positive = tf.cast(sampled_labels > 0, tf.float32)
    bce = tf.nn.sigmoid_cross_entropy_with_logits(labels=positive, logits=tf.cast(score_logits, tf.float32))
    score = tf.reduce_sum(bce * sampled) / tf.maximum(tf.reduce_sum(sampled), 1.0)
    classes = tf.zeros_like(sampled_labels)
    mask = mask_ops.mask_loss(tf.cast(mask_logits, tf.float32)[..., None], classes, mask_targets, positive)
    return {"segment_score_loss": score, "segment_mask_loss": mask_weight * mask}


def paper_config() -> ModelConfig:
    """Appendix A's model: ResNet-50, P2..P6, d = 128 (§5.1), dual MLP, 14×14 masks: the type's defaults."""
    return ModelConfig(type="segment_proposals")


def build_segment_proposer(
    backbone: str | dict | None = None, config: ModelConfig | None = None, **overrides
) -> SegmentProposer:
    """Builds the FPN segment proposer with the paper's defaults (P2..P6, d = 128, dual MLP, 14×14).

    Args:
      backbone: "resnet50" (default), "resnet101", "resnet18", "resnet34", or the
        whole section as a dict, e.g. {"name": "resnet18", "width_multiplier": 0.5}.
      config: a full ModelConfig (``type: segment_proposals``); default: the paper's.
      **overrides: top-level ModelConfig fields, e.g. ``segment=SegmentProposalConfig(mlps=(5,))``.
    """
    cfg = resolve_model_config("segment_proposals", None, backbone, config, None, overrides)
    return SegmentProposer(cfg)
