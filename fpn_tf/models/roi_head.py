"""Fast R-CNN head on the feature pyramid (FPN §4.2).

RoIs are pooled (RoIAlign 7×7) from the level that eq. (1) assigns them,
k = ⌊4 + log2(√(wh)/224)⌋ clamped to [2, 5], then pass two fc-1024 + ReLU layers
and sibling class-score and class-specific box layers. Training samples 512 RoIs
per image with 25 % foreground (IoU ≥ 0.5), GT boxes added to the proposals.

Boxes are (y1, x1, y2, x2) float32 in input pixels unless a docstring says
"original pixels" (the user's image before resizing).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from fpn_tf.config import RoIHeadConfig
from fpn_tf.ops import box_coder, box_ops, losses, matcher, nms, roi_align, sampler
from fpn_tf.ops.xla import jit_unless_inside_xla

# torchvision drops detections narrower or shorter than this (pixels) before NMS.
_MIN_DETECTION_SIZE = 1e-2


def _pool(features, boxes, levels, output_size, sampling_ratio, aligned, canonical_size, canonical_level):
    """RoIAlign of ``boxes`` [B, N, 4] from ``features`` {level: [B, h, w, C]}: [B, N, S, S, C]."""
    if len(levels) == 1:
        level = levels[0]
        return roi_align.roi_align(
            features[level],
            boxes,
            spatial_scale=1.0 / 2 ** int(level[1:]),
            output_size=output_size,
            sampling_ratio=sampling_ratio,
            aligned=aligned,
        )
    numbers = [int(level[1:]) for level in levels]
    return roi_align.multilevel_roi_align(
        {level: features[level] for level in levels},
        boxes,
        output_size=output_size,
        sampling_ratio=sampling_ratio,
        aligned=aligned,
        min_level=min(numbers),
        max_level=max(numbers),
        canonical_size=canonical_size,
        canonical_level=canonical_level,
    )


# The gathers and bilinear weights of RoIAlign fuse under XLA into one pass over the
# RoIs: 4x faster on CPU than TF's separate gather ops, which is why the pooler
# compiles it even inside a function that is not compiled as a whole (inlined inside
# one that is: a nested compiled call recompiled the training step every step).
_pool_xla = jit_unless_inside_xla(_pool)


@keras.saving.register_keras_serializable(package="fpn_tf")
class RoIPooler(keras.layers.Layer):
    """RoIAlign from the pyramid: multi-level by eq. (1), or from a single map.

    Call args:
      features: {level: [B, h, w, C]}; only levels min_level..max_level are used,
        or the only level when the pyramid has one (single-scale baselines, P2-only).
      boxes: [B, N, 4] input pixels.

    Returns:
      [B, N, S, S, C] pooled features, S = output_size.

    ``jit_compile=True`` (the default) runs the pooling as an XLA-compiled function
    (the same maths; see ``_pool_xla``).
    """

    def __init__(
        self,
        levels: list[str],
        output_size: int = 7,
        sampling_ratio: int = 2,
        aligned: bool = True,
        canonical_size: float = 224.0,
        canonical_level: int = 4,
        jit_compile: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.levels = list(levels)
        self.output_size = int(output_size)
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)
        self.canonical_size = float(canonical_size)
        self.canonical_level = int(canonical_level)
        self.jit_compile = bool(jit_compile)
        if not self.levels:
            raise ValueError("RoIPooler needs at least one feature level")

    def call(self, features, boxes):
        pool = _pool_xla if self.jit_compile else _pool
        return pool(
            {level: features[level] for level in self.levels},
            tf.convert_to_tensor(boxes, tf.float32),
            tuple(self.levels),
            self.output_size,
            self.sampling_ratio,
            self.aligned,
            self.canonical_size,
            self.canonical_level,
        )

    def compute_output_spec(self, features, boxes):
        channels = features[self.levels[0]].shape[-1]
        s = self.output_size
        return keras.KerasTensor(
            tuple(boxes.shape[:2]) + (s, s, channels), dtype=features[self.levels[0]].dtype
        )

    def get_config(self):
        return {
            **super().get_config(),
            "levels": self.levels,
            "output_size": self.output_size,
            "sampling_ratio": self.sampling_ratio,
            "aligned": self.aligned,
            "canonical_size": self.canonical_size,
            "canonical_level": self.canonical_level,
            "jit_compile": self.jit_compile,
        }


def class_and_box_outputs(class_layer, box_layer, features, batch, num_rois, num_classes):
    """Sibling class-score and class-specific box layers on per-RoI features.

    Args:
      features: [batch * num_rois, D] RoI features.

    Returns:
      (class_logits [batch, num_rois, K] float32, box_deltas [batch, num_rois, K, 4] float32).
    """
    logits = tf.cast(class_layer(features), tf.float32)
    deltas = tf.cast(box_layer(features), tf.float32)
    return (
        tf.reshape(logits, [batch, num_rois, num_classes]),
        tf.reshape(deltas, [batch, num_rois, num_classes, 4]),
    )


def class_and_box_output_spec(pooled, num_classes):
    """KerasTensor specs of ``class_and_box_outputs`` for pooled RoIs [B, N, ...]."""
    b, n = pooled.shape[:2]
    return (
        keras.KerasTensor((b, n, num_classes), dtype="float32"),
        keras.KerasTensor((b, n, num_classes, 4), dtype="float32"),
    )


@keras.saving.register_keras_serializable(package="fpn_tf")
class FastRCNNHead(keras.layers.Layer):
    """Two fc layers + ReLU, then class scores and class-specific box deltas (§4.2).

    Call args:
      pooled: [B, N, S, S, C] RoI features.

    Returns:
      (class_logits [B, N, K] float32, box_deltas [B, N, K, 4] float32), K =
      num_classes including background (label 0), deltas in (dy, dx, dh, dw).
    """

    def __init__(self, num_classes: int, fc_dim: int = 1024, num_fc: int = 2, **kwargs):
        super().__init__(**kwargs)
        if num_classes < 2:
            raise ValueError(f"num_classes counts background and must be >= 2, got {num_classes}")
        self.num_classes = int(num_classes)
        self.fc_dim = int(fc_dim)
        self.num_fc = int(num_fc)
        fc_init = keras.initializers.VarianceScaling(1.0, "fan_in", "uniform")  # Detectron2's c2_xavier_fill
        # Plain attributes fc6, fc7, ...: TF checkpoints do not see layers in Keras-tracked lists.
        for i in range(self.num_fc):
            layer = keras.layers.Dense(
                self.fc_dim, activation="relu", kernel_initializer=fc_init, name=f"fc{i + 6}"
            )
            setattr(self, f"fc{i + 6}", layer)
        self.class_logits = keras.layers.Dense(
            self.num_classes,
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
            name="class_logits",
        )
        self.box_deltas = keras.layers.Dense(
            4 * self.num_classes,
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.001),
            name="box_deltas",
        )

    @property
    def fcs(self) -> list[keras.layers.Dense]:
        """The hidden fc layers, fc6 first (a view of the fc{k} attributes)."""
        return [getattr(self, f"fc{i + 6}") for i in range(self.num_fc)]

    def build(self, pooled_shape):
        s, _, c = pooled_shape[2:]
        dim = s * s * c
        for fc in self.fcs:
            fc.build((None, dim))
            dim = self.fc_dim
        self.class_logits.build((None, dim))
        self.box_deltas.build((None, dim))

    def call(self, pooled):
        shape = tf.shape(pooled)
        b, n = shape[0], shape[1]
        s1, s2, c = pooled.shape[2], pooled.shape[3], pooled.shape[4]
        x = tf.reshape(pooled, [b * n, s1 * s2 * c])
        for fc in self.fcs:
            x = fc(x)
        return class_and_box_outputs(self.class_logits, self.box_deltas, x, b, n, self.num_classes)

    def compute_output_spec(self, pooled):
        return class_and_box_output_spec(pooled, self.num_classes)

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "fc_dim": self.fc_dim,
            "num_fc": self.num_fc,
        }


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
      proposals: [B, P, 4] input pixels; proposal_valid: [B, P] bool.
      gt_boxes: [B, G, 4] input pixels; gt_classes: [B, G] int32 (-1 padded).
      seeds: [B, 2] int32 per-image sampler seeds.

    Returns:
      rois [B, S, 4], labels [B, S] int32 (0 background), box_targets [B, S, 4]
      encoded with the head's weights, weights [B, S] float32 (0 for padding
      slots), S = cfg.batch_size_per_image.
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


def to_original_pixels(boxes: tf.Tensor, image_info: tf.Tensor) -> tf.Tensor:
    """[B, N, 4] input pixels -> original-image pixels, clipped to the original size."""
    scale = tf.concat([image_info[:, 4:6], image_info[:, 4:6]], axis=-1)[:, None, :]
    boxes = boxes / scale
    return box_ops.clip_boxes(boxes, image_info[:, None, 0:2])


@keras.saving.register_keras_serializable(package="fpn_tf")
class ToOriginalPixels(keras.layers.Layer):
    """Layer form of ``to_original_pixels``: boxes [B, N, 4], image_info [B, 6] -> [B, N, 4]."""

    def call(self, boxes, image_info):
        return to_original_pixels(boxes, image_info)

    def compute_output_spec(self, boxes, image_info):
        return keras.KerasTensor(boxes.shape, dtype="float32")


@keras.saving.register_keras_serializable(package="fpn_tf")
class DetectionGenerator(keras.layers.Layer):
    """Test-time post-processing: class scores > threshold, per-class NMS, top D.

    Call args:
      class_logits: [B, N, K]; box_deltas: [B, N, K, 4];
      proposals: [B, N, 4] input pixels; proposal_valid: [B, N] bool;
      image_info: [B, 6].

    Returns:
      detection_boxes [B, D, 4] float32 (y1, x1, y2, x2) in ORIGINAL-image pixels,
      detection_scores [B, D] float32, detection_classes [B, D] int32 contiguous
      labels 1..K-1, num_detections [B] int32; padded rows are 0.
    """

    def __init__(
        self,
        score_threshold: float = 0.05,
        nms_iou: float = 0.5,
        detections_per_image: int = 100,
        pre_nms_topk: int = 5000,
        box_coder_weights=(10.0, 10.0, 5.0, 5.0),
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.score_threshold = float(score_threshold)
        self.nms_iou = float(nms_iou)
        self.detections_per_image = int(detections_per_image)
        self.pre_nms_topk = int(pre_nms_topk)
        self.box_coder_weights = tuple(float(w) for w in box_coder_weights)

    def call(self, class_logits, box_deltas, proposals, proposal_valid, image_info):
        num_classes = class_logits.shape[-1]
        probs = tf.nn.softmax(class_logits, axis=-1)[:, :, 1:]  # [B, N, K-1]
        deltas = box_deltas[:, :, 1:, :]
        anchors = tf.broadcast_to(proposals[:, :, None, :], tf.shape(deltas))
        boxes = box_coder.decode_boxes(deltas, anchors, weights=self.box_coder_weights)
        boxes = box_ops.clip_boxes(boxes, image_info[:, None, None, 2:4])
        size_ok = tf.logical_and(
            boxes[..., 2] - boxes[..., 0] >= _MIN_DETECTION_SIZE,
            boxes[..., 3] - boxes[..., 1] >= _MIN_DETECTION_SIZE,
        )
        keep = tf.logical_and(size_ok, proposal_valid[:, :, None])
        keep = tf.logical_and(keep, probs > self.score_threshold)
        scores = tf.where(keep, probs, 0.0)

        batch = tf.shape(scores)[0]
        flat_scores = tf.reshape(scores, [batch, -1])
        flat_boxes = tf.reshape(boxes, [batch, -1, 4])
        classes = tf.broadcast_to(tf.range(1, num_classes, dtype=tf.int32), tf.shape(scores))
        flat_classes = tf.reshape(classes, [batch, -1])
        # Per-class NMS runs on the best candidates only, which keeps its cost fixed.
        total = flat_scores.shape[1]
        k = (
            min(self.pre_nms_topk, total)
            if total is not None
            else tf.minimum(self.pre_nms_topk, tf.shape(flat_scores)[1])
        )
        top_scores, top_idx = tf.math.top_k(flat_scores, k=k, sorted=True)
        top_boxes = tf.gather(flat_boxes, top_idx, batch_dims=1)
        top_classes = tf.gather(flat_classes, top_idx, batch_dims=1)
        idx, valid = nms.batched_nms_padded(
            top_boxes,
            top_scores,
            top_classes,
            max_output_size=self.detections_per_image,
            iou_threshold=self.nms_iou,
            score_threshold=self.score_threshold,
        )
        det_scores = tf.gather(top_scores, idx, batch_dims=1)
        valid = tf.logical_and(valid, det_scores > self.score_threshold)
        mask = tf.cast(valid, tf.float32)
        det_boxes = to_original_pixels(tf.gather(top_boxes, idx, batch_dims=1), image_info)
        return {
            "detection_boxes": det_boxes * mask[..., None],
            "detection_scores": det_scores * mask,
            "detection_classes": tf.gather(top_classes, idx, batch_dims=1) * tf.cast(valid, tf.int32),
            "num_detections": tf.reduce_sum(tf.cast(valid, tf.int32), axis=1),
        }

    def compute_output_spec(self, class_logits, box_deltas, proposals, proposal_valid, image_info):
        b, d = class_logits.shape[0], self.detections_per_image
        return {
            "detection_boxes": keras.KerasTensor((b, d, 4), dtype="float32"),
            "detection_scores": keras.KerasTensor((b, d), dtype="float32"),
            "detection_classes": keras.KerasTensor((b, d), dtype="int32"),
            "num_detections": keras.KerasTensor((b,), dtype="int32"),
        }

    def get_config(self):
        return {
            **super().get_config(),
            "score_threshold": self.score_threshold,
            "nms_iou": self.nms_iou,
            "detections_per_image": self.detections_per_image,
            "pre_nms_topk": self.pre_nms_topk,
            "box_coder_weights": list(self.box_coder_weights),
        }
