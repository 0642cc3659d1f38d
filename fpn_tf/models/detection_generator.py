"""Test-time detection post-processing of the Fast R-CNN head (FPN §4.2, §5.2).

Class scores above a threshold, class-specific boxes decoded from their proposals,
per-class NMS, the best D per image, boxes mapped back to original-image pixels.

Shapes: B images, N proposals per image, K classes including background, D
detections per image. Boxes are (y1, x1, y2, x2) float32; proposals in input
pixels, detections in ORIGINAL-image pixels.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from fpn_tf.ops import box_coder, box_ops, nms
from fpn_tf.ops.box_ops import to_original_pixels

# torchvision drops detections narrower or shorter than this (pixels) before NMS.
_MIN_DETECTION_SIZE = 1e-2


def padded_detections(boxes, scores, classes, image_info, max_detections, nms_iou, score_threshold) -> dict:
    """Per-class NMS of candidates, the best ``max_detections``, padded, in original pixels.

    Args:
      boxes: [B, N, 4] input pixels; scores: [B, N]; classes: [B, N] int32 labels.
      image_info: [B, 6].

    Returns:
      detection_boxes [B, D, 4] ORIGINAL-image pixels, detection_scores [B, D],
      detection_classes [B, D] int32, num_detections [B] int32 (padded rows 0).
    """
    idx, valid = nms.batched_nms_padded(
        boxes,
        scores,
        classes,
        max_output_size=max_detections,
        iou_threshold=nms_iou,
        score_threshold=score_threshold,
    )
    det_scores = tf.gather(scores, idx, batch_dims=1)
    valid = tf.logical_and(valid, det_scores > score_threshold)
    mask = tf.cast(valid, tf.float32)
    det_boxes = to_original_pixels(tf.gather(boxes, idx, batch_dims=1), image_info)
    return {
        "detection_boxes": det_boxes * mask[..., None],
        "detection_scores": det_scores * mask,
        "detection_classes": tf.gather(classes, idx, batch_dims=1) * tf.cast(valid, tf.int32),
        "num_detections": tf.reduce_sum(tf.cast(valid, tf.int32), axis=1),
    }


def detection_output_spec(batch, max_detections: int) -> dict:
    """KerasTensor specs of ``padded_detections``' outputs."""
    b, d = batch, max_detections
    return {
        "detection_boxes": keras.KerasTensor((b, d, 4), dtype="float32"),
        "detection_scores": keras.KerasTensor((b, d), dtype="float32"),
        "detection_classes": keras.KerasTensor((b, d), dtype="int32"),
        "num_detections": keras.KerasTensor((b,), dtype="int32"),
    }


@keras.saving.register_keras_serializable(package="fpn_tf")
class ToOriginalPixels(keras.layers.Layer):
    """Layer form of ``to_original_pixels``: boxes [B, N, 4], image_info [B, 6] -> [B, N, 4]."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # Stateless, and not always in the functional graph (Faster R-CNN calls it for
        # proposals only): built from the start, or Keras' fit under a strategy, which
        # builds "unbuilt" models symbolically, would call the model on a training batch.
        self.built = True

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
        return padded_detections(
            top_boxes,
            top_scores,
            top_classes,
            image_info,
            self.detections_per_image,
            self.nms_iou,
            self.score_threshold,
        )

    def compute_output_spec(self, class_logits, box_deltas, proposals, proposal_valid, image_info):
        b, d = class_logits.shape[0], self.detections_per_image
        return detection_output_spec(b, d)

    def get_config(self):
        return {
            **super().get_config(),
            "score_threshold": self.score_threshold,
            "nms_iou": self.nms_iou,
            "detections_per_image": self.detections_per_image,
            "pre_nms_topk": self.pre_nms_topk,
            "box_coder_weights": list(self.box_coder_weights),
        }
