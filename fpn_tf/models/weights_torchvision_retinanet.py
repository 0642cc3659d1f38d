"""Import torchvision RetinaNet weights (``retinanet_resnet50_fpn``, v1 COCO: 36.4 box AP).

``load_torchvision_retinanet_state_dict`` maps every key of a torchvision
``retinanet_resnet50_fpn`` state dict onto ``build_retinanet(preset="torchvision_v1")``;
the two then compute the same detections (tests/test_retinanet_torchvision.py).
The ResNet body, the FPN and the transforms are those of the Faster R-CNN import
(``fpn_tf.models.weights_torchvision``); what RetinaNet adds:

* FPN on C3..C5: ``backbone.fpn.inner_blocks.i`` -> ``lateral{i + 3}``,
  ``layer_blocks.i`` -> ``smooth{i + 3}``; ``backbone.fpn.extra_blocks.p6`` /
  ``p7`` -> ``fpn_extra`` ``conv0`` / ``conv1``;
* the towers ``head.classification_head.conv.i.0`` / ``head.regression_head.conv.i.0``
  -> ``class_conv{i}`` / ``box_conv{i}`` (with GroupNorm, torchvision v2:
  ``conv.i.1`` -> ``class_norm{i}`` / ``box_norm{i}``; torchvision < 0.13 named the
  convs ``conv.{2i}``, also accepted);
* ``cls_logits`` -> ``class_logits``: the same ``[A * K]`` channel layout, which
  needs ``retinanet.background_channel`` (torchvision's channel 0 per anchor);
* ``bbox_reg`` -> ``box_deltas``, each anchor's 4 channels permuted
  (dx, dy, dw, dh) -> (dy, dx, dh, dw).

Files are read as in ``read_state_dict``: ``torch.load(weights_only=True)`` or
``np.load(allow_pickle=False)``.
"""

from __future__ import annotations

import dataclasses

from fpn_tf.config import ModelConfig, from_dict
from fpn_tf.models.weights_torchvision import (
    _BIAS_XY,
    _BN_PARAMS,
    _CONV_XY,
    _DEPTHS,
    _IDENTITY,
    _IGNORED_SUFFIXES,
    ImportResult,
    WeightImportError,
    _assign,
    _conv_targets,
    _find_resnet,
    _resnet_targets,
    _Target,
    read_state_dict,
)

CLASS_LOGITS_KEY = "head.classification_head.cls_logits.weight"
_TOWERS = (("class", "head.classification_head"), ("box", "head.regression_head"))


def is_torchvision_retinanet(state: dict) -> bool:
    """True for a torchvision RetinaNet state dict (it has ``head.classification_head``)."""
    return CLASS_LOGITS_KEY in state


def _check_supported(config: ModelConfig) -> None:
    problems = []
    if config.type != "retinanet":
        problems.append(f"model.type={config.type!r}")
    if config.fpn.variant != "fpn":
        problems.append(f"fpn.variant={config.fpn.variant!r} (torchvision builds 'fpn')")
    if config.fpn.extra_block not in ("conv_p5", "conv_c5") or config.fpn.num_extra_levels != 2:
        problems.append("fpn.extra_block must be conv_p5 or conv_c5 with num_extra_levels=2 (P6, P7)")
    if not config.retinanet.background_channel:
        problems.append(
            "retinanet.background_channel=False (torchvision's cls_logits have num_classes channels "
            "per anchor; use the torchvision_v1 preset)"
        )
    if problems:
        raise WeightImportError(
            "this model cannot take a torchvision RetinaNet state dict: " + "; ".join(problems)
        )


def torchvision_retinanet_targets(model) -> list[_Target]:
    """Every (torchvision key, variable, transform) of a RetinaNet, in model order."""
    _check_supported(model.config)
    targets = _resnet_targets(_find_resnet(model), "backbone.body.")
    fpn = model.pyramid.get_layer("fpn")
    for k in range(fpn.min_level, fpn.max_level + 1):
        i = k - fpn.min_level
        targets += _conv_targets(fpn.lateral_layers[k].conv, f"backbone.fpn.inner_blocks.{i}.0")
        targets += _conv_targets(fpn.smoothing[k].conv, f"backbone.fpn.layer_blocks.{i}.0")
    extra = model.pyramid.get_layer("fpn_extra")
    for name, conv in zip(("p6", "p7"), extra.convs):
        targets += _conv_targets(conv, f"backbone.fpn.extra_blocks.{name}")
    head = model.head
    for tower, prefix in _TOWERS:
        for i, (conv, norm) in enumerate(head.tower(tower)):
            targets += _conv_targets(conv, f"{prefix}.conv.{i}.0")
            if norm is not None:  # GroupNorm: weight / bias
                targets += [_Target(f"{prefix}.conv.{i}.1.{t}", getattr(norm, k), _IDENTITY)
                            for t, k in _BN_PARAMS[:2]]  # fmt: skip
    targets += _conv_targets(head.class_logits, "head.classification_head.cls_logits")
    targets += _conv_targets(head.box_deltas, "head.regression_head.bbox_reg", _CONV_XY, _BIAS_XY)
    return targets


def _upgrade_v1_keys(state: dict) -> None:
    """torchvision < 0.13 named the tower convs ``conv.{2i}`` (ReLUs at odd indices)."""
    for _, prefix in _TOWERS:
        for i in range(8):
            for p in ("weight", "bias"):
                old = f"{prefix}.conv.{2 * i}.{p}"
                if old in state:
                    state[f"{prefix}.conv.{i}.0.{p}"] = state.pop(old)


def load_torchvision_retinanet_state_dict(model, state_dict_or_path) -> ImportResult:
    """Loads a torchvision ``retinanet_resnet50_fpn`` (or v2) state dict into a RetinaNet.

    Args:
      model: normally ``build_retinanet(preset="torchvision_v1", num_classes=...)``
        (``num_classes`` as the checkpoint's, 91 for torchvision's COCO weights).
      state_dict_or_path: see ``read_state_dict`` (.pth, .npz or a mapping).

    Returns:
      ImportResult: every key loaded, and the ``num_batches_tracked`` keys skipped.

    Raises:
      WeightImportError listing every missing key, unexpected key and shape
      mismatch; the model is left untouched then.
    """
    state = read_state_dict(state_dict_or_path)
    _upgrade_v1_keys(state)
    ignored = [k for k in state if k.endswith(_IGNORED_SUFFIXES)]
    targets = torchvision_retinanet_targets(model)
    return _assign(targets, state, ignored, "the torchvision RetinaNet state dict")


def torchvision_retinanet_state_dict(model) -> dict:
    """The inverse of the import: a RetinaNet's weights as a torchvision state dict of numpy arrays."""
    import numpy as np

    return {
        t.key: np.ascontiguousarray(t.inverse(t.variable.numpy()))
        for t in torchvision_retinanet_targets(model)
    }


def infer_torchvision_retinanet_config(state_dict_or_path) -> ModelConfig:
    """The ``torchvision_v1`` RetinaNet ModelConfig whose shapes fit a torchvision state dict.

    Reads the ResNet depth and width, the FPN channels, the P6 source (P5 when
    ``extra_blocks.p6`` takes the FPN's channels, else C5 as torchvision v2), the
    head's GroupNorm and ``num_classes`` (cls_logits channels / anchors per location).
    """
    state = (
        state_dict_or_path if isinstance(state_dict_or_path, dict) else read_state_dict(state_dict_or_path)
    )
    state = dict(state)
    _upgrade_v1_keys(state)
    needed = ["backbone.body.conv1.weight", "backbone.fpn.inner_blocks.0.0.weight", CLASS_LOGITS_KEY,
              "head.regression_head.bbox_reg.weight", "backbone.fpn.extra_blocks.p6.weight"]  # fmt: skip
    absent = [k for k in needed if k not in state]
    if absent:
        raise WeightImportError(f"not a torchvision RetinaNet + FPN state dict: no {', '.join(absent)}")
    kind = "bottleneck" if "backbone.body.layer1.0.conv3.weight" in state else "basic"
    blocks = len({k.split(".")[3] for k in state if k.startswith("backbone.body.layer3.")})
    if (kind, blocks) not in _DEPTHS:
        raise WeightImportError(f"unknown ResNet: {blocks} {kind} blocks in layer3")
    anchors = state["head.regression_head.bbox_reg.weight"].shape[0] // 4
    channels = int(state["backbone.fpn.inner_blocks.0.0.weight"].shape[0])
    p6_from_p5 = state["backbone.fpn.extra_blocks.p6.weight"].shape[1] == channels
    num_convs = len({k.split(".")[3] for k in state if k.startswith("head.classification_head.conv.")})
    config = from_dict(
        ModelConfig,
        {
            "type": "retinanet",
            "preset": "torchvision_v1",
            "num_classes": int(state[CLASS_LOGITS_KEY].shape[0]) // anchors,
            "backbone": {"name": _DEPTHS[kind, blocks]},
        },
    )
    r = dataclasses.replace(
        config.retinanet,
        num_convs=num_convs,
        norm="group_norm" if "head.classification_head.conv.0.1.weight" in state else "none",
    )
    return dataclasses.replace(
        config,
        backbone=dataclasses.replace(
            config.backbone, width_multiplier=state["backbone.body.conv1.weight"].shape[0] / 64.0
        ),
        fpn=dataclasses.replace(
            config.fpn, num_channels=channels, extra_block="conv_p5" if p6_from_p5 else "conv_c5"
        ),
        retinanet=r,
    )
