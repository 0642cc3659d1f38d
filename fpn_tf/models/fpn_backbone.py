"""ResNet + feature pyramid: a normalised image to the levels the heads use.

``FPNConfig.variant`` selects the rows of the paper's Table 1 (§5.1):

| variant      | row | returned levels (default levels 2..5, maxpool P6)       |
|--------------|-----|----------------------------------------------------------|
| ``fpn``      | c   | P2..P5 + extra levels (P6; none; or P6, P7 by convs)     |
| ``bottom_up``| d   | P2..P5 (lateral 1×1 + smoothing 3×3 per C) + extras      |
| ``no_lateral``| e  | P2..P5 (1×1 on C5, upsample + smoothing) + extras        |
| ``p2_only``  | f   | P2 only (full FPN, finest level; no extras)              |
| ``c4``/``c5``| a/b | the raw backbone map C4 / C5, its own channels           |

The extra levels come from ``FPNConfig.extra_block``: "maxpool" (P6 = max-pool
kernel 1 stride 2 of P_max, the paper's), "conv_p5" / "conv_c5" (RetinaNet's
stride-2 3×3 convs on P_max / C_max, ``num_extra_levels`` of them), "none".

Shapes: B images, H/W input height/width, h/w a level's map size, C channels (d).
"""

from __future__ import annotations

import keras

from fpn_tf.config import BackboneConfig, FPNConfig, ModelConfig
from fpn_tf.detector_types import EXTRA_BLOCKS, FPN_VARIANTS, NECK_TYPES, import_path
from fpn_tf.layers.fpn import ConvExtraLevels, ExtraLevels, FeaturePyramid, MaxPoolP6
from fpn_tf.levels import backbone_levels, level_number, pyramid_level_names
from fpn_tf.models.resnet import build_resnet, resnet_output_specs
from fpn_tf.neck_configs import NeckConfig


def _check_fpn_config(fpn: FPNConfig) -> None:
    if fpn.variant not in FPN_VARIANTS:
        raise ValueError(f"unknown FPN variant {fpn.variant!r}; valid variants: {', '.join(FPN_VARIANTS)}")
    if fpn.extra_block not in EXTRA_BLOCKS:
        raise ValueError(
            f"unknown FPN extra_block {fpn.extra_block!r}; valid blocks: {', '.join(EXTRA_BLOCKS)}"
        )
    if not 2 <= fpn.min_level <= fpn.max_level <= 5:
        raise ValueError(
            f"FPN levels must satisfy 2 <= min_level <= max_level <= 5 (C2..C5), "
            f"got min_level={fpn.min_level}, max_level={fpn.max_level}"
        )
    if fpn.num_channels < 1:
        raise ValueError(f"FPN num_channels must be >= 1, got {fpn.num_channels}")
    if fpn.extra_block == "maxpool" and fpn.num_extra_levels != 1:
        raise ValueError(
            f"extra_block 'maxpool' makes exactly 1 level, got num_extra_levels={fpn.num_extra_levels}"
        )
    if fpn.extra_block.startswith("conv") and fpn.num_extra_levels < 1:
        raise ValueError(f"extra_block {fpn.extra_block!r} needs num_extra_levels >= 1")


def _uses_extra_levels(fpn: FPNConfig) -> bool:
    return fpn.variant in ("fpn", "bottom_up", "no_lateral") and fpn.extra_block != "none"


def extra_block(fpn: FPNConfig, name: str = "fpn_extra") -> ExtraLevels:
    """The layer making the levels above ``max_level`` (``fpn.extra_block``, not "none")."""
    if fpn.extra_block == "maxpool":
        return MaxPoolP6(name=name)
    return ConvExtraLevels(fpn.num_channels, fpn.num_extra_levels, name=name)


def add_extra_levels(outputs: dict, features: dict, fpn: FPNConfig, name: str = "fpn_extra") -> dict:
    """``outputs`` (P_min..P_max) plus the extra levels of ``fpn`` (none for "none").

    The source is C_max for "conv_c5", else P_max; any neck may share this.
    """
    outputs = dict(outputs)
    if fpn.extra_block == "none":
        return outputs
    top = fpn.max_level
    source = features[f"C{top}"] if fpn.extra_block == "conv_c5" else outputs[f"P{top}"]
    for offset, level in enumerate(extra_block(fpn, name)(source)):
        outputs[f"P{top + 1 + offset}"] = level
    return outputs


def fpn_output_specs(
    backbone: BackboneConfig | None = None, fpn: FPNConfig | None = None
) -> dict[str, tuple[int, int]]:
    """``{level name: (channels, stride)}`` of ``build_fpn_backbone(backbone, fpn)``, finest first."""
    backbone = backbone or BackboneConfig()
    fpn = fpn or FPNConfig()
    _check_fpn_config(fpn)
    c_specs = resnet_output_specs(backbone)
    return {
        name: c_specs[name] if name.startswith("C") else (fpn.num_channels, 2 ** level_number(name))
        for name in pyramid_level_names(fpn)
    }


def build_fpn_neck(features: dict, fpn: FPNConfig, neck: NeckConfig | None = None) -> dict:
    """The FPN (§3) on symbolic backbone maps: ``{"C2": ..}`` -> ``{"P2": .., "P6": ..}``.

    ``fpn.variant`` picks the paper's Table 1 row (module docstring); ``neck`` is
    unused (the FPN has no options beyond ``model.fpn``). The pyramid is the layer
    ``"fpn"``, the extra levels the layer ``"fpn_extra"``.
    """
    del neck
    if fpn.variant in ("c4", "c5"):
        name = fpn.variant.upper()
        return {name: features[name]}
    outputs = fpn_levels(features, fpn)
    if _uses_extra_levels(fpn):
        outputs = add_extra_levels(outputs, features, fpn)
    return outputs


def fpn_levels(features: dict, fpn: FPNConfig) -> dict:
    """The FPN layer ``"fpn"`` (``fpn.variant``'s connections) on ``{"C<k>": ..}`` -> P_min..P_max,
    without the extra levels (necks built on the FPN add theirs after their own layers)."""
    pyramid = FeaturePyramid(
        num_channels=fpn.num_channels,
        min_level=fpn.min_level,
        max_level=fpn.max_level,
        lateral=fpn.variant != "no_lateral",
        top_down=fpn.variant != "bottom_up",
        output_levels=(fpn.min_level,) if fpn.variant == "p2_only" else None,
        name="fpn",
    )
    return dict(pyramid({k: features[k] for k in backbone_levels(fpn)}))


def build_fpn_backbone(
    backbone: BackboneConfig | None = None,
    fpn: FPNConfig | None = None,
    input_shape: tuple[int | None, int | None, int] = (None, None, 3),
    name: str = "fpn_backbone",
    neck: NeckConfig | None = None,
) -> keras.Model:
    """Builds ResNet + the neck (default the FPN) as a functional ``keras.Model``.

    Args:
      backbone: the ResNet body (default ``BackboneConfig()``: ResNet-50, frozen
        BN, stem + res2 frozen).
      fpn: the pyramid's levels and channels, and the FPN's options (default
        ``FPNConfig()``: full FPN on C2..C5, d = 256, max-pool P6).
      input_shape: ``(H, W, 3)`` without the batch; ``None`` for any size.
      name: model name.
      neck: which neck (``NeckConfig.type``, one of ``fpn_tf.detector_types.NECK_TYPES``;
        default the FPN).

    Returns:
      A model mapping an already-normalised image ``[B, H, W, 3]`` float32 to a
      dict of levels named and ordered as ``fpn_tf.levels.pyramid_level_names(fpn)``;
      level k is ``[B, ceil(H / 2**k), ceil(W / 2**k), channels]`` (e.g.
      ResNet-50 + FPN on 800×1344 gives P2..P6 of 200×336 .. 13×21, 256 channels).
      The ResNet is a nested model named ``backbone.name`` (its layers keep the
      torchvision-mappable names of ``fpn_tf.models.resnet``).
    """
    backbone = backbone or BackboneConfig()
    fpn = fpn or FPNConfig()
    neck = neck or NeckConfig()
    _check_fpn_config(fpn)
    if neck.type not in NECK_TYPES:
        raise ValueError(f"unknown model.neck.type {neck.type!r}; valid necks: {', '.join(NECK_TYPES)}")
    needed = backbone_levels(fpn)
    resnet = build_resnet(backbone, input_shape=input_shape)
    if needed[-1] != "C5":
        # Drop the stages after the last used one (e.g. layer4 for the C4 baseline).
        resnet = keras.Model(resnet.input, {k: resnet.output[k] for k in needed}, name=resnet.name)

    images = keras.Input(shape=input_shape, name="images")
    features = resnet(images)
    outputs = import_path(NECK_TYPES[neck.type])({k: features[k] for k in needed}, fpn, neck)
    expected = pyramid_level_names(fpn)
    if list(outputs) != expected:
        raise ValueError(
            f"neck {neck.type!r} returned levels {list(outputs)}, expected {expected} (model.fpn)"
        )
    return keras.Model(images, outputs, name=name)


def build_pyramid(cfg: ModelConfig, name: str = "pyramid") -> tuple[keras.Model, dict[str, tuple[int, int]]]:
    """The detector's pyramid (ResNet + ``cfg.neck``) and its ``{level: (channels, stride)}``.

    The specs are read off the built model's outputs, so the heads are built from what
    the neck made, not from a second computation of it.
    """
    model = build_fpn_backbone(cfg.backbone, cfg.fpn, name=name, neck=cfg.neck)
    specs = {k: (int(t.shape[-1]), 2 ** level_number(k)) for k, t in model.output.items()}
    return model, specs
