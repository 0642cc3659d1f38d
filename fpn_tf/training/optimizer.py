"""Learning-rate schedule, SGD and weight decay (FPN paper §5.1/§5.2).

The paper trains with synchronous SGD on 8 GPUs, 16 images per step, momentum
0.9, weight decay 1e-4, LR 0.02 for 60k steps then 0.002 for 20k (§5.2; the
RPN-only runs of §5.1 use 30k + 10k). The linear warm-up is not in the paper: it
comes from Goyal et al. 2017 and is Detectron2's default (1000 steps from
0.001 × the base LR); it is what makes LR 0.02 stable from a random head.

Weight decay is an L2 term ``wd * w`` added to the gradient (as Detectron and
torchvision's SGD do, i.e. *not* decoupled AdamW-style decay) of every trainable
convolution / dense kernel and bias. Normalisation parameters (gamma / beta of
batch / group / layer norm) are never decayed (Detectron2's
``WEIGHT_DECAY_NORM = 0``), and frozen variables are not trainable so they get
no update at all. Detectron2 decays biases too; we follow it.

Gradients are post-processed *after* they are summed over replicas (see
``fpn_tf.training.trainer``): decay is added once to the global gradient and
global-norm clipping sees the true global norm. Keras' own ``global_clipnorm``
would clip each replica's partial gradient before the all-reduce, so it is not
used; ``ReducedGradientSGD`` is Keras' SGD told that its gradients arrive
already all-reduced.

mixed_float16 uses dynamic loss scaling (``CountingLossScaleOptimizer``, Keras'
``LossScaleOptimizer`` plus a count of the steps it skipped): the loss is
multiplied by the scale before differentiation, the all-reduced gradients are
checked for inf / NaN, a bad step is skipped (no update, LR schedule not
advanced) and the scale halved; ``loss_scale_scalars`` gives the trainer the
scale and the skip count for its log and TensorBoard.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from fpn_tf.config import TrainConfig

MIXED_PRECISION_POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")


@keras.saving.register_keras_serializable(package="fpn_tf")
class WarmupStepDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up followed by step decay.

    ``lr(step) = base_lr * w(step) * decay_factor ** #{b in boundaries: step >= b}``
    with ``w(step) = warmup_factor + (1 - warmup_factor) * step / warmup_steps``
    for ``step < warmup_steps`` and 1 afterwards (Detectron2's
    ``WarmupMultiStepLR``: the LR of step ``b`` is already decayed).

    Args:
        base_learning_rate: LR after warm-up (paper §5.2: 0.02 at 16 images/step).
        boundaries: increasing step numbers at which the LR is multiplied by
            ``decay_factor`` (paper §5.2: 60000 of 80000).
        decay_factor: multiplier at each boundary (paper: 0.1, i.e. 0.02 → 0.002).
        warmup_steps: length of the linear warm-up; 0 disables it.
        warmup_factor: LR multiplier at step 0.
    """

    def __init__(
        self,
        base_learning_rate: float,
        boundaries: tuple[int, ...] | list[int] = (),
        decay_factor: float = 0.1,
        warmup_steps: int = 0,
        warmup_factor: float = 0.001,
    ):
        boundaries = [int(b) for b in boundaries]
        if any(b2 <= b1 for b1, b2 in zip(boundaries, boundaries[1:])):
            raise ValueError(f"LR decay boundaries must increase strictly, got {boundaries}")
        if any(b <= 0 for b in boundaries):
            raise ValueError(f"LR decay boundaries must be positive steps, got {boundaries}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if base_learning_rate <= 0:
            raise ValueError(f"base_learning_rate must be > 0, got {base_learning_rate}")
        self.base_learning_rate = float(base_learning_rate)
        self.boundaries = boundaries
        self.decay_factor = float(decay_factor)
        self.warmup_steps = int(warmup_steps)
        self.warmup_factor = float(warmup_factor)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        lr = tf.constant(self.base_learning_rate, tf.float32)
        for boundary in self.boundaries:
            lr = tf.where(step >= float(boundary), lr * self.decay_factor, lr)
        if self.warmup_steps > 0:
            alpha = tf.minimum(step / float(self.warmup_steps), 1.0)
            lr = lr * (self.warmup_factor * (1.0 - alpha) + alpha)
        return lr

    def get_config(self) -> dict:
        return {
            "base_learning_rate": self.base_learning_rate,
            "boundaries": list(self.boundaries),
            "decay_factor": self.decay_factor,
            "warmup_steps": self.warmup_steps,
            "warmup_factor": self.warmup_factor,
        }


def decay_boundaries(train: TrainConfig, train_steps: int | None = None) -> list[int]:
    """Step numbers of the LR drops: ``round(fraction * train_steps)`` per fraction."""
    steps = train.train_steps if train_steps is None else train_steps
    for f in train.lr_decay_fractions:
        if not 0.0 < f < 1.0:
            raise ValueError(f"train.lr_decay_fractions must lie in (0, 1), got {train.lr_decay_fractions}")
    return [max(1, int(round(f * steps))) for f in train.lr_decay_fractions]


def build_learning_rate_schedule(train: TrainConfig, train_steps: int | None = None) -> WarmupStepDecay:
    """The schedule of ``train`` for a run of ``train_steps`` (default ``train.train_steps``).

    The default TrainConfig gives 0.02 with a 1000-step warm-up, then 0.002 from
    step 60000 of 80000 (paper §5.2).
    """
    return WarmupStepDecay(
        base_learning_rate=train.base_learning_rate,
        boundaries=decay_boundaries(train, train_steps),
        decay_factor=train.lr_decay_factor,
        warmup_steps=train.warmup_steps,
        warmup_factor=train.warmup_factor,
    )


@keras.saving.register_keras_serializable(package="fpn_tf")
class ReducedGradientSGD(keras.optimizers.SGD):
    """Keras SGD whose ``apply`` takes gradients already summed over replicas.

    Keras' TF optimizer all-reduces gradients inside ``apply`` when called in a
    replica context; the trainer sums them itself first (so that weight decay
    and global-norm clipping act on the global gradient), so the second sum is
    skipped here. Outside tf.distribute this is exactly ``keras.optimizers.SGD``.
    """

    def _all_reduce_sum_gradients(self, grads_and_vars):
        return list(grads_and_vars)


def build_optimizer(
    train: TrainConfig, mixed_precision: str = "float32", train_steps: int | None = None
) -> keras.optimizers.Optimizer:
    """SGD with momentum ``train.momentum`` (paper: 0.9) and the schedule above.

    With ``mixed_precision="mixed_float16"`` the SGD is wrapped in Keras'
    dynamic ``LossScaleOptimizer``. Weight decay and clipping are not set on
    the Keras optimizer: the trainer applies them to the all-reduced gradients
    (``postprocess_gradients``).
    """
    if mixed_precision not in MIXED_PRECISION_POLICIES:
        raise ValueError(
            f"mixed_precision must be one of {', '.join(MIXED_PRECISION_POLICIES)}, got {mixed_precision!r}"
        )
    if not 0.0 <= train.momentum < 1.0:
        raise ValueError(f"train.momentum must lie in [0, 1), got {train.momentum}")
    sgd = ReducedGradientSGD(
        learning_rate=build_learning_rate_schedule(train, train_steps),
        momentum=train.momentum,
        nesterov=False,
    )
    if mixed_precision == "mixed_float16":
        if train.initial_loss_scale <= 0 or train.loss_scale_growth_steps < 1:
            raise ValueError(
                f"train.initial_loss_scale must be > 0 and train.loss_scale_growth_steps >= 1, got "
                f"{train.initial_loss_scale} and {train.loss_scale_growth_steps}"
            )
        return CountingLossScaleOptimizer(
            sgd,
            initial_scale=train.initial_loss_scale,
            dynamic_growth_steps=train.loss_scale_growth_steps,
        )
    return sgd


@keras.saving.register_keras_serializable(package="fpn_tf")
class CountingLossScaleOptimizer(keras.optimizers.LossScaleOptimizer):
    """Keras' dynamic ``LossScaleOptimizer`` that also counts the steps it skipped.

    ``skipped_steps`` (int variable, part of the optimizer's checkpointed state) is
    incremented with the halving of the scale, in Keras' own non-finite branch,
    so it counts exactly the steps whose update was dropped, under every
    tf.distribute strategy (the branch runs once per replica copy, as for
    ``dynamic_scale``, so every copy holds the same count).
    """

    def build(self, var_list):
        self.skipped_steps = self.add_variable(
            shape=(), dtype="int", initializer="zeros", aggregation="none", name="skipped_steps"
        )
        super().build(var_list)

    def _stateful_handle_non_finite_grads(self):
        self.skipped_steps.assign_add(1)
        super()._stateful_handle_non_finite_grads()


def loss_scale_scalars(optimizer: keras.optimizers.Optimizer) -> dict[str, float]:
    """{"loss_scale", "skipped_steps"} of a loss-scaling optimizer, {} for any other."""
    if not isinstance(optimizer, keras.optimizers.LossScaleOptimizer) or not optimizer.built:
        return {}
    out = {"loss_scale": float(optimizer.dynamic_scale.numpy())}
    if hasattr(optimizer, "skipped_steps"):
        out["skipped_steps"] = float(optimizer.skipped_steps.numpy())
    return out


def is_normalization_layer(layer: keras.layers.Layer) -> bool:
    """True for Keras batch / layer / group / RMS norm layers and any layer class
    whose name ends in ``Normalization`` or ``Norm`` (e.g. a FrozenBatchNorm)."""
    norm_types = (
        keras.layers.BatchNormalization,
        keras.layers.LayerNormalization,
        keras.layers.GroupNormalization,
        keras.layers.RMSNormalization,
        keras.layers.UnitNormalization,
    )
    name = type(layer).__name__
    return isinstance(layer, norm_types) or name.endswith("Normalization") or name.endswith("Norm")


def weight_decay_mask(model: keras.Model) -> list[bool]:
    """One flag per ``model.trainable_variables``: True where weight decay applies.

    Every trainable variable is decayed (kernels and biases alike) except those
    owned by a normalisation layer (``is_normalization_layer``).
    """
    norm_ids = set()
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if is_normalization_layer(layer):
            norm_ids.update(id(v) for v in layer.weights)
    return [id(v) not in norm_ids for v in model.trainable_variables]


def postprocess_gradients(
    grads: list[tf.Tensor],
    variables: list,
    decay_mask: list[bool],
    weight_decay: float,
    clip_norm: float = 0.0,
    loss_scale: tf.Tensor | float = 1.0,
) -> list[tf.Tensor]:
    """Adds L2 weight decay and clips by global norm (on all-reduced gradients).

    For gradients of a loss multiplied by ``loss_scale`` (mixed_float16's
    dynamic loss scaling, unscaled later by the LossScaleOptimizer) the decay
    term and the clip norm are scaled alike, which equals unscaling, decaying,
    clipping and rescaling (the scale is a power of two, so exactly).

    Args:
        grads: gradients of the (replica-summed) loss, one per variable; None
            entries (variables the loss does not reach) stay None.
        variables: the trainable variables, same order.
        decay_mask: ``weight_decay_mask(model)``.
        weight_decay: L2 coefficient; ``grad += weight_decay * variable``.
        clip_norm: > 0 clips the list to this global norm (after decay).
        loss_scale: the factor the loss was multiplied by before differentiation.
    """
    if not len(grads) == len(variables) == len(decay_mask):
        raise ValueError(
            f"got {len(grads)} gradients, {len(variables)} variables, {len(decay_mask)} decay flags"
        )
    loss_scale = tf.cast(loss_scale, tf.float32)
    out = []
    for g, v, decay in zip(grads, variables, decay_mask):
        if g is not None and decay and weight_decay > 0.0:
            coefficient = tf.cast(weight_decay * loss_scale, g.dtype)
            g = g + coefficient * tf.cast(v, g.dtype)
        out.append(g)
    if clip_norm > 0.0:
        present = [i for i, g in enumerate(out) if g is not None]
        clipped, _ = tf.clip_by_global_norm([out[i] for i in present], clip_norm * loss_scale)
        for i, g in zip(present, clipped):
            out[i] = g
    return out
