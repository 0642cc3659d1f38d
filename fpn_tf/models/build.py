"""``build_model(config)``: the detector that ``model.type`` names.

The types, their classes and defaults are ``fpn_tf.detector_types.DETECTOR_TYPES``
(no registry filled by imports): a detector's module is imported only when used.
"""

from __future__ import annotations

from fpn_tf import detector_types
from fpn_tf.config import ModelConfig

MODEL_TYPES: dict[str, str] = {name: t.detector for name, t in detector_types.DETECTOR_TYPES.items()}


def detector_class(model_type: str) -> type:
    """The Detector subclass of ``model_type``; ValueError naming the valid types."""
    return detector_types.import_path(detector_types.detector_type(model_type).detector)


def build_model(config: ModelConfig):
    """The detector of ``config.type`` built from ``config`` (a ``Detector``)."""
    return detector_class(config.type)(config)
