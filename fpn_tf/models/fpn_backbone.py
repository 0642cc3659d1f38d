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

from fpn_tf.config import BackboneConfig, FPNConfig
from fpn_tf.layers.fpn import ConvExtraLevels, ExtraLevels, FeaturePyramid, MaxPoolP6
from fpn_tf.models.resnet import build_resnet, resnet_output_specs

VARIANTS = ("fpn", "bottom_up", "no_lateral", "p2_only", "c4", "c5")
EXTRA_BLOCKS = ("maxpool", "conv_p5", "conv_c5", "none")


def _check_fpn_config(fpn: FPNConfig) -> None:
    if fpn.variant not in VARIANTS:
        raise ValueError(f"unknown FPN variant {fpn.variant!r}; valid variants: {', '.join(VARIANTS)}")
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


def _extra_block(fpn: FPNConfig) -> ExtraLevels:
    if fpn.extra_block == "maxpool":
        return MaxPoolP6(name="fpn_extra")
    return ConvExtraLevels(fpn.num_channels, fpn.num_extra_levels, name="fpn_extra")


def fpn_output_specs(
    backbone: BackboneConfig | None = None, fpn: FPNConfig | None = None
) -> dict[str, tuple[int, int]]:
    """``{level name: (channels, stride)}`` of ``build_fpn_backbone(backbone, fpn)``, finest first."""
    backbone = backbone or BackboneConfig()
    fpn = fpn or FPNConfig()
    _check_fpn_config(fpn)
    c_specs = resnet_output_specs(backbone)
    if fpn.variant in ("c4", "c5"):
        name = fpn.variant.upper()
        return {name: c_specs[name]}
    d = fpn.num_channels
    if fpn.variant == "p2_only":
        return {f"P{fpn.min_level}": (d, 2**fpn.min_level)}
    specs = {f"P{k}": (d, 2**k) for k in range(fpn.min_level, fpn.max_level + 1)}
    if _uses_extra_levels(fpn):
        top = fpn.max_level
        channels = d if fpn.extra_block != "maxpool" else specs[f"P{top}"][0]
        for k in range(top + 1, top + 1 + fpn.num_extra_levels):
            specs[f"P{k}"] = (channels, 2**k)
    return specs


def build_fpn_backbone(
    backbone: BackboneConfig | None = None,
    fpn: FPNConfig | None = None,
    input_shape: tuple[int | None, int | None, int] = (None, None, 3),
    name: str = "fpn_backbone",
) -> keras.Model:
    """Builds ResNet + FPN as a functional ``keras.Model``.

    Args:
      backbone: the ResNet body (default ``BackboneConfig()``: ResNet-50, frozen
        BN, stem + res2 frozen).
      fpn: the pyramid (default ``FPNConfig()``: full FPN on C2..C5, d = 256,
        max-pool P6).
      input_shape: ``(H, W, 3)`` without the batch; ``None`` for any size.
      name: model name.

    Returns:
      A model mapping an already-normalised image ``[B, H, W, 3]`` float32 to a
      dict of levels named and ordered as ``fpn_output_specs(backbone, fpn)``;
      level k is ``[B, ceil(H / 2**k), ceil(W / 2**k), channels]`` (e.g.
      ResNet-50 + FPN on 800×1344 gives P2..P6 of 200×336 .. 13×21, 256 channels).
      The ResNet is a nested model named ``backbone.name`` (its layers keep the
      torchvision-mappable names of ``fpn_tf.models.resnet``); the pyramid is the
      layer ``"fpn"``, the extra levels the layer ``"fpn_extra"``.
    """
    backbone = backbone or BackboneConfig()
    fpn = fpn or FPNConfig()
    _check_fpn_config(fpn)
    if fpn.variant in ("c4", "c5"):
        needed = [fpn.variant.upper()]
    else:
        needed = [f"C{k}" for k in range(fpn.min_level, fpn.max_level + 1)]

    resnet = build_resnet(backbone, input_shape=input_shape)
    if needed[-1] != "C5":
        # Drop the stages after the last used one (e.g. layer4 for the C4 baseline).
        resnet = keras.Model(resnet.input, {k: resnet.output[k] for k in needed}, name=resnet.name)

    images = keras.Input(shape=input_shape, name="images")
    features = resnet(images)
    if fpn.variant in ("c4", "c5"):
        return keras.Model(images, {needed[0]: features[needed[0]]}, name=name)

    pyramid = FeaturePyramid(
        num_channels=fpn.num_channels,
        min_level=fpn.min_level,
        max_level=fpn.max_level,
        lateral=fpn.variant != "no_lateral",
        top_down=fpn.variant != "bottom_up",
        output_levels=(fpn.min_level,) if fpn.variant == "p2_only" else None,
        name="fpn",
    )
    outputs = dict(pyramid({k: features[k] for k in needed}))
    if _uses_extra_levels(fpn):
        top = fpn.max_level
        source = features[f"C{top}"] if fpn.extra_block == "conv_c5" else outputs[f"P{top}"]
        for offset, level in enumerate(_extra_block(fpn)(source)):
            outputs[f"P{top + 1 + offset}"] = level
    return keras.Model(images, outputs, name=name)
