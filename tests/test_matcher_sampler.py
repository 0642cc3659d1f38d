"""Tests for fpn_tf.ops.matcher and fpn_tf.ops.sampler."""

import numpy as np
import pytest
import tensorflow as tf

from fpn_tf.ops import anchors as anchor_ops
from fpn_tf.ops import matcher, sampler


def _random_boxes(rng, shape, low=5.0, high=80.0, extent=200.0):
    yx = rng.uniform(0, extent, (*shape, 2))
    hw = rng.uniform(low, high, (*shape, 2))
    return np.concatenate([yx, yx + hw], -1).astype(np.float32)


def _np_iou(a, b):
    area = lambda x: np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)  # noqa: E731
    ih = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    iw = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = ih * iw
    union = area(a)[:, None] + area(b)[None, :] - inter
    ok = (area(a)[:, None] > 0) & (area(b)[None, :] > 0)
    return np.where(ok, inter / np.where(ok, union, 1), 0)


def _np_match(boxes, gt, valid, pos, neg, low_quality):
    """torchvision's Matcher (RPN label convention) on one image, in numpy."""
    n = boxes.shape[0]
    if not valid.any():
        return np.zeros(n, np.int32), np.zeros(n, np.int32)
    iou = np.where(valid[None, :], _np_iou(boxes, gt), -1.0)
    best = iou.argmax(1)
    best_iou = iou.max(1)
    labels = np.where(best_iou >= pos, 1, np.where(best_iou < neg, 0, -1))
    if low_quality:
        gt_max = iou.max(0)
        hit = (iou == gt_max[None, :]) & (gt_max[None, :] > 0)
        labels[hit.any(1)] = 1
    return best.astype(np.int32), labels.astype(np.int32)


# Hand case. GT of image 0: g0 (0,0,10,10); g1 (0,10,10,60), area 500; g2 zero
# padding; g3 a real box marked invalid.
HAND_GT = np.array(
    [
        [[0, 0, 10, 10], [0, 10, 10, 60], [0, 0, 0, 0], [50, 50, 60, 60]],
        [[0, 0, 0, 0], [200, 200, 210, 210], [0, 0, 0, 0], [0, 0, 0, 0]],
        [[0, 0, 10, 10], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
    ],
    np.float32,
)
HAND_VALID = np.array([[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]], bool)
HAND_ANCHORS = np.array(
    [
        [0, 0, 10, 20],  # g0: 0.5 (ignored); g1: 100/600 = 1/6, g1's best -> low-quality positive
        [0, 0, 10, 11],  # g0: 10/11 -> positive
        [50, 50, 60, 60],  # equals the invalid g3 -> negative
        [200, 200, 210, 210],  # nothing in image 0 -> negative
        [0, 0, 10, 14],  # g0: 100/140 = 0.714 -> positive
        [0, 0, 10, 16],  # g0: 0.625 -> ignored
        [0, -25, 10, 5],  # g0: 50/350 -> negative
    ],
    np.float32,
)


@pytest.mark.parametrize("chunk_size", [16384, 3])
def test_hand_case_rpn_rule(chunk_size):
    idx, labels, iou = (
        t.numpy() for t in matcher.match_boxes(HAND_ANCHORS, HAND_GT, HAND_VALID, 0.7, 0.3, True, chunk_size)
    )
    assert idx.dtype == np.int32 and labels.dtype == np.int32 and iou.dtype == np.float32
    assert idx.shape == labels.shape == iou.shape == (3, 7)
    np.testing.assert_array_equal(labels[0], [1, 1, 0, 0, 1, -1, 0])
    # the low-quality box keeps its own best GT (g0), not the GT it is best for
    np.testing.assert_array_equal(idx[0], [0, 0, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(iou[0], [0.5, 10 / 11, 0, 0, 100 / 140, 0.625, 1 / 7], rtol=1e-6)
    # image 1: one valid GT in slot 1
    np.testing.assert_array_equal(labels[1], [0, 0, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(idx[1], np.ones(7))
    # image 2: no valid GT -> everything negative, index 0, IoU 0
    np.testing.assert_array_equal(labels[2], np.zeros(7))
    np.testing.assert_array_equal(idx[2], np.zeros(7))
    np.testing.assert_array_equal(iou[2], np.zeros(7))

    _, labels_no_lq, _ = matcher.match_boxes(HAND_ANCHORS, HAND_GT, HAND_VALID, 0.7, 0.3, False, chunk_size)
    np.testing.assert_array_equal(labels_no_lq.numpy()[0], [-1, 1, 0, 0, 1, -1, 0])


def test_low_quality_ties_are_all_positive():
    gt = np.array([[[0, 0, 10, 100], [0, 0, 0, 0]]], np.float32)
    boxes = np.array([[0, 0, 10, 20], [0, 80, 10, 100], [0, 0, 10, 10], [50, 0, 60, 10]], np.float32)
    _, labels, iou = matcher.match_boxes(boxes, gt, np.array([[True, False]]), 0.7, 0.3, True)
    np.testing.assert_allclose(iou.numpy()[0], [0.2, 0.2, 0.1, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(labels.numpy()[0], [1, 1, 0, 0])
    # a GT that overlaps nothing makes no box positive
    far = np.array([[[500, 500, 510, 510]]], np.float32)
    _, labels, _ = matcher.match_boxes(boxes, far, np.array([[True]]), 0.7, 0.3, True)
    np.testing.assert_array_equal(labels.numpy()[0], [0, 0, 0, 0])


def test_roi_head_rule_per_image_boxes():
    rng = np.random.default_rng(0)
    gt = _random_boxes(rng, (2, 6))
    valid = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
    proposals = np.concatenate([_random_boxes(rng, (2, 300)), gt], axis=1)  # GT added as proposals
    idx, labels, iou = (t.numpy() for t in matcher.match_boxes(proposals, gt, valid, 0.5, 0.5, False, 64))
    assert set(np.unique(labels)) <= {0, 1}
    for b in range(2):
        ref_idx, ref_labels = _np_match(proposals[b], gt[b], valid[b], 0.5, 0.5, False)
        np.testing.assert_array_equal(labels[b], ref_labels)
        np.testing.assert_array_equal(idx[b], ref_idx)
        np.testing.assert_array_equal(labels[b, 300 : 300 + valid[b].sum()], 1)
    np.testing.assert_allclose(iou[0, 300:304], 1.0)


def test_chunked_equals_unchunked_and_reference():
    rng = np.random.default_rng(1)
    boxes = _random_boxes(rng, (3000,), low=4.0, high=120.0, extent=400.0)
    gt = _random_boxes(rng, (2, 50), low=4.0, high=200.0, extent=400.0)
    valid = np.ones((2, 50), bool)
    valid[1, 20:] = False
    whole = [t.numpy() for t in matcher.match_boxes(boxes, gt, valid, 0.7, 0.3, True, chunk_size=10**6)]
    chunked = [t.numpy() for t in matcher.match_boxes(boxes, gt, valid, 0.7, 0.3, True, chunk_size=256)]
    for w, c in zip(whole, chunked):
        np.testing.assert_array_equal(c, w)
    for b in range(2):
        ref_idx, ref_labels = _np_match(boxes, gt[b], valid[b], 0.7, 0.3, True)
        np.testing.assert_array_equal(whole[1][b], ref_labels)
        np.testing.assert_array_equal(whole[0][b], ref_idx)
    assert (whole[1] == 1).sum() > 0 and (whole[1] == -1).sum() > 0


def test_500_gt_against_full_pyramid_of_anchors():
    """~270k anchors of an 800x1344 input against 500 GT (a 537 MB IoU matrix unchunked)."""
    feature_sizes = {f"P{k}": (800 // 2**k + (800 % 2**k > 0), 1344 // 2**k) for k in range(2, 7)}
    level_sizes = {f"P{k}": (2.0 ** (k + 3),) for k in range(2, 7)}
    strides = {f"P{k}": 2**k for k in range(2, 7)}
    anchors = tf.concat(list(anchor_ops.generate_anchors(feature_sizes, level_sizes, strides).values()), 0)
    assert anchors.shape[0] > 250_000
    rng = np.random.default_rng(2)
    gt = _random_boxes(rng, (1, 500), low=4.0, high=300.0, extent=700.0)
    run = tf.function(lambda a, g, v: matcher.match_boxes(a, g, v, 0.7, 0.3, True))
    idx, labels, iou = (t.numpy() for t in run(anchors, gt, np.ones((1, 500), bool)))
    assert labels.shape == (1, anchors.shape[0])
    assert (labels == 1).sum() > 0 and (labels == 0).sum() > 0 and (labels == -1).sum() > 0
    # a slice of the anchors against the reference computed in numpy
    sl = slice(100_000, 104_000)
    ref_iou = _np_iou(anchors.numpy()[sl], gt[0])
    ref_max = ref_iou.max(1)
    np.testing.assert_allclose(iou[0, sl], ref_max, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(idx[0, sl], ref_iou.argmax(1))
    np.testing.assert_array_equal(labels[0, sl][ref_max >= 0.7], 1)
    assert set(labels[0, sl][(ref_max >= 0.3) & (ref_max < 0.7)]) <= {-1, 1}


def test_matcher_under_xla_matches_eager():
    rng = np.random.default_rng(3)
    boxes = _random_boxes(rng, (2, 500))
    gt = _random_boxes(rng, (2, 9))
    valid = np.ones((2, 9), bool)
    valid[0, 5:] = False
    eager = matcher.match_boxes(boxes, gt, valid, 0.7, 0.3, True, chunk_size=128)
    compiled = tf.function(lambda *a: matcher.match_boxes(*a, 0.7, 0.3, True, 128), jit_compile=True)(
        boxes, gt, valid
    )
    for e, c in zip(eager, compiled):
        assert c.shape == e.shape == (2, 500)
        np.testing.assert_array_equal(c.numpy(), e.numpy())


def test_matcher_bad_arguments():
    with pytest.raises(ValueError, match="negative_threshold"):
        matcher.match_boxes(HAND_ANCHORS, HAND_GT, HAND_VALID, 0.3, 0.7, True)
    with pytest.raises(ValueError, match="gt_boxes"):
        matcher.match_boxes(HAND_ANCHORS, HAND_GT[0], HAND_VALID, 0.7, 0.3, True)


def _labels(num_pos, num_neg, num_ignored, rng):
    labels = np.array([1] * num_pos + [0] * num_neg + [-1] * num_ignored, np.int32)
    return rng.permutation(labels)


def _check_sample(labels, indices, sampled, num_samples, fraction):
    assert indices.shape == sampled.shape == (num_samples,)
    max_pos = int(num_samples * fraction)
    num_pos = min((labels == 1).sum(), max_pos)
    num_neg = min((labels == 0).sum(), num_samples - num_pos)
    np.testing.assert_array_equal(sampled[:num_pos], 1)
    np.testing.assert_array_equal(sampled[num_pos : num_pos + num_neg], 0)
    np.testing.assert_array_equal(sampled[num_pos + num_neg :], -1)
    np.testing.assert_array_equal(indices[num_pos + num_neg :], 0)
    filled = indices[: num_pos + num_neg]
    assert len(np.unique(filled)) == len(filled)
    np.testing.assert_array_equal(labels[filled], sampled[: num_pos + num_neg])


def test_sampler_counts_and_fill():
    rng = np.random.default_rng(4)
    labels = np.stack(
        [
            _labels(400, 2000, 600, rng),  # plenty: 128 + 128
            _labels(5, 2000, 995, rng),  # few positives: 5 + 251
            _labels(5, 20, 2975, rng),  # few candidates: 5 + 20 + 231 unfilled
            _labels(0, 0, 3000, rng),  # nothing to sample
        ]
    )
    seeds = np.array([[0, 1], [0, 2], [7, 3], [9, 9]], np.int32)
    indices, sampled = (t.numpy() for t in sampler.sample_balanced(labels, 256, 0.5, seeds))
    assert indices.dtype == np.int32 and sampled.dtype == np.int32
    for b in range(4):
        _check_sample(labels[b], indices[b], sampled[b], 256, 0.5)
    assert [(s == 1).sum() for s in sampled] == [128, 5, 5, 0]
    assert [(s == 0).sum() for s in sampled] == [128, 251, 20, 0]


def test_sampler_fewer_boxes_than_samples_and_roi_fraction():
    rng = np.random.default_rng(5)
    labels = np.stack([_labels(3, 4, 3, rng), _labels(9, 1, 0, rng)])
    indices, sampled = (t.numpy() for t in sampler.sample_balanced(labels, 16, 0.25, [[1, 1], [2, 2]]))
    for b in range(2):
        _check_sample(labels[b], indices[b], sampled[b], 16, 0.25)
    assert (sampled[1] == 1).sum() == 4  # int(16 * 0.25)


def test_sampler_determinism_and_batch_split():
    rng = np.random.default_rng(6)
    labels = np.stack([_labels(300, 1500, 200, rng) for _ in range(4)])
    seeds = np.array([[1, 10], [2, 20], [3, 30], [4, 40]], np.int32)
    first = [t.numpy() for t in sampler.sample_balanced(labels, 256, 0.5, seeds)]
    again = [t.numpy() for t in sampler.sample_balanced(labels, 256, 0.5, seeds)]
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    halves = [sampler.sample_balanced(labels[s], 256, 0.5, seeds[s]) for s in (slice(0, 2), slice(2, 4))]
    np.testing.assert_array_equal(np.concatenate([h[0].numpy() for h in halves]), first[0])
    # a different seed for the same labels gives a different sample
    other = sampler.sample_balanced(labels, 256, 0.5, seeds + np.array([[0, 1]], np.int32))[0].numpy()
    for b in range(4):
        assert len(np.intersect1d(other[b, :128], first[0][b, :128])) < 100
    # the same labels with the same seed in two images give the same sample
    same = sampler.sample_balanced(labels[[0, 0]], 256, 0.5, seeds[[0, 0]])[0].numpy()
    np.testing.assert_array_equal(same[0], same[1])


def test_sampler_is_uniform_over_candidates():
    labels = np.array([[1] * 10 + [0] * 10 + [-1] * 5], np.int32)
    counts = np.zeros(25)
    for seed in range(500):
        indices, sampled = sampler.sample_balanced(labels, 8, 0.25, [[seed, 12345]])
        counts[indices.numpy()[0][sampled.numpy()[0] >= 0]] += 1
    # 2 of 10 positives and 6 of 10 negatives per draw: expected 100 and 300 per box
    assert np.all(np.abs(counts[:10] - 100) < 40), counts[:10]
    assert np.all(np.abs(counts[10:20] - 300) < 60), counts[10:20]
    np.testing.assert_array_equal(counts[20:], 0)


def test_sampler_under_xla_matches_eager():
    rng = np.random.default_rng(7)
    labels = np.stack([_labels(50, 400, 50, rng), _labels(2, 10, 488, rng)])
    seeds = np.array([[5, 6], [7, 8]], np.int32)
    eager = sampler.sample_balanced(labels, 64, 0.25, seeds)
    compiled = tf.function(lambda lab, s: sampler.sample_balanced(lab, 64, 0.25, s), jit_compile=True)(
        labels, seeds
    )
    for e, c in zip(eager, compiled):
        assert c.shape == (2, 64)
        np.testing.assert_array_equal(c.numpy(), e.numpy())


def test_sampler_bad_arguments():
    with pytest.raises(ValueError, match="seeds"):
        sampler.sample_balanced(np.zeros([2, 10], np.int32), 4, 0.5, np.zeros([2], np.int32))
    with pytest.raises(ValueError, match="positive_fraction"):
        sampler.sample_balanced(np.zeros([2, 10], np.int32), 4, 1.5, np.zeros([2, 2], np.int32))
