"""ResNet bottom-up pathway (FPN paper §3): an image to ``{"C2", "C3", "C4", "C5"}``.

The layout is torchvision's ``resnet{18,34,50,101,152}`` exactly: conv1 7×7/2
(64 channels) + bn + relu + max-pool 3×3/2; basic blocks (3×3, 3×3) or
bottlenecks (1×1, 3×3, 1×1 with ×4 expansion) whose stride sits on the 3×3 conv
(ResNet v1.5); a 1×1 conv + bn ``downsample`` on the first block of a stage when
the stride or the channel count changes; no conv bias. Every padded conv uses
PyTorch's symmetric zero padding (``ZeroPadding2D`` + a ``"valid"`` conv): Keras'
``"same"`` pads stride-2 convs asymmetrically and would shift every feature map
against torchvision's. C2..C5 are the outputs of ``layer1``..``layer4`` (strides
4, 8, 16, 32); for an H×W input, each stride-2 step maps a size n to
``floor((n - 1) / 2) + 1``, e.g. 803×1211 → C2..C5 of 201×303, 101×152, 51×76,
26×38.

Weight-name mapping from a torchvision state dict (for a weight importer):

* layer name = the module path with ``.`` replaced by ``_``:
  ``conv1`` → ``conv1``, ``layer3.5.bn2`` → ``layer3_5_bn2``,
  ``layer1.0.downsample.0`` (conv) → ``layer1_0_downsample_0``,
  ``layer1.0.downsample.1`` (bn) → ``layer1_0_downsample_1``;
* parameter: conv ``weight`` → ``kernel``, transposed from ``[O, I, kh, kw]`` to
  ``[kh, kw, I, O]``; bn ``weight`` → ``gamma``, ``bias`` → ``beta``,
  ``running_mean`` → ``moving_mean``, ``running_var`` → ``moving_variance``;
  ``num_batches_tracked`` and ``fc.*`` have no counterpart.

Layers without weights carry suffixed names that no torchvision key maps to
(``conv1_pad``, ``relu``, ``maxpool_pad``, ``maxpool``, ``layer1_0_conv2_pad``,
``layer1_0_relu1``, ``layer1_0_add``, ``layer1_0_out``).

Shapes: B images, H/W input height/width, h/w a level's map size, C channels.
"""

from __future__ import annotations

import keras
from keras import layers

from fpn_tf.config import BackboneConfig
from fpn_tf.detector_types import BACKBONE_NORMS
from fpn_tf.layers.folded_conv import FoldableConv2D
from fpn_tf.layers.frozen_batch_norm import FrozenBatchNorm

# name -> (block type, blocks per stage layer1..layer4)
_ARCHITECTURES = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}
_EXPANSION = {"basic": 1, "bottleneck": 4}
_NORMS = BACKBONE_NORMS


def _check_config(config: BackboneConfig) -> None:
    if config.name not in _ARCHITECTURES:
        raise ValueError(f"unknown backbone name {config.name!r}; valid names: {', '.join(_ARCHITECTURES)}")
    if config.norm not in _NORMS:
        raise ValueError(f"unknown backbone norm {config.norm!r}; valid norms: {', '.join(_NORMS)}")
    if not 0 <= config.freeze_at <= 5:
        raise ValueError(f"backbone freeze_at must be in 0..5, got {config.freeze_at}")
    if not config.width_multiplier > 0:
        raise ValueError(f"backbone width_multiplier must be > 0, got {config.width_multiplier}")
    if config.bn_epsilon < 0:
        raise ValueError(f"backbone bn_epsilon must be >= 0, got {config.bn_epsilon}")


def _width(channels: int, multiplier: float) -> int:
    return max(1, int(round(channels * multiplier)))


def resnet_output_specs(config: BackboneConfig) -> dict[str, tuple[int, int]]:
    """``{"C2": (channels, stride), ..., "C5": ...}`` of ``build_resnet(config)``.

    E.g. resnet50: 256/512/1024/2048 channels; resnet18: 64/128/256/512; both
    scaled by ``config.width_multiplier``. Strides are 4, 8, 16, 32.
    """
    _check_config(config)
    block, _ = _ARCHITECTURES[config.name]
    return {
        f"C{stage + 2}": (
            _width(64 * 2**stage, config.width_multiplier) * _EXPANSION[block],
            2 ** (stage + 2),
        )
        for stage in range(4)
    }


class _Builder:
    """Adds torchvision-named layers to a functional graph."""

    def __init__(self, config: BackboneConfig):
        self.config = config
        self.trainable = True

    def conv_norm(self, x, filters: int, kernel: int, stride: int, name: str, norm_name: str):
        """conv (torchvision's symmetric padding) + its norm; a frozen norm is folded where it pays."""
        pad = (kernel - 1) // 2
        if pad:
            x = layers.ZeroPadding2D(pad, name=f"{name}_pad")(x)
        conv = FoldableConv2D(
            filters,
            kernel,
            strides=stride,
            padding="valid",
            use_bias=False,
            # torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu")
            kernel_initializer=keras.initializers.VarianceScaling(2.0, "fan_out", "untruncated_normal"),
            trainable=self.trainable,
            name=name,
        )
        y = conv(x)
        if self.config.norm == "frozen_bn":
            norm = FrozenBatchNorm(epsilon=self.config.bn_epsilon, trainable=self.trainable, name=norm_name)
            conv.fold(norm)
        else:
            norm = layers.BatchNormalization(
                epsilon=self.config.bn_epsilon, momentum=0.9, trainable=self.trainable, name=norm_name
            )
        return norm(y)

    def block(self, x, kind: str, planes: int, stride: int, name: str):
        out_channels = planes * _EXPANSION[kind]
        shortcut = x
        if stride != 1 or x.shape[-1] != out_channels:
            shortcut = self.conv_norm(
                x, out_channels, 1, stride, f"{name}_downsample_0", f"{name}_downsample_1"
            )
        if kind == "basic":
            y = self.conv_norm(x, planes, 3, stride, f"{name}_conv1", f"{name}_bn1")
            y = layers.ReLU(name=f"{name}_relu1")(y)
            y = self.conv_norm(y, planes, 3, 1, f"{name}_conv2", f"{name}_bn2")
        else:
            y = self.conv_norm(x, planes, 1, 1, f"{name}_conv1", f"{name}_bn1")
            y = layers.ReLU(name=f"{name}_relu1")(y)
            y = self.conv_norm(y, planes, 3, stride, f"{name}_conv2", f"{name}_bn2")
            y = layers.ReLU(name=f"{name}_relu2")(y)
            y = self.conv_norm(y, out_channels, 1, 1, f"{name}_conv3", f"{name}_bn3")
        y = layers.Add(name=f"{name}_add")([y, shortcut])
        return layers.ReLU(name=f"{name}_out")(y)


def build_resnet(
    config: BackboneConfig,
    input_shape: tuple[int | None, int | None, int] = (None, None, 3),
    name: str | None = None,
) -> keras.Model:
    """Builds the ResNet body as a functional ``keras.Model``.

    Args:
      config: architecture (``name``: resnet18/34/50/101/152), ``width_multiplier``
        (scales every channel count), ``norm`` ("frozen_bn" → ``FrozenBatchNorm``,
        "bn" → ``keras.layers.BatchNormalization`` with momentum 0.9; both with
        ``bn_epsilon``) and ``freeze_at`` (0: nothing frozen; 1: the stem; k ≥ 2:
        the stem and ``layer1``..``layer{k-1}``, i.e. res2..res{k}; frozen layers
        get ``trainable=False``).
      input_shape: ``(H, W, 3)`` without the batch; ``None`` for any size.
      name: model name; defaults to ``config.name``.

    Returns:
      A model mapping an already-normalised image ``[B, H, W, 3]`` float32 to
      ``{"C2": [B, H/4, W/4, c2], ..., "C5": [B, H/32, W/32, c5]}`` (sizes rounded
      up; channels as ``resnet_output_specs(config)``).
    """
    _check_config(config)
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (height, width, channels), got {input_shape}")
    kind, depths = _ARCHITECTURES[config.name]
    builder = _Builder(config)

    images = keras.Input(shape=input_shape, name="images")
    builder.trainable = config.freeze_at < 1
    x = builder.conv_norm(images, _width(64, config.width_multiplier), 7, 2, "conv1", "bn1")
    x = layers.ReLU(name="relu")(x)
    # Zero padding equals PyTorch's -inf padding here: the input is post-ReLU.
    x = layers.ZeroPadding2D(1, name="maxpool_pad")(x)
    x = layers.MaxPooling2D(3, strides=2, padding="valid", name="maxpool")(x)

    outputs = {}
    for stage, num_blocks in enumerate(depths):
        builder.trainable = config.freeze_at < stage + 2
        planes = _width(64 * 2**stage, config.width_multiplier)
        for index in range(num_blocks):
            stride = 2 if stage > 0 and index == 0 else 1
            x = builder.block(x, kind, planes, stride, f"layer{stage + 1}_{index}")
        outputs[f"C{stage + 2}"] = x
    return keras.Model(images, outputs, name=name or config.name)


def build_resnet_stage(
    config: BackboneConfig,
    stage: int,
    input_channels: int,
    stride: int = 2,
    name: str | None = None,
) -> keras.Model:
    """Builds one ResNet stage res{stage} (``layer{stage - 1}``) alone, e.g. as a RoI head.

    The blocks, widths, norm and layer names are those ``build_resnet(config)``
    gives the stage, so ``build_resnet_stage(config, 5, c4_channels)`` is the
    "conv5 head" of the C4 Faster R-CNN baseline (He et al., FPN paper Table
    3(a)) and can take torchvision's ``layer4.*`` weights. The stage is
    trainable unless ``config.freeze_at >= stage`` (as in ``build_resnet``).

    Args:
      config: architecture, width, norm (see ``build_resnet``).
      stage: 2..5 (res2..res5).
      input_channels: channels of the input map (e.g. C4's).
      stride: stride of the stage's first block (2 as in the backbone; 1 keeps
        the resolution).
      name: model name; defaults to ``f"res{stage}"``.

    Returns:
      A model mapping ``[N, h, w, input_channels]`` float32 to
      ``[N, ceil(h / stride), ceil(w / stride), C]`` with C the stage's output
      channels (``resnet_output_specs(config)[f"C{stage}"][0]``), e.g. res5 of a
      ResNet-50: ``[N, 14, 14, 1024] -> [N, 7, 7, 2048]``.
    """
    _check_config(config)
    if not 2 <= stage <= 5:
        raise ValueError(f"stage must be 2..5 (res2..res5), got {stage}")
    if input_channels < 1:
        raise ValueError(f"input_channels must be >= 1, got {input_channels}")
    if stride not in (1, 2):
        raise ValueError(f"stride must be 1 or 2, got {stride}")
    kind, depths = _ARCHITECTURES[config.name]
    builder = _Builder(config)
    builder.trainable = config.freeze_at < stage
    index = stage - 2
    planes = _width(64 * 2**index, config.width_multiplier)
    inputs = keras.Input(shape=(None, None, input_channels), name="features")
    x = inputs
    for block in range(depths[index]):
        x = builder.block(x, kind, planes, stride if block == 0 else 1, f"layer{index + 1}_{block}")
    return keras.Model(inputs, x, name=name or f"res{stage}")
