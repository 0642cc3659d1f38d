"""Image and box preprocessing shared by the input pipeline and the serving signatures.

Pure TensorFlow ops that run in graph mode (``tf.data`` maps, ``tf.function``
serving signatures). Boxes are ``(y1, x1, y2, x2)`` float32 pixels; each
docstring says which image's pixels.

The resize rule is torchvision's ``GeneralizedRCNNTransform`` (the FPN paper's
§4 setting: shorter side 800, longer side at most 1333)::

    s = min(min_size / min(h, w), max_size / max(h, w))
    new_h, new_w = floor(h * s), floor(w * s)        # at least 1
    scale = (new_h / h, new_w / w)                   # per axis, for the boxes

computed in float64 like torch's ``interpolate(scale_factor=s,
recompute_scale_factor=True)``, followed by a bilinear resize with half-pixel
centres and no antialiasing (torch's ``align_corners=False``).
"""

from __future__ import annotations

import logging
import threading

import tensorflow as tf

from fpn_tf.config import InputConfig

_LOG = logging.getLogger(__name__)

# Leading bytes of the formats decode_image accepts (JPEG, PNG, GIF, BMP, WebP).
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM")


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
    """Decodes one encoded image to RGB.

    Args:
      encoded: tf.string scalar holding a JPEG, PNG, BMP, GIF (first frame) or
        WebP file. Grayscale becomes RGB (replicated), an alpha channel is dropped.

    Returns:
      uint8 ``[h, w, 3]``.

    Raises:
      tf.errors.InvalidArgumentError: bytes of no supported format ("could not
        decode image ..."); corrupt data of a known format fails in the decoder
        (``DecodeImage`` op) with the decoder's message.
    """
    encoded = tf.convert_to_tensor(encoded, tf.string)
    # Padded so that substr never runs past the end of short inputs.
    head = tf.strings.substr(encoded, 0, 12) + b"\0" * 12
    known = tf.reduce_any(tf.stack([tf.strings.substr(head, 0, len(m)) == m for m in _MAGIC]))
    webp = tf.logical_and(tf.strings.substr(head, 0, 4) == b"RIFF", tf.strings.substr(head, 8, 4) == b"WEBP")
    check = tf.debugging.Assert(
        tf.logical_or(known, webp),
        [
            "could not decode image: the bytes are not a JPEG, PNG, GIF, BMP or WebP file "
            "(empty or corrupt data); number of bytes:",
            tf.strings.length(encoded),
        ],
    )
    with tf.control_dependencies([check]):
        image = tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def compute_resize(orig_hw, min_size, max_size) -> tuple[tf.Tensor, tf.Tensor]:
    """Output size of the torchvision resize rule (see the module docstring).

    Args:
      orig_hw: int ``[2]`` (height, width) of the original image, both > 0.
      min_size: target length of the shorter side.
      max_size: upper bound of the longer side.

    Returns:
      ``new_hw`` int32 ``[2]`` and ``scale`` float32 ``[2]`` = new_hw / orig_hw.
    """
    orig_hw = tf.convert_to_tensor(orig_hw)
    check = tf.debugging.assert_positive(orig_hw, message="compute_resize: image height/width must be > 0")
    with tf.control_dependencies([check]):
        hw = tf.cast(orig_hw, tf.float64)
    s = tf.minimum(
        tf.cast(min_size, tf.float64) / tf.reduce_min(hw), tf.cast(max_size, tf.float64) / tf.reduce_max(hw)
    )
    new = tf.maximum(tf.floor(hw * s), 1.0)
    new_hw = tf.cast(new, tf.int32)
    scale = tf.cast(new_hw, tf.float32) / tf.cast(orig_hw, tf.float32)
    return new_hw, scale


def resize_image(image: tf.Tensor, min_size, max_size) -> tuple[tf.Tensor, tf.Tensor]:
    """Resizes one image with the torchvision rule, bilinear, no antialiasing.

    Args:
      image: uint8 or float ``[h, w, 3]``, RGB in [0, 255].

    Returns:
      ``resized`` float32 ``[new_h, new_w, 3]`` in [0, 255] and ``image_info``
      float32 ``[6]`` = ``(orig_h, orig_w, new_h, new_w, scale_y, scale_x)``.
    """
    image = tf.convert_to_tensor(image)
    orig_hw = tf.shape(image)[:2]
    new_hw, scale = compute_resize(orig_hw, min_size, max_size)
    resized = tf.image.resize(tf.cast(image, tf.float32), new_hw, method="bilinear", antialias=False)
    image_info = tf.concat([tf.cast(orig_hw, tf.float32), tf.cast(new_hw, tf.float32), scale], axis=0)
    return resized, image_info


def padded_size(hw, divisibility: int):
    """Rounds ``hw`` (python ints or an int tensor) up to multiples of ``divisibility``."""
    if divisibility <= 1:
        return hw
    if isinstance(hw, (tuple, list)):
        return tuple(-(-int(v) // divisibility) * divisibility for v in hw)
    return -(-hw // divisibility) * divisibility


def fixed_padded_hw(input_config: InputConfig, portrait: bool = False) -> tuple[int, int]:
    """The fixed padded input size used for batching.

    Any image resized by ``input_config`` whose height <= width fits in
    ``padded_size((min_size, max_size))``; a portrait image fits the transpose.
    """
    short, long_ = padded_size((input_config.min_size, input_config.max_size), input_config.size_divisibility)
    short = max(short, 1)
    return (long_, short) if portrait else (short, long_)


def pad_image(image: tf.Tensor, target_hw) -> tf.Tensor:
    """Zero-pads ``image [h, w, C]`` at the bottom and right to ``target_hw``.

    The output has a static shape when ``target_hw`` is known at trace time.
    """
    image = tf.convert_to_tensor(image)
    target_hw = tf.convert_to_tensor(target_hw, tf.int32)
    hw = tf.shape(image)[:2]
    check = tf.debugging.assert_less_equal(
        hw, target_hw, message="pad_image: the image is larger than the padded size"
    )
    with tf.control_dependencies([check]):
        pad = target_hw - hw
    out = tf.pad(image, [[0, pad[0]], [0, pad[1]], [0, 0]])
    static = tf.get_static_value(target_hw)
    if static is not None:
        out.set_shape([int(static[0]), int(static[1]), image.shape[-1]])
    return out


def resize_boxes(boxes: tf.Tensor, scale: tf.Tensor) -> tf.Tensor:
    """Scales ``boxes [..., 4]`` (y1, x1, y2, x2) by ``scale [2]`` = (scale_y, scale_x)."""
    boxes = tf.convert_to_tensor(boxes, tf.float32)
    scale = tf.convert_to_tensor(scale, tf.float32)
    return boxes * tf.stack([scale[0], scale[1], scale[0], scale[1]])


def clip_boxes(boxes: tf.Tensor, hw) -> tf.Tensor:
    """Clips ``boxes [..., 4]`` (y1, x1, y2, x2) pixels to ``[0, h] x [0, w]``."""
    hw = tf.cast(hw, tf.float32)
    limit = tf.stack([hw[0], hw[1], hw[0], hw[1]])
    return tf.clip_by_value(tf.convert_to_tensor(boxes, tf.float32), 0.0, limit)


def flip_left_right(
    image: tf.Tensor | None, boxes: tf.Tensor, valid_width
) -> tuple[tf.Tensor | None, tf.Tensor]:
    """Mirrors the valid region of an image and its boxes horizontally.

    Args:
      image: ``[h, w, C]`` whose first ``valid_width`` columns hold the picture
        (the rest, if any, is padding and stays in place); None to flip boxes only.
      boxes: float32 ``[n, 4]`` (y1, x1, y2, x2) pixels of that image; all-zero
        rows (padding) stay zero.
      valid_width: width of the picture in pixels.

    Returns:
      ``(image, boxes)`` flipped; ``x1' = valid_width - x2``, ``x2' = valid_width - x1``.
    """
    boxes = tf.convert_to_tensor(boxes, tf.float32)
    vw = tf.cast(valid_width, tf.float32)
    y1, x1, y2, x2 = tf.unstack(boxes, axis=-1)
    flipped = tf.stack([y1, vw - x2, y2, vw - x1], axis=-1)
    is_row = tf.reduce_any(tf.not_equal(boxes, 0.0), axis=-1, keepdims=True)
    boxes = tf.where(is_row, flipped, boxes)
    if image is not None:
        image = tf.convert_to_tensor(image)
        iw = tf.cast(valid_width, tf.int32)
        image = tf.concat([tf.reverse(image[:, :iw], axis=[1]), image[:, iw:]], axis=1)
    return image, boxes


def flip_masks_left_right(masks: tf.Tensor) -> tf.Tensor:
    """Mirrors box-relative masks ``[n, M, M]`` to follow ``flip_left_right`` of their boxes.

    A box-relative mask spans its box, so flipping the box (``x1' = w - x2``)
    and reversing the mask's columns is the whole flip.
    """
    return tf.reverse(masks, axis=[-1])


def pad_gt_masks(masks: tf.Tensor, max_boxes: int) -> tf.Tensor:
    """Pads / truncates box-relative masks ``[n, M, M]`` to ``[G, M, M]`` (padded rows 0), like ``pad_gt``."""
    masks = tf.convert_to_tensor(masks)
    side = masks.shape[-1]
    masks = masks[:max_boxes]
    out = tf.pad(masks, [[0, max_boxes - tf.shape(masks)[0]], [0, 0], [0, 0]])
    out.set_shape([max_boxes, side, side])
    return out


_TRUNCATION_WARNED = threading.Event()


def _warn_truncated(num_boxes, max_boxes):
    if not _TRUNCATION_WARNED.is_set():
        _TRUNCATION_WARNED.set()
        _LOG.warning(
            "an image has %d ground-truth boxes, more than max_gt_boxes=%d: keeping the first %d "
            "(raise input.max_gt_boxes to keep all; this warning is shown once)",
            int(num_boxes),
            int(max_boxes),
            int(max_boxes),
        )
    return 0


def pad_gt(boxes: tf.Tensor, classes: tf.Tensor, max_boxes: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Pads ground truth to a fixed number of rows.

    Args:
      boxes: float32 ``[n, 4]``; classes: int ``[n]``.
      max_boxes: G. With n > G the first G boxes are kept (a warning is logged once).

    Returns:
      ``boxes`` float32 ``[G, 4]`` (padded rows 0) and ``classes`` int32 ``[G]``
      (padded rows -1).
    """
    boxes = tf.reshape(tf.convert_to_tensor(boxes, tf.float32), [-1, 4])
    classes = tf.reshape(tf.cast(classes, tf.int32), [-1])
    n = tf.shape(boxes)[0]
    warned = tf.cond(
        n > max_boxes,
        lambda: tf.py_function(lambda k: _warn_truncated(k, max_boxes), [n], tf.int32),
        lambda: tf.constant(0, tf.int32),
    )
    with tf.control_dependencies([warned]):
        boxes = boxes[:max_boxes]
        classes = classes[:max_boxes]
    pad = max_boxes - tf.shape(boxes)[0]
    boxes = tf.pad(boxes, [[0, pad], [0, 0]])
    classes = tf.pad(classes, [[0, pad]], constant_values=-1)
    boxes.set_shape([max_boxes, 4])
    classes.set_shape([max_boxes])
    return boxes, classes


def normalize_image(images: tf.Tensor, image_info: tf.Tensor, pixel_mean, pixel_std) -> tf.Tensor:
    """``(images - mean) / std`` with the padded area set to exactly 0 (as torchvision).

    Args:
      images: float32 ``[B, H, W, 3]`` RGB in [0, 255], picture at the top-left.
      image_info: float32 ``[B, 6]``; columns 2, 3 are the valid (resized) height, width.
      pixel_mean, pixel_std: 3 floats each (``InputConfig``).

    Returns:
      float32 ``[B, H, W, 3]``. XLA-compatible (static shapes).
    """
    images = tf.convert_to_tensor(images, tf.float32)
    mean = tf.constant(pixel_mean, tf.float32)
    std = tf.constant(pixel_std, tf.float32)
    out = (images - mean) / std
    rows = tf.range(tf.shape(images)[1], dtype=tf.float32)
    cols = tf.range(tf.shape(images)[2], dtype=tf.float32)
    valid_h = image_info[:, 2][:, None]
    valid_w = image_info[:, 3][:, None]
    mask = tf.logical_and((rows[None, :] < valid_h)[:, :, None], (cols[None, :] < valid_w)[:, None, :])
    return out * tf.cast(mask, out.dtype)[..., None]


def preprocess_for_inference(
    image: tf.Tensor, input_config: InputConfig, pad_hw=None
) -> tuple[tf.Tensor, tf.Tensor]:
    """Resizes and pads one image for the network (serving and evaluation).

    Args:
      image: uint8 (or float) ``[h, w, 3]`` RGB.
      input_config: min_size / max_size / size_divisibility.
      pad_hw: padded (H, W); None pads the resized image up to multiples of
        ``size_divisibility``. Use ``fixed_padded_hw`` or ``padded_size((max_size,
        max_size), div)`` for a size every image fits.

    Returns:
      ``image`` float32 ``[H, W, 3]`` in [0, 255], zero padded at the bottom/right,
      and ``image_info`` float32 ``[6]`` (see ``resize_image``).
    """
    resized, image_info = resize_image(image, input_config.min_size, input_config.max_size)
    if pad_hw is None:
        pad_hw = padded_size(tf.shape(resized)[:2], input_config.size_divisibility)
    return pad_image(resized, pad_hw), image_info
