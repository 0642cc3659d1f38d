"""fpn_tf.data.preprocess: decoding, the torchvision resize rule, flip / pad / GT padding."""

from __future__ import annotations

import io
import logging
import math

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from fpn_tf.config import InputConfig
from fpn_tf.data import preprocess

RGB = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)


def _encode(array: np.ndarray, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _decode(data: bytes) -> np.ndarray:
    return preprocess.decode_image(tf.constant(data)).numpy()


@pytest.mark.parametrize("fmt", ["PNG", "BMP"])
def test_decode_lossless_rgb(fmt):
    out = _decode(_encode(RGB, fmt))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, RGB)


def test_decode_jpeg_made_by_tf():
    yy, xx = np.mgrid[0:16, 0:12]
    smooth = np.stack([xx * 20, yy * 15, np.full((16, 12), 90)], -1).astype(np.uint8)
    out = _decode(tf.io.encode_jpeg(tf.constant(smooth), quality=100).numpy())
    assert out.shape == (16, 12, 3)
    error = np.abs(out.astype(int) - smooth.astype(int))
    assert error.mean() < 4 and error.max() <= 16  # lossy (chroma subsampling), but the same picture


def test_decode_gif_first_frame():
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    first = palette[np.arange(35).reshape(5, 7) % 3]
    second = palette[(np.arange(35).reshape(5, 7) + 1) % 3]
    buf = io.BytesIO()
    Image.fromarray(first).save(buf, format="GIF", save_all=True, append_images=[Image.fromarray(second)])
    out = _decode(buf.getvalue())
    assert out.shape == (5, 7, 3)
    np.testing.assert_array_equal(out, first)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_decode_grayscale_becomes_rgb(fmt):
    gray = RGB[..., 0]
    out = _decode(_encode(gray, fmt, **({"quality": 100} if fmt == "JPEG" else {})))
    assert out.shape == (5, 7, 3)
    np.testing.assert_array_equal(out[..., 0], out[..., 1])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    if fmt == "PNG":
        np.testing.assert_array_equal(out[..., 0], gray)


def test_decode_rgba_drops_alpha():
    rgba = np.dstack([RGB, np.full((5, 7), 7, np.uint8)])
    np.testing.assert_array_equal(_decode(_encode(rgba, "PNG")), RGB)
    np.testing.assert_array_equal(_decode(tf.io.encode_png(tf.constant(rgba)).numpy()), RGB)


def test_decode_in_graph_mode_has_static_channels():
    fn = tf.function(preprocess.decode_image, input_signature=[tf.TensorSpec([], tf.string)])
    assert fn.get_concrete_function().structured_outputs.shape.as_list() == [None, None, 3]
    np.testing.assert_array_equal(fn(tf.constant(_encode(RGB, "PNG"))).numpy(), RGB)


@pytest.mark.parametrize("data", [b"", b"this is not an image at all", b"\x00" * 64])
def test_decode_garbage_raises_clear_error(data):
    with pytest.raises(tf.errors.InvalidArgumentError, match="could not decode image"):
        _decode(data)


def test_decode_truncated_png_raises():
    with pytest.raises(tf.errors.InvalidArgumentError, match="(?i)decode"):
        _decode(_encode(RGB, "PNG")[:40])


def _torchvision_size(h, w, min_size, max_size):
    """torchvision's GeneralizedRCNNTransform: python float scale, floor(size * scale)."""
    scale = min(min_size / min(h, w), max_size / max(h, w))
    return max(math.floor(h * scale), 1), max(math.floor(w * scale), 1)


@pytest.mark.parametrize(
    "hw, expected",
    [
        ((480, 640), (800, 1066)),
        ((640, 480), (1066, 800)),
        ((427, 640), (800, 1199)),
        ((600, 800), (800, 1066)),
        ((400, 2000), (266, 1333)),  # long side binds
        ((800, 1333), (800, 1333)),
        ((1, 1), (800, 800)),
        ((4000, 6000), (800, 1200)),
        ((3, 1000), (3, 1333)),
    ],
)
def test_compute_resize_800_1333(hw, expected):
    new_hw, scale = preprocess.compute_resize(tf.constant(hw), 800, 1333)
    assert tuple(new_hw.numpy()) == expected == _torchvision_size(*hw, 800, 1333)
    np.testing.assert_allclose(scale.numpy(), np.array(expected) / np.array(hw), rtol=1e-6)


def test_compute_resize_matches_torchvision_rule_on_many_sizes():
    rng = np.random.default_rng(1)
    sizes = rng.integers(1, 3000, (300, 2))
    for min_size, max_size in ((800, 1333), (600, 1000), (256, 256)):
        new_hw = tf.map_fn(
            lambda hw, a=min_size, b=max_size: preprocess.compute_resize(hw, a, b)[0],
            tf.constant(sizes, tf.int32),
        ).numpy()
        expected = [_torchvision_size(int(h), int(w), min_size, max_size) for h, w in sizes]
        np.testing.assert_array_equal(new_hw, np.array(expected))


def _torch_bilinear(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """torch.nn.functional.interpolate(mode='bilinear', align_corners=False) in numpy."""

    def axis(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    y0, y1, fy = axis(image.shape[0], out_h)
    x0, x1, fx = axis(image.shape[1], out_w)
    img = image.astype(np.float64)
    top = img[y0][:, x0] * (1 - fx)[None, :, None] + img[y0][:, x1] * fx[None, :, None]
    bottom = img[y1][:, x0] * (1 - fx)[None, :, None] + img[y1][:, x1] * fx[None, :, None]
    return top * (1 - fy)[:, None, None] + bottom * fy[:, None, None]


def test_resize_image_matches_torch_interpolate_and_reports_info():
    image = np.random.default_rng(2).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    resized, info = preprocess.resize_image(tf.constant(image), 10, 20)
    assert resized.dtype == tf.float32 and resized.shape == (10, 15, 3)
    np.testing.assert_allclose(resized.numpy(), _torch_bilinear(image, 10, 15), atol=1e-3)
    np.testing.assert_allclose(info.numpy(), [6, 9, 10, 15, 10 / 6, 15 / 9], rtol=1e-6)
    down, _ = preprocess.resize_image(tf.constant(image), 3, 20)
    np.testing.assert_allclose(down.numpy(), _torch_bilinear(image, 3, 4), atol=1e-3)


def test_resize_tiny_and_huge_images():
    tiny, info = preprocess.resize_image(tf.fill([1, 1, 3], tf.constant(200, tf.uint8)), 800, 1333)
    assert tiny.shape == (800, 800, 3)
    np.testing.assert_allclose(tiny.numpy(), 200.0)
    np.testing.assert_allclose(info.numpy(), [1, 1, 800, 800, 800, 800])
    huge, info = preprocess.resize_image(tf.zeros([4000, 6000, 3], tf.uint8), 800, 1333)
    assert huge.shape == (800, 1200, 3)
    np.testing.assert_allclose(info.numpy(), [4000, 6000, 800, 1200, 0.2, 0.2], rtol=1e-6)


def test_padded_size_and_pad_image():
    assert preprocess.padded_size((800, 1333), 64) == (832, 1344)
    assert preprocess.padded_size((64, 1), 32) == (64, 32)
    np.testing.assert_array_equal(preprocess.padded_size(tf.constant([800, 1333]), 32).numpy(), [800, 1344])
    assert preprocess.fixed_padded_hw(InputConfig()) == (832, 1344)
    assert preprocess.fixed_padded_hw(InputConfig(), portrait=True) == (1344, 832)
    image = tf.ones([3, 5, 3])
    padded = preprocess.pad_image(image, (4, 8))
    assert padded.shape == (4, 8, 3)
    np.testing.assert_array_equal(padded.numpy()[:3, :5], 1.0)
    assert padded.numpy().sum() == 15 * 3
    with pytest.raises(tf.errors.InvalidArgumentError, match="larger than the padded size"):
        preprocess.pad_image(image, (2, 8))


def test_flip_left_right_image_and_boxes_agree_and_round_trip():
    width = 12
    image = np.zeros((8, 16, 1), np.float32)  # 12 valid columns + 4 padding columns
    image[2:5, 1:4] = 1.0
    image[:, 12:] = 7.0  # padding must stay where it is
    boxes = tf.constant([[2.0, 1.0, 5.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    flipped_image, flipped_boxes = preprocess.flip_left_right(tf.constant(image), boxes, width)
    np.testing.assert_allclose(flipped_boxes.numpy(), [[2.0, 8.0, 5.0, 11.0], [0.0, 0.0, 0.0, 0.0]])
    fi = flipped_image.numpy()
    np.testing.assert_array_equal(fi[:, 12:], 7.0)
    ys, xs = np.nonzero(fi[:, :12, 0] == 1.0)
    assert (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1) == (2, 8, 5, 11)
    back_image, back_boxes = preprocess.flip_left_right(flipped_image, flipped_boxes, width)
    np.testing.assert_array_equal(back_image.numpy(), image)
    np.testing.assert_allclose(back_boxes.numpy(), boxes.numpy())


def test_resize_boxes_round_trip_and_clip():
    boxes = tf.constant([[10.0, 20.0, 110.0, 220.0], [0.0, 0.0, 5.0, 5.0]])
    scale = tf.constant([800 / 480, 1066 / 640])
    there = preprocess.resize_boxes(boxes, scale)
    np.testing.assert_allclose(
        there.numpy()[0], [10 * 800 / 480, 20 * 1066 / 640, 110 * 800 / 480, 220 * 1066 / 640]
    )
    np.testing.assert_allclose(preprocess.resize_boxes(there, 1.0 / scale).numpy(), boxes.numpy(), rtol=1e-6)
    clipped = preprocess.clip_boxes(tf.constant([[-3.0, 4.0, 50.0, 70.0]]), (40, 60))
    np.testing.assert_allclose(clipped.numpy(), [[0.0, 4.0, 40.0, 60.0]])


def test_pad_gt_pads_and_truncates_with_one_warning(caplog):
    boxes, classes = preprocess.pad_gt(tf.constant([[1.0, 2.0, 3.0, 4.0]]), tf.constant([3]), 4)
    np.testing.assert_allclose(boxes.numpy(), [[1, 2, 3, 4], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(classes.numpy(), [3, -1, -1, -1])
    assert classes.dtype == tf.int32
    empty_boxes, empty_classes = preprocess.pad_gt(tf.zeros([0, 4]), tf.zeros([0], tf.int64), 2)
    np.testing.assert_array_equal(empty_classes.numpy(), [-1, -1])
    assert empty_boxes.shape == (2, 4)

    preprocess._TRUNCATION_WARNED.clear()
    many = tf.reshape(tf.range(24, dtype=tf.float32), [6, 4])
    with caplog.at_level(logging.WARNING, logger="fpn_tf.data.preprocess"):
        boxes, classes = preprocess.pad_gt(many, tf.range(1, 7), 3)
        preprocess.pad_gt(many, tf.range(1, 7), 3)
        graph = tf.function(lambda b, c: preprocess.pad_gt(b, c, 3))
        graph(many, tf.range(1, 7))
    np.testing.assert_allclose(boxes.numpy(), many.numpy()[:3])
    np.testing.assert_array_equal(classes.numpy(), [1, 2, 3])
    warnings = [r for r in caplog.records if "max_gt_boxes=3" in r.getMessage()]
    assert len(warnings) == 1 and "6 ground-truth boxes" in warnings[0].getMessage()


def test_preprocess_for_inference_shapes_and_serving_signature():
    cfg = InputConfig(min_size=64, max_size=100, size_divisibility=32)
    image = tf.constant(np.full((30, 50, 3), 9, np.uint8))
    out, info = preprocess.preprocess_for_inference(image, cfg)
    assert out.shape == (64, 128, 3)  # the long side binds: 60 x 100, padded to multiples of 32
    np.testing.assert_allclose(info.numpy(), [30, 50, 60, 100, 2, 2], rtol=1e-6)
    np.testing.assert_allclose(out.numpy()[:60, :100], 9.0)
    assert out.numpy()[60:].max() == 0.0 and out.numpy()[:, 100:].max() == 0.0

    pad_hw = preprocess.padded_size((cfg.max_size, cfg.max_size), cfg.size_divisibility)
    serve = tf.function(
        lambda data: preprocess.preprocess_for_inference(preprocess.decode_image(data), cfg, pad_hw),
        input_signature=[tf.TensorSpec([], tf.string)],
    )
    out, info = serve(tf.constant(_encode(np.zeros((50, 30, 3), np.uint8), "PNG")))
    assert out.shape == (128, 128, 3)
    np.testing.assert_allclose(info.numpy()[:4], [50, 30, 100, 60])


def test_normalize_image_zeroes_padding_under_xla():
    images = tf.fill([2, 4, 6, 3], 100.0)
    info = tf.constant([[3, 5, 3, 5, 1, 1], [4, 6, 4, 6, 1, 1]], tf.float32)
    fn = tf.function(
        lambda x, i: preprocess.normalize_image(x, i, (100.0, 50.0, 0.0), (1.0, 2.0, 4.0)), jit_compile=True
    )
    out = fn(images, info).numpy()
    np.testing.assert_allclose(out[0, :3, :5], np.broadcast_to([0.0, 25.0, 25.0], (3, 5, 3)))
    assert np.all(out[0, 3:] == 0) and np.all(out[0, :, 5:] == 0)
    np.testing.assert_allclose(out[1], np.broadcast_to([0.0, 25.0, 25.0], (4, 6, 3)))
