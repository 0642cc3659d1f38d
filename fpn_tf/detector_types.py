"""The single source for every detector type and neck: class, defaults, presets, choices.

TF-free (``fpn_tf.config``, ``fpn_tf.config_checks``, ``fpn_tf.models.build`` and the
models import it; it imports nothing of fpn_tf), so reading a config never loads
TensorFlow.

Adding a detector type is one entry of ``DETECTOR_TYPES`` plus its module; adding a
neck is one entry of ``NECK_TYPES`` plus its module (docs/design.md walks through
both; tests/test_detector_types.py fails when an entry is incomplete).

A type's ``defaults`` and ``presets`` are nested dicts over the dataclass defaults of
``fpn_tf.config.ModelConfig``'s sections, keyed by section (``{"fpn": {"min_level": 3}}``):
``ModelConfig(type=X)``, ``from_dict(ModelConfig, {"type": X})``, a YAML
``model: {type: X}`` and ``build_X()`` all start from the dataclasses + ``defaults``,
then ``presets[preset]``, then what the user gave.
"""

from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass, field

# -- choices of the string fields that select code (the code and the config checks read these)
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
BACKBONE_NORMS = ("frozen_bn", "bn")
# FPNConfig.variant: the paper's Table 1 ablations of the FPN neck (fpn_tf.models.fpn_backbone)
FPN_VARIANTS = ("fpn", "bottom_up", "no_lateral", "p2_only", "c4", "c5")
EXTRA_BLOCKS = ("maxpool", "conv_p5", "conv_c5", "none")
BOX_HEADS = ("2fc", "conv5")
BOX_LOSSES = ("smooth_l1", "l1")
RETINANET_NORMS = ("none", "group_norm")
LOSS_NORMALIZATIONS = ("batch", "image")
COMPUTE_DTYPES = ("float32", "mixed_bfloat16")
DATA_SOURCES = ("synthetic", "coco_json", "tfds")
BAD_IMAGE_POLICIES = ("skip", "error")
# COCO-JSON duplicate image / annotation ids and annotations of unknown images.
STRUCTURE_POLICIES = ("error", "warn")

# What an evaluator scores from a detector's outputs (Detector.scored_outputs):
#   boxes     detection_boxes / _scores / _classes / num_detections -> box AP
#   masks     detection_masks (box-relative) -> mask AP (segm_*)
#   proposals proposal_boxes / _scores / num_proposals -> proposal AR
#   segments  proposal_masks (+ proposal boxes) -> class-agnostic segment AR
SCORED_OUTPUTS = ("boxes", "masks", "proposals", "segments")


@dataclass(frozen=True)
class DetectorType:
    """One detector type (``model.type``).

    Attributes:
      detector: ``"module:Class"`` of its ``fpn_tf.models.detector.Detector`` subclass.
      builder: the name of its ``build_*`` function in the same module (and in ``fpn_tf``).
      scores: what evaluation scores (``SCORED_OUTPUTS``); served detections need "boxes".
      defaults: its own defaults over the ModelConfig dataclasses (nested dict by section).
      presets: named deltas applied over ``defaults`` (``model.preset``).
      head_section: the ModelConfig section only this type reads ("" when none).
    """

    detector: str
    builder: str
    scores: tuple[str, ...]
    defaults: dict = field(default_factory=dict)
    presets: dict[str, dict] = field(default_factory=dict)
    head_section: str = ""


# torchvision.models._meta._COCO_CATEGORIES without "__background__": the name of
# COCO category id i is entry i - 1; "N/A" marks the ten ids COCO never used.
TORCHVISION_COCO_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "N/A", "backpack",
    "umbrella", "N/A", "N/A", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork", "knife", "spoon", "bowl",
    "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair", "couch", "potted plant", "bed", "N/A", "dining table", "N/A", "N/A",
    "toilet", "N/A", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave",
    "oven", "toaster", "sink", "refrigerator", "N/A", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

# torchvision's fasterrcnn_resnet50_fpn (v1 COCO weights, 37.0 box AP); names in comments
# are torchvision's constructor arguments (fpn_tf.models.presets says what still differs).
_TORCHVISION_RCNN_V1 = {
    # torchvision overwrites eps to 0.0 for the v1 COCO weights
    "backbone": {"bn_epsilon": 0.0},
    "anchors": {"round_base": True, "strides_from_input_size": True},
    "rpn": {"min_box_size": 1e-3},  # RegionProposalNetwork.min_size
    "roi_head": {
        "aligned": False,  # torchvision.ops.roi_align(aligned=False)
        "smooth_l1_beta": 1.0 / 9.0,
    },
    "input": {"size_divisibility": 32},  # GeneralizedRCNNTransform(size_divisible=32)
}


def _with(base: dict, section: str, **values) -> dict:
    out = copy.deepcopy(base)
    out.setdefault(section, {}).update(values)
    return out


DETECTOR_TYPES: dict[str, DetectorType] = {
    # Faster R-CNN on the FPN (paper §4): its defaults are the dataclasses'.
    "faster_rcnn": DetectorType(
        "fpn_tf.models.faster_rcnn:FasterRCNN",
        "build_faster_rcnn",
        scores=("boxes",),
        presets={"torchvision_v1": _TORCHVISION_RCNN_V1},
    ),
    # The RPN alone (Table 1; Detectron2's ProposalNetwork): scored by proposal AR.
    "rpn": DetectorType(
        "fpn_tf.models.proposal_network:ProposalNetwork",
        "build_proposal_network",
        scores=("proposals",),
        presets={"torchvision_v1": _TORCHVISION_RCNN_V1},
    ),
    # Mask R-CNN on the FPN (He et al. 2017).
    "mask_rcnn": DetectorType(
        "fpn_tf.models.mask_rcnn:MaskRCNN",
        "build_mask_rcnn",
        scores=("boxes", "masks"),
        # GT masks cropped to their boxes at 28 x 28 (Model Garden crops to 112; see InputConfig)
        defaults={"input": {"mask_size": 28}},
        # torchvision's maskrcnn_resnet50_fpn (v1 COCO weights, 37.9 box / 34.6 mask AP): the
        # Faster R-CNN graph plus MaskRCNNHeads(256, [256] * 4) + MaskRCNNPredictor(256, 256, K)
        # on MultiScaleRoIAlign(14, sampling_ratio=2), which are mask_head's defaults; training
        # reads GT masks cropped to their boxes at 56 x 56 (input.mask_size).
        presets={"torchvision_v1": _with(_TORCHVISION_RCNN_V1, "input", mask_size=56)},
        head_section="mask_head",
    ),
    # RetinaNet (Lin et al. 2017b, "Focal Loss"; Detectron2's defaults).
    "retinanet": DetectorType(
        "fpn_tf.models.retinanet:RetinaNet",
        "build_retinanet",
        scores=("boxes",),
        # P3..P7, P6/P7 by stride-2 3x3 convs on C5, anchors 32..512 on P3..P7 (x 3 scales
        # x 3 ratios: model.retinanet); padding to 128 keeps P7 (stride 128) exact.
        defaults={
            "fpn": {"min_level": 3, "max_level": 5, "extra_block": "conv_c5", "num_extra_levels": 2},
            "input": {"size_divisibility": 128},
        },
        presets={
            # torchvision's retinanet_resnet50_fpn (v1 COCO weights, 36.4 box AP)
            "torchvision_v1": {
                "backbone": {"bn_epsilon": 0.0},  # overwrite_eps(model, 0.0) for the v1 weights
                "fpn": {"extra_block": "conv_p5"},  # LastLevelP6P7(256, 256): P6 from P5
                "anchors": {"round_base": True, "strides_from_input_size": True},
                "retinanet": {
                    "truncate_anchor_sizes": True,  # _default_anchorgen: int(x * 2 ** (i / 3))
                    "background_channel": True,  # cls_logits has num_classes channels per anchor
                    "box_loss": "l1",  # RetinaNetRegressionHead._loss_type
                    "loss_normalization": "image",
                    "detections_per_image": 300,  # RetinaNet(detections_per_img=300)
                },
                "input": {"size_divisibility": 32},
            },
        },
        head_section="retinanet",
    ),
    # The paper's segment proposals (§6, Appendix A): P2..P6 with d = 128, 14 x 14 masks
    # trained from GT masks cropped to their boxes at 28 x 28.
    "segment_proposals": DetectorType(
        "fpn_tf.models.segment_proposals:SegmentProposer",
        "build_segment_proposer",
        scores=("segments",),
        defaults={"fpn": {"num_channels": 128}, "input": {"mask_size": 28}},
        head_section="segment",
    ),
}

# model.neck.type -> "module:function" building the pyramid from the backbone's C levels:
#   build(features: {"C2": ..., "C5": ...}, fpn: FPNConfig, neck: NeckConfig) -> {"P2": ..., ...}
# (symbolic Keras tensors; levels named "P<k>" with stride 2**k, finest first).
NECK_TYPES: dict[str, str] = {
    "fpn": "fpn_tf.models.fpn_backbone:build_fpn_neck",  # Lin et al. 2017 (+ Table 1 variants)
    "pafpn": "fpn_tf.models.pafpn:build_pafpn_neck",  # + PANet's bottom-up path (Liu et al. 2018)
}
# neck.pafpn_style: PANet's definition, or MMDetection's PAFPN (fpn_tf/models/pafpn.py).
PAFPN_STYLES = ("paper", "mmdetection")


def detector_type(name: str) -> DetectorType:
    """The entry of ``model.type`` ``name``; ValueError naming the valid types."""
    if name not in DETECTOR_TYPES:
        raise ValueError(f"unknown model.type {name!r}; valid types: {', '.join(DETECTOR_TYPES)}")
    return DETECTOR_TYPES[name]


def import_path(path: str):
    """The object a ``"module:name"`` path names (imported on use: no registry by side effect)."""
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def type_of_detector_class(cls: type) -> str:
    """The ``model.type`` whose entry names ``cls`` (ValueError for an unregistered class)."""
    path = f"{cls.__module__}:{cls.__name__}"
    for name, entry in DETECTOR_TYPES.items():
        if entry.detector == path:
            return name
    raise ValueError(f"{path} is not a registered detector (fpn_tf.detector_types.DETECTOR_TYPES)")


def preset_names(model_type: str) -> list[str]:
    """The named presets ``model_type`` accepts."""
    return sorted(detector_type(model_type).presets)


def preset_delta(model_type: str, preset: str = "") -> dict:
    """What ``model_type`` with ``preset`` changes over the dataclass defaults (a new dict).

    ``preset`` "" gives the type's own defaults; a named preset is applied over those.
    ValueError naming the valid types / presets.
    """
    entry = detector_type(model_type)
    if not preset:
        return copy.deepcopy(entry.defaults)
    if preset not in entry.presets:
        valid = ", ".join(preset_names(model_type)) or "none"
        raise ValueError(
            f"unknown model.preset {preset!r} for model.type {model_type!r}; valid presets: {valid}"
        )
    return merge_dicts(entry.defaults, entry.presets[preset])


def merge_dicts(base: dict, delta: dict) -> dict:
    """``base`` updated by ``delta``, nested mappings merged key by key (neither changed)."""
    out = copy.deepcopy(base)
    for key, value in delta.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
