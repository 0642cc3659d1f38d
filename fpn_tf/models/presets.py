"""Named model configurations that reproduce another implementation's graph.

``torchvision_v1`` is torchvision's ``fasterrcnn_resnet50_fpn`` (the "v1" COCO
weights, 37.0 box AP): with it, ``fpn_tf.models.weights_torchvision`` imports
that model's state dict and the two networks compute the same detections (see
docs/torchvision_parity.md for the measured agreement).

Every option below is one torchvision hard-codes; the names in the comments are
torchvision's constructor arguments. What cannot be configured and differs:

* the detection pre-NMS cap: torchvision runs per-class NMS on every (box,
  class) above the score threshold, fpn_tf on the best
  ``roi_head.detection_pre_nms_topk`` (5000) of them, for static shapes;
* training-only details (RoI/anchor sampling random streams, loss normalisation
  across a batch) are statistically, not bit-wise, equal.
"""

from __future__ import annotations

import dataclasses

from fpn_tf import detector_types
from fpn_tf.config import ModelConfig, from_dict, to_dict
from fpn_tf.detector_types import TORCHVISION_COCO_NAMES

__all__ = [
    "TORCHVISION_COCO_NAMES",
    "merge_dicts",
    "preset_config",
    "preset_delta",
    "preset_names",
    "resolve_model_config",
    "torchvision_coco_label_map",
    "torchvision_v1_config",
]

# The presets themselves are data of their detector type (one source: fpn_tf.detector_types).
preset_names = detector_types.preset_names
preset_delta = detector_types.preset_delta
merge_dicts = detector_types.merge_dicts


def preset_config(name: str, num_classes: int | None = None, model_type: str = "faster_rcnn") -> ModelConfig:
    """The ModelConfig of preset ``name``: the type's defaults plus the preset's delta."""
    values = {"type": model_type, "preset": name}
    if num_classes is not None:
        values["num_classes"] = int(num_classes)
    return from_dict(ModelConfig, values)


def torchvision_v1_config(num_classes: int = 91, backbone: str = "resnet50") -> ModelConfig:
    """The ModelConfig whose graph equals torchvision's ``fasterrcnn_resnet50_fpn``.

    RGB 0..255 input normalised with ImageNet mean/std × 255 (torchvision divides by
    255 first: the same map), shorter side 800 / longer ≤ 1333, padding to multiples
    of 32; frozen BN with eps 0 and conv1 + layer1 frozen (``trainable_backbone_layers
    =3``); integer-rounded anchors centred at ``index * stride``; RPN top-k 2000/1000
    per level before NMS 0.7 and 2000/1000 per image after it, boxes under 1e-3 px
    dropped; RoIAlign unaligned with 2 samples per bin side; smooth-L1 β = 1/9 in both
    stages; test score > 0.05, per-class NMS 0.5, 100 detections.
    """
    return from_dict(
        ModelConfig,
        {"preset": "torchvision_v1", "num_classes": int(num_classes), "backbone": {"name": backbone}},
    )


def resolve_model_config(
    model_type: str,
    num_classes: int | None,
    backbone: str | dict | None,
    config: ModelConfig | dict | None,
    preset: str | None,
    overrides: dict,
) -> ModelConfig:
    """The ModelConfig a ``build_<detector>(...)`` call asks for (shared by the builders).

    ``config`` is a ModelConfig or a mapping as in YAML (``{"fpn": {"num_channels": 64}}``);
    ``preset`` and ``config`` exclude each other. ``backbone`` is a ResNet name or the
    whole section (a dict of some of its keys, or a BackboneConfig). ``num_classes``, ``backbone`` and
    ``overrides`` (ModelConfig fields: a section as a dict of some of its keys, or as
    its dataclass; a scalar field as a value) apply on top. An unknown key is a
    ConfigError naming it.
    """
    where = f"build_{model_type}"
    if preset is not None and config is not None:
        raise ValueError(f"{where}: pass either config or preset, not both")
    if config is None:
        values = {"type": model_type, "preset": preset or ""}
    else:
        values = to_dict(config) if dataclasses.is_dataclass(config) else dict(config)
        values.setdefault("type", model_type)
    if values["type"] != model_type:
        raise ValueError(f"{where} was given a config of model.type {values['type']!r}")
    delta: dict = {}
    if num_classes is not None:
        delta["num_classes"] = int(num_classes)
    if isinstance(backbone, str):
        delta["backbone"] = {"name": backbone}
    elif backbone is not None:  # the section itself, as for every other section
        delta["backbone"] = to_dict(backbone) if dataclasses.is_dataclass(backbone) else dict(backbone)
    for key, value in overrides.items():
        delta[key] = to_dict(value) if dataclasses.is_dataclass(value) else value
    return from_dict(ModelConfig, merge_dicts(values, delta))


def torchvision_coco_label_map():
    """torchvision's 91-id COCO labelling as a ``LabelMap``: label == COCO category id.

    The 90 ids 1..90 all get a label (the ten ids COCO never used are named "N/A"),
    so label k of a ``torchvision_v1`` model with 91 classes is COCO category k
    and ``to_category_id`` is the identity.
    """
    from fpn_tf.data.label_map import LabelMap  # imports TensorFlow; keep presets light

    return LabelMap(list(range(1, len(TORCHVISION_COCO_NAMES) + 1)), list(TORCHVISION_COCO_NAMES))
