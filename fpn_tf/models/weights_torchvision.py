"""Import torchvision weights: a whole Faster R-CNN, or a ResNet backbone (ImageNet init).

``load_torchvision_state_dict`` maps every key of a torchvision
``fasterrcnn_resnet50_fpn`` state dict onto a model built with
``build_faster_rcnn(preset="torchvision_v1")``; the two then compute the same
detections (docs/torchvision_parity.md). ``load_torchvision_backbone`` loads a
torchvision ``resnet50`` / ``resnet101`` classification state dict (or the
``backbone.body`` part of a detection one) into the ResNet body only.

The conventions bridged, key by key:

* conv kernels ``[O, I, kh, kw]`` (NCHW) -> ``[kh, kw, I, O]`` (NHWC); dense
  weights ``[out, in]`` -> ``[in, out]``;
* boxes: torchvision regresses ``(dx, dy, dw, dh)``, fpn_tf ``(dy, dx, dh, dw)``:
  the output channels of ``rpn.head.bbox_pred`` (4 per anchor) and the rows of
  ``roi_heads.box_predictor.bbox_pred`` (4 per class) are permuted ``(1, 0, 3, 2)``;
  the coder weights (10, 10, 5, 5) are symmetric in x / y and need nothing;
* ``fc6`` reads a RoI feature flattened as ``[C, 7, 7]`` in torchvision and as
  ``[7, 7, C]`` here: its input rows are permuted accordingly;
* batch norm ``weight``/``bias``/``running_mean``/``running_var`` -> ``gamma``/
  ``beta``/``moving_mean``/``moving_variance`` (``num_batches_tracked`` is dropped);
* the RPN conv is ``rpn.head.conv.0.0`` (torchvision ≥ 0.13) or ``rpn.head.conv``
  (older checkpoints); both are accepted.

Layer names follow ``fpn_tf.models.resnet`` (``layer3.5.bn2`` -> ``layer3_5_bn2``),
``fpn_tf.layers.fpn`` (``inner_blocks.i`` -> ``lateral{i + 2}``, ``layer_blocks.i``
-> ``smooth{i + 2}``), ``RPNHead`` and ``FastRCNNHead``.

Files: ``.pth`` / ``.pt`` are read with ``torch.load(weights_only=True)`` (tensors
only, never arbitrary pickles; needs the ``fpn_tf[torch]`` extra); ``.npz`` with
``np.load(allow_pickle=False)`` (no torch needed: convert once with
``np.savez(path, **{k: v.numpy() for k, v in state_dict.items()})``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import keras
import numpy as np

from fpn_tf.layers.frozen_batch_norm import FrozenBatchNorm
from fpn_tf.models.state_dict_files import ImportResult, WeightImportError, read_state_dict  # noqa: F401

# torchvision (dx, dy, dw, dh) -> fpn_tf (dy, dx, dh, dw), within each group of 4.
_XY_SWAP = (1, 0, 3, 2)
_BN_PARAMS = (
    ("weight", "gamma"),
    ("bias", "beta"),
    ("running_mean", "moving_mean"),
    ("running_var", "moving_variance"),
)
_IGNORED_SUFFIXES = ("num_batches_tracked",)


@dataclasses.dataclass
class _Target:
    key: str  # torchvision key
    variable: keras.Variable
    mapping: tuple[
        Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]
    ]  # (to fpn_tf, back)

    def transform(self, value: np.ndarray) -> np.ndarray:
        return self.mapping[0](value)

    def inverse(self, value: np.ndarray) -> np.ndarray:
        return self.mapping[1](value)


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _conv_kernel(x: np.ndarray) -> np.ndarray:
    if x.ndim != 4:
        raise ValueError(f"a conv weight must have 4 dims [O, I, kh, kw], got shape {x.shape}")
    return np.transpose(x, (2, 3, 1, 0))


def _dense_kernel(x: np.ndarray) -> np.ndarray:
    if x.ndim != 2:
        raise ValueError(f"a linear weight must have 2 dims [out, in], got shape {x.shape}")
    return x.T


def _xy_permutation(n: int) -> np.ndarray:
    if n % 4:
        raise ValueError(f"a box regression output must have a multiple of 4 channels, got {n}")
    return np.asarray([g * 4 + p for g in range(n // 4) for p in _XY_SWAP])


def _swap_last(x: np.ndarray) -> np.ndarray:
    return x[..., _xy_permutation(x.shape[-1])]  # an involution: its own inverse


def _fc6_mapping(resolution: int):
    """fc6: torch column ``c*S*S + i*S + j``  <->  fpn_tf kernel row ``(i*S + j)*C + c``."""
    s = resolution

    def forward(x: np.ndarray) -> np.ndarray:
        x = _dense_kernel(x)  # [C*S*S, out]
        channels, rest = divmod(x.shape[0], s * s)
        if rest:
            raise ValueError(f"fc6 input size {x.shape[0]} is not C * {s} * {s}")
        return x.reshape(channels, s, s, -1).transpose(1, 2, 0, 3).reshape(x.shape)

    def inverse(x: np.ndarray) -> np.ndarray:
        channels = x.shape[0] // (s * s)
        return x.reshape(s, s, channels, -1).transpose(2, 0, 1, 3).reshape(x.shape).T

    return forward, inverse


_IDENTITY = (_identity, _identity)
_CONV = (_conv_kernel, lambda x: np.transpose(x, (3, 2, 0, 1)))
_DENSE = (_dense_kernel, _dense_kernel)
_CONV_XY = (lambda x: _swap_last(_conv_kernel(x)), lambda x: _CONV[1](_swap_last(x)))
_DENSE_XY = (lambda x: _swap_last(_dense_kernel(x)), lambda x: _dense_kernel(_swap_last(x)))
_BIAS_XY = (_swap_last, _swap_last)


# ---------------------------------------------------------------- targets
def _conv_targets(layer, prefix: str, kernel_map=_CONV, bias_map=_IDENTITY) -> list[_Target]:
    targets = [_Target(f"{prefix}.weight", layer.kernel, kernel_map)]
    if getattr(layer, "use_bias", False):
        targets.append(_Target(f"{prefix}.bias", layer.bias, bias_map))
    return targets


def _resnet_targets(resnet: keras.Model, prefix: str) -> list[_Target]:
    targets = []
    for layer in resnet.layers:
        if not layer.weights:
            continue
        key = prefix + layer.name.replace("_", ".")
        if isinstance(layer, keras.layers.Conv2D):
            targets += _conv_targets(layer, key)
        elif isinstance(layer, (FrozenBatchNorm, keras.layers.BatchNormalization)):
            targets += [_Target(f"{key}.{t}", getattr(layer, k), _IDENTITY) for t, k in _BN_PARAMS]
        else:
            raise WeightImportError(
                f"layer {layer.name!r} ({type(layer).__name__}) has no torchvision counterpart"
            )
    return targets


def _find_resnet(model: keras.Model) -> keras.Model:
    """The (sub)model that holds the ResNet layers (``conv1``, ``bn1``, ``layer1_0_conv1``)."""
    names = {layer.name for layer in model.layers}
    if {"conv1", "bn1"} <= names:
        return model
    config = getattr(model, "config", None)
    if config is not None and hasattr(model, "pyramid"):  # a FasterRCNN
        return model.pyramid.get_layer(config.backbone.name)
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            try:
                return _find_resnet(layer)
            except WeightImportError:
                continue
    raise WeightImportError(f"model {model.name!r} holds no fpn_tf ResNet (no layers 'conv1' and 'bn1')")


def _check_supported(config) -> None:
    problems = []
    if config.fpn.variant != "fpn" or config.neck.type != "fpn":
        problems.append(
            f"fpn.variant={config.fpn.variant!r}, neck.type={config.neck.type!r} (torchvision builds 'fpn')"
        )
    if config.fpn.extra_block != "maxpool":
        problems.append(
            f"fpn.extra_block={config.fpn.extra_block!r} (torchvision's Faster R-CNN uses 'maxpool')"
        )
    if config.roi_head.head != "2fc" or config.roi_head.num_fc != 2:
        problems.append("roi_head must be '2fc' with num_fc=2 (torchvision's TwoMLPHead fc6, fc7)")
    if config.type == "rpn":
        problems.append("model.type 'rpn' (the RPN alone has no RoI head for roi_heads.* keys)")
    if problems:
        raise WeightImportError(
            "this model cannot take a torchvision Faster R-CNN state dict: " + "; ".join(problems)
        )


def torchvision_targets(model) -> list[_Target]:
    """Every (torchvision key, variable, transform) of a FasterRCNN, in model order."""
    config = model.config
    _check_supported(config)
    targets = _resnet_targets(_find_resnet(model), "backbone.body.")
    fpn = model.pyramid.get_layer("fpn")
    for k in range(fpn.min_level, fpn.max_level + 1):
        i = k - fpn.min_level
        targets += _conv_targets(fpn.lateral_layers[k].conv, f"backbone.fpn.inner_blocks.{i}.0")
        targets += _conv_targets(fpn.smoothing[k].conv, f"backbone.fpn.layer_blocks.{i}.0")
    head = model.rpn_head
    targets += _conv_targets(head.conv, "rpn.head.conv.0.0")
    targets += _conv_targets(head.objectness, "rpn.head.cls_logits")
    targets += _conv_targets(head.box_deltas, "rpn.head.bbox_pred", _CONV_XY, _BIAS_XY)
    box = model.box_head
    targets += _conv_targets(
        box.fcs[0], "roi_heads.box_head.fc6", _fc6_mapping(config.roi_head.pooler_resolution)
    )
    targets += _conv_targets(box.fcs[1], "roi_heads.box_head.fc7", _DENSE)
    targets += _conv_targets(box.class_logits, "roi_heads.box_predictor.cls_score", _DENSE)
    targets += _conv_targets(box.box_deltas, "roi_heads.box_predictor.bbox_pred", _DENSE_XY, _BIAS_XY)
    return targets


# ---------------------------------------------------------------- assignment
def _assign(
    targets: list[_Target], state: dict[str, np.ndarray], ignored: list[str], what: str
) -> ImportResult:
    """Checks every key and shape first, then assigns all (nothing is written on error)."""
    wanted = {t.key for t in targets}
    missing = [t.key for t in targets if t.key not in state]
    unexpected = sorted(k for k in state if k not in wanted and k not in ignored)
    values, mismatched = {}, []
    for t in targets:
        if t.key not in state:
            continue
        source = state[t.key]
        try:
            value = t.transform(source)
        except ValueError as e:
            mismatched.append(f"{t.key}: {e}")
            continue
        if tuple(value.shape) != tuple(t.variable.shape):
            mismatched.append(
                f"{t.key}: state dict shape {tuple(source.shape)} gives {tuple(value.shape)} but "
                f"{t.variable.path} has shape {tuple(t.variable.shape)}"
            )
            continue
        values[t.key] = value
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(
                f"{len(missing)} missing key(s) (in the model, not in the state dict): {', '.join(missing)}"
            )
        if unexpected:
            parts.append(
                f"{len(unexpected)} unexpected key(s) (no counterpart in the model): {', '.join(unexpected)}"
            )
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es): " + "; ".join(mismatched))
        raise WeightImportError(f"cannot import {what}: " + " | ".join(parts))
    for t in targets:
        t.variable.assign(np.asarray(values[t.key], dtype=t.variable.dtype))
    return ImportResult(loaded=[t.key for t in targets], ignored=sorted(ignored))


def load_torchvision_state_dict(model, state_dict_or_path) -> ImportResult:
    """Loads a torchvision ``fasterrcnn_resnet50_fpn`` state dict into a FasterRCNN.

    Args:
      model: a ``FasterRCNN``, normally ``build_faster_rcnn(preset="torchvision_v1",
        num_classes=...)`` (any ResNet depth; ``num_classes`` must match the
        checkpoint's, 91 for torchvision's COCO weights).
      state_dict_or_path: see ``read_state_dict`` (.pth, .npz or a mapping).

    Returns:
      ImportResult: every key loaded (all must be), and the ``num_batches_tracked``
      keys skipped.

    Raises:
      WeightImportError listing every missing key, unexpected key and shape
      mismatch by name; the model is left untouched then.
    """
    state = read_state_dict(state_dict_or_path)
    if "rpn.head.conv.weight" in state:  # torchvision < 0.13 layout
        for p in ("weight", "bias"):
            if f"rpn.head.conv.{p}" in state:
                state[f"rpn.head.conv.0.0.{p}"] = state.pop(f"rpn.head.conv.{p}")
    ignored = [k for k in state if k.endswith(_IGNORED_SUFFIXES)]
    return _assign(torchvision_targets(model), state, ignored, "the torchvision Faster R-CNN state dict")


def load_torchvision_backbone(model_or_backbone, state_dict_or_path) -> ImportResult:
    """ImageNet init: loads a torchvision ResNet classification state dict into the ResNet body.

    Args:
      model_or_backbone: a FasterRCNN, an FPN backbone (``build_fpn_backbone``) or
        a ResNet (``build_resnet``); its depth must match the state dict's
        (``resnet50`` <-> torchvision ``resnet50``, etc.).
      state_dict_or_path: a torchvision ``resnet{18,34,50,101,152}`` state dict
        (``fc.*`` is skipped), or a detection state dict of which only the
        ``backbone.body.*`` keys are used; see ``read_state_dict``.

    torchvision's ImageNet statistics come from ``nn.BatchNorm2d`` with eps 1e-5,
    ``BackboneConfig.bn_epsilon``'s default; the ``torchvision_v1`` preset uses 0.0
    (for the COCO weights), which changes a normalised value by at most
    ``1e-5 / (2 var)`` relative.

    Returns:
      ImportResult (loaded keys; skipped ``fc.*``, ``num_batches_tracked`` and
      non-backbone keys).

    Raises:
      WeightImportError naming every missing key, unexpected key and shape
      mismatch; nothing is assigned then.
    """
    state = read_state_dict(state_dict_or_path)
    ignored = []
    if any(k.startswith("backbone.body.") for k in state):
        ignored = [k for k in state if not k.startswith("backbone.body.")]
        state = {k[len("backbone.body.") :]: v for k, v in state.items() if k.startswith("backbone.body.")}
    ignored += [k for k in state if k.startswith("fc.") or k.endswith(_IGNORED_SUFFIXES)]
    targets = _resnet_targets(_find_resnet(model_or_backbone), "")
    return _assign(targets, state, ignored, "the torchvision ResNet state dict")


def torchvision_state_dict(model) -> dict[str, np.ndarray]:
    """The inverse of ``load_torchvision_state_dict``: a FasterRCNN's weights in torchvision's layout.

    Returns ``{key: float32 numpy array}`` with torchvision's names, shapes and
    (dx, dy, dw, dh) order, loadable with ``torchvision_model.load_state_dict(
    {k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)`` (torchvision's
    trainable batch norms also hold ``num_batches_tracked``, which is not written),
    or saved with ``np.savez`` for a torch-free round trip.
    """
    return {t.key: np.ascontiguousarray(t.inverse(t.variable.numpy())) for t in torchvision_targets(model)}


_DEPTHS = {("bottleneck", 6): "resnet50", ("bottleneck", 23): "resnet101", ("bottleneck", 36): "resnet152"}
_DEPTHS.update({("basic", 2): "resnet18", ("basic", 6): "resnet34"})


def infer_torchvision_config(state_dict_or_path):
    """The ``torchvision_v1`` ModelConfig whose shapes fit a torchvision Faster R-CNN state dict.

    Reads the ResNet depth (blocks of ``layer3``, bottleneck or basic), its width
    (``conv1`` channels / 64), the FPN channels, the fc dimension and
    ``num_classes`` (rows of ``cls_score``) from the keys and shapes, so
    fine-tuned checkpoints (other class counts) import too.

    Raises:
      WeightImportError naming what is missing when it is not such a state dict.
    """
    from fpn_tf.models.presets import torchvision_v1_config

    state = (
        state_dict_or_path if isinstance(state_dict_or_path, dict) else read_state_dict(state_dict_or_path)
    )
    needed = [
        "backbone.body.conv1.weight",
        "backbone.fpn.inner_blocks.0.0.weight",
        "roi_heads.box_head.fc6.weight",
        "roi_heads.box_predictor.cls_score.weight",
    ]
    absent = [k for k in needed if k not in state]
    if absent:
        raise WeightImportError(f"not a torchvision Faster R-CNN + FPN state dict: no {', '.join(absent)}")
    kind = "bottleneck" if "backbone.body.layer1.0.conv3.weight" in state else "basic"
    blocks = len({k.split(".")[3] for k in state if k.startswith("backbone.body.layer3.")})
    if (kind, blocks) not in _DEPTHS:
        raise WeightImportError(f"unknown ResNet: {blocks} {kind} blocks in layer3")
    config = torchvision_v1_config(
        num_classes=int(state["roi_heads.box_predictor.cls_score.weight"].shape[0]),
        backbone=_DEPTHS[kind, blocks],
    )
    width = state["backbone.body.conv1.weight"].shape[0] / 64.0
    fc_dim = int(state["roi_heads.box_head.fc6.weight"].shape[0])
    return dataclasses.replace(
        config,
        backbone=dataclasses.replace(config.backbone, width_multiplier=width),
        fpn=dataclasses.replace(
            config.fpn, num_channels=int(state["backbone.fpn.inner_blocks.0.0.weight"].shape[0])
        ),
        roi_head=dataclasses.replace(config.roi_head, fc_dim=fc_dim),
    )
