"""Import torchvision ``maskrcnn_resnet50_fpn`` weights into ``build_mask_rcnn(preset="torchvision_v1")``.

The backbone, FPN, RPN and box-branch keys map exactly as for Faster R-CNN
(``fpn_tf.models.weights_torchvision``); the mask branch adds

==========================================  =====================================
torchvision key                             fpn_tf layer (``MaskHead``)
==========================================  =====================================
``roi_heads.mask_head.{i}.0.weight/bias``   ``mask_fcn{i+1}`` (3x3 conv, i = 0..3)
``roi_heads.mask_predictor.conv5_mask``     ``conv5_mask`` (2x2 stride-2 transposed)
``roi_heads.mask_predictor.mask_fcn_logits`` ``mask_fcn_logits`` (1x1, K channels)
==========================================  =====================================

torchvision < 0.13 named the convs ``roi_heads.mask_head.mask_fcn{i+1}``; both
layouts are accepted. A ConvTranspose2d weight is ``[in, out, kh, kw]`` and
Keras' Conv2DTranspose kernel ``[kh, kw, out, in]``: the same axis permutation
as a conv's ``[out, in, kh, kw]`` -> ``[kh, kw, in, out]``, and both frameworks
compute the transposed convolution as the gradient of a cross-correlation, so no
spatial flip. Mask channels need no (dx, dy) swap (one channel per class).
"""

from __future__ import annotations

import re

import numpy as np

from fpn_tf.models import weights_torchvision as tv
from fpn_tf.models.weights_torchvision import ImportResult, WeightImportError, read_state_dict

_OLD_MASK_CONV = re.compile(r"^roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)$")


def mask_targets(model) -> list:
    """(torchvision key, variable, transform) of every mask-branch weight of a MaskRCNN."""
    head = getattr(model, "mask_head", None)
    if head is None:
        raise WeightImportError(f"model {model.name!r} has no mask head: build it with build_mask_rcnn")
    targets = []
    for i, conv in enumerate(head.convs):
        targets += tv._conv_targets(conv, f"roi_heads.mask_head.{i}.0")
    targets += tv._conv_targets(head.conv5_mask, "roi_heads.mask_predictor.conv5_mask")
    targets += tv._conv_targets(head.mask_fcn_logits, "roi_heads.mask_predictor.mask_fcn_logits")
    return targets


def torchvision_mask_targets(model) -> list:
    """Every (torchvision key, variable, transform) of a MaskRCNN, in model order."""
    return tv.torchvision_targets(model) + mask_targets(model)


def _normalise_keys(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Old (< 0.13) names -> current ones: rpn.head.conv.* and roi_heads.mask_head.mask_fcn{i}.*."""
    out = {}
    for key, value in state.items():
        old = _OLD_MASK_CONV.match(key)
        if old:
            key = f"roi_heads.mask_head.{int(old.group(1)) - 1}.0.{old.group(2)}"
        elif key.startswith("rpn.head.conv.") and not key.startswith("rpn.head.conv.0.0."):
            key = "rpn.head.conv.0.0." + key[len("rpn.head.conv.") :]
        out[key] = value
    return out


def load_torchvision_mask_state_dict(model, state_dict_or_path) -> ImportResult:
    """Loads a torchvision ``maskrcnn_resnet50_fpn`` state dict into a MaskRCNN.

    Args:
      model: a ``MaskRCNN``, normally ``build_mask_rcnn(preset="torchvision_v1",
        num_classes=...)`` (91 classes for torchvision's COCO weights).
      state_dict_or_path: ``.pth`` / ``.npz`` / mapping (``weights_torchvision.read_state_dict``).

    Returns:
      ImportResult (every key loaded; ``num_batches_tracked`` skipped).

    Raises:
      WeightImportError naming every missing key, unexpected key and shape
      mismatch; nothing is assigned then.
    """
    state = _normalise_keys(read_state_dict(state_dict_or_path))
    ignored = [k for k in state if k.endswith(tv._IGNORED_SUFFIXES)]
    return tv._assign(
        torchvision_mask_targets(model), state, ignored, "the torchvision Mask R-CNN state dict"
    )


def torchvision_mask_state_dict(model) -> dict[str, np.ndarray]:
    """The inverse of ``load_torchvision_mask_state_dict``: a MaskRCNN's weights in torchvision's layout."""
    return {
        t.key: np.ascontiguousarray(t.inverse(t.variable.numpy())) for t in torchvision_mask_targets(model)
    }


def is_mask_state_dict(state: dict) -> bool:
    """Whether a torchvision detection state dict holds a mask branch."""
    return any(k.startswith("roi_heads.mask_") for k in state)


def infer_torchvision_mask_config(state_dict_or_path):
    """The ``mask_rcnn`` / ``torchvision_v1`` ModelConfig whose shapes fit a Mask R-CNN state dict.

    As ``weights_torchvision.infer_torchvision_config`` (depth, width, FPN
    channels, fc dimension, classes) plus the mask head's conv count and width.
    """
    from fpn_tf.config import MaskHeadConfig, ModelConfig, from_dict, to_dict

    if not isinstance(state_dict_or_path, dict):
        state_dict_or_path = read_state_dict(state_dict_or_path)
    state = _normalise_keys(state_dict_or_path)
    if "roi_heads.mask_predictor.mask_fcn_logits.weight" not in state:
        raise WeightImportError(
            "not a torchvision Mask R-CNN state dict: no roi_heads.mask_predictor.mask_fcn_logits.weight"
        )
    box = tv.infer_torchvision_config(state)
    convs = sorted({int(k.split(".")[2]) for k in state if k.startswith("roi_heads.mask_head.")})
    values = to_dict(box)
    values["type"] = "mask_rcnn"
    values["input"]["mask_size"] = 56
    values["mask_head"] = {
        **to_dict(MaskHeadConfig()),
        "num_convs": len(convs),
        "conv_channels": int(state["roi_heads.mask_predictor.conv5_mask.weight"].shape[1]),
    }
    return from_dict(ModelConfig, values)
