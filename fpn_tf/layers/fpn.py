"""Feature pyramid neck (FPN paper §3) and its extra coarse levels.

The building block of Fig. 3: a 1×1 *lateral* conv on the bottom-up map C_k, a
nearest-neighbour 2× *top-down* upsampling of the coarser merged map, merged by
addition, and a 3×3 *smoothing* conv giving P_k. All convs have ``d`` output
channels, a bias and no non-linearity; kernels are initialised kaiming-uniform
with a=1 (torchvision's and Detectron2's FPN init), biases 0.

Maps are ``[B, H, W, C]`` float, channels last. A level-k map has stride 2**k.

Shapes: B images, h/w a level's map size, C channels (d on the pyramid).
"""

from __future__ import annotations

import keras
from keras import ops


def _kaiming_uniform_a1() -> keras.initializers.Initializer:
    # PyTorch kaiming_uniform_(a=1): bound = sqrt(6 / ((1 + a^2) fan_in)) = sqrt(3 / fan_in).
    return keras.initializers.VarianceScaling(1.0, "fan_in", "uniform")


def _conv(
    filters: int, kernel: int, name: str, strides: int = 1, padding: str = "same"
) -> keras.layers.Conv2D:
    return keras.layers.Conv2D(
        filters,
        kernel,
        strides=strides,
        padding=padding,
        use_bias=True,
        kernel_initializer=_kaiming_uniform_a1(),
        bias_initializer="zeros",
        name=name,
    )


def _check_channels(num_channels: int) -> int:
    if int(num_channels) != num_channels or num_channels < 1:
        raise ValueError(f"num_channels must be a positive integer, got {num_channels!r}")
    return int(num_channels)


class _PyramidConv(keras.layers.Layer):
    """One conv with bias to ``num_channels``; subclasses set ``kernel_size``."""

    kernel_size: int = 1

    def __init__(self, num_channels: int = 256, **kwargs):
        super().__init__(**kwargs)
        self.num_channels = _check_channels(num_channels)
        self.conv = _conv(self.num_channels, self.kernel_size, "conv")

    def build(self, input_shape):
        self.conv.build(tuple(input_shape))

    def call(self, inputs):
        return self.conv(inputs)

    def compute_output_shape(self, input_shape):
        return (*tuple(input_shape)[:-1], self.num_channels)

    def get_config(self):
        return {**super().get_config(), "num_channels": self.num_channels}


@keras.saving.register_keras_serializable(package="fpn_tf")
class LateralConnection(_PyramidConv):
    """1×1 conv with bias taking a bottom-up map C_k to ``num_channels`` (§3).

    Input ``[B, H, W, C]``; output ``[B, H, W, num_channels]``.
    """

    kernel_size = 1


@keras.saving.register_keras_serializable(package="fpn_tf")
class Smoothing(_PyramidConv):
    """3×3 conv (stride 1, symmetric padding 1) with bias on a merged map (§3).

    Reduces the aliasing of upsampling. Input ``[B, H, W, C]``; output
    ``[B, H, W, num_channels]``.
    """

    kernel_size = 3


@keras.saving.register_keras_serializable(package="fpn_tf")
class TopDownMerge(keras.layers.Layer):
    """Nearest 2× upsampling of the coarser map, cropped to the finer map, plus add (§3).

    ``call([coarse, lateral])``: ``coarse`` is ``[B, h, w, d]``, ``lateral`` is
    ``[B, H, W, c]`` with ``h = ceil(H / 2)``, ``w = ceil(W / 2)``. The upsampled
    ``[B, 2h, 2w, d]`` map is cropped to ``[B, H, W, d]`` (statically when H, W are
    static), which for odd sizes equals torchvision's
    ``interpolate(size=(H, W), mode="nearest")``. With ``add=True`` (the default)
    ``lateral`` is added (then ``c`` must equal ``d``); with ``add=False`` (the
    no-lateral ablation, Table 1e) ``lateral`` only gives the output size.
    Output ``[B, H, W, d]``.
    """

    def __init__(self, add: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.add = bool(add)

    def build(self, input_shape):
        coarse, lateral = (tuple(s) for s in input_shape)
        if self.add and coarse[-1] is not None and lateral[-1] is not None and coarse[-1] != lateral[-1]:
            raise ValueError(
                f"{self.name}: cannot add a lateral map of {lateral[-1]} channels to a "
                f"top-down map of {coarse[-1]} channels"
            )
        for axis in (1, 2):
            if coarse[axis] is not None and lateral[axis] is not None:
                if coarse[axis] != -(-lateral[axis] // 2):
                    raise ValueError(
                        f"{self.name}: coarse map shape {coarse} is not the 2x-downsampled size of "
                        f"the lateral map shape {lateral} (expected ceil(n / 2) on axis {axis})"
                    )

    def call(self, inputs):
        coarse, lateral = inputs
        up = ops.repeat(ops.repeat(coarse, 2, axis=1), 2, axis=2)
        height, width = lateral.shape[1], lateral.shape[2]
        if height is None or width is None:
            dynamic = ops.shape(lateral)
            height = dynamic[1] if height is None else height
            width = dynamic[2] if width is None else width
        up = up[:, :height, :width, :]
        return up + ops.cast(lateral, up.dtype) if self.add else up

    def compute_output_shape(self, input_shape):
        coarse, lateral = (tuple(s) for s in input_shape)
        return (coarse[0], lateral[1], lateral[2], coarse[3])

    def get_config(self):
        return {**super().get_config(), "add": self.add}


@keras.saving.register_keras_serializable(package="fpn_tf")
class FeaturePyramid(keras.layers.Layer):
    """Builds {P_k} from {C_k} over the contiguous levels ``min_level..max_level`` (§3).

    Full FPN (``lateral=True, top_down=True``, Table 1c)::

        M_max = lateral_max(C_max);  M_k = up(M_{k+1}) + lateral_k(C_k);  P_k = smooth_k(M_k)

    ``top_down=False`` (bottom-up pyramid, Table 1d): ``P_k = smooth_k(lateral_k(C_k))``.
    ``lateral=False`` (top-down pyramid without lateral connections, Table 1e): a
    1×1 conv on C_max starts the pathway, ``M_k = up(M_{k+1})`` cropped to C_k's
    size, ``P_k = smooth_k(M_k)``.

    Args:
      num_channels: d, the channels of every P_k (256 in the paper).
      min_level, max_level: the C levels used (2..5 for C2..C5).
      lateral, top_down: the two connections of Fig. 3 (not both off).
      output_levels: the P levels to smooth and return (default all); e.g.
        ``(2,)`` for the finest-level-only variant (Table 1f), which then has no
        smoothing convs for the unused levels.

    ``call(features)``: ``features`` is a dict holding at least ``"C{k}"`` for
    every used level, ``[B, H_k, W_k, c_k]`` with ``H_k = ceil(H_{k-1} / 2)``.
    Returns ``{"P{k}": [B, H_k, W_k, num_channels]}`` for the output levels, finest first.
    """

    def __init__(
        self,
        num_channels: int = 256,
        min_level: int = 2,
        max_level: int = 5,
        lateral: bool = True,
        top_down: bool = True,
        output_levels: tuple[int, ...] | list[int] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_channels = _check_channels(num_channels)
        if not 1 <= min_level <= max_level:
            raise ValueError(f"need 1 <= min_level <= max_level, got {min_level}, {max_level}")
        if not (lateral or top_down):
            raise ValueError("a FeaturePyramid needs lateral connections, a top-down pathway or both")
        self.min_level, self.max_level = int(min_level), int(max_level)
        self.lateral, self.top_down = bool(lateral), bool(top_down)
        levels = range(self.min_level, self.max_level + 1)
        self.output_levels = tuple(
            sorted(int(k) for k in (levels if output_levels is None else output_levels))
        )
        if not self.output_levels or any(k not in levels for k in self.output_levels):
            raise ValueError(
                f"output_levels must be a non-empty subset of {min_level}..{max_level}, got {output_levels}"
            )
        d = self.num_channels
        lowest = self.output_levels[0]
        if not self.top_down:
            lateral_levels = self.output_levels
        elif self.lateral:
            lateral_levels = range(lowest, self.max_level + 1)
        else:
            lateral_levels = [self.max_level]  # only the 1x1 conv on C_max that starts the pathway
        # Sub-layers are plain attributes (lateral2, merge2, smooth2, ...): TF checkpoints
        # do not see layers held in Keras-tracked dicts or lists.
        self._lateral_levels = tuple(lateral_levels)
        # Top-down merges into every level from max_level - 1 down to the finest output level.
        self._merge_levels = tuple(range(lowest, self.max_level)) if self.top_down else ()
        for k in self._lateral_levels:
            setattr(self, f"lateral{k}", LateralConnection(d, name=f"lateral{k}"))
        for k in self._merge_levels:
            setattr(self, f"merge{k}", TopDownMerge(add=self.lateral, name=f"merge{k}"))
        for k in self.output_levels:
            setattr(self, f"smooth{k}", Smoothing(d, name=f"smooth{k}"))

    @property
    def lateral_layers(self) -> dict[int, LateralConnection]:
        """{level number: LateralConnection} (a view of the lateral{k} attributes)."""
        return {k: getattr(self, f"lateral{k}") for k in self._lateral_levels}

    @property
    def merges(self) -> dict[int, TopDownMerge]:
        """{level number: TopDownMerge} (a view of the merge{k} attributes)."""
        return {k: getattr(self, f"merge{k}") for k in self._merge_levels}

    @property
    def smoothing(self) -> dict[int, Smoothing]:
        """{level number: Smoothing} (a view of the smooth{k} attributes)."""
        return {k: getattr(self, f"smooth{k}") for k in self.output_levels}

    def _feature_shape(self, input_shape, level: int) -> tuple:
        key = f"C{level}"
        if not isinstance(input_shape, dict) or key not in input_shape:
            raise ValueError(f"{self.name}: expects a dict of feature maps holding {key!r}")
        return tuple(input_shape[key])

    def build(self, input_shape):
        d = self.num_channels
        for k, layer in self.lateral_layers.items():
            layer.build(self._feature_shape(input_shape, k))
        for k, layer in self.merges.items():
            c = self._feature_shape(input_shape, k)
            coarse = self._feature_shape(input_shape, k + 1)
            layer.build([(*coarse[:3], d), (*c[:3], d if self.lateral else c[3])])
        for k, layer in self.smoothing.items():
            layer.build((*self._feature_shape(input_shape, k)[:3], d))

    def call(self, features):
        missing = [f"C{k}" for k in range(self.min_level, self.max_level + 1) if f"C{k}" not in features]
        if missing:
            raise ValueError(f"{self.name}: missing feature maps {missing}; got {sorted(features)}")
        if not self.top_down:
            return {
                f"P{k}": self.smoothing[k](self.lateral_layers[k](features[f"C{k}"]))
                for k in self.output_levels
            }
        outputs = {}
        merged = self.lateral_layers[self.max_level](features[f"C{self.max_level}"])
        for k in range(self.max_level, self.output_levels[0] - 1, -1):
            if k < self.max_level:
                c = features[f"C{k}"]
                merged = self.merges[k]([merged, self.lateral_layers[k](c) if self.lateral else c])
            if k in self.smoothing:
                outputs[f"P{k}"] = self.smoothing[k](merged)
        return {f"P{k}": outputs[f"P{k}"] for k in self.output_levels}

    def get_config(self):
        return {
            **super().get_config(),
            "num_channels": self.num_channels,
            "min_level": self.min_level,
            "max_level": self.max_level,
            "lateral": self.lateral,
            "top_down": self.top_down,
            "output_levels": list(self.output_levels),
        }


class ExtraLevels(keras.layers.Layer):
    """Extension point for pyramid levels coarser than the last C level.

    A subclass takes one map (P_max or C_max, ``[B, H, W, C]``) and returns a
    list of ``num_levels`` maps, each at twice the stride of the one before
    (sizes ``ceil(n / 2)``), all of ``output_channels(C)`` channels.
    """

    num_levels: int = 1

    def output_channels(self, input_channels: int) -> int:
        raise NotImplementedError


@keras.saving.register_keras_serializable(package="fpn_tf")
class MaxPoolP6(ExtraLevels):
    """P6 = max-pool (kernel 1, stride 2) of P5, the paper's (§4.1); used by the RPN only.

    Input ``[B, H, W, C]``; returns ``[P6]`` of ``[B, ceil(H/2), ceil(W/2), C]``
    (kernel 1 makes it a stride-2 subsampling).
    """

    num_levels = 1

    def output_channels(self, input_channels: int) -> int:
        return input_channels

    def call(self, inputs):
        return [inputs[:, ::2, ::2, :]]

    def compute_output_shape(self, input_shape):
        b, h, w, c = input_shape
        return [(b, None if h is None else -(-h // 2), None if w is None else -(-w // 2), c)]


@keras.saving.register_keras_serializable(package="fpn_tf")
class ConvExtraLevels(ExtraLevels):
    """P6 (, P7, ...) by 3×3 stride-2 convs (padding 1, symmetric), ReLU between (RetinaNet).

    ``P6 = conv6(x)``, ``P7 = conv7(relu(P6))``; ``x`` is C5 or P5 (the builder's
    choice: ``FPNConfig.extra_block`` "conv_c5" / "conv_p5"). Kernels
    kaiming-uniform a=1, biases 0 (torchvision's ``LastLevelP6P7``).

    Input ``[B, H, W, C]``; returns ``num_levels`` maps, the i-th
    ``[B, ceil(H / 2**i), ceil(W / 2**i), num_channels]``.
    """

    def __init__(self, num_channels: int = 256, num_levels: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.num_channels = _check_channels(num_channels)
        if int(num_levels) != num_levels or num_levels < 1:
            raise ValueError(f"num_levels must be a positive integer, got {num_levels!r}")
        self.num_levels = int(num_levels)
        # Plain attributes conv0, conv1, ...: TF checkpoints do not see layers in Keras-tracked lists.
        for i in range(self.num_levels):
            setattr(self, f"conv{i}", _conv(self.num_channels, 3, f"conv{i}", strides=2, padding="valid"))

    @property
    def convs(self) -> list[keras.layers.Layer]:
        """The stride-2 convs, coarser level last (a view of the conv{i} attributes)."""
        return [getattr(self, f"conv{i}") for i in range(self.num_levels)]

    def output_channels(self, input_channels: int) -> int:
        return self.num_channels

    def build(self, input_shape):
        shape = tuple(input_shape)
        for conv in self.convs:
            conv.build(shape)
            shape = (*shape[:3], self.num_channels)

    def call(self, inputs):
        outputs = []
        x = inputs
        for i, conv in enumerate(self.convs):
            if i > 0:
                x = ops.relu(x)
            x = conv(ops.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]]))
            outputs.append(x)
        return outputs

    def compute_output_shape(self, input_shape):
        b, h, w, _ = input_shape
        shapes = []
        for _ in range(self.num_levels):
            h = None if h is None else -(-h // 2)
            w = None if w is None else -(-w // 2)
            shapes.append((b, h, w, self.num_channels))
        return shapes

    def get_config(self):
        return {**super().get_config(), "num_channels": self.num_channels, "num_levels": self.num_levels}
