"""Region proposal network on the feature pyramid (FPN §4.1).

One head (3×3 conv + ReLU, sibling 1×1 objectness and 1×1 box convs) is shared by
every level; each level carries anchors of one size (32²…512² on P2–P6) at three
aspect ratios. Proposals: per-level top-k by objectness, decode, clip to the
valid image, drop tiny boxes, NMS 0.7 within each level, then the best per image
(2000 in training, 1000 at test, §5.2). Per-image (not per-batch) post-NMS top-k:
the per-batch variant cost Detectron v1 about 1 AP.

Shapes: B images, h/w a level's map size, A anchors per location, T anchors of all
levels, N proposals per image, G ground-truth boxes per image, C channels.
Boxes are (y1, x1, y2, x2) float32 in input pixels (the resized, padded image).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from fpn_tf.config import AnchorConfig, RPNConfig, from_dict
from fpn_tf.ops import anchors as anchor_ops
from fpn_tf.ops import box_coder, box_ops, losses, matcher, nms, sampler
from fpn_tf.ops.xla import jit_unless_inside_xla


def level_stride(level: str) -> int:
    """Stride of a level named by its number: "P3" and "C3" have stride 8."""
    return 2 ** int(level[1:])


def anchor_sizes_per_level(levels: list[str], anchors: AnchorConfig) -> dict[str, tuple[float, ...]]:
    """One size per level on a pyramid; every size on the only level of a single-scale map.

    The single-scale baselines of Table 1(a, b, f) put all five anchor scales on one map.
    """
    if len(levels) == 1:
        return {levels[0]: tuple(anchors.sizes)}
    if len(levels) != len(anchors.sizes):
        raise ValueError(
            f"anchors.sizes has {len(anchors.sizes)} sizes but the pyramid has {len(levels)} levels "
            f"{levels}: give one size per level"
        )
    return {level: (size,) for level, size in zip(levels, anchors.sizes)}


@keras.saving.register_keras_serializable(package="fpn_tf")
class RPNHead(keras.layers.Layer):
    """Shared RPN head applied to every pyramid level (§4.1).

    Call args:
      features: {level: [B, h, w, C]} pyramid maps.

    Returns:
      {"objectness": {level: [B, h, w, A] float32 logits},
       "deltas": {level: [B, h, w, A * 4] float32}}, deltas per anchor in
      (dy, dx, dh, dw) order.
    """

    def __init__(self, num_anchors: int, conv_channels: int, **kwargs):
        super().__init__(**kwargs)
        self.num_anchors = int(num_anchors)
        self.conv_channels = int(conv_channels)
        init = keras.initializers.RandomNormal(stddev=0.01)
        self.conv = keras.layers.Conv2D(
            self.conv_channels, 3, padding="same", activation="relu", kernel_initializer=init, name="conv"
        )
        self.objectness = keras.layers.Conv2D(self.num_anchors, 1, kernel_initializer=init, name="objectness")
        self.box_deltas = keras.layers.Conv2D(4 * self.num_anchors, 1, kernel_initializer=init, name="deltas")

    def build(self, features_shape):
        shape = next(iter(features_shape.values()))
        self.conv.build(shape)
        hidden = tuple(shape[:-1]) + (self.conv_channels,)
        self.objectness.build(hidden)
        self.box_deltas.build(hidden)

    def call(self, features):
        objectness, deltas = {}, {}
        for level, x in features.items():
            h = self.conv(x)
            objectness[level] = tf.cast(self.objectness(h), tf.float32)
            deltas[level] = tf.cast(self.box_deltas(h), tf.float32)
        return {"objectness": objectness, "deltas": deltas}

    def compute_output_spec(self, features):
        out = {"objectness": {}, "deltas": {}}
        for level, x in features.items():
            spatial = tuple(x.shape[:-1])
            out["objectness"][level] = keras.KerasTensor(spatial + (self.num_anchors,), dtype="float32")
            out["deltas"][level] = keras.KerasTensor(spatial + (4 * self.num_anchors,), dtype="float32")
        return out

    def get_config(self):
        return {**super().get_config(), "num_anchors": self.num_anchors, "conv_channels": self.conv_channels}


def flatten_level_outputs(rpn_outputs: dict, levels: list[str]) -> tuple[tf.Tensor, tf.Tensor]:
    """Concatenates the levels: objectness [B, N] and deltas [B, N, 4], N = Σ h·w·A."""
    logits, deltas = [], []
    for level in levels:
        o = rpn_outputs["objectness"][level]
        d = rpn_outputs["deltas"][level]
        batch = tf.shape(o)[0]
        logits.append(tf.reshape(o, [batch, -1]))
        deltas.append(tf.reshape(d, [batch, -1, 4]))
    return tf.concat(logits, axis=1), tf.concat(deltas, axis=1)


@keras.saving.register_keras_serializable(package="fpn_tf")
class ProposalGenerator(keras.layers.Layer):
    """Anchors and proposals from the RPN outputs (no weights).

    Call args:
      rpn_outputs: RPNHead's output dict.
      image_info: [B, 6] (orig_h, orig_w, valid_h, valid_w, scale_y, scale_x).
      training: selects the train / test top-k.
      anchors: {level: [h·w·A, 4]} of ``anchors()``, when the caller has them already.

    Returns:
      {"boxes": [B, N, 4] input pixels (zeros in padded rows),
       "scores": [B, N] objectness probabilities (0 in padded rows),
       "valid": [B, N] bool}; N = post-NMS top-k, rows sorted by score.
    """

    def __init__(self, anchor_config: dict, rpn_config: dict, levels: list[str], **kwargs):
        super().__init__(**kwargs)
        self.anchor_config = dict(anchor_config)
        self.rpn_config = dict(rpn_config)
        self.levels = list(levels)
        self._anchors = from_dict(AnchorConfig, self.anchor_config)
        self._rpn = from_dict(RPNConfig, self.rpn_config)
        self.level_sizes = anchor_sizes_per_level(self.levels, self._anchors)

    def anchors(self, objectness: dict) -> dict[str, tf.Tensor]:
        """{level: [h·w·A, 4]} anchors for feature maps shaped like ``objectness``."""
        sizes = {}
        for level in self.levels:
            static = objectness[level].shape
            dynamic = tf.shape(objectness[level])
            h = static[1] if static[1] is not None else dynamic[1]
            w = static[2] if static[2] is not None else dynamic[2]
            sizes[level] = (h, w)
        strides = {level: level_stride(level) for level in self.levels}
        if self._anchors.strides_from_input_size:
            # torchvision's AnchorGenerator: stride = input size // feature size per axis,
            # the input size being the finest map's size times its stride (e.g. 800 // 13
            # = 61, not 64, on P6 of an 800-row input padded to a multiple of 32).
            h0, w0 = sizes[self.levels[0]]
            s0 = strides[self.levels[0]]
            strides = {level: ((h0 * s0) // h, (w0 * s0) // w) for level, (h, w) in sizes.items()}
        return anchor_ops.generate_anchors(
            sizes,
            self.level_sizes,
            strides,
            aspect_ratios=self._anchors.aspect_ratios,
            offset=self._anchors.offset,
            round_base=self._anchors.round_base,
        )

    def call(self, rpn_outputs, image_info, training=False, anchors=None):
        cfg = self._rpn
        pre_k = cfg.pre_nms_topk_train if training else cfg.pre_nms_topk_test
        post_k = cfg.post_nms_topk_train if training else cfg.post_nms_topk_test
        if anchors is None:
            anchors = self.anchors(rpn_outputs["objectness"])
        valid_hw = image_info[:, 2:4]
        boxes_l, scores_l, groups_l = [], [], []
        for i, level in enumerate(self.levels):
            logits = rpn_outputs["objectness"][level]
            batch = tf.shape(logits)[0]
            logits = tf.reshape(logits, [batch, -1])
            deltas = tf.reshape(rpn_outputs["deltas"][level], [batch, -1, 4])
            n = logits.shape[1]
            k = min(pre_k, n) if n is not None else tf.minimum(pre_k, tf.shape(logits)[1])
            top_logits, top_idx = tf.math.top_k(logits, k=k, sorted=True)
            top_deltas = tf.gather(deltas, top_idx, batch_dims=1)
            top_anchors = tf.gather(anchors[level], top_idx)
            boxes = box_coder.decode_boxes(top_deltas, top_anchors, weights=cfg.box_coder_weights)
            boxes = box_ops.clip_boxes(boxes, valid_hw[:, None, :])
            scores = tf.sigmoid(top_logits)
            heights = boxes[..., 2] - boxes[..., 0]
            widths = boxes[..., 3] - boxes[..., 1]
            big_enough = tf.logical_and(heights >= cfg.min_box_size, widths >= cfg.min_box_size)
            # Removed boxes get score -1 so NMS (score threshold 0) never keeps them.
            scores = tf.where(big_enough, scores, -tf.ones_like(scores))
            boxes_l.append(boxes)
            scores_l.append(scores)
            groups_l.append(tf.fill(tf.shape(scores), i))
        boxes = tf.concat(boxes_l, axis=1)
        scores = tf.concat(scores_l, axis=1)
        groups = tf.concat(groups_l, axis=1)
        keep, valid = nms.batched_nms_padded(
            boxes, scores, groups, max_output_size=post_k, iou_threshold=cfg.nms_iou, score_threshold=0.0
        )
        out_boxes = tf.gather(boxes, keep, batch_dims=1)
        out_scores = tf.gather(scores, keep, batch_dims=1)
        valid = tf.logical_and(valid, out_scores >= 0.0)
        mask = tf.cast(valid, tf.float32)
        return {
            "boxes": tf.stop_gradient(out_boxes * mask[..., None]),
            "scores": tf.stop_gradient(out_scores * mask),
            "valid": valid,
        }

    def compute_output_spec(self, rpn_outputs, image_info, training=False, anchors=None):
        post_k = self._rpn.post_nms_topk_train if training else self._rpn.post_nms_topk_test
        batch = image_info.shape[0]
        return {
            "boxes": keras.KerasTensor((batch, post_k, 4), dtype="float32"),
            "scores": keras.KerasTensor((batch, post_k), dtype="float32"),
            "valid": keras.KerasTensor((batch, post_k), dtype="bool"),
        }

    def get_config(self):
        return {
            **super().get_config(),
            "anchor_config": self.anchor_config,
            "rpn_config": self.rpn_config,
            "levels": self.levels,
        }


# Matching all anchors (~280k at 800x1333) against the padded GT is element-wise IoU
# maths and reductions over chunks, which XLA fuses into one pass: ~3x faster on CPU
# than TF's separate ops, with identical results. Nothing differentiable flows through.
# Inlined when the caller is XLA-compiled itself (see fpn_tf/ops/xla.py).
_match_boxes_xla = jit_unless_inside_xla(matcher.match_boxes)


def rpn_losses(
    rpn_outputs: dict,
    anchors: dict[str, tf.Tensor],
    levels: list[str],
    gt_boxes: tf.Tensor,
    gt_classes: tf.Tensor,
    seeds: tf.Tensor,
    cfg: RPNConfig,
) -> dict[str, tf.Tensor]:
    """Objectness and box losses on 256 sampled anchors per image (§4.1).

    All anchors take part, including those crossing the image border (§5.1:
    "we include the anchor boxes that are outside the image for training").

    Args:
      rpn_outputs: RPNHead output; anchors: {level: [n_l, 4]}.
      gt_boxes: [B, G, 4] input pixels; gt_classes: [B, G] int32, -1 padded.
      seeds: [B, 2] int32 per-image seeds for the sampler.

    Returns:
      {"rpn_objectness_loss", "rpn_box_loss"} scalars, each averaged over the
      sampled anchors of the batch (Detectron2's and torchvision's normalisation).
    """
    logits, deltas = flatten_level_outputs(rpn_outputs, levels)
    all_anchors = tf.concat([anchors[level] for level in levels], axis=0)
    gt_valid = gt_classes > 0
    matched, labels, _ = _match_boxes_xla(
        all_anchors,
        gt_boxes,
        gt_valid,
        positive_threshold=cfg.positive_iou,
        negative_threshold=cfg.negative_iou,
        allow_low_quality_matches=cfg.allow_low_quality_matches,
    )
    idx, sampled = sampler.sample_balanced(labels, cfg.batch_size_per_image, cfg.positive_fraction, seeds)
    weights = tf.cast(sampled >= 0, tf.float32)
    positive = tf.cast(sampled == 1, tf.float32)
    num_sampled = tf.maximum(tf.reduce_sum(weights), 1.0)

    s_logits = tf.gather(logits, idx, batch_dims=1)
    bce = tf.nn.sigmoid_cross_entropy_with_logits(labels=positive, logits=s_logits)
    objectness_loss = tf.reduce_sum(bce * weights) / num_sampled

    s_deltas = tf.gather(deltas, idx, batch_dims=1)
    s_anchors = tf.gather(all_anchors, idx)
    s_gt = tf.gather(gt_boxes, tf.gather(matched, idx, batch_dims=1), batch_dims=1)
    targets = box_coder.encode_boxes(s_gt, s_anchors, weights=cfg.box_coder_weights)
    box = losses.box_regression_loss(s_deltas, tf.stop_gradient(targets), cfg.box_loss, cfg.smooth_l1_beta)
    box_loss = tf.reduce_sum(box * positive) / num_sampled
    return {
        "rpn_objectness_loss": objectness_loss * cfg.loss_weight,
        "rpn_box_loss": box_loss * cfg.loss_weight,
    }
