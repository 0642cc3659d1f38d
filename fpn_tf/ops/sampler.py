"""Balanced positive / negative sampling of labelled boxes (FPN §4.1, §4.2).

The RPN trains on 256 anchors per image, at most half positive; the RoI head
on 512 RoIs per image, at most 25 % foreground. Positives are chosen uniformly
at random up to ``floor(S * positive_fraction)`` and the rest of the ``S`` slots
are filled with random negatives (torchvision's ``BalancedPositiveNegativeSampler``).

Randomness is a pure function of each image's seed (a counter-based hash of
seed and index, identical in eager, graph and XLA execution), so an image gets
the same sample whether it is in a batch of 16 or split across replicas. A
random subset is the ``top_k`` of random keys, which compiles under XLA where
``tf.random.shuffle`` does not. Shapes are static.

Shapes: B images, R candidates per image (anchors or RoIs), S sampled per image.
"""

from __future__ import annotations

import tensorflow as tf

_GOLDEN = 0x9E3779B9  # 2**32 / golden ratio, odd


def _mix(x: tf.Tensor) -> tf.Tensor:
    """A bijective uint32 hash with good avalanche (Wellons' "lowbias32")."""

    def xorshift(v, n):
        return tf.bitwise.bitwise_xor(v, tf.bitwise.right_shift(v, tf.constant(n, tf.uint32)))

    x = xorshift(x, 16) * tf.constant(0x7FEB352D, tf.uint32)
    x = xorshift(x, 15) * tf.constant(0x846CA68B, tf.uint32)
    return xorshift(x, 16)


def random_keys(seeds: tf.Tensor, num: int | tf.Tensor) -> tf.Tensor:
    """``[B, num]`` int32 random keys in ``[0, 2**31)``; row ``b`` depends on ``seeds[b]`` only.

    A counter-based hash of ``(seed, index)``, not ``tf.random``: XLA's stateless
    random ops give different numbers from TensorFlow's kernels, and the sample
    must not change when a step is compiled. Within a row the keys of distinct
    indices differ except for the dropped lowest bit, so ties are rare.
    """
    seeds = tf.bitcast(tf.cast(seeds, tf.int32), tf.uint32)  # [B, 2]
    key = _mix(tf.bitwise.bitwise_xor(_mix(seeds[:, 1] + tf.constant(_GOLDEN, tf.uint32)), seeds[:, 0]))
    key = key[:, None]  # [B, 1]
    index = tf.bitcast(tf.range(num, dtype=tf.int32), tf.uint32)[None, :]  # [1, num]
    hashed = _mix(index * tf.constant(_GOLDEN, tf.uint32) + key)
    hashed = _mix(tf.bitwise.bitwise_xor(hashed, key))
    return tf.bitcast(tf.bitwise.right_shift(hashed, tf.constant(1, tf.uint32)), tf.int32)


def sample_balanced(
    labels: tf.Tensor,
    num_samples: int,
    positive_fraction: float,
    seeds: tf.Tensor,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Samples ``num_samples`` boxes per image, positives first.

    Args:
      labels: ``[B, R]`` int32, 1 positive, 0 negative, -1 ignored (never
        sampled), e.g. from :func:`fpn_tf.ops.matcher.match_boxes`.
      num_samples: ``S``, boxes per image.
      positive_fraction: at most ``int(S * positive_fraction)`` positives.
      seeds: ``[B, 2]`` int32, one stateless-random seed per image.

    Returns:
      indices: ``[B, S]`` int32 into ``R``: the sampled positives, then the
        sampled negatives, then 0 in unfilled slots.
      sampled_labels: ``[B, S]`` int32, 1 / 0 for sampled positives /
        negatives, -1 for unfilled slots (not enough candidates).

    Long by its docstring and argument checks; the sampling itself is a dozen lines.
    """
    num_samples = int(num_samples)
    if num_samples < 1:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
    labels = tf.cast(labels, tf.int32)
    if labels.shape.rank != 2:
        raise ValueError(f"labels must be [B, R], got shape {labels.shape}")
    seeds = tf.cast(seeds, tf.int32)
    if seeds.shape.rank != 2 or seeds.shape[1] != 2:
        raise ValueError(f"seeds must be [B, 2] int32, got shape {seeds.shape}")
    max_positives = int(num_samples * positive_fraction)

    # top_k needs at least S entries: pad with ignored labels.
    num_boxes = labels.shape[1]
    if num_boxes is None or num_boxes < num_samples:
        pad = num_samples - tf.shape(labels)[1] if num_boxes is None else num_samples - num_boxes
        labels = tf.pad(labels, [[0, 0], [0, tf.maximum(pad, 0)]], constant_values=-1)
        labels.set_shape([None, None if num_boxes is None else num_samples])
    keys = random_keys(seeds, labels.shape[1] or tf.shape(labels)[1])  # [B, N'] in [0, 2**31)

    is_pos = tf.equal(labels, 1)
    is_neg = tf.equal(labels, 0)
    # Non-candidates get key -1 and lose against every candidate.
    _, pos_index = tf.math.top_k(tf.where(is_pos, keys, -1), k=max(max_positives, 1))
    _, neg_index = tf.math.top_k(tf.where(is_neg, keys, -1), k=num_samples)
    num_pos = tf.minimum(tf.reduce_sum(tf.cast(is_pos, tf.int32), axis=1), max_positives)  # [B]
    num_neg = tf.minimum(tf.reduce_sum(tf.cast(is_neg, tf.int32), axis=1), num_samples - num_pos)

    slot = tf.range(num_samples)[None, :]  # [1, S]
    num_pos = num_pos[:, None]
    num_neg = num_neg[:, None]
    take_pos = slot < num_pos
    take_neg = tf.logical_and(slot >= num_pos, slot < num_pos + num_neg)
    # Slot j takes the j-th positive, or the (j - num_pos)-th negative.
    pos_slot = tf.broadcast_to(tf.minimum(slot, pos_index.shape[1] - 1), tf.shape(take_pos))
    neg_slot = tf.maximum(slot - num_pos, 0)
    pos_choice = tf.gather(pos_index, pos_slot, batch_dims=1)
    neg_choice = tf.gather(neg_index, neg_slot, batch_dims=1)
    indices = tf.where(take_pos, pos_choice, tf.where(take_neg, neg_choice, 0))
    sampled_labels = tf.where(take_pos, 1, tf.where(take_neg, 0, -1))
    return tf.cast(indices, tf.int32), tf.cast(sampled_labels, tf.int32)
