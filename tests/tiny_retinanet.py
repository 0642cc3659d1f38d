"""A tiny RetinaNet configuration for CPU tests on <= 256 px images."""

from __future__ import annotations

from fpn_tf.config import ModelConfig, from_dict
from fpn_tf.models.presets import merge_dicts


def tiny_retinanet_config(num_classes: int = 4, image_size: int = 128, **sections) -> ModelConfig:
    """Narrow ResNet-18 + FPN(d=32) on P3..P7, anchors 12..~300 px; ``sections`` merge in."""
    values = {
        "type": "retinanet",
        "num_classes": num_classes,
        "backbone": {"name": "resnet18", "width_multiplier": 0.25, "freeze_at": 0, "norm": "bn"},
        "fpn": {"num_channels": 32},
        "anchors": {"sizes": [12.0, 24.0, 48.0, 96.0, 192.0]},
        "retinanet": {"topk_candidates": 200, "detections_per_image": 20},
        "input": {"min_size": image_size, "max_size": image_size, "max_gt_boxes": 8},
    }
    return from_dict(ModelConfig, merge_dicts(values, sections))
