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

from collections.abc import Callable

from fpn_tf.config import (
    AnchorConfig,
    BackboneConfig,
    FPNConfig,
    InputConfig,
    ModelConfig,
    RoIHeadConfig,
    RPNConfig,
)

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


def torchvision_v1_config(num_classes: int = 91, backbone: str = "resnet50") -> ModelConfig:
    """The ModelConfig whose graph equals torchvision's ``fasterrcnn_resnet50_fpn``.

    Args:
      num_classes: classes including background; 91 is torchvision's COCO
        labelling (label == COCO category id, see ``torchvision_coco_label_map``).
      backbone: "resnet50" (the published weights) or another ResNet of
        ``fpn_tf.models.resnet`` (as ``resnet_fpn_backbone`` would build).

    Returns:
      A ModelConfig: RGB 0..255 input normalised with ImageNet mean/std × 255
      (torchvision divides by 255 first: the same map), shorter side 800 / longer
      ≤ 1333, padding to multiples of 32; frozen BN with eps 0 (torchvision
      overwrites eps to 0.0 for the v1 COCO weights) and conv1 + layer1 frozen
      (``trainable_backbone_layers=3``); integer-rounded anchors centred at
      ``index * stride``; RPN top-k 2000/1000 per level before NMS 0.7 and
      2000/1000 per image after it, boxes under 1e-3 px dropped; RoIAlign
      unaligned with 2 samples per bin side; smooth-L1 β = 1/9 in both stages;
      test score > 0.05, per-class NMS 0.5, 100 detections.
    """
    return ModelConfig(
        num_classes=int(num_classes),
        backbone=BackboneConfig(name=backbone, freeze_at=2, norm="frozen_bn", bn_epsilon=0.0),
        fpn=FPNConfig(variant="fpn", num_channels=256, min_level=2, max_level=5, extra_block="maxpool"),
        anchors=AnchorConfig(
            sizes=(32.0, 64.0, 128.0, 256.0, 512.0),
            aspect_ratios=(0.5, 1.0, 2.0),
            offset=0.0,
            round_base=True,
            strides_from_input_size=True,
        ),
        rpn=RPNConfig(
            positive_iou=0.7,  # rpn_fg_iou_thresh
            negative_iou=0.3,  # rpn_bg_iou_thresh
            allow_low_quality_matches=True,
            batch_size_per_image=256,  # rpn_batch_size_per_image
            positive_fraction=0.5,  # rpn_positive_fraction
            box_coder_weights=(1.0, 1.0, 1.0, 1.0),
            pre_nms_topk_train=2000,  # rpn_pre_nms_top_n_train (per level)
            pre_nms_topk_test=1000,  # rpn_pre_nms_top_n_test (per level)
            post_nms_topk_train=2000,  # rpn_post_nms_top_n_train (per image)
            post_nms_topk_test=1000,  # rpn_post_nms_top_n_test (per image)
            nms_iou=0.7,  # rpn_nms_thresh
            min_box_size=1e-3,  # RegionProposalNetwork.min_size
            box_loss="smooth_l1",
            smooth_l1_beta=1.0 / 9.0,
        ),
        roi_head=RoIHeadConfig(
            batch_size_per_image=512,  # box_batch_size_per_image
            positive_fraction=0.25,  # box_positive_fraction
            foreground_iou=0.5,  # box_fg_iou_thresh
            background_iou_high=0.5,  # box_bg_iou_thresh
            background_iou_low=0.0,
            add_gt_as_proposals=True,
            pooler_resolution=7,
            sampling_ratio=2,  # MultiScaleRoIAlign(sampling_ratio=2)
            aligned=False,  # torchvision.ops.roi_align(aligned=False)
            canonical_size=224.0,
            canonical_level=4,
            min_level=2,
            max_level=5,
            head="2fc",
            fc_dim=1024,
            num_fc=2,
            box_coder_weights=(10.0, 10.0, 5.0, 5.0),
            box_loss="smooth_l1",
            smooth_l1_beta=1.0 / 9.0,
            score_threshold=0.05,  # box_score_thresh
            nms_iou=0.5,  # box_nms_thresh
            detections_per_image=100,  # box_detections_per_img
        ),
        input=InputConfig(
            min_size=800,
            max_size=1333,
            size_divisibility=32,
            pixel_mean=(123.675, 116.28, 103.53),  # 255 * (0.485, 0.456, 0.406)
            pixel_std=(58.395, 57.12, 57.375),  # 255 * (0.229, 0.224, 0.225)
        ),
    )


PRESETS: dict[str, Callable[..., ModelConfig]] = {"torchvision_v1": torchvision_v1_config}


def preset_config(name: str, num_classes: int | None = None) -> ModelConfig:
    """The ModelConfig of preset ``name`` (see PRESETS); ValueError naming the valid ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]() if num_classes is None else PRESETS[name](num_classes=num_classes)


def torchvision_coco_label_map():
    """torchvision's 91-id COCO labelling as a ``LabelMap``: label == COCO category id.

    The 90 ids 1..90 all get a label (the ten ids COCO never used are named "N/A"),
    so label k of a ``torchvision_v1`` model with 91 classes is COCO category k
    and ``to_category_id`` is the identity.
    """
    from fpn_tf.data.label_map import LabelMap  # imports TensorFlow; keep presets light

    return LabelMap(list(range(1, len(TORCHVISION_COCO_NAMES) + 1)), list(TORCHVISION_COCO_NAMES))
