"""``build_model(config)``: the detector that ``model.type`` names.

MODEL_TYPES is written out here (no registry filled by imports): adding a detector
adds one line, "type": "module:Class", and the module is imported only when used.
"""

from __future__ import annotations

import importlib

from fpn_tf.config import MODEL_TYPES as CONFIG_MODEL_TYPES
from fpn_tf.config import ModelConfig

MODEL_TYPES: dict[str, str] = {
    "faster_rcnn": "fpn_tf.models.faster_rcnn:FasterRCNN",
    "mask_rcnn": "fpn_tf.models.mask_rcnn:MaskRCNN",
    "retinanet": "fpn_tf.models.retinanet:RetinaNet",
    "segment_proposals": "fpn_tf.models.segment_proposals:SegmentProposer",
}
assert set(MODEL_TYPES) == set(CONFIG_MODEL_TYPES), "fpn_tf.config.MODEL_TYPES and MODEL_TYPES differ"


def detector_class(model_type: str) -> type:
    """The Detector subclass of ``model_type``; ValueError naming the valid types."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model.type {model_type!r}; valid types: {', '.join(sorted(MODEL_TYPES))}")
    module, name = MODEL_TYPES[model_type].split(":")
    return getattr(importlib.import_module(module), name)


def build_model(config: ModelConfig):
    """The detector of ``config.type`` built from ``config`` (a ``Detector``)."""
    return detector_class(config.type)(config)
