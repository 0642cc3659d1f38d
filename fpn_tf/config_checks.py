"""Load-time checks of a configuration: every numeric field's range, the choices
of the string fields that select code, and the fields that must agree.

``fpn_tf.config.from_dict`` (and so ``load_config``) runs ``check_config`` on
what it builds, so a bad value fails when the YAML is read, naming its dotted
key (``model.input.min_size must be >= 1, got 0``), not steps later inside
the model or as a ZeroDivisionError. Every problem of a config is listed in one
error.

``RULES`` holds one rule per numeric field of every config dataclass, keyed by the
dataclass's name (a test keeps it complete: a new numeric field without a rule fails
it). Tuple fields are checked element by element (``anchors.sizes[2]``). The choice
lists come from ``fpn_tf.detector_types``; this module does not import
``fpn_tf.config`` (which imports it), so there is no import circle.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any

from fpn_tf import detector_types as T
from fpn_tf.levels import pyramid_levels

if typing.TYPE_CHECKING:
    from fpn_tf import config as C


class ConfigError(ValueError):
    """A configuration file or override that does not fit the dataclasses."""


@dataclass(frozen=True)
class Range:
    """``low <= value <= high`` (either bound optional; ``open_low``: ``low < value``)."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def ok(self, value) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.open_high else value > self.high))

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            left = "(" if self.open_low else "["
            right = ")" if self.open_high else "]"
            return f"be in {left}{self.low:g}, {self.high:g}{right}"
        if self.low is not None:
            return f"be {'>' if self.open_low else '>='} {self.low:g}"
        return f"be {'<' if self.open_high else '<='} {self.high:g}"


@dataclass(frozen=True)
class Choice:
    values: tuple[str, ...]

    def ok(self, value) -> bool:
        return value in self.values

    def describe(self) -> str:
        return f"be one of {', '.join(self.values)}"


@dataclass(frozen=True)
class Each:
    """A tuple field: every element satisfies ``rule``; its length within [min_len, max_len]."""

    rule: Range
    min_len: int = 0
    max_len: int | None = None


POSITIVE = Range(0, open_low=True)  # > 0
AT_LEAST_1 = Range(1)
NON_NEGATIVE = Range(0)
UNIT = Range(0, 1)  # probabilities, fractions, IoU thresholds
LEVEL = Range(2, 7)  # P2 (stride 4) .. P7 (stride 128)

RULES: dict[str, dict[str, Any]] = {
    "BackboneConfig": {
        "name": Choice(T.RESNETS),
        "width_multiplier": POSITIVE,
        "freeze_at": Range(0, 5),
        "norm": Choice(T.BACKBONE_NORMS),
        "bn_epsilon": NON_NEGATIVE,
    },
    "FPNConfig": {
        "variant": Choice(T.FPN_VARIANTS),
        "num_channels": AT_LEAST_1,
        "min_level": Range(2, 5),  # built from C2..C5
        "max_level": Range(2, 5),
        "extra_block": Choice(T.EXTRA_BLOCKS),
        "num_extra_levels": Range(0, 2),  # P6 or P6, P7
    },
    "AnchorConfig": {
        "sizes": Each(POSITIVE, min_len=1),
        "aspect_ratios": Each(POSITIVE, min_len=1),
        "offset": UNIT,
    },
    "RPNConfig": {
        "conv_channels": NON_NEGATIVE,
        "positive_iou": UNIT,
        "negative_iou": UNIT,
        "batch_size_per_image": AT_LEAST_1,
        "positive_fraction": UNIT,
        "box_coder_weights": Each(POSITIVE, 4, 4),
        "pre_nms_topk_train": AT_LEAST_1,
        "pre_nms_topk_test": AT_LEAST_1,
        "post_nms_topk_train": AT_LEAST_1,
        "post_nms_topk_test": AT_LEAST_1,
        "nms_iou": UNIT,
        "min_box_size": NON_NEGATIVE,
        "box_loss": Choice(T.BOX_LOSSES),
        "smooth_l1_beta": NON_NEGATIVE,
        "loss_weight": NON_NEGATIVE,
    },
    "RoIHeadConfig": {
        "batch_size_per_image": AT_LEAST_1,
        "positive_fraction": UNIT,
        "foreground_iou": UNIT,
        "background_iou_high": UNIT,
        "background_iou_low": UNIT,
        "pooler_resolution": AT_LEAST_1,
        "sampling_ratio": AT_LEAST_1,  # static shapes: no adaptive (<= 0) sampling
        "canonical_size": POSITIVE,
        "canonical_level": LEVEL,
        "min_level": LEVEL,
        "max_level": LEVEL,
        "head": Choice(T.BOX_HEADS),
        "fc_dim": AT_LEAST_1,
        "num_fc": NON_NEGATIVE,
        "box_coder_weights": Each(POSITIVE, 4, 4),
        "box_loss": Choice(T.BOX_LOSSES),
        "smooth_l1_beta": NON_NEGATIVE,
        "loss_weight": NON_NEGATIVE,
        "score_threshold": UNIT,
        "nms_iou": UNIT,
        "detections_per_image": AT_LEAST_1,
        "detection_pre_nms_topk": AT_LEAST_1,
    },
    "InputConfig": {
        "min_size": AT_LEAST_1,
        "max_size": AT_LEAST_1,
        "size_divisibility": AT_LEAST_1,
        "pixel_mean": Each(Range(), 3, 3),
        "pixel_std": Each(POSITIVE, 3, 3),
        "max_gt_boxes": AT_LEAST_1,
        "mask_size": NON_NEGATIVE,  # 0: no masks in the batch
    },
    "RetinaNetConfig": {
        "scales_per_octave": AT_LEAST_1,
        "num_convs": NON_NEGATIVE,
        "conv_channels": NON_NEGATIVE,  # 0: the pyramid's channels
        "norm": Choice(T.RETINANET_NORMS),
        "prior_probability": Range(0, 1, open_low=True, open_high=True),
        "positive_iou": UNIT,
        "negative_iou": UNIT,
        "box_coder_weights": Each(POSITIVE, 4, 4),
        "focal_alpha": UNIT,
        "focal_gamma": NON_NEGATIVE,
        "box_loss": Choice(T.BOX_LOSSES),
        "smooth_l1_beta": NON_NEGATIVE,
        "loss_normalization": Choice(T.LOSS_NORMALIZATIONS),
        "class_loss_weight": NON_NEGATIVE,
        "box_loss_weight": NON_NEGATIVE,
        "score_threshold": UNIT,
        "topk_candidates": AT_LEAST_1,
        "nms_iou": UNIT,
        "detections_per_image": AT_LEAST_1,
    },
    "MaskHeadConfig": {
        "pooler_resolution": AT_LEAST_1,
        "sampling_ratio": AT_LEAST_1,
        "num_convs": NON_NEGATIVE,
        "conv_channels": AT_LEAST_1,
        "loss_weight": NON_NEGATIVE,
    },
    "SegmentProposalConfig": {
        "mlps": Each(Range(5, 7), min_len=1, max_len=2),  # 5 and/or 7 (cross-checked)
        "hidden_dim": AT_LEAST_1,
        "mask_size": AT_LEAST_1,
        "scales": Each(POSITIVE, min_len=1),
        "padding": NON_NEGATIVE,
        "levels": Each(LEVEL),
        "max_scale_distance": NON_NEGATIVE,
        "batch_size_per_image": AT_LEAST_1,
        "positive_fraction": UNIT,
        "mask_loss_weight": NON_NEGATIVE,
        "proposals_per_image": AT_LEAST_1,
        "image_pyramid": Each(POSITIVE),
    },
    "NeckConfig": {
        "type": Choice(tuple(T.NECK_TYPES)),
        "pafpn_style": Choice(T.PAFPN_STYLES),
    },
    "ModelConfig": {
        "type": Choice(tuple(T.DETECTOR_TYPES)),
        "num_classes": Range(2),  # background + at least one class
        "compute_dtype": Choice(T.COMPUTE_DTYPES),
    },
    "DataConfig": {
        "source": Choice(T.DATA_SOURCES),
        "synthetic_num_train": AT_LEAST_1,
        "synthetic_num_eval": AT_LEAST_1,
        "synthetic_image_size": Range(16),  # write_synthetic_coco's limits
        "synthetic_num_classes": Range(1, 6),  # synthetic.SHAPES
        "synthetic_seed": NON_NEGATIVE,
        "shuffle_buffer": NON_NEGATIVE,
        "bad_image_policy": Choice(T.BAD_IMAGE_POLICIES),
        "structure_policy": Choice(T.STRUCTURE_POLICIES),
    },
    "TrainConfig": {
        "batch_size": AT_LEAST_1,
        "train_steps": AT_LEAST_1,
        "base_learning_rate": POSITIVE,
        "lr_decay_fractions": Each(UNIT),
        "lr_decay_factor": POSITIVE,
        "warmup_steps": NON_NEGATIVE,
        "warmup_factor": UNIT,
        "momentum": Range(0, 1, open_high=True),
        "weight_decay": NON_NEGATIVE,
        "gradient_clip_norm": NON_NEGATIVE,
        "checkpoint_every": AT_LEAST_1,
        "max_checkpoints_to_keep": AT_LEAST_1,
        "log_every": AT_LEAST_1,
        "eval_every": NON_NEGATIVE,  # 0: no evaluation during training
        "initial_loss_scale": POSITIVE,  # mixed_float16
        "loss_scale_growth_steps": AT_LEAST_1,
        "seed": NON_NEGATIVE,
    },
    "EvalConfig": {
        "batch_size": AT_LEAST_1,
        "num_images": NON_NEGATIVE,  # 0: all
    },
}


def _field_problems(config: Any, where: str) -> list[str]:
    problems = []
    for name, rule in RULES.get(type(config).__name__, {}).items():
        if not hasattr(config, name):
            continue
        value = getattr(config, name)
        key = f"{where}{name}"
        if isinstance(rule, Each):
            if len(value) < rule.min_len or (rule.max_len is not None and len(value) > rule.max_len):
                want = rule.min_len if rule.max_len == rule.min_len else f"at least {rule.min_len}"
                problems.append(f"{key} must have {want} values, got {len(value)}: {list(value)}")
            for i, v in enumerate(value):
                if not rule.rule.ok(v):
                    problems.append(f"{key}[{i}] must {rule.rule.describe()}, got {v!r}")
        elif not rule.ok(value):
            problems.append(f"{key} must {rule.describe()}, got {value!r}")
    return problems


def _not_above(out: list[str], where: str, config, low: str, high: str) -> bool:
    """Appends a problem unless ``config.<low> <= config.<high>``; True when in order."""
    a, b = (getattr(config, k.split(".")[-1]) for k in (low, high))
    if a > b:
        out.append(f"{where}{low} ({a}) must be <= {where}{high} ({b})")
    return a <= b


def _model_problems(m: C.ModelConfig, where: str) -> list[str]:
    """Fields of different sections that must agree."""
    out: list[str] = []
    fpn, r = m.fpn, m.roi_head
    _not_above(out, where, fpn, "fpn.min_level", "fpn.max_level")
    if fpn.extra_block == "maxpool" and fpn.num_extra_levels != 1:
        out.append(f"{where}fpn.num_extra_levels must be 1 with maxpool, got {fpn.num_extra_levels}")
    if fpn.extra_block.startswith("conv") and fpn.num_extra_levels < 1:
        out.append(f"{where}fpn.num_extra_levels must be >= 1 with extra_block {fpn.extra_block}")
    if fpn.variant != "fpn" and m.neck.type != "fpn":
        out.append(
            f"{where}fpn.variant {fpn.variant!r} is an ablation of the FPN neck; "
            f"it cannot be combined with {where}neck.type {m.neck.type!r}"
        )
    levels = pyramid_levels(fpn)
    if len(levels) > 1 and len(m.anchors.sizes) != len(levels):
        out.append(
            f"{where}anchors.sizes has {len(m.anchors.sizes)} sizes but the pyramid has {len(levels)} levels "
            f"P{levels[0]}..P{levels[-1]} ({where}fpn): give one size per level"
        )
    in_order = _not_above(out, where, r, "roi_head.min_level", "roi_head.max_level")
    if in_order and len(levels) > 1 and not any(r.min_level <= k <= r.max_level for k in levels):
        out.append(
            f"{where}roi_head.min_level..max_level ({r.min_level}..{r.max_level}) holds no pyramid level "
            f"(P{levels[0]}..P{levels[-1]})"
        )
    _not_above(out, where, r, "roi_head.background_iou_low", "roi_head.background_iou_high")
    _not_above(out, where, m.rpn, "rpn.negative_iou", "rpn.positive_iou")
    _not_above(out, where, m.input, "input.min_size", "input.max_size")
    seg = m.segment
    if sorted(set(seg.mlps)) != sorted(seg.mlps) or not set(seg.mlps) <= {5, 7}:
        out.append(f"{where}segment.mlps must be (5,), (7,) or (5, 7), got {list(seg.mlps)}")
    return out


def _train_problems(t: C.TrainConfig, where: str) -> list[str]:
    fractions = list(t.lr_decay_fractions)
    if fractions != sorted(fractions):
        return [f"{where}lr_decay_fractions must be increasing, got {fractions}"]
    return []


_CROSS = {"ModelConfig": _model_problems, "TrainConfig": _train_problems}


def config_problems(config: Any, where: str = "") -> list[str]:
    """Every problem of ``config`` (a config dataclass) and its sections, by dotted key."""
    prefix = f"{where}." if where else ""
    problems = _field_problems(config, prefix)
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            problems += config_problems(value, prefix + f.name)
    if type(config).__name__ in _CROSS:
        problems += _CROSS[type(config).__name__](config, prefix)
    return problems


def check_config(config: Any, where: str = "") -> Any:
    """Returns ``config`` unchanged, or raises ``ConfigError`` listing every problem."""
    problems = config_problems(config, where)
    if problems:
        raise ConfigError("; ".join(problems))
    return config
