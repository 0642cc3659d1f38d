"""fpn_tf.ops.mask_ops: targets vs full-image references, the mask loss, pasting like torchvision."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from fpn_tf.data.masks import crop_mask, encode_binary_mask
from fpn_tf.ops.mask_ops import mask_loss, mask_targets, paste_mask_numpy, paste_masks

H, W = 72, 96


def _ellipse(cy, cx, ry, rx) -> np.ndarray:
    yy, xx = np.mgrid[0:H, 0:W] + 0.5
    return (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0).astype(np.uint8)


def _tight_box(m: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(m)
    return np.asarray([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1], np.float32)


def _bilinear_full(full: np.ndarray, roi, size: int) -> np.ndarray:
    """Reference: the FULL-image mask, bilinear at the RoI's bin centres (aligned RoIAlign, 1 sample)."""
    y1, x1, y2, x2 = roi
    ys = y1 + (np.arange(size) + 0.5) * (y2 - y1) / size - 0.5
    xs = x1 + (np.arange(size) + 0.5) * (x2 - x1) / size - 0.5
    f = np.pad(full.astype(np.float64), 1)  # zero outside the image

    def taps(u, n):
        u = np.clip(u + 1, 0, n + 1)
        lo = np.minimum(np.floor(u).astype(int), n + 1)
        return lo, np.minimum(lo + 1, n + 1), u - lo

    y0, y1i, fy = taps(ys, full.shape[0])
    x0, x1i, fx = taps(xs, full.shape[1])
    top = f[y0][:, x0] * (1 - fx) + f[y0][:, x1i] * fx
    bot = f[y1i][:, x0] * (1 - fx) + f[y1i][:, x1i] * fx
    return top * (1 - fy[:, None]) + bot * fy[:, None]


@pytest.fixture(scope="module")
def scene():
    fulls = [_ellipse(20, 30, 14, 22), _ellipse(50, 70, 18, 12), _ellipse(40, 20, 6, 9)]
    boxes = np.stack([_tight_box(m) for m in fulls])
    size = 64
    cropped = np.stack([crop_mask(encode_binary_mask(m), b, size) for m, b in zip(fulls, boxes)])
    return fulls, boxes, cropped


def test_mask_targets_match_roi_align_of_full_image_masks(scene):
    fulls, boxes, cropped = scene
    rng = np.random.default_rng(0)
    rois, index = [], []
    for g, b in enumerate(boxes):
        for _ in range(6):  # RoIs jittered around the GT box (overlapping it, partly outside)
            h, w = b[2] - b[0], b[3] - b[1]
            jitter = rng.uniform(-0.25, 0.25, 4) * np.asarray([h, w, h, w])
            rois.append(b + jitter)
            index.append(g)
    rois = np.asarray(rois, np.float32)
    got = mask_targets(cropped[None], boxes[None], np.asarray(index)[None], rois[None], size=28).numpy()[0]
    assert got.shape == (len(rois), 28, 28)
    for n, (roi, g) in enumerate(zip(rois, index)):
        ref = _bilinear_full(fulls[g], roi, 28)
        assert np.abs(got[n] - ref).mean() < 0.04, n  # edge pixels: binary crop vs soft raster
        inter = np.sum((got[n] >= 0.5) & (ref >= 0.5))
        union = np.sum((got[n] >= 0.5) | (ref >= 0.5))
        assert inter / union > 0.98, (n, inter / union)


def test_mask_targets_at_the_gt_box_reproduce_the_mask_and_compile(scene):
    _, boxes, cropped = scene
    index = np.asarray([[2, 0, 1, 7, -1]])  # out-of-range rows are clamped, not errors
    rois = boxes[np.clip(index[0], 0, 2)][None]
    fn = tf.function(lambda *a: mask_targets(*a, size=64), jit_compile=True)
    got = fn(tf.constant(cropped[None]), boxes[None], tf.constant(index), rois).numpy()[0]
    np.testing.assert_allclose(got[:3], cropped[[2, 0, 1]], atol=1e-5)
    # a RoI twice the GT box (same centre): the mask shrinks into the middle half, zeros around
    b = boxes[0]
    c, half = (b[:2] + b[2:]) / 2, (b[2:] - b[:2])
    big = np.concatenate([c - half, c + half])[None, None].astype(np.float32)
    t = mask_targets(cropped[None], boxes[None], np.zeros((1, 1), np.int32), big, size=64).numpy()[0, 0]
    assert t[:14].max() == 0 and t[:, :14].max() == 0 and t[51:].max() == 0
    np.testing.assert_allclose(t[16:48, 16:48].mean(), cropped[0].mean(), atol=0.03)


def _bce(x, t):
    return np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))


def test_mask_loss_uses_the_gt_class_channel_and_averages_over_positives():
    rng = np.random.default_rng(1)
    b, n, s, k = 2, 3, 5, 4
    logits = rng.normal(size=(b, n, s, s, k)).astype(np.float32)
    classes = np.asarray([[1, 3, 0], [2, 2, 1]])
    targets = (rng.uniform(size=(b, n, s, s)) > 0.5).astype(np.float32)
    weights = np.asarray([[1, 1, 0], [0, 1, 0]], np.float32)
    expected = np.mean(
        [_bce(logits[i, j, :, :, classes[i, j]], targets[i, j]).mean() for i, j in ((0, 0), (0, 1), (1, 1))]
    )
    got = float(mask_loss(logits, classes, targets, weights))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    first = float(mask_loss(np.moveaxis(logits, -1, 2), classes, targets, weights, channels_last=False))
    np.testing.assert_allclose(first, expected, rtol=1e-5)
    assert float(mask_loss(logits, classes, targets, np.zeros_like(weights))) == 0.0
    np.testing.assert_allclose(
        float(mask_loss(np.zeros_like(logits), classes, targets, weights)), np.log(2.0), rtol=1e-6
    )
    # gradient reaches only the GT-class channel of positive RoIs
    x = tf.Variable(logits)
    with tf.GradientTape() as tape:
        loss = mask_loss(x, classes, targets, weights)
    grad = tape.gradient(loss, x).numpy()
    nonzero = np.argwhere(np.abs(grad).sum(axis=(2, 3)) > 0)
    assert sorted(map(tuple, nonzero)) == [(0, 0, 1), (0, 1, 3), (1, 1, 2)]


# ---------------------------------------------------------------- pasting vs torchvision

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None

_TORCH_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import torch
    from torchvision.models.detection.roi_heads import paste_masks_in_image
    d = np.load(sys.argv[1])
    masks = torch.from_numpy(d["masks"])[:, None]  # [D, 1, S, S]
    boxes = torch.from_numpy(d["boxes_xyxy"])
    out = paste_masks_in_image(masks, boxes, tuple(int(v) for v in d["hw"]), padding=1)
    np.save(sys.argv[2], out[:, 0].numpy())
    """
)


def _paste_case():
    rng = np.random.default_rng(3)
    d, s = 12, 28
    yy, xx = np.mgrid[0:s, 0:s] + 0.5
    centres = rng.uniform(8, 20, (d, 2))
    masks = np.stack([1 / (1 + np.exp(np.hypot(yy - cy, xx - cx) - 6)) for cy, cx in centres]).astype(
        np.float32
    )
    y1, x1 = rng.uniform(-15, 70, d), rng.uniform(-15, 110, d)
    h, w = rng.uniform(3, 60, d), rng.uniform(3, 60, d)
    boxes = np.stack([y1, x1, y1 + h, x1 + w], axis=1).astype(np.float32)  # some cross the borders
    return masks, boxes, (90, 120)


@pytest.mark.skipif(not HAS_TORCHVISION, reason="torchvision is not installed")
def test_paste_masks_match_torchvision(tmp_path):
    masks, boxes, hw = _paste_case()
    inp, out = os.path.join(tmp_path, "in.npz"), os.path.join(tmp_path, "out.npy")
    np.savez(inp, masks=masks, boxes_xyxy=boxes[:, [1, 0, 3, 2]], hw=np.asarray(hw))
    # torchvision runs in its own process: importing it after TensorFlow crashes (STACK_NOTES).
    subprocess.run([sys.executable, "-c", _TORCH_SCRIPT, inp, out], check=True, timeout=300)
    ref = np.load(out)
    got = paste_masks(masks[None], boxes[None], hw).numpy()[0]
    np.testing.assert_allclose(got, ref, atol=1e-5)
    for k in range(len(masks)):
        np.testing.assert_allclose(paste_mask_numpy(masks[k], boxes[k], hw), ref[k], atol=1e-5)
        a, b = got[k] > 0.5, ref[k] > 0.5
        assert a.sum() > 0 and np.sum(a & b) / np.sum(a | b) >= 0.99


def test_paste_masks_xla_and_numpy_agree():
    masks, boxes, hw = _paste_case()
    fn = tf.function(lambda m, b: paste_masks(m, b, hw), jit_compile=True)
    got = fn(masks[None], boxes[None]).numpy()[0]
    assert got.shape == (len(masks), *hw)
    for k in range(len(masks)):
        np.testing.assert_allclose(paste_mask_numpy(masks[k], boxes[k], hw), got[k], atol=1e-5)
    # an all-ones mask pastes to (about) its box, expanded by one mask pixel and softened at the edge
    one = paste_mask_numpy(np.ones((28, 28)), [10.0, 20.0, 66.0, 76.0], hw) > 0.5
    ys, xs = np.nonzero(one)
    assert (ys.min(), xs.min(), ys.max(), xs.max()) == (10, 20, 66, 76)
