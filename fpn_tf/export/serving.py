"""The serving graph: encoded images, uint8 tensors or tf.Examples -> detections.

``DetectionModule`` wraps a ``FasterRCNN`` in a ``tf.Module`` whose three
``tf.function`` signatures are what ``export_saved_model`` saves (and what
``scripts/predict.py`` runs in-process, so predictions and the SavedModel share
one code path):

==================  ==========================================  ==============
signature           input                                       input name
==================  ==========================================  ==============
serving_default     tf.string ``[B]`` encoded JPEG/PNG/BMP/GIF  encoded_images
image_tensor        uint8 ``[B, h, w, 3]`` RGB                  images
tf_example          tf.string ``[B]`` serialized tf.Example     serialized_examples
                    with the feature ``image/encoded``
==================  ==========================================  ==============

Each image is decoded, resized with the training resize rule and zero padded to
the batch's largest resized size (rounded up to ``size_divisibility``) by the
functions of ``fpn_tf.data.preprocess``; then one batched call of the model's own
``call`` runs. Every signature returns (D detections per image, the model's setting):

- ``detection_boxes`` float32 ``[B, D, 4]``: ``(y1, x1, y2, x2)`` in pixels of the
  ORIGINAL image each client sent (not the resized network input);
- ``detection_boxes_normalized`` float32 ``[B, D, 4]``: the same divided by the
  original (height, width, height, width), in [0, 1];
- ``detection_scores`` float32 ``[B, D]``, sorted in decreasing order;
- ``detection_classes`` int32 ``[B, D]``: the dataset's own category ids (via the
  label map; the contiguous labels 1..K-1 when there is none);
- ``num_detections`` int32 ``[B]``: rows ``[:num_detections]`` are detections, the
  rest are padding (boxes, scores and classes 0).

Mask models (outputs holding ``detection_masks``, e.g. Mask R-CNN) add:

- ``detection_masks`` float32 ``[B, D, M, M]``: each detection's mask probability
  on an M x M grid over its box (box-relative; M = 28). Paste one into image
  pixels with ``fpn_tf.ops.mask_ops.paste_mask_numpy(mask, box, (h, w))``
  (torchvision's ``paste_masks_in_image``), threshold at 0.5 for a binary mask;
- with ``full_image_masks=True`` at export, ``detection_masks_image`` uint8
  ``[B, D, h, w]``: the same pasted into ORIGINAL-image pixels and thresholded
  (1 = instance; h, w = the batch's largest original size, smaller images
  zero-padded at the bottom / right). The size cap: an image over
  ``full_image_max_pixels`` (default 1024 x 1024) original pixels fails the
  request with an InvalidArgumentError naming the cap, since pasting holds
  ``B * D * h * w`` float32 values (400 MB for 100 detections at 1 megapixel).

A model whose outputs hold ``proposal_masks`` (the segment proposer, paper §6)
returns instead (N = ``segment.proposals_per_image``): ``proposal_boxes`` float32
``[B, N, 4]`` (the window each mask covers, original pixels, not clipped),
``proposal_boxes_normalized``, ``proposal_scores`` ``[B, N]`` (decreasing),
``proposal_masks`` float32 ``[B, N, M, M]`` probabilities over the window, and
``num_proposals`` int32 ``[B]``.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from fpn_tf.config import InputConfig
from fpn_tf.data.label_map import LabelMap
from fpn_tf.data.preprocess import (
    declared_image_hw,
    is_known_image_format,
    pad_image,
    padded_size,
    resize_image,
    try_apply,
)
from fpn_tf.ops import mask_ops

SIGNATURE_INPUTS = {
    "serving_default": "encoded_images",
    "image_tensor": "images",
    "tf_example": "serialized_examples",
}
OUTPUT_KEYS = (
    "detection_boxes",
    "detection_boxes_normalized",
    "detection_scores",
    "detection_classes",
    "num_detections",
)
MASK_OUTPUT_KEYS = ("detection_masks", "detection_masks_image")
PROPOSAL_OUTPUT_KEYS = ("proposal_boxes", "proposal_scores", "proposal_masks", "num_proposals")
IMAGE_FEATURE = "image/encoded"
# Cap on an image's pixel count (height x width), checked on the size its header
# declares BEFORE decoding and again on the decoded size: 50 MP is ~150 MB as RGB
# uint8 (and 4x that as float32 while resizing). An 8000 x 8000 PNG of one colour
# is ~80 KB on the wire and would otherwise decode to 192 MB.
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
# Cap on original h * w for the full-image masks of a mask model (detection_masks_image).
FULL_IMAGE_MAX_PIXELS = 1024 * 1024


def identity_label_map(num_classes: int) -> LabelMap:
    """Label map whose category ids are the contiguous labels ``1..num_classes-1``."""
    ids = list(range(1, int(num_classes)))
    return LabelMap(ids, [f"class_{i}" for i in ids])


def _too_large(index, verb: str, hw, max_pixels: int) -> tf.Tensor:
    return tf.strings.format(
        "image too large: element {} of the request " + verb + " {} x {} pixels; the limit is {} pixels "
        "(max_image_pixels)",
        [index, hw[0], hw[1], tf.constant(max_pixels, tf.int64)],
    )


def decode_request_image(encoded: tf.Tensor, index: tf.Tensor, max_pixels: int) -> tf.Tensor:
    """Decodes element ``index`` of a request to uint8 ``[h, w, 3]`` RGB, or fails naming it.

    Checks, in order, each error naming the element's index: the bytes start like
    a JPEG / PNG / GIF / BMP / WebP file; the size its header declares is at most
    ``max_pixels`` (nothing is decoded otherwise); the decoder succeeds.
    """
    known = tf.debugging.Assert(
        is_known_image_format(encoded),
        [
            tf.strings.format(
                "could not decode image: element {} of the request is not a JPEG, PNG, GIF, BMP or WebP "
                "file (empty or corrupt data; {} bytes)",
                [index, tf.strings.length(encoded)],
            )
        ],
    )
    with tf.control_dependencies([known]):
        hw = declared_image_hw(encoded)
    small = tf.debugging.Assert(hw[0] * hw[1] <= max_pixels, [_too_large(index, "declares", hw, max_pixels)])
    with tf.control_dependencies([small]):
        image, ok = try_apply(
            lambda e: tf.io.decode_image(e, channels=3, dtype=tf.uint8, expand_animations=False),
            encoded,
            tf.zeros([0, 0, 3], tf.uint8),
        )
    decoded = tf.debugging.Assert(
        ok,
        [
            tf.strings.format(
                "could not decode image: element {} of the request is corrupt or truncated", [index]
            )
        ],
    )
    with tf.control_dependencies([decoded]):
        image = tf.identity(image)
    image.set_shape([None, None, 3])
    return image


def resize_and_pad_batch(
    images, load_fn, input_config: InputConfig, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> tuple[tf.Tensor, tf.Tensor]:
    """Loads, resizes and pads a batch of images of any sizes into one network input.

    Args:
      images: a tensor whose first axis indexes the images (``[B]`` strings or
        ``[B, h, w, 3]`` uint8).
      load_fn: ``load_fn(element, index)`` maps one element of ``images`` to uint8
        ``[h, w, 3]`` RGB (``index``: its int32 position, for error messages).
      input_config: the model's ``InputConfig`` (resize rule, size_divisibility).
      max_pixels: the largest ``h * w`` accepted per image.

    Returns:
      ``images`` float32 ``[B, H, W, 3]`` in [0, 255] (each resized image at the
      top-left, zero padded; H, W = the largest resized size rounded up to
      ``size_divisibility``) and ``image_info`` float32 ``[B, 6]``
      ``(orig_h, orig_w, valid_h, valid_w, scale_y, scale_x)``.

    Raises:
      tf.errors.InvalidArgumentError: an empty batch, an image that cannot be
        decoded ("could not decode image: element i ...") or one of more than
        ``max_pixels`` pixels ("image too large: element i ...").
    """
    count = tf.shape(images)[0]
    check = tf.debugging.assert_positive(count, message="the request holds no images (batch size 0)")

    def load_and_resize(args):
        index, element = args
        image = load_fn(element, index)
        hw = tf.cast(tf.shape(image)[:2], tf.int64)
        small = tf.debugging.Assert(hw[0] * hw[1] <= max_pixels, [_too_large(index, "has", hw, max_pixels)])
        with tf.control_dependencies([small]):
            resized, info = resize_image(image, input_config.min_size, input_config.max_size)
        return tf.RaggedTensor.from_tensor(resized), info

    with tf.control_dependencies([check]):
        ragged, image_info = tf.map_fn(
            load_and_resize,
            (tf.range(count), images),
            fn_output_signature=(
                tf.RaggedTensorSpec([None, None, 3], tf.float32, ragged_rank=1),
                tf.TensorSpec([6], tf.float32),
            ),
        )
    max_hw = tf.cast(tf.reduce_max(image_info[:, 2:4], axis=0), tf.int32)
    pad_hw = padded_size(max_hw, input_config.size_divisibility)
    batch = tf.map_fn(
        lambda r: pad_image(r.to_tensor(), pad_hw),
        ragged,
        fn_output_signature=tf.TensorSpec([None, None, 3], tf.float32),
    )
    return batch, image_info


def parse_image_examples(serialized: tf.Tensor) -> tf.Tensor:
    """Serialized ``tf.train.Example`` ``[B]`` -> their ``image/encoded`` bytes ``[B]``."""
    features = tf.io.parse_example(serialized, {IMAGE_FEATURE: tf.io.FixedLenFeature([], tf.string)})
    return features[IMAGE_FEATURE]


def _tf_variable(variable) -> tf.Variable:
    """The tf.Variable behind a keras.Variable (TF backend), or ``variable`` itself."""
    value = variable.value if isinstance(variable, keras.Variable) else variable
    if not isinstance(value, tf.Variable):
        raise TypeError(f"cannot export variable {variable.path!r}: its value is a {type(value).__name__}")
    return value


def has_masks(model) -> bool:
    """Whether a detector's outputs hold ``detection_masks`` (a mask model)."""
    outputs = getattr(model, "output", None)
    return isinstance(outputs, dict) and "detection_masks" in outputs


class DetectionModule(tf.Module):
    """A FasterRCNN plus its serving signatures (see the module docstring).

    Args:
      model: a built ``FasterRCNN`` (``model.config`` a ModelConfig); the module
        tracks its variables (``model_variables``) and calls the model itself.
      label_map: maps the model's labels 1..K-1 to category ids; None = identity.
      max_image_pixels: the largest height x width a request's image may have
        (checked on the declared size before decoding; fixed when exported).
      full_image_masks: a mask model also serves ``detection_masks_image``
        (binary masks in original pixels; see the module docstring and its cap).
      full_image_max_pixels: the cap on an image's original h * w for them.
      mask_threshold: the probability at which a pasted pixel counts as instance.
    """

    def __init__(
        self,
        model,
        label_map: LabelMap | None = None,
        name: str = "detection_module",
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        full_image_masks: bool = False,
        full_image_max_pixels: int = FULL_IMAGE_MAX_PIXELS,
        mask_threshold: float = 0.5,
    ):
        super().__init__(name=name)
        if (
            isinstance(max_image_pixels, bool)
            or not isinstance(max_image_pixels, int)
            or max_image_pixels < 1
        ):
            raise ValueError(f"max_image_pixels must be a positive integer, got {max_image_pixels!r}")
        self.max_image_pixels = max_image_pixels
        self.has_masks = has_masks(model)
        if full_image_masks and not self.has_masks:
            raise ValueError("full_image_masks needs a mask model (outputs with detection_masks)")
        self.full_image_masks = bool(full_image_masks)
        self.full_image_max_pixels = int(full_image_max_pixels)
        self.mask_threshold = float(mask_threshold)
        config = model.config
        problem = model.serving_problem()
        if problem:
            raise ValueError(f"cannot serve this model: {problem}")
        if label_map is None:
            label_map = identity_label_map(config.num_classes)
        if label_map.num_classes != config.num_classes:
            raise ValueError(
                f"the label map has {len(label_map)} categories but the model has "
                f"num_classes={config.num_classes} ({config.num_classes - 1} foreground classes)"
            )
        # The model's tf.Variables are tracked as one flat list (the SavedModel stores
        # each once); the Keras model itself is held untracked, since SavedModel
        # cannot save every Keras-internal structure (e.g. a layer dict with integer
        # keys). Tracking the keras.Variable wrappers instead would save a second,
        # never-restored copy of each variable into the TF1 graph that TF Serving
        # and saved_model_cli load, leaving the captured ones uninitialised.
        self.model_variables = [_tf_variable(v) for v in model.variables]
        object.__setattr__(self, "_model", model)  # bypasses tf.Module's tracking
        self.input_config = config.input
        self.label_map = label_map

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None, None, 3], tf.float32, name="images"),
            tf.TensorSpec([None, 6], tf.float32, name="image_info"),
        ]
    )
    def detect(self, images, image_info):
        """The model's own call on a preprocessed batch, plus the output contract.

        Args: images float32 ``[B, H, W, 3]`` and image_info ``[B, 6]`` (docs/design.md).
        Returns: the dict of OUTPUT_KEYS (module docstring).
        """
        return self.detection_outputs(images, image_info)

    def detection_outputs(self, images, image_info) -> dict:
        """``detect``'s body as plain ops (no tf.function), for graphs built around it."""
        outputs = self._model({"images": images, "image_info": image_info}, training=False)
        orig_hw = tf.tile(image_info[:, 0:2], [1, 2])[:, None, :]
        if "proposal_masks" in outputs:  # segment proposals: class-agnostic, passed through
            result = {k: outputs[k] for k in PROPOSAL_OUTPUT_KEYS}
            result["proposal_boxes_normalized"] = outputs["proposal_boxes"] / orig_hw
            return result
        boxes = outputs["detection_boxes"]
        normalized = boxes / orig_hw
        classes = tf.cast(self.label_map.to_category_id_tf(outputs["detection_classes"]), tf.int32)
        result = {
            "detection_boxes": boxes,
            "detection_boxes_normalized": normalized,
            "detection_scores": outputs["detection_scores"],
            "detection_classes": classes,
            "num_detections": outputs["num_detections"],
        }
        if "detection_masks" in outputs:
            result["detection_masks"] = outputs["detection_masks"]
            if self.full_image_masks:
                result["detection_masks_image"] = self._full_image_masks(
                    outputs["detection_masks"], boxes, image_info
                )
        return result

    def _full_image_masks(self, masks, boxes, image_info):
        """Box-relative probabilities -> uint8 [B, D, h, w] binary masks in original pixels."""
        orig_hw = tf.cast(tf.round(image_info[:, 0:2]), tf.int32)
        pixels = orig_hw[:, 0] * orig_hw[:, 1]
        check = tf.debugging.assert_less_equal(
            tf.reduce_max(pixels),
            self.full_image_max_pixels,
            message=(
                f"detection_masks_image is capped at {self.full_image_max_pixels} original pixels per image "
                "(export option full_image_max_pixels); serve larger images box-relative masks"
            ),
        )
        with tf.control_dependencies([check]):
            out_hw = tf.reduce_max(orig_hw, axis=0)
            pasted = mask_ops.paste_masks(masks, boxes, (out_hw[0], out_hw[1]))
        return tf.cast(pasted >= self.mask_threshold, tf.uint8)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=SIGNATURE_INPUTS["serving_default"])])
    def serve_encoded(self, encoded_images):
        """``[B]`` encoded images (each its own size) -> detections."""
        images, image_info = resize_and_pad_batch(
            encoded_images, self._decode, self.input_config, self.max_image_pixels
        )
        return self.detect(images, image_info)

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None, None, 3], tf.uint8, name=SIGNATURE_INPUTS["image_tensor"])
        ]
    )
    def serve_image_tensor(self, images):
        """uint8 ``[B, h, w, 3]`` RGB -> detections."""
        batch, image_info = resize_and_pad_batch(
            images, lambda image, _index: image, self.input_config, self.max_image_pixels
        )
        return self.detect(batch, image_info)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=SIGNATURE_INPUTS["tf_example"])])
    def serve_tf_example(self, serialized_examples):
        """``[B]`` serialized tf.Example with ``image/encoded`` -> detections."""
        encoded = parse_image_examples(serialized_examples)
        images, image_info = resize_and_pad_batch(
            encoded, self._decode, self.input_config, self.max_image_pixels
        )
        return self.detect(images, image_info)

    def _decode(self, encoded, index):
        return decode_request_image(encoded, index, self.max_image_pixels)

    @property
    def model(self):
        """The wrapped FasterRCNN."""
        return self._model

    def signatures(self) -> dict:
        """The concrete functions to save, keyed by signature name."""
        return {
            "serving_default": self.serve_encoded.get_concrete_function(),
            "image_tensor": self.serve_image_tensor.get_concrete_function(),
            "tf_example": self.serve_tf_example.get_concrete_function(),
        }
