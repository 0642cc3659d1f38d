"""Batch normalisation with fixed statistics and affine parameters.

Detection backbones are fine-tuned with batches of 1–2 images per device, too few
for batch statistics, so the ImageNet statistics are frozen (Detectron2's and
torchvision's ``FrozenBatchNorm2d``). Unlike ``keras.layers.BatchNormalization``
with ``trainable=False``, all four weights here are always non-trainable and the
layer behaves the same in training and inference.

Two equal formulations, chosen per call for speed and memory (outputs agree up
to float rounding):

- ``FusedBatchNormV3(is_training=False)`` on 4-D inputs where no gradient is
  needed (inference, or a frozen stage during training): TF's grappler remapper
  fuses it into the preceding convolution (``_FusedConv2D`` with ``FusedBatchNorm``
  and a following ``Relu``, which oneDNN runs as one primitive), so no separate
  multiply, add and ReLU passes over the activation are made — measured in the
  optimised graph of the ResNet-50 body: all 53 convolutions fused, 159 ``Mul``,
  106 ``AddV2`` and 33 ``Relu`` passes gone.
- ``x * scale + shift`` elsewhere (trainable stages in training): its gradient
  needs no saved activation, where ``FusedBatchNormGradV3`` would keep each
  convolution's output alive for the backward pass.

The remapper does not fuse the first form into bfloat16 convolutions; there the
ResNet's convolutions apply the norm themselves (``fpn_tf.layers.folded_conv``)
and this layer passes its input through.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops


@keras.saving.register_keras_serializable(package="fpn_tf")
class FrozenBatchNorm(keras.layers.Layer):
    """``y = (x - moving_mean) / sqrt(moving_variance + epsilon) * gamma + beta``.

    Computed as one fused per-channel ``x * scale + shift``. The four weights,
    named ``gamma``, ``beta``, ``moving_mean`` and ``moving_variance`` (as in
    ``keras.layers.BatchNormalization``, so either layer loads the other's
    weights), are non-trainable float32 vectors of length C. They are initialised
    to the identity transform (1, 0, 0, 1).

    Args:
      epsilon: added to the variance; 1e-5 is PyTorch's default (torchvision's
        COCO detection weights were trained with 0.0).

    Input: ``[..., C]`` float (channels last). Output: same shape and dtype.
    """

    def __init__(self, epsilon: float = 1e-5, **kwargs):
        super().__init__(**kwargs)
        if epsilon < 0:
            raise ValueError(f"FrozenBatchNorm epsilon must be >= 0, got {epsilon}")
        self.epsilon = float(epsilon)
        # weakref to a FoldableConv2D that applies this norm in its own call
        # (fpn_tf/layers/folded_conv.py); not serialised. None: the norm runs itself.
        self.folded_into = None

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is None:
            raise ValueError(f"FrozenBatchNorm needs a known channel count, got input shape {input_shape}")
        for name, init in (
            ("gamma", "ones"),
            ("beta", "zeros"),
            ("moving_mean", "zeros"),
            ("moving_variance", "ones"),
        ):
            setattr(
                self,
                name,
                # autocast=False: the statistics stay float32 under a mixed policy
                # (FusedBatchNormV3 takes float32 statistics with bfloat16 inputs).
                self.add_weight(
                    name=name, shape=(channels,), initializer=init, trainable=False, autocast=False
                ),
            )

    def call(self, inputs, training=None):
        conv = self.folded_into() if self.folded_into is not None else None
        if conv is not None and conv.folds(training):
            return inputs  # the conv before this layer applied it (bfloat16 inference)
        if len(inputs.shape) == 4 and (not training or not self.trainable):
            return self._fused(inputs)
        scale = self.gamma * ops.rsqrt(self.moving_variance + self.epsilon)
        shift = self.beta - self.moving_mean * scale
        return inputs * ops.cast(scale, inputs.dtype) + ops.cast(shift, inputs.dtype)

    def _fused(self, inputs):
        """The TF op the remapper folds into a preceding Conv2D (NHWC, float32 statistics)."""
        outputs, *_ = tf.raw_ops.FusedBatchNormV3(
            x=inputs,
            scale=ops.convert_to_tensor(self.gamma),
            offset=ops.convert_to_tensor(self.beta),
            mean=ops.convert_to_tensor(self.moving_mean),
            variance=ops.convert_to_tensor(self.moving_variance),
            epsilon=self.epsilon,
            data_format="NHWC",
            is_training=False,
        )
        return outputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config["epsilon"] = self.epsilon
        return config
