"""Typed configuration: one small dataclass per component, loaded from YAML.

Every default is the FPN paper's (Lin et al. 2017, §4–§5) unless a comment says
where it comes from instead. An unknown key anywhere in a YAML file or an
override is an error that names the key: typos never pass silently.

Conventions used across fpn_tf:
- boxes are ``(y1, x1, y2, x2)`` float32 pixels (TensorFlow / TF Object
  Detection API order);
- ``num_classes`` counts the background class, which is label 0; foreground
  labels are ``1 .. num_classes - 1`` (torchvision's convention, so the default
  91 matches torchvision's COCO labelling);
- pyramid levels are named by their number: ``"P3"`` has stride 2**3.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml
from absl import logging

from fpn_tf import detector_types
from fpn_tf.config_checks import ConfigError, check_config
from fpn_tf.config_files import resolve_config_path
from fpn_tf.head_configs import MaskHeadConfig, RetinaNetConfig, SegmentProposalConfig
from fpn_tf.neck_configs import NeckConfig


@dataclass
class BackboneConfig:
    """ResNet body producing C2..C5 (see ``fpn_tf.models.resnet``)."""

    name: str = "resnet50"  # resnet18 | resnet34 | resnet50 | resnet101
    width_multiplier: float = 1.0  # < 1 gives narrow nets for tests and CPU runs
    freeze_at: int = 2  # 0: nothing frozen; 1: stem; 2: stem + res2 (Detectron2)
    norm: str = "frozen_bn"  # frozen_bn | bn (trainable batch norm)
    bn_epsilon: float = 1e-5  # PyTorch's default; torchvision's COCO weights use 0.0


@dataclass
class FPNConfig:
    """Feature pyramid (§3) and the paper's ablations (Tables 1–3).

    ``variant``:
      fpn        - top-down + lateral (Table 1c), the default;
      bottom_up  - lateral + smoothing, no top-down pathway (Table 1d);
      no_lateral - top-down only, no lateral connections (Table 1e);
      p2_only    - full FPN but only P2 is used (Table 1f);
      c4 / c5    - single-scale baselines on C4 / C5 (Table 1a/b).
    """

    variant: str = "fpn"
    num_channels: int = 256
    min_level: int = 2
    max_level: int = 5  # last level built from a C map
    extra_block: str = "maxpool"  # maxpool (P6, paper) | conv_p5 | conv_c5 (P6/P7) | none
    num_extra_levels: int = 1  # 1 -> P6; 2 -> P6, P7 (conv blocks only)


@dataclass
class AnchorConfig:
    """One anchor size per level (§4.1): 32²…512² on P2–P6, 3 aspect ratios."""

    sizes: tuple[float, ...] = (32.0, 64.0, 128.0, 256.0, 512.0)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)  # height / width
    offset: float = 0.0  # anchor centre = (index + offset) * stride (D2, torchvision)
    round_base: bool = False  # torchvision rounds its base anchors to integers
    # torchvision: stride = input size // feature size per axis (61 instead of 64 on P6
    # of an 800-px input padded to 32); False: 2**k
    strides_from_input_size: bool = False


@dataclass
class RPNConfig:
    """Region proposal network (§4.1)."""

    conv_channels: int = 0  # 0 -> same as the pyramid's channels
    positive_iou: float = 0.7
    negative_iou: float = 0.3
    allow_low_quality_matches: bool = True  # each GT's best anchor is positive
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    box_coder_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)
    pre_nms_topk_train: int = 2000  # per level
    pre_nms_topk_test: int = 1000  # per level
    post_nms_topk_train: int = 2000  # per image (§5.2: 2000 RoIs per image in training)
    post_nms_topk_test: int = 1000  # per image
    nms_iou: float = 0.7
    min_box_size: float = 0.0  # proposals smaller than this (pixels) are dropped
    box_loss: str = "smooth_l1"  # smooth_l1 | l1
    smooth_l1_beta: float = 1.0 / 9.0  # Detectron (v1) and torchvision
    loss_weight: float = 1.0


@dataclass
class RoIHeadConfig:
    """Fast R-CNN head on the pyramid (§4.2)."""

    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    foreground_iou: float = 0.5
    background_iou_high: float = 0.5
    background_iou_low: float = 0.0
    add_gt_as_proposals: bool = True
    pooler_resolution: int = 7
    sampling_ratio: int = 2  # samples per bin side (torchvision); static shapes need a fixed value
    aligned: bool = True  # half-pixel RoIAlign (Detectron2); False = torchvision v1
    canonical_size: float = 224.0  # eq. (1)
    canonical_level: int = 4  # eq. (1), k0
    min_level: int = 2  # RoIs are pooled from P2..P5 (P6 is RPN-only)
    max_level: int = 5
    head: str = "2fc"  # 2fc (paper) | conv5 (C4 baseline, Table 3a)
    fc_dim: int = 1024
    num_fc: int = 2
    box_coder_weights: tuple[float, ...] = (10.0, 10.0, 5.0, 5.0)
    box_loss: str = "smooth_l1"  # smooth_l1 | l1
    smooth_l1_beta: float = 1.0  # Fast R-CNN / Detectron (v1); torchvision uses 1/9
    loss_weight: float = 1.0
    score_threshold: float = 0.05
    nms_iou: float = 0.5
    detections_per_image: int = 100
    # Per-class NMS runs on the best this-many (box, class) candidates per image:
    # a fixed cost for static shapes; torchvision keeps all above the threshold.
    detection_pre_nms_topk: int = 5000


@dataclass
class InputConfig:
    """Resizing and pixel normalisation (§4: shorter side 800)."""

    min_size: int = 800
    max_size: int = 1333
    size_divisibility: int = 64  # 32 is enough without P6; 64 keeps P6 exact
    # RGB pixels in [0, 255]; ImageNet mean / std scaled by 255 (torchvision).
    pixel_mean: tuple[float, ...] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, ...] = (58.395, 57.12, 57.375)
    max_gt_boxes: int = 100
    random_flip: bool = True
    # M > 0: batches carry ``gt_masks`` uint8 [B, G, M, M], each GT instance mask
    # sampled on an M x M grid over its box (fpn_tf/data/masks.py). 0: no masks
    # (box-only models). Model Garden crops to 112; mask targets are then resampled
    # from these into each RoI (fpn_tf/ops/mask_ops.py), so M only bounds how
    # much detail survives, at G * M * M bytes per image.
    mask_size: int = 0


# The detector types (fpn_tf.detector_types.DETECTOR_TYPES holds each one's class and defaults)
MODEL_TYPES = tuple(detector_types.DETECTOR_TYPES)


@dataclass
class ModelConfig:
    """The detector: ``type`` picks it, ``preset`` applies a named delta first.

    A section left out (``None``) is filled from the dataclass defaults with the
    type's own defaults and then the preset's delta on top
    (``fpn_tf.detector_types``): ``ModelConfig(type="retinanet")`` is the same config
    as ``from_dict(ModelConfig, {"type": "retinanet"})``, a YAML ``model: {type:
    retinanet}`` and ``build_retinanet()``. A section given as a dataclass is taken as
    it is; given in a mapping (``from_dict``, YAML) its keys win over the preset's.
    """

    type: str = "faster_rcnn"  # one of MODEL_TYPES
    preset: str = ""  # "" = the type's defaults (the paper's)
    num_classes: int = 91  # includes background (label 0)
    backbone: BackboneConfig = None
    neck: NeckConfig = None  # which pyramid (fpn | ...); its levels and channels are ``fpn``'s
    fpn: FPNConfig = None
    anchors: AnchorConfig = None
    rpn: RPNConfig = None
    roi_head: RoIHeadConfig = None
    retinanet: RetinaNetConfig = None  # model.type retinanet
    input: InputConfig = None
    mask_head: MaskHeadConfig = None  # model.type mask_rcnn only
    segment: SegmentProposalConfig = None  # model.type segment_proposals only
    # "mixed_bfloat16": backbone, FPN, RPN and box-head convs / fcs compute in bfloat16
    # (oneDNN AVX512-BF16 / AMX kernels on CPU); weights stay float32, so float32
    # checkpoints load unchanged, and proposal / box / score maths stays float32.
    compute_dtype: str = "float32"  # float32 | mixed_bfloat16

    def __post_init__(self):
        hints = typing.get_type_hints(ModelConfig)
        delta = None
        for f in dataclasses.fields(self):
            if getattr(self, f.name) is not None or not dataclasses.is_dataclass(hints[f.name]):
                continue
            if delta is None:
                try:
                    delta = detector_types.preset_delta(self.type, self.preset)
                except ValueError as e:
                    raise ConfigError(str(e)) from None
            setattr(self, f.name, _from_dict(hints[f.name], delta.get(f.name, {}), f.name))


@dataclass
class DataConfig:
    """Where training / evaluation images come from."""

    source: str = "synthetic"  # synthetic | coco_json | tfds
    # synthetic: folder to write the dataset into (created with a fixed seed)
    # coco_json: folder holding images; annotations: path of the instances JSON
    train_dir: str = ""
    train_annotations: str = ""
    eval_dir: str = ""
    eval_annotations: str = ""
    tfds_name: str = "coco/2017"
    tfds_data_dir: str = ""
    tfds_download: bool = False  # tfds hangs ~210 s offline when allowed to download
    train_split: str = "train"
    eval_split: str = "validation"
    # synthetic dataset size and image size
    synthetic_num_train: int = 200
    synthetic_num_eval: int = 50
    synthetic_image_size: int = 256
    synthetic_num_classes: int = 3
    synthetic_seed: int = 0
    shuffle_buffer: int = 256
    # A training image that cannot be read or decoded: "skip" leaves it out (logged
    # with its path, counted by image_reading.skipped_images()); "error" stops naming it.
    # Evaluation images are always fatal: skipping one would silently change the AP.
    bad_image_policy: str = "skip"  # skip | error
    # COCO-JSON duplicate image / annotation ids, or annotations whose image_id is not an
    # image (pycocotools would silently keep one entry / ignore them): "error" stops naming
    # them, "warn" logs them and trains on what pycocotools keeps.
    structure_policy: str = "error"  # error | warn


@dataclass
class TrainConfig:
    """Optimisation (§5.1/§5.2: SGD, momentum 0.9, wd 1e-4, 16 images per step)."""

    batch_size: int = 16  # global batch
    train_steps: int = 80000
    base_learning_rate: float = 0.02
    # The paper drops the LR 10x after 60k of 80k steps (§5.2); boundaries are
    # fractions of train_steps so the schedule scales with the run length.
    lr_decay_fractions: tuple[float, ...] = (0.75,)
    lr_decay_factor: float = 0.1
    warmup_steps: int = 1000  # linear warm-up (Goyal et al.; Detectron2's default)
    warmup_factor: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 1e-4  # not applied to frozen or normalisation parameters
    gradient_clip_norm: float = 0.0  # 0 disables
    # mixed_float16 only: dynamic loss scaling (Keras' LossScaleOptimizer defaults). The
    # scale halves on a step with non-finite gradients (the step is skipped) and doubles
    # after loss_scale_growth_steps finite steps in a row.
    initial_loss_scale: float = 32768.0
    loss_scale_growth_steps: int = 2000
    checkpoint_every: int = 1000
    max_checkpoints_to_keep: int = 3
    log_every: int = 20
    # Evaluation during training on the eval split every this-many steps (0: never);
    # the weights with the best ``best_metric`` are kept in model_dir/best/.
    eval_every: int = 0
    best_metric: str = "AP"
    seed: int = 0


@dataclass
class EvalConfig:
    batch_size: int = 1
    num_images: int = 0  # 0: all


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# PyYAML follows YAML 1.1, whose floats need a dot: it reads ``1e-5`` as the
# string "1e-5". Such strings are accepted where a float is expected.
_FLOAT_TEXT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _convert(value: Any, annotation: Any, where: str) -> Any:
    """Converts a YAML value to the type named by a dataclass annotation."""
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return _from_dict(annotation, value, where)
    origin = typing.get_origin(annotation)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_type, *_rest) = typing.get_args(annotation)
        return tuple(_convert(v, item_type, where) for v in value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _apply_preset(values: dict, where: str) -> dict:
    """A ModelConfig mapping with its type's defaults and ``preset``'s delta underneath."""
    values = _replace_rpn_only(values, where)
    try:
        delta = detector_types.preset_delta(
            str(values.get("type", ModelConfig.type)), str(values.get("preset") or "")
        )
    except ValueError as e:
        raise ConfigError(f"{where + '.' if where else ''}{e}") from None
    return detector_types.merge_dicts(delta, values)


def _replace_rpn_only(values: dict, where: str) -> dict:
    """Reads the former ``rpn_only: true`` (Faster R-CNN's RPN alone) as ``type: rpn``, saying so."""
    if "rpn_only" not in values:
        return values
    values = dict(values)
    rpn_only = values.pop("rpn_only")
    key = f"{where}.rpn_only" if where else "rpn_only"
    if rpn_only is True:
        if values.get("type", "faster_rcnn") != "faster_rcnn":
            raise ConfigError(f"{key}: only a faster_rcnn could be rpn_only; use model.type: rpn")
        values["type"] = "rpn"
        logging.warning("%s: true is read as model.type: rpn (the RPN alone); write that instead", key)
    elif rpn_only is not False:
        raise ConfigError(f"{key}: expected true/false, got {rpn_only!r} (write model.type: rpn instead)")
    return values


def _from_dict(cls: type, values: dict, where: str = "") -> Any:
    if cls is ModelConfig:
        values = _apply_preset(values, where)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"{cls.__name__} accepts: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in values.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = _convert(value, hints[name], key)
    return cls(**kwargs)


def from_dict(cls: type, values: dict) -> Any:
    """Builds dataclass ``cls`` from a nested dict and checks its values.

    Raises:
      ConfigError: naming the dotted key of an unknown key, a value of the wrong
        type, or a value out of its range (``fpn_tf.config_checks``).
    """
    return check_config(_from_dict(cls, values or {}))


def to_dict(config: Any) -> dict:
    """Nested plain-Python dict (tuples as lists) of a config dataclass."""

    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(config))


def apply_overrides(values: dict, overrides: list[str] | tuple[str, ...] | None) -> dict:
    """A copy of the nested config dict ``values`` with ``a.b=value`` overrides set.

    Values are parsed as YAML scalars / lists (``train.batch_size=2``,
    ``model.anchors.sizes=[16,32,64,128,256]``); missing sections are created
    (``from_dict`` then names a key no config has).

    Raises:
      ConfigError: naming an override that is not ``key.path=value`` or that
        descends into a value that is not a section.
    """
    values = copy.deepcopy(values)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key, raw = item.split("=", 1)
        node = values
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return values


def with_overrides(
    config: ExperimentConfig, overrides: list[str] | tuple[str, ...] | None
) -> ExperimentConfig:
    """``config`` with ``a.b=value`` overrides applied (``apply_overrides``), checked again."""
    try:
        return from_dict(ExperimentConfig, apply_overrides(to_dict(config), overrides))
    except ConfigError as e:
        raise ConfigError(f"override: {e}") from None


def load_config(path: str | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Loads an ExperimentConfig from a YAML file plus ``a.b=value`` overrides.

    ``path`` is a file or the name of a shipped config ("demo", see
    ``fpn_tf.config_files``). The file is parsed with ``yaml.safe_load`` (data,
    never code). Overrides are parsed as YAML scalars/lists, e.g. ``train.batch_size=2`` or
    ``model.anchors.sizes=[16,32,64,128,256]``.
    """
    values: dict = {}
    if path:
        path = resolve_config_path(path)
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        values = loaded
    values = apply_overrides(values, overrides)
    try:
        return from_dict(ExperimentConfig, values)
    except ConfigError as e:
        raise ConfigError(f"{path or 'config'}: {e}") from None
