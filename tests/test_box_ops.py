"""Tests for fpn_tf.ops.box_ops and fpn_tf.ops.box_coder."""

import math

import numpy as np
import pytest
import tensorflow as tf

from fpn_tf.ops import box_coder, box_ops


def _random_boxes(rng, n, low=5.0, high=80.0):
    yx = rng.uniform(0, 200, (n, 2))
    hw = rng.uniform(low, high, (n, 2))
    return np.concatenate([yx, yx + hw], -1).astype(np.float32)


def test_area_clamps_degenerate_boxes():
    boxes = np.array([[0, 0, 10, 20], [5, 5, 5, 9], [10, 10, 0, 20], [0, 0, 0, 0]], np.float32)
    np.testing.assert_array_equal(box_ops.area(boxes).numpy(), [200, 0, 0, 0])
    assert box_ops.area(np.zeros([2, 3, 4], np.float32)).shape == (2, 3)


def test_clip_boxes_broadcasts_per_image_sizes():
    boxes = np.array(
        [[[-5, -5, 50, 70], [10, 20, 30, 40]], [[-5, -5, 50, 70], [90, 10, 120, 30]]], np.float32
    )
    hw = np.array([[[40, 60]], [[100, 25]]], np.float32)  # [B, 1, 2]
    clipped = box_ops.clip_boxes(boxes, hw).numpy()
    np.testing.assert_array_equal(
        clipped, [[[0, 0, 40, 60], [10, 20, 30, 40]], [[0, 0, 50, 25], [90, 10, 100, 25]]]
    )
    np.testing.assert_array_equal(
        box_ops.clip_boxes(boxes[0], np.array([40, 60], np.float32)).numpy(), clipped[0]
    )


def test_pairwise_iou_hand_computed():
    a = np.array([[0, 0, 10, 10], [0, 0, 0, 0]], np.float32)
    b = np.array(
        [[0, 0, 10, 10], [5, 5, 15, 15], [0, 0, 10, 20], [20, 20, 30, 30], [0, 0, 0, 0], [2, 2, 2, 8]],
        np.float32,
    )
    iou = box_ops.pairwise_iou(a, b).numpy()
    assert iou.dtype == np.float32 and iou.shape == (2, 6)
    np.testing.assert_allclose(iou[0], [1.0, 25 / 175, 0.5, 0.0, 0.0, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(iou[1], np.zeros(6))  # a zero-area box matches nothing


def test_pairwise_iou_broadcasts_shared_boxes_against_batch():
    rng = np.random.default_rng(0)
    shared = _random_boxes(rng, 7)
    batch = np.stack([_random_boxes(rng, 4), _random_boxes(rng, 4)])
    iou = box_ops.pairwise_iou(shared, batch).numpy()
    assert iou.shape == (2, 7, 4)
    for b in range(2):
        np.testing.assert_allclose(iou[b], box_ops.pairwise_iou(shared, batch[b]).numpy(), rtol=1e-6)
    # symmetric and within [0, 1]
    np.testing.assert_allclose(iou[0], box_ops.pairwise_iou(batch[0], shared).numpy().T, rtol=1e-6)
    assert iou.min() >= 0.0 and iou.max() <= 1.0


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="boxes1"):
        box_ops.pairwise_iou(np.zeros([3, 5], np.float32), np.zeros([2, 4], np.float32))
    with pytest.raises(ValueError, match="height_width"):
        box_ops.clip_boxes(np.zeros([3, 4], np.float32), np.zeros([3], np.float32))
    with pytest.raises(ValueError, match="weights"):
        box_coder.encode_boxes(np.zeros([1, 4]), np.zeros([1, 4]), weights=(1.0, 1.0, 1.0))


def test_encode_hand_computed():
    anchor = np.array([[0, 0, 10, 20]], np.float32)  # h 10, w 20, centre (5, 10)
    box = np.array([[2, 4, 22, 14]], np.float32)  # h 20, w 10, centre (12, 9)
    np.testing.assert_allclose(
        box_coder.encode_boxes(box, anchor).numpy(), [[0.7, -0.05, math.log(2), math.log(0.5)]], rtol=1e-6
    )
    np.testing.assert_allclose(
        box_coder.encode_boxes(box, anchor, weights=(10, 10, 5, 5)).numpy(),
        [[7.0, -0.5, 5 * math.log(2), 5 * math.log(0.5)]],
        rtol=1e-6,
    )


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_encode_decode_round_trip(weights):
    rng = np.random.default_rng(1)
    boxes = _random_boxes(rng, 200).reshape(2, 100, 4)
    anchors = _random_boxes(rng, 100, low=8.0, high=300.0)  # [N, 4] broadcast over the batch
    deltas = box_coder.encode_boxes(boxes, anchors, weights)
    assert deltas.shape == (2, 100, 4)
    decoded = box_coder.decode_boxes(deltas, anchors, weights).numpy()
    np.testing.assert_allclose(decoded, boxes, atol=1e-4)


def test_decode_matches_torchvision_formula():
    """torchvision's BoxCoder.decode_single written out in float32 numpy (x-first boxes)."""
    rng = np.random.default_rng(2)
    anchors = _random_boxes(rng, 50, low=8.0, high=300.0)
    deltas = rng.normal(0, 2, (50, 4)).astype(np.float32)
    wy, wx, wh, ww = np.float32(10), np.float32(10), np.float32(5), np.float32(5)
    clip = np.float32(math.log(1000.0 / 16))
    y1, x1, y2, x2 = anchors.T
    widths, heights = x2 - x1, y2 - y1
    ctr_x, ctr_y = x1 + np.float32(0.5) * widths, y1 + np.float32(0.5) * heights
    dy, dx = deltas[:, 0] / wy, deltas[:, 1] / wx
    dh, dw = np.minimum(deltas[:, 2] / wh, clip), np.minimum(deltas[:, 3] / ww, clip)
    pred_ctr_x, pred_ctr_y = dx * widths + ctr_x, dy * heights + ctr_y
    pred_w, pred_h = np.exp(dw) * widths, np.exp(dh) * heights
    half_w, half_h = np.float32(0.5) * pred_w, np.float32(0.5) * pred_h
    expected = np.stack(
        [pred_ctr_y - half_h, pred_ctr_x - half_w, pred_ctr_y + half_h, pred_ctr_x + half_w], 1
    )
    decoded = box_coder.decode_boxes(deltas, anchors, (10, 10, 5, 5)).numpy()
    np.testing.assert_allclose(decoded, expected, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_decode_clamps_huge_scales(weights):
    anchor = np.array([[0, 0, 16, 32]], np.float32)  # h 16, w 32, centre (8, 16)
    deltas = np.array([[0.0, 0.0, 1e4, 1e4]], np.float32)
    decoded = box_coder.decode_boxes(deltas, anchor, weights).numpy()
    assert np.all(np.isfinite(decoded))
    # exp(log(1000/16)) = 62.5 times the anchor's size, about the same centre
    np.testing.assert_allclose(decoded, [[8 - 500, 16 - 1000, 8 + 500, 16 + 1000]], rtol=1e-5)
    small = box_coder.decode_boxes(deltas, anchor, weights, scale_clamp=0.0).numpy()
    np.testing.assert_allclose(small, anchor, rtol=1e-6)


def test_encode_of_zero_padded_boxes_is_finite():
    deltas = box_coder.encode_boxes(np.zeros([3, 4], np.float32), np.zeros([3, 4], np.float32)).numpy()
    assert np.all(np.isfinite(deltas))


def test_box_ops_under_xla_match_eager():
    rng = np.random.default_rng(3)
    boxes = _random_boxes(rng, 30).reshape(2, 15, 4)
    anchors = _random_boxes(rng, 15, low=8.0, high=300.0)
    hw = np.array([[[120, 150]], [[200, 90]]], np.float32)
    weights = (10.0, 10.0, 5.0, 5.0)

    def run(b, a, s):
        deltas = box_coder.encode_boxes(b, a, weights)
        return (
            box_ops.area(b),
            box_ops.clip_boxes(b, s),
            box_ops.pairwise_iou(a, b),
            deltas,
            box_coder.decode_boxes(deltas * 3.0, a, weights),
        )

    eager = run(boxes, anchors, hw)
    compiled = tf.function(run, jit_compile=True)(boxes, anchors, hw)
    for e, c in zip(eager, compiled):
        np.testing.assert_allclose(c.numpy(), e.numpy(), rtol=1e-5, atol=1e-5)
