"""fpn_tf: Feature Pyramid Networks (Lin et al., CVPR 2017) with Faster R-CNN for TensorFlow / Keras 3.

Entry points (every detector type of ``fpn_tf.detector_types`` has its class and builder here):
  fpn_tf.build_faster_rcnn(num_classes=91, backbone="resnet50", ...)  # detector
  fpn_tf.build_proposal_network(...)                                 # the RPN alone (Table 1)
  fpn_tf.build_mask_rcnn(num_classes=91, ...)                        # + instance masks
  fpn_tf.build_retinanet(num_classes=91, backbone="resnet50", ...)    # one-stage detector on P3..P7
  fpn_tf.build_segment_proposer(backbone="resnet50", ...)            # segment proposals (§6)
  fpn_tf.build_fpn_backbone(backbone_config, fpn_config)             # image -> {"P2".."P6"}
  fpn_tf.build_dataset(data_config, model.config.input, "train", ...)  # batches for model.fit
  fpn_tf.CocoEvaluation(data_config)                                 # Keras callback: val_AP, ...

Every detector is a keras.Model: compile / fit / evaluate / predict (raw images) /
save / load_model (fpn_tf/models/keras_training.py).

Attributes resolve lazily so that ``import fpn_tf.config`` does not load TensorFlow.
"""

import importlib

from fpn_tf.detector_types import DETECTOR_TYPES

_EXPORTS = {
    "ExperimentConfig": "fpn_tf.config",
    "ModelConfig": "fpn_tf.config",
    "DataConfig": "fpn_tf.config",
    "load_config": "fpn_tf.config",
    "build_dataset": "fpn_tf.data.pipeline",
    "CocoEvaluation": "fpn_tf.evaluation.keras_callback",
    "build_fpn_backbone": "fpn_tf.models.fpn_backbone",
    "build_model": "fpn_tf.models.build",
}
for _entry in DETECTOR_TYPES.values():
    _module, _class = _entry.detector.split(":")
    _EXPORTS[_class] = _module
    _EXPORTS[_entry.builder] = _module
del _entry, _module, _class

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fpn_tf' has no attribute {name!r}")
