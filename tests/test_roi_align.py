"""RoIAlign (fpn_tf.ops.roi_align) and FPN level assignment (fpn_tf.ops.level_assignment)."""

import importlib.util
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from fpn_tf.ops.level_assignment import assign_levels
from fpn_tf.ops.roi_align import multilevel_roi_align, roi_align


def reference_roi_align(feature, box, spatial_scale, output_size, sampling_ratio, aligned):
    """torchvision's CPU roi_align for one box, transcribed loop by loop (float32).

    feature: [H, W, C]; box: (y1, x1, y2, x2) input pixels. Returns [S, S, C].
    """
    f32 = np.float32
    height, width, channels = feature.shape
    offset = f32(0.5) if aligned else f32(0.0)
    y1, x1, y2, x2 = (f32(v) for v in box)
    scale = f32(spatial_scale)
    start_h, start_w = y1 * scale - offset, x1 * scale - offset
    roi_h, roi_w = (y2 * scale - offset) - start_h, (x2 * scale - offset) - start_w
    if not aligned:
        roi_h, roi_w = max(roi_h, f32(1)), max(roi_w, f32(1))
    bin_h, bin_w = roi_h / f32(output_size), roi_w / f32(output_size)
    out = np.zeros([output_size, output_size, channels], np.float32)
    for ph in range(output_size):
        for pw in range(output_size):
            acc = np.zeros(channels, np.float32)
            for iy in range(sampling_ratio):
                yy = start_h + f32(ph) * bin_h + f32(iy + 0.5) * bin_h / f32(sampling_ratio)
                for ix in range(sampling_ratio):
                    xx = start_w + f32(pw) * bin_w + f32(ix + 0.5) * bin_w / f32(sampling_ratio)
                    y, x = yy, xx
                    if y < -1.0 or y > height or x < -1.0 or x > width:
                        continue
                    y, x = max(y, f32(0)), max(x, f32(0))
                    y_low, x_low = int(y), int(x)
                    if y_low >= height - 1:
                        y_high = y_low = height - 1
                        y = f32(y_low)
                    else:
                        y_high = y_low + 1
                    if x_low >= width - 1:
                        x_high = x_low = width - 1
                        x = f32(x_low)
                    else:
                        x_high = x_low + 1
                    ly, lx = y - f32(y_low), x - f32(x_low)
                    hy, hx = f32(1) - ly, f32(1) - lx
                    acc += (
                        hy * hx * feature[y_low, x_low]
                        + hy * lx * feature[y_low, x_high]
                        + ly * hx * feature[y_high, x_low]
                        + ly * lx * feature[y_high, x_high]
                    )
            out[ph, pw] = acc / f32(sampling_ratio * sampling_ratio)
    return out


def reference_batch(feature, boxes, spatial_scale, output_size, sampling_ratio, aligned):
    return np.stack(
        [
            np.stack(
                [
                    reference_roi_align(feature[b], box, spatial_scale, output_size, sampling_ratio, aligned)
                    for box in boxes[b]
                ]
            )
            for b in range(len(boxes))
        ]
    )


# (y1, x1, y2, x2) in input pixels, stride 4 on a 6 x 7 map (24 x 28 pixels).
BOXES = np.array(
    [
        [
            [0.0, 0.0, 24.0, 28.0],  # the whole map
            [3.3, 5.1, 17.9, 20.2],
            [-10.0, -6.0, 9.0, 12.0],  # partly outside (top-left)
            [15.0, 20.0, 40.0, 45.0],  # partly outside (bottom-right)
            [10.0, 10.0, 11.0, 10.5],  # smaller than one feature pixel
            [7.0, 7.0, 7.0, 7.0],  # zero size
            [-30.0, -30.0, -12.0, -10.0],  # outside
            [22.5, 26.5, 23.9, 27.9],  # last row / column
        ],
        [
            [1.0, 2.0, 5.0, 27.0],
            [0.0, 0.0, 4.0, 4.0],
            [20.0, 0.0, 24.0, 28.0],
            [2.0, 2.0, 22.0, 26.0],
            [5.5, 6.5, 6.0, 7.0],
            [-2.0, -2.0, 1.0, 1.0],
            [0.0, 25.0, 24.0, 30.0],
            [12.0, 3.0, 13.0, 4.0],
        ],
    ],
    np.float32,
)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("output_size, sampling_ratio", [(3, 2), (2, 3)])
def test_roi_align_matches_reference(aligned, output_size, sampling_ratio):
    rng = np.random.default_rng(0)
    feature = rng.normal(size=(2, 6, 7, 3)).astype(np.float32)
    out = roi_align(feature, BOXES, 0.25, output_size, sampling_ratio, aligned)
    assert out.shape == (2, 8, output_size, output_size, 3) and out.dtype == tf.float32
    expected = reference_batch(feature, BOXES, 0.25, output_size, sampling_ratio, aligned)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out.numpy()[0, 6], 0.0)  # a box outside the map pools zeros


def test_roi_align_constant_and_ramp_maps():
    """On a constant map every bin inside the map is the constant; on a ramp, the sample mean."""
    feature = np.full([1, 5, 5, 1], 3.0, np.float32)
    out = roi_align(feature, [[[0.0, 0.0, 10.0, 10.0]]], 0.5, output_size=2, sampling_ratio=2)
    np.testing.assert_allclose(out.numpy(), 3.0, rtol=1e-6)
    ramp = np.tile(np.arange(8, dtype=np.float32)[None, :, None, None], [1, 1, 8, 1])  # value = row
    out = roi_align(ramp, [[[2.0, 2.0, 6.0, 6.0]]], 1.0, output_size=2, sampling_ratio=2, aligned=True)
    # aligned rows: 1.5 + (0.5, 1.5, 2.5, 3.5); bins average pairs: 2.5 and 4.5.
    np.testing.assert_allclose(out.numpy()[0, 0, :, :, 0], [[2.5, 2.5], [4.5, 4.5]], rtol=1e-6)


def test_bfloat16_features_are_pooled_in_float32():
    rng = np.random.default_rng(8)
    feature = rng.normal(size=(2, 6, 7, 3)).astype(np.float32)
    low = tf.cast(feature, tf.bfloat16)
    out = roi_align(low, BOXES, 0.25, 3, 2)
    assert out.dtype == tf.bfloat16
    expected = roi_align(tf.cast(low, tf.float32), BOXES, 0.25, 3, 2)  # the same inputs, in float32
    np.testing.assert_array_equal(out.numpy(), tf.cast(expected, tf.bfloat16).numpy())


def test_roi_align_gradient_matches_finite_differences():
    rng = np.random.default_rng(1)
    feature = tf.constant(rng.normal(size=(1, 4, 5, 2)), tf.float64)
    boxes = tf.constant([[[0.5, 1.0, 9.0, 12.0], [-3.0, 4.0, 6.0, 25.0]]], tf.float32)

    def pooled(f):
        return roi_align(f, boxes, 0.5, output_size=2, sampling_ratio=2, aligned=True)

    theoretical, numerical = tf.test.compute_gradient(pooled, [feature])
    np.testing.assert_allclose(theoretical[0], numerical[0], atol=1e-6)
    assert np.abs(theoretical[0]).sum() > 0


def levels_features(rng, batch=2, channels=3):
    # A 64 x 96 input: P2 16 x 24, P3 8 x 12, P4 4 x 6, P5 2 x 3 (P6 is ignored).
    return {
        f"P{k}": rng.normal(size=(batch, 64 // 2**k, 96 // 2**k, channels)).astype(np.float32)
        for k in range(2, 7)
    }


MULTI_BOXES = np.array(
    [
        [[0, 0, 20, 20], [5, 5, 60, 90], [10, 10, 130, 130], [-20, 30, 500, 600], [30, 40, 31, 41]],
        [[2, 3, 50, 60], [0, 0, 64, 96], [40, 80, 64, 96], [1, 1, 2, 2], [0, 0, 250, 250]],
    ],
    np.float32,
)


@pytest.mark.parametrize("aligned", [True, False])
def test_multilevel_equals_per_level(aligned):
    rng = np.random.default_rng(2)
    features = levels_features(rng)
    out = multilevel_roi_align(features, MULTI_BOXES, output_size=3, sampling_ratio=2, aligned=aligned)
    assert out.shape == (2, 5, 3, 3, 3)
    levels = assign_levels(MULTI_BOXES).numpy()
    assert set(levels.ravel()) == {2, 3, 4, 5}
    for b in range(2):
        for n in range(5):
            k = levels[b, n]
            single = roi_align(
                features[f"P{k}"][b : b + 1], MULTI_BOXES[b : b + 1, n : n + 1], 2.0**-k, 3, 2, aligned
            )
            np.testing.assert_allclose(out.numpy()[b, n], single.numpy()[0, 0], rtol=1e-6, atol=1e-6)


def test_multilevel_gradient_equals_per_level_gradient():
    rng = np.random.default_rng(3)
    features = {k: tf.constant(v) for k, v in levels_features(rng).items()}
    weights = rng.normal(size=(2, 5, 2, 2, 3)).astype(np.float32)
    levels = assign_levels(MULTI_BOXES).numpy()

    def per_level(features):
        rows = []
        for b in range(2):
            rows.append(
                tf.concat(
                    [
                        roi_align(
                            features[f"P{levels[b, n]}"][b : b + 1],
                            MULTI_BOXES[b : b + 1, n : n + 1],
                            2.0 ** -int(levels[b, n]),
                            output_size=2,
                        )
                        for n in range(5)
                    ],
                    axis=1,
                )
            )
        return tf.concat(rows, axis=0)

    grads = []
    for pool in [lambda f: multilevel_roi_align(f, MULTI_BOXES, output_size=2), per_level]:
        with tf.GradientTape() as tape:
            tape.watch(features)
            loss = tf.reduce_sum(pool(features) * weights)
        grads.append(tape.gradient(loss, features))
    for k in range(2, 6):
        multi = tf.convert_to_tensor(grads[0][f"P{k}"]).numpy()
        assert np.abs(multi).sum() > 0, f"no gradient reaches P{k}"
        np.testing.assert_allclose(
            multi, tf.convert_to_tensor(grads[1][f"P{k}"]).numpy(), rtol=1e-5, atol=1e-6
        )
    assert grads[0]["P6"] is None  # outside min_level..max_level


def test_xla_equals_eager():
    rng = np.random.default_rng(4)
    features = levels_features(rng)
    single = features["P2"]

    def run(features, single, boxes):
        return (
            multilevel_roi_align(features, boxes, output_size=3),
            roi_align(single, boxes, 0.25, output_size=3, aligned=False),
        )

    eager = run(features, single, MULTI_BOXES)
    compiled = tf.function(run, jit_compile=True)(features, single, MULTI_BOXES)
    for e, c in zip(eager, compiled):
        np.testing.assert_allclose(e.numpy(), c.numpy(), rtol=1e-6, atol=1e-6)

    def grad(single, boxes):
        with tf.GradientTape() as tape:
            tape.watch(single)
            loss = tf.reduce_sum(roi_align(single, boxes, 0.25, output_size=3) ** 2)
        return tape.gradient(loss, single)

    np.testing.assert_allclose(
        grad(tf.constant(single), MULTI_BOXES).numpy(),
        tf.function(grad, jit_compile=True)(tf.constant(single), MULTI_BOXES).numpy(),
        rtol=1e-5,
        atol=1e-5,
    )


def test_bad_arguments_raise_clear_errors():
    feature = np.zeros([1, 4, 4, 2], np.float32)
    boxes = np.zeros([1, 1, 4], np.float32)
    with pytest.raises(ValueError, match="adaptive sampling"):
        roi_align(feature, boxes, 1.0, sampling_ratio=0)
    with pytest.raises(ValueError, match="output_size"):
        roi_align(feature, boxes, 1.0, output_size=0)
    with pytest.raises(ValueError, match="feature must be"):
        roi_align(feature[0], boxes, 1.0)
    with pytest.raises(ValueError, match="boxes must be"):
        roi_align(feature, boxes[0], 1.0)
    with pytest.raises(ValueError, match=r"lack level\(s\) \['P5'\]"):
        multilevel_roi_align({"P2": feature, "P3": feature, "P4": feature}, boxes)


# ---- level assignment, eq. (1) ----


def square(size, y=0.0, x=0.0):
    return [y, x, y + size, x + size]


def test_assign_levels_eq1():
    boxes = np.array(
        [square(224), square(112), square(448), square(223.9), square(111.99), square(56), square(896)],
        np.float32,
    )
    assert assign_levels(boxes).numpy().tolist() == [4, 3, 5, 3, 2, 2, 5]
    assert assign_levels(boxes, min_level=2, max_level=6).numpy().tolist() == [4, 3, 5, 3, 2, 2, 6]
    # Rectangles use sqrt(w * h): 112 x 448 has the area of 224 x 224.
    assert assign_levels(np.array([[0, 0, 112, 448]], np.float32)).numpy().tolist() == [4]


def test_assign_levels_clamps_and_degenerate_boxes():
    boxes = np.array(
        [square(1.0), square(1e5), [5, 5, 5, 9], [3, 3, 3, 3], [10, 10, 4, 20], square(1e-3)], np.float32
    )
    assert assign_levels(boxes).numpy().tolist() == [2, 5, 2, 2, 2, 2]
    nested = assign_levels(np.tile(boxes[None], [2, 1, 1]))
    assert nested.shape == (2, 6) and nested.dtype == tf.int32


def test_assign_levels_matches_torchvision_formula_and_compiles():
    rng = np.random.default_rng(5)
    sizes = np.exp(rng.uniform(np.log(4), np.log(1500), (300, 2))).astype(np.float32)
    boxes = np.concatenate([np.zeros_like(sizes), sizes], 1)
    expected = np.clip(np.floor(4 + np.log2(np.sqrt(sizes[:, 0] * sizes[:, 1]) / 224.0) + 1e-6), 2, 5).astype(
        np.int32
    )
    np.testing.assert_array_equal(assign_levels(boxes).numpy(), expected)
    compiled = tf.function(assign_levels, jit_compile=True)(boxes)
    np.testing.assert_array_equal(compiled.numpy(), expected)
    with pytest.raises(ValueError, match="min_level"):
        assign_levels(boxes, min_level=5, max_level=2)


TORCHVISION_SCRIPT = """
import sys
import numpy as np
import torch
import torchvision

data = dict(np.load(sys.argv[1]))
to_nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
rois = lambda boxes: [torch.from_numpy(np.ascontiguousarray(b[:, [1, 0, 3, 2]])) for b in boxes]  # xyxy
out = {}
for aligned in (True, False):
    pooled = torchvision.ops.roi_align(to_nchw(data["feature"]), rois(data["boxes"]), 3, 0.25, 2, aligned)
    out[f"single_{aligned}"] = pooled.numpy()
pooler = torchvision.ops.MultiScaleRoIAlign(["P2", "P3", "P4", "P5"], output_size=3, sampling_ratio=2)
features = {k: to_nchw(data[k]) for k in ["P2", "P3", "P4", "P5"]}
out["multi"] = pooler(features, rois(data["multi_boxes"]), [(64, 96)] * 2).numpy()
np.savez(sys.argv[2], **out)
"""


def test_matches_torchvision_when_available(tmp_path):
    """Parity with torchvision.ops.roi_align / MultiScaleRoIAlign (aligned=False), run in a
    separate process: importing torchvision after TensorFlow can crash the interpreter."""
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision not installed")
    rng = np.random.default_rng(6)
    feature = rng.normal(size=(2, 6, 7, 3)).astype(np.float32)
    features = levels_features(rng)
    np.savez(tmp_path / "in.npz", feature=feature, boxes=BOXES, multi_boxes=MULTI_BOXES, **features)
    subprocess.run(
        [sys.executable, "-c", TORCHVISION_SCRIPT, str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
        check=True,
        timeout=300,
    )
    theirs = np.load(tmp_path / "out.npz")
    for aligned in (True, False):
        ours = roi_align(feature, BOXES, 0.25, 3, 2, aligned).numpy()
        expected = theirs[f"single_{aligned}"].transpose(0, 2, 3, 1).reshape(ours.shape)
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)
    ours = multilevel_roi_align(features, MULTI_BOXES, output_size=3, sampling_ratio=2, aligned=False).numpy()
    expected = theirs["multi"].transpose(0, 2, 3, 1).reshape(ours.shape)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)
