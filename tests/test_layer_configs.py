"""Every registered fpn_tf Keras layer survives get_config -> from_config with the same outputs.

A layer registered with ``@keras.saving.register_keras_serializable(package="fpn_tf")``
must have a case in CASES: ``test_every_registered_layer_has_a_case`` fails otherwise.
"""

from __future__ import annotations

import importlib
import pkgutil

import keras
import numpy as np
import pytest
import tensorflow as tf
from layer_round_trip import check_layer_round_trip
from test_mask_rcnn import tiny_mask_config
from tiny import tiny_model_config
from tiny_retinanet import tiny_retinanet_config

import fpn_tf
from fpn_tf.config import AnchorConfig, BackboneConfig, RetinaNetConfig, RPNConfig, to_dict
from fpn_tf.layers.folded_conv import FoldableConv2D
from fpn_tf.layers.fpn import (
    ConvExtraLevels,
    FeaturePyramid,
    LateralConnection,
    MaxPoolP6,
    Smoothing,
    TopDownMerge,
)
from fpn_tf.layers.frozen_batch_norm import FrozenBatchNorm
from fpn_tf.layers.normalization import PixelNormalization
from fpn_tf.models.box_heads import FastRCNNHead
from fpn_tf.models.conv5_head import Conv5Head
from fpn_tf.models.dense_detection_generator import DenseDetectionGenerator
from fpn_tf.models.detection_generator import DetectionGenerator, ToOriginalPixels
from fpn_tf.models.mask_head import ClassMasks, MaskHead, ToInputPixels
from fpn_tf.models.pafpn import BottomUpPath
from fpn_tf.models.retinanet_head import RetinaNetHead
from fpn_tf.models.roi_pooler import RoIPooler
from fpn_tf.models.rpn import ProposalGenerator, RPNHead
from fpn_tf.models.segment_head import (
    MergeSegmentProposals,
    ResizeImages,
    SegmentProposalHead,
    SegmentProposalOutputs,
)
from fpn_tf.models.segment_proposals import SegmentProposer

LEVELS = ["P2", "P3", "P4", "P5", "P6"]


def _rand(*shape, low=0.0, high=1.0, seed=0):
    return tf.constant(np.random.default_rng(seed).uniform(low, high, size=shape).astype(np.float32))


def _pyramid(channels=8, size=64, levels=LEVELS):
    return {lv: _rand(1, size // 2 ** int(lv[1:]), size // 2 ** int(lv[1:]), channels) for lv in levels}


INFO = tf.constant([[60.0, 50.0, 60.0, 50.0, 1.0, 1.0]])
BOXES = tf.constant([[[2.0, 3.0, 30.0, 40.0], [10.0, 10.0, 20.0, 20.0], [0.0, 0.0, 60.0, 50.0]]])


def _rpn_case():
    head = RPNHead(3, 8)
    return head, (_pyramid(),), {}


def _proposal_case():
    anchors = to_dict(AnchorConfig(sizes=(8.0, 16.0, 32.0, 64.0, 128.0)))
    rpn = to_dict(RPNConfig(pre_nms_topk_test=50, post_nms_topk_test=20))
    outputs = RPNHead(3, 8)(_pyramid())
    return ProposalGenerator(anchors, rpn, LEVELS), (outputs, INFO), {}


def _detection_case():
    logits, deltas = _rand(1, 3, 4, seed=1), _rand(1, 3, 4, 4, low=-0.1, high=0.1, seed=2)
    valid = tf.constant([[True, True, False]])
    return (
        DetectionGenerator(score_threshold=0.0, detections_per_image=5),
        (logits, deltas, BOXES, valid, INFO),
        {},
    )


def _dense_case():
    levels = ["P3", "P4", "P5", "P6", "P7"]
    outputs = RetinaNetHead(9, 3, 8, num_convs=1)(_pyramid(size=256, levels=levels))
    anchors = to_dict(AnchorConfig(sizes=(12.0, 24.0, 48.0, 96.0, 192.0)))
    generator = DenseDetectionGenerator(anchors, to_dict(RetinaNetConfig(score_threshold=0.0)), levels)
    return generator, (outputs, tf.constant([[256.0, 256.0, 256.0, 256.0, 1.0, 1.0]])), {}


def _model_case(model_cls=fpn_tf.FasterRCNN, config=None):
    inputs = {
        "images": _rand(1, 128, 128, 3, high=255.0),
        "image_info": tf.constant([[128.0, 128.0, 128.0, 128.0, 1.0, 1.0]]),
    }
    return model_cls(config or tiny_model_config()), (inputs,), {}


def _segment_head():
    return SegmentProposalHead(LEVELS, (5, 7), 8, 4, (8.0, 16.0, 32.0, 64.0, 128.0), 0.25, 20)


def _segment_outputs():
    head = _segment_head()
    return SegmentProposalOutputs()(head(_pyramid(), INFO), INFO)


def _segment_model_case():
    from fpn_tf.config import SegmentProposalConfig

    cfg = tiny_model_config(
        type="segment_proposals", segment=SegmentProposalConfig(hidden_dim=8, proposals_per_image=30)
    )
    inputs = {
        "images": _rand(1, 64, 64, 3, high=255.0),
        "image_info": tf.constant([[64.0, 64.0] * 2 + [1.0] * 2]),
    }
    return SegmentProposer(cfg), (inputs,), {}


CASES = {
    "PixelNormalization": lambda: (PixelNormalization(), (_rand(1, 64, 64, 3, high=255.0), INFO), {}),
    "FrozenBatchNorm": lambda: (FrozenBatchNorm(epsilon=1e-3), (_rand(1, 4, 4, 8),), {}),
    "FoldableConv2D": lambda: (
        FoldableConv2D(8, 3, padding="same", use_bias=False),
        (_rand(1, 4, 4, 8),),
        {},
    ),  # noqa: E501
    "LateralConnection": lambda: (LateralConnection(8), (_rand(1, 8, 8, 16),), {}),
    "Smoothing": lambda: (Smoothing(8), (_rand(1, 8, 8, 8),), {}),
    "TopDownMerge": lambda: (TopDownMerge(), ([_rand(1, 4, 4, 8), _rand(1, 7, 8, 8)],), {}),
    "FeaturePyramid": lambda: (
        FeaturePyramid(8, min_level=3, max_level=5),
        ({"C3": _rand(1, 8, 8, 4), "C4": _rand(1, 4, 4, 6), "C5": _rand(1, 2, 2, 10)},),
        {},
    ),
    "MaxPoolP6": lambda: (MaxPoolP6(), (_rand(1, 4, 4, 8),), {}),
    "ConvExtraLevels": lambda: (ConvExtraLevels(8, num_levels=2), (_rand(1, 4, 4, 8),), {}),
    "RPNHead": _rpn_case,
    "ProposalGenerator": _proposal_case,
    "RoIPooler": lambda: (RoIPooler(["P2", "P3", "P4", "P5"], 7), (_pyramid(), BOXES), {}),
    "FastRCNNHead": lambda: (FastRCNNHead(4, 16, 2), (_rand(1, 3, 7, 7, 8),), {}),
    "Conv5Head": lambda: (
        Conv5Head(4, to_dict(BackboneConfig(name="resnet18", width_multiplier=0.25)), 64),
        (_rand(1, 2, 14, 14, 64),),
        {},
    ),
    "DetectionGenerator": _detection_case,
    "ToOriginalPixels": lambda: (
        ToOriginalPixels(),
        (BOXES, tf.constant([[120.0, 100.0, 60.0, 50.0, 0.5, 0.5]])),
        {},
    ),
    "FasterRCNN": _model_case,
    "MaskHead": lambda: (MaskHead(4, num_convs=2, conv_channels=8), (_rand(1, 3, 14, 14, 8),), {}),
    "ClassMasks": lambda: (ClassMasks(), (_rand(1, 3, 28, 28, 4), tf.constant([[1, 3, 0]])), {}),
    "RetinaNetHead": lambda: (RetinaNetHead(9, 3, 32, num_convs=2, norm="group_norm"), (_pyramid(),), {}),
    "DenseDetectionGenerator": _dense_case,
    "MaskRCNN": lambda: _model_case(fpn_tf.MaskRCNN, tiny_mask_config()),
    "RetinaNet": lambda: _model_case(fpn_tf.RetinaNet, tiny_retinanet_config()),
    "ProposalNetwork": lambda: _model_case(fpn_tf.ProposalNetwork, tiny_model_config(type="rpn")),
    "ToInputPixels": lambda: (
        ToInputPixels(),
        (BOXES, tf.constant([[120.0, 100.0, 60.0, 50.0, 0.5, 0.5]])),
        {},
    ),
    "SegmentProposalHead": lambda: (_segment_head(), (_pyramid(), INFO), {}),
    "SegmentProposalOutputs": lambda: (
        SegmentProposalOutputs(),
        (_segment_head()(_pyramid(), INFO), INFO),
        {},
    ),
    "MergeSegmentProposals": lambda: (
        MergeSegmentProposals(25),
        ([_segment_outputs(), _segment_outputs()],),
        {},
    ),
    "ResizeImages": lambda: (ResizeImages(0.75, 16), (_rand(1, 64, 48, 3, high=255.0), INFO), {}),
    "SegmentProposer": _segment_model_case,
    "BottomUpPath": lambda: (
        BottomUpPath(8, min_level=2, max_level=5, style="mmdetection"),
        (_pyramid(levels=["P2", "P3", "P4", "P5"]),),
        {},
    ),
}


def _registered_layers() -> set[str]:
    for module in pkgutil.walk_packages(fpn_tf.__path__, "fpn_tf."):
        importlib.import_module(module.name)
    return {
        name.split(">", 1)[1]
        for name, obj in keras.saving.get_custom_objects().items()
        if name.startswith("fpn_tf>") and isinstance(obj, type) and issubclass(obj, keras.layers.Layer)
    }


def test_every_registered_layer_has_a_case():
    registered = _registered_layers()
    assert "FasterRCNN" in registered and "RoIPooler" in registered
    missing = sorted(registered - set(CASES))
    assert not missing, f"registered layers without a round-trip case in CASES: {missing}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_layer_round_trip(name):
    layer, args, kwargs = CASES[name]()
    layer(*args, **kwargs)  # builds the weights, which then get non-trivial values
    rng = np.random.default_rng(3)
    layer.set_weights([rng.uniform(0.5, 1.5, size=w.shape).astype(w.dtype) for w in layer.get_weights()])
    check_layer_round_trip(layer, args, kwargs, atol=1e-4)
