"""Tests for fpn_tf.ops.anchors (FPN §4.1)."""

import numpy as np
import pytest
import tensorflow as tf

from fpn_tf.ops import anchors

PAPER_SIZES = {"P2": (32.0,), "P3": (64.0,), "P4": (128.0,), "P5": (256.0,), "P6": (512.0,)}
STRIDES = {f"P{k}": 2**k for k in range(2, 7)}


def _torchvision_anchors(height, width, stride, sizes, ratios, round_base):
    """torchvision's AnchorGenerator written out in numpy; returns (y1, x1, y2, x2)."""
    scales = np.asarray(sizes, np.float32)
    aspect_ratios = np.asarray(ratios, np.float32)
    h_ratios = np.sqrt(aspect_ratios)
    w_ratios = np.float32(1) / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    base = np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2)  # x1, y1, x2, y2
    if round_base:
        base = np.round(base)
    shift_y, shift_x = np.meshgrid(np.arange(height) * stride, np.arange(width) * stride, indexing="ij")
    shifts = np.stack([shift_x.ravel(), shift_y.ravel(), shift_x.ravel(), shift_y.ravel()], 1)
    xyxy = (shifts[:, None, :] + base[None, :, :]).reshape(-1, 4).astype(np.float32)
    return xyxy[:, [1, 0, 3, 2]]


def test_tiny_p2_map_exact_values():
    out = anchors.generate_anchors({"P2": (2, 3)}, {"P2": (32.0,)}, {"P2": 4})
    p2 = out["P2"].numpy()
    assert p2.dtype == np.float32 and p2.shape == (2 * 3 * 3, 4)
    # by hand: ratio 1 anchor (index 1) at (y=0, x=0) and at (y=1, x=2)
    np.testing.assert_array_equal(p2[1], [-16, -16, 16, 16])
    np.testing.assert_array_equal(p2[(1 * 3 + 2) * 3 + 1], [4 - 16, 8 - 16, 4 + 16, 8 + 16])
    # ratio 0.5 (wide): h = 32 * sqrt(.5), w = 32 / sqrt(.5)
    h, w = 32 * np.sqrt(0.5), 32 / np.sqrt(0.5)
    np.testing.assert_allclose(p2[0], [-h / 2, -w / 2, h / 2, w / 2], rtol=1e-6)
    np.testing.assert_array_equal(p2, _torchvision_anchors(2, 3, 4, (32.0,), (0.5, 1.0, 2.0), False))


def test_round_base_matches_torchvision():
    out = anchors.generate_anchors({"P2": (2, 3)}, {"P2": (32.0,)}, {"P2": 4}, round_base=True)
    p2 = out["P2"].numpy()
    np.testing.assert_array_equal(p2[:3], [[-11, -23, 11, 23], [-16, -16, 16, 16], [-23, -11, 23, 11]])
    np.testing.assert_array_equal(p2, _torchvision_anchors(2, 3, 4, (32.0,), (0.5, 1.0, 2.0), True))


def test_paper_pyramid_counts_areas_and_ratios():
    feature_sizes = {f"P{k}": (64 // 2**k, 96 // 2**k) for k in range(2, 7)}
    out = anchors.generate_anchors(feature_sizes, PAPER_SIZES, STRIDES)
    assert list(out) == ["P2", "P3", "P4", "P5", "P6"]
    assert anchors.num_anchors_per_location(PAPER_SIZES) == {k: 3 for k in PAPER_SIZES}
    for level, (size,) in PAPER_SIZES.items():
        h, w = feature_sizes[level]
        boxes = out[level].numpy().reshape(h, w, 3, 4)
        heights = boxes[..., 2] - boxes[..., 0]
        widths = boxes[..., 3] - boxes[..., 1]
        np.testing.assert_allclose(heights * widths, size**2, rtol=1e-5)
        np.testing.assert_allclose(heights / widths, np.broadcast_to([0.5, 1.0, 2.0], (h, w, 3)), rtol=1e-5)
        # centres at index * stride, ordered (y, x, a)
        centre_y = (boxes[..., 0] + boxes[..., 2]) / 2
        centre_x = (boxes[..., 1] + boxes[..., 3]) / 2
        stride = STRIDES[level]
        np.testing.assert_allclose(centre_y[:, 0, 0], np.arange(h) * stride, atol=1e-4)
        np.testing.assert_allclose(centre_x[0, :, 0], np.arange(w) * stride, atol=1e-4)


def test_single_scale_all_sizes_on_one_level_and_offset():
    sizes = {"P4": (32.0, 64.0, 128.0, 256.0, 512.0)}
    assert anchors.num_anchors_per_location(sizes) == {"P4": 15}
    out = anchors.generate_anchors({"P4": (3, 2), "P5": (2, 1)}, sizes, {"P4": 16, "P5": 32}, offset=0.5)
    assert list(out) == ["P4"]
    p4 = out["P4"].numpy()
    assert p4.shape == (3 * 2 * 15, 4)
    np.testing.assert_allclose(p4, _torchvision_anchors(3, 2, 16, sizes["P4"], (0.5, 1.0, 2.0), False) + 8.0)
    # ratio-major, size-minor: anchor a = ratio * 5 + size
    first = p4[:15].reshape(3, 5, 4)
    areas = (first[..., 2] - first[..., 0]) * (first[..., 3] - first[..., 1])
    np.testing.assert_allclose(areas, np.broadcast_to(np.square(sizes["P4"]), (3, 5)), rtol=1e-5)


def test_tensor_feature_sizes_under_xla_match_eager():
    sizes = {"P2": (32.0,), "P3": (64.0, 90.0)}
    strides = {"P2": 4, "P3": 8}

    @tf.function(jit_compile=True)
    def from_maps(p2, p3):
        return anchors.generate_anchors(
            {"P2": tf.shape(p2)[1:3], "P3": (tf.shape(p3)[1], tf.shape(p3)[2])},
            sizes,
            strides,
            round_base=True,
        )

    compiled = from_maps(tf.zeros([1, 4, 6, 1]), tf.zeros([1, 2, 3, 1]))
    eager = anchors.generate_anchors({"P2": (4, 6), "P3": (2, 3)}, sizes, strides, round_base=True)
    assert compiled["P3"].shape == (2 * 3 * 6, 4)
    for level in sizes:
        np.testing.assert_array_equal(compiled[level].numpy(), eager[level].numpy())


def test_missing_level_is_named():
    with pytest.raises(ValueError, match="P6"):
        anchors.generate_anchors({"P2": (2, 2)}, {"P2": (32.0,), "P6": (512.0,)}, {"P2": 4, "P6": 64})
    with pytest.raises(ValueError, match="stride"):
        anchors.generate_anchors({"P2": (2, 2)}, {"P2": (32.0,)}, {})
    with pytest.raises(ValueError, match="aspect_ratios"):
        anchors.num_anchors_per_location({"P2": (32.0,)}, aspect_ratios=())
