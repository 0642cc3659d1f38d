"""Layers of the FPN segmentation proposer (paper §6, Fig. 4, Appendix A).

Shapes: B images, H/W input height/width, h/w a level's map, C channels (d),
T locations per image over every (MLP, level) pair (``fpn_tf.ops.segment_labels``
fixes their order), N selected locations per image (sampled in training, the
top ``proposals_per_image`` at inference), M mask side.

- ``SegmentProposalHead``: the "MLPs": per window size k ∈ {5, 7} a k×k conv with
  ``hidden_dim`` outputs + ReLU, then sibling 1×1 convs, one object score and
  ``M²`` mask logits, shared by every level. Scores are computed at all T
  locations; the 1×1 mask conv only at the N selected ones (a 1×1 conv at a
  location is a matrix product of that location's hidden vector, so gathering
  first gives the same logits as the dense conv, without T × M² values).
- ``SegmentProposalOutputs``: windows -> original-image pixels, sigmoid scores
  and masks, padding rows zeroed, ``num_proposals``.
- ``ResizeImages`` / ``MergeSegmentProposals``: the image-pyramid baseline
  (DeepMask's 2^{-2:0.5:1} scales at inference, merged to the top N).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from fpn_tf.ops import segment_labels as labels_lib


def level_number(name: str) -> int:
    """``"P4"`` / ``"C4"`` -> 4."""
    return int(name[1:])


@keras.saving.register_keras_serializable(package="fpn_tf")
class SegmentProposalHead(keras.layers.Layer):
    """Dense scores + masks at chosen locations, for one or two MLPs on every level.

    Args:
      levels: feature names the head runs on ("P2".."P6", or "C4" for a single map).
      mlps: window sizes, (5,), (7,) or (5, 7).
      hidden_dim: outputs of the k×k conv (512 in the paper).
      mask_size: M (14 or 28).
      scales, padding: canonical scales of P2.. and the window padding (config).
      proposals_per_image: N at inference.

    Call: ``(features, image_info, indices=None)``; ``indices`` int32 [B, N] picks
    the locations whose masks are computed (training); None: the N best-scoring
    locations inside the image. Returns a dict of float32 tensors:
    ``score_logits`` [B, T], ``indices`` [B, N] int32, ``valid`` [B, N] bool,
    ``scores`` [B, N] (sigmoid), ``mask_logits`` [B, N, M, M], ``windows`` [B, N, 4]
    (input pixels, the region each mask covers).
    """

    def __init__(
        self,
        levels,
        mlps=(5, 7),
        hidden_dim: int = 512,
        mask_size: int = 14,
        scales=(32.0, 64.0, 128.0, 256.0, 512.0),
        padding: float = 0.25,
        proposals_per_image: int = 1000,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.level_names = list(levels)
        self.mlps = tuple(int(k) for k in mlps)
        self.hidden_dim = int(hidden_dim)
        self.mask_size = int(mask_size)
        self.scales = tuple(float(s) for s in scales)
        self.padding = float(padding)
        self.proposals_per_image = int(proposals_per_image)
        self.entries = labels_lib.canonical_entries(
            [level_number(n) for n in self.level_names], self.mlps, self.scales, self.padding
        )
        for k in self.mlps:
            # One attribute per sub-layer: TF checkpoints do not see layers in lists.
            conv = keras.layers.Conv2D(hidden_dim, k, padding="same", activation="relu", name=f"mlp{k}_conv")
            init = keras.initializers.RandomNormal(stddev=0.01)
            setattr(self, f"conv{k}", conv)
            score = keras.layers.Conv2D(1, 1, kernel_initializer=init, name=f"mlp{k}_score")
            setattr(self, f"score{k}", score)
            mask = keras.layers.Dense(self.mask_size**2, kernel_initializer=init, name=f"mlp{k}_mask")
            setattr(self, f"mask{k}", mask)

    def build(self, features_shape, image_info_shape=None, indices_shape=None):
        channels = features_shape[self.level_names[0]][-1]
        for k in self.mlps:
            getattr(self, f"conv{k}").build((None, None, None, channels))
            getattr(self, f"score{k}").build((None, None, None, self.hidden_dim))
            getattr(self, f"mask{k}").build((None, self.hidden_dim))
        self.built = True

    def geometry(self, features) -> dict[str, tf.Tensor]:
        """``location_geometry`` of these feature maps (entry order)."""
        sizes = []
        for entry in self.entries:
            shape = tf.shape(features[self._name_of(entry.level)])
            sizes.append((shape[1], shape[2]))
        return labels_lib.location_geometry(sizes, self.entries)

    def _name_of(self, level: int) -> str:
        return next(n for n in self.level_names if level_number(n) == level)

    def call(self, features, image_info, indices=None):
        hidden, logits = [], []
        for entry in self.entries:  # MLP-major, then level: the location order
            x = getattr(self, f"conv{entry.kernel}")(features[self._name_of(entry.level)])
            s = getattr(self, f"score{entry.kernel}")(x)
            batch = tf.shape(x)[0]
            hidden.append(tf.reshape(x, [batch, -1, self.hidden_dim]))
            logits.append(tf.reshape(tf.cast(s, tf.float32), [batch, -1]))
        hidden = tf.concat(hidden, axis=1)  # [B, T, hidden]
        score_logits = tf.concat(logits, axis=1)  # [B, T]
        geo = self.geometry(features)
        valid_hw = tf.cast(image_info, tf.float32)[:, None, 2:4]
        inside = tf.reduce_all(geo["centres"][None] < valid_hw, axis=-1)  # [B, T]
        if indices is None:
            # Static top-N: N extra -inf columns make top_k valid on any map size.
            n = self.proposals_per_image
            masked = tf.where(inside, score_logits, float("-inf"))
            masked = tf.pad(masked, [[0, 0], [0, n]], constant_values=float("-inf"))
            top, indices = tf.math.top_k(masked, k=n)
            valid = tf.math.is_finite(top)
            indices = tf.minimum(indices, tf.shape(score_logits)[1] - 1)
        else:
            indices = tf.cast(indices, tf.int32)
            valid = tf.gather(inside, indices, batch_dims=1)
        rows = tf.gather(hidden, indices, batch_dims=1)  # [B, N, hidden]
        entry = tf.gather(geo["entry"], indices)  # [B, N]
        kernel_of_entry = tf.constant([self.mlps.index(e.kernel) for e in self.entries], tf.int32)
        which = tf.one_hot(tf.gather(kernel_of_entry, entry), len(self.mlps), dtype=tf.float32)
        per_mlp = tf.stack([tf.cast(getattr(self, f"mask{k}")(rows), tf.float32) for k in self.mlps], -1)
        mask_logits = tf.reduce_sum(per_mlp * which[:, :, None, :], axis=-1)  # [B, N, M²]
        shape = tf.shape(mask_logits)
        scores = tf.sigmoid(tf.gather(score_logits, indices, batch_dims=1))
        return {
            "score_logits": score_logits,
            "indices": indices,
            "valid": valid,
            "scores": tf.where(valid, scores, 0.0),
            "mask_logits": tf.reshape(mask_logits, [shape[0], shape[1], self.mask_size, self.mask_size]),
            "windows": tf.gather(geo["windows"], indices),
        }

    def get_config(self):
        config = super().get_config()
        config.update(
            levels=self.level_names,
            mlps=list(self.mlps),
            hidden_dim=self.hidden_dim,
            mask_size=self.mask_size,
            scales=list(self.scales),
            padding=self.padding,
            proposals_per_image=self.proposals_per_image,
        )
        return config


@keras.saving.register_keras_serializable(package="fpn_tf")
class SegmentProposalOutputs(keras.layers.Layer):
    """Head outputs of one image scale -> the model's outputs (original-image pixels).

    Call: ``(head_outputs, image_info)``. Returns ``proposal_boxes`` [B, N, 4] the
    window each mask covers (y1, x1, y2, x2, NOT clipped: the mask is relative to
    the whole window), ``proposal_scores`` [B, N], ``proposal_masks`` [B, N, M, M]
    probabilities, ``num_proposals`` [B] int32; rows past ``num_proposals`` are 0.
    """

    def call(self, head_outputs, image_info):
        info = tf.cast(image_info, tf.float32)
        scale = tf.concat([info[:, 4:6], info[:, 4:6]], axis=-1)[:, None, :]
        valid = head_outputs["valid"]
        keep = tf.cast(valid, tf.float32)
        return {
            "proposal_boxes": head_outputs["windows"] / scale * keep[..., None],
            "proposal_scores": head_outputs["scores"] * keep,
            "proposal_masks": tf.sigmoid(head_outputs["mask_logits"]) * keep[..., None, None],
            "num_proposals": tf.reduce_sum(tf.cast(valid, tf.int32), axis=1),
        }


@keras.saving.register_keras_serializable(package="fpn_tf")
class MergeSegmentProposals(keras.layers.Layer):
    """The best ``num`` proposals of several image scales (no NMS, as DeepMask's top-N).

    Call: a list of ``SegmentProposalOutputs`` dicts. Returns one such dict.
    """

    def __init__(self, num: int = 1000, **kwargs):
        super().__init__(**kwargs)
        self.num = int(num)

    def call(self, outputs):
        def cat(key):
            return tf.concat([o[key] for o in outputs], axis=1)

        scores, boxes, masks = cat("proposal_scores"), cat("proposal_boxes"), cat("proposal_masks")
        valid = tf.concat(
            [
                tf.range(tf.shape(o["proposal_scores"])[1])[None] < o["num_proposals"][:, None]
                for o in outputs
            ],
            1,
        )
        top, index = tf.math.top_k(tf.where(valid, scores, -1.0), k=self.num)
        keep = top >= 0.0
        keep_f = tf.cast(keep, tf.float32)
        return {
            "proposal_boxes": tf.gather(boxes, index, batch_dims=1) * keep_f[..., None],
            "proposal_scores": tf.maximum(top, 0.0),
            "proposal_masks": tf.gather(masks, index, batch_dims=1) * keep_f[..., None, None],
            "num_proposals": tf.reduce_sum(tf.cast(keep, tf.int32), axis=1),
        }

    def get_config(self):
        return {**super().get_config(), "num": self.num}


def resize_batch(images, image_info, factor, divisibility: int):
    """Resizes a padded batch by ``factor`` (scalar) and pads it to ``divisibility``.

    Returns images [B, H', W', 3] and image_info with valid size and scales × factor.
    """
    factor = tf.cast(factor, tf.float32)
    hw = tf.cast(tf.shape(images)[1:3], tf.float32)
    new_hw = tf.maximum(tf.cast(tf.round(hw * factor), tf.int32), 1)
    resized = tf.image.resize(tf.cast(images, tf.float32), new_hw, method="bilinear")
    padded_hw = (new_hw + divisibility - 1) // divisibility * divisibility
    resized = tf.pad(resized, [[0, 0], [0, padded_hw[0] - new_hw[0]], [0, padded_hw[1] - new_hw[1]], [0, 0]])
    info = tf.cast(image_info, tf.float32)
    info = tf.concat([info[:, 0:2], info[:, 2:6] * factor], axis=1)
    return resized, info


@keras.saving.register_keras_serializable(package="fpn_tf")
class ResizeImages(keras.layers.Layer):
    """One scale of the image pyramid: ``(images, image_info) -> (resized, image_info')``."""

    def __init__(self, factor: float, divisibility: int = 32, **kwargs):
        super().__init__(**kwargs)
        self.factor = float(factor)
        self.divisibility = int(divisibility)

    def call(self, images, image_info):
        return resize_batch(images, image_info, self.factor, self.divisibility)

    def get_config(self):
        return {**super().get_config(), "factor": self.factor, "divisibility": self.divisibility}
