"""fpn_tf: Feature Pyramid Networks (Lin et al., CVPR 2017) with Faster R-CNN for TensorFlow / Keras 3.

Entry points:
  fpn_tf.build_faster_rcnn(num_classes=91, backbone="resnet50", ...)  # detector
  fpn_tf.build_mask_rcnn(num_classes=91, ...)                        # + instance masks
  fpn_tf.build_retinanet(num_classes=91, backbone="resnet50", ...)    # one-stage detector on P3..P7
  fpn_tf.build_fpn_backbone(backbone_config, fpn_config)             # image -> {"P2".."P6"}
  fpn_tf.build_segment_proposer(backbone="resnet50", ...)            # segment proposals (§6)

Attributes resolve lazily so that ``import fpn_tf.config`` does not load TensorFlow.
"""

import importlib

_EXPORTS = {
    "ExperimentConfig": "fpn_tf.config",
    "ModelConfig": "fpn_tf.config",
    "load_config": "fpn_tf.config",
    "FasterRCNN": "fpn_tf.models.faster_rcnn",
    "build_faster_rcnn": "fpn_tf.models.faster_rcnn",
    "MaskRCNN": "fpn_tf.models.mask_rcnn",
    "build_mask_rcnn": "fpn_tf.models.mask_rcnn",
    "build_fpn_backbone": "fpn_tf.models.fpn_backbone",
    "RetinaNet": "fpn_tf.models.retinanet",
    "build_retinanet": "fpn_tf.models.retinanet",
    "SegmentProposer": "fpn_tf.models.segment_proposals",
    "build_segment_proposer": "fpn_tf.models.segment_proposals",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fpn_tf' has no attribute {name!r}")
