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

import copy
import dataclasses

from fpn_tf.config import ModelConfig, from_dict

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


# Each preset is a delta over the paper's defaults (the dataclasses of fpn_tf.config),
# keyed by model type; names in comments are torchvision's constructor arguments.
PRESETS: dict[str, dict[str, dict]] = {
    "faster_rcnn": {
        # torchvision's fasterrcnn_resnet50_fpn (v1 COCO weights, 37.0 box AP)
        "torchvision_v1": {
            # torchvision overwrites eps to 0.0 for the v1 COCO weights
            "backbone": {"bn_epsilon": 0.0},
            "anchors": {"round_base": True, "strides_from_input_size": True},
            "rpn": {"min_box_size": 1e-3},  # RegionProposalNetwork.min_size
            "roi_head": {
                "aligned": False,  # torchvision.ops.roi_align(aligned=False)
                "smooth_l1_beta": 1.0 / 9.0,
            },
            "input": {"size_divisibility": 32},  # GeneralizedRCNNTransform(size_divisible=32)
        },
    },
    "retinanet": {
        # RetinaNet's own defaults (Lin et al. 2017b; Detectron2): P3..P7, P6/P7 by stride-2
        # 3x3 convs on C5, anchors 32..512 on P3..P7 (x 3 scales x 3 ratios: model.retinanet).
        "": {
            "fpn": {"min_level": 3, "max_level": 5, "extra_block": "conv_c5", "num_extra_levels": 2},
            "input": {"size_divisibility": 128},  # keeps P7 (stride 128) exact
        },
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
}
# torchvision's maskrcnn_resnet50_fpn (v1 COCO weights, 37.9 box / 34.6 mask AP): the same
# graph plus MaskRCNNHeads(256, [256] * 4) + MaskRCNNPredictor(256, 256, K) on
# MultiScaleRoIAlign(output_size=14, sampling_ratio=2), which are mask_head's defaults;
# training reads GT masks cropped to their boxes at 56 x 56 (input.mask_size).
_MASK_TORCHVISION_V1 = copy.deepcopy(PRESETS["faster_rcnn"]["torchvision_v1"])
_MASK_TORCHVISION_V1["input"]["mask_size"] = 56
PRESETS["mask_rcnn"] = {"torchvision_v1": _MASK_TORCHVISION_V1}


def preset_names(model_type: str = "faster_rcnn") -> list[str]:
    """The named presets a model type accepts ("" , the type's defaults, not included)."""
    return sorted(name for name in PRESETS.get(model_type, {}) if name)


def preset_delta(model_type: str, name: str) -> dict:
    """The nested dict preset ``name`` changes; ValueError naming the valid ones.

    Preset "" is the model type's own defaults (empty for Faster R-CNN, whose are the
    dataclasses'); a named preset is a delta over it.
    """
    presets = PRESETS.get(model_type, {})
    base = presets.get("", {})
    if not name:
        return copy.deepcopy(base)
    if name not in presets:
        valid = ", ".join(preset_names(model_type)) or "none"
        raise ValueError(
            f"unknown model.preset {name!r} for model.type {model_type!r}; valid presets: {valid}"
        )
    return merge_dicts(base, presets[name])


def merge_dicts(base: dict, delta: dict) -> dict:
    """``base`` updated by ``delta``, nested mappings merged key by key (neither changed)."""
    out = copy.deepcopy(base)
    for key, value in delta.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


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
    backbone: str | None,
    config: ModelConfig | None,
    preset: str | None,
    overrides: dict,
) -> ModelConfig:
    """The ModelConfig a ``build_<detector>(...)`` call asks for (shared by the builders).

    ``preset`` and ``config`` exclude each other; ``num_classes``, ``backbone`` and
    ``overrides`` (top-level ModelConfig fields) apply on top.
    """
    if preset is not None:
        if config is not None:
            raise ValueError(f"build_{model_type}: pass either config or preset, not both")
        config = preset_config(preset, model_type=model_type)
    if config is None:
        config = from_dict(ModelConfig, {"type": model_type})  # with the type's "" preset
    cfg = dataclasses.replace(config)
    if cfg.type != model_type:
        raise ValueError(f"build_{model_type} was given a config of model.type {cfg.type!r}")
    if num_classes is not None:
        cfg.num_classes = int(num_classes)
    if backbone is not None:
        cfg.backbone = dataclasses.replace(cfg.backbone, name=backbone)
    if overrides:
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(
                f"unknown build_{model_type} argument(s) {unknown}; ModelConfig fields: {sorted(known)}"
            )
        cfg = dataclasses.replace(cfg, **overrides)
    return cfg


def torchvision_coco_label_map():
    """torchvision's 91-id COCO labelling as a ``LabelMap``: label == COCO category id.

    The 90 ids 1..90 all get a label (the ten ids COCO never used are named "N/A"),
    so label k of a ``torchvision_v1`` model with 91 classes is COCO category k
    and ``to_category_id`` is the identity.
    """
    from fpn_tf.data.label_map import LabelMap  # imports TensorFlow; keep presets light

    return LabelMap(list(range(1, len(TORCHVISION_COCO_NAMES) + 1)), list(TORCHVISION_COCO_NAMES))
