"""A bias-free ``Conv2D`` that can apply the ``FrozenBatchNorm`` after it in its own call.

Shapes: ``[B, H, W, C_in] -> [B, h, w, C_out]`` (channels last), as ``keras.layers.Conv2D``.

Why: in float32, TF's grappler remapper already fuses ``Conv2D`` + ``FusedBatchNormV3``
(+ ``Relu``) into one oneDNN primitive (``_FusedConv2D``), but it does not for
bfloat16 / float16 convolutions: there every frozen batch norm is a separate pass
over the activation (the ResNet-50 body at 832×1344 in bfloat16, ``bench/norm_fold.py``:
0.33 s with its 53 separate norms, 0.28 s folded, 0.29 s with no norms at all). Folding the
norm into the kernel and a bias — ``conv(x, W · s) + (β − μ · s)`` with
``s = γ / sqrt(σ² + ε)`` — gives ``Conv2D`` + ``BiasAdd`` (+ ``Relu``), which the
remapper fuses in bfloat16 too. The fold is exact up to rounding.

When: only where no gradient is needed (inference, or a frozen stage in training),
and only for a non-float32 compute dtype (float32 is fused already; folding would
only add the per-call kernel product). Otherwise the layer is a plain ``Conv2D``
and the norm runs itself. ``fold(norm)`` links the two (the ResNet builder does
it); the link is not serialised, so a model rebuilt from its config without the
builder runs the norm itself — never zero times, never twice, because the norm
asks this layer (``folds``) whether to pass its input through.
"""

from __future__ import annotations

import weakref

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="fpn_tf")
class FoldableConv2D(keras.layers.Conv2D):
    """``keras.layers.Conv2D`` (``use_bias=False``) that may apply a following ``FrozenBatchNorm``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.use_bias:
            raise ValueError("FoldableConv2D folds a batch norm into a bias: build it with use_bias=False")
        # A weak reference: a Layer attribute would be tracked as a sub-layer, putting
        # the norm's weights (and checkpoint paths) under this conv as well.
        self._norm_ref = None

    def fold(self, norm) -> None:
        """Makes this conv apply ``norm`` (a ``FrozenBatchNorm`` called on its output) when it can."""
        self._norm_ref = weakref.ref(norm)
        norm.folded_into = weakref.ref(self)

    def unfold(self) -> None:
        """Cuts the link: the norm runs itself again (``bench/norm_fold.py`` times both)."""
        norm = self._norm_ref() if self._norm_ref is not None else None
        if norm is not None:
            norm.folded_into = None
        self._norm_ref = None

    def folds(self, training=None) -> bool:
        """Whether this call applies the linked norm (the norm then passes its input through)."""
        norm = self._norm_ref() if self._norm_ref is not None else None
        no_gradient = not training or not self.trainable
        return norm is not None and self.compute_dtype != "float32" and no_gradient

    def call(self, inputs, training=None):
        if not self.folds(training):
            return super().call(inputs)
        norm = self._norm_ref()
        scale = norm.gamma * tf.math.rsqrt(norm.moving_variance + norm.epsilon)  # float32 [C_out]
        shift = norm.beta - norm.moving_mean * scale
        kernel = tf.cast(tf.cast(self.kernel, tf.float32) * scale, self.compute_dtype)
        outputs = self.convolution_op(inputs, kernel)
        return tf.nn.bias_add(outputs, tf.cast(shift, self.compute_dtype))
