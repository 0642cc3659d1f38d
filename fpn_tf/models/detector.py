"""The interface every detector of the family implements (Faster R-CNN, Mask R-CNN, ...).

A detector is a Keras functional model whose ``call`` is inference, built from
three methods that a subclass writes once:

    forward(images, image_info, training, targets, step) -> raw outputs
        normalise -> ResNet + FPN -> heads; with ``targets`` (training) it also
        does what needs the ground truth before the heads (e.g. RoI sampling).
    loss_terms(raw, targets, step) -> {loss name: scalar}, including "total_loss"
    postprocess(raw, image_info) -> outputs (boxes in ORIGINAL-image pixels)

``Detector.__init__`` builds the functional graph as ``postprocess(forward(...))``
on symbolic inputs, so inference, training (``compute_losses``) and export run the
same layers. The trainer calls only ``compute_losses``; the evaluator, the exporter
and ``scripts/predict.py`` only call the model (``model(inputs)``) and read its
output dict by key:

    detection_boxes [B, D, 4], detection_scores [B, D], detection_classes [B, D]
    (contiguous labels 1..K-1, 0 in padding), num_detections [B]: box detectors;
    detection_masks [B, D, M, M]: box-relative mask probabilities (mask detectors);
    proposal_boxes / proposal_scores / num_proposals: proposal models.

Adding a detector: a module under ``fpn_tf/models/`` with a ``Detector`` subclass and
a ``build_<name>()`` function, and one entry in ``fpn_tf.models.build.MODEL_TYPES``
(docs/design.md walks through Faster R-CNN as the example).

Shapes: B images, H/W padded input size, D detections per image, M mask side.
image_info [B, 6] is (orig_h, orig_w, valid_h, valid_w, scale_y, scale_x).
"""

from __future__ import annotations

import contextlib

import keras
import tensorflow as tf

from fpn_tf.config import ModelConfig, from_dict, to_dict

COMPUTE_DTYPES = ("float32", "mixed_bfloat16")


@contextlib.contextmanager
def dtype_policy(name: str | None):
    """Builds layers under the Keras dtype policy ``name`` (None: leave the global one)."""
    if name is None:
        yield
        return
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def compute_policy(cfg: ModelConfig) -> str | None:
    """The dtype policy the convs / fcs are built under (None: keep the global one).

    "float32" keeps the global policy (e.g. a trainer's mixed_float16); box, score
    and proposal maths are float32 whatever the policy.
    """
    if cfg.compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(
            f"model.compute_dtype={cfg.compute_dtype!r} is not supported; "
            f"use one of {', '.join(COMPUTE_DTYPES)}"
        )
    return None if cfg.compute_dtype == "float32" else cfg.compute_dtype


def image_seeds(batch: dict, step, stage: int = 0) -> tf.Tensor:
    """[B, 2] int32 per-image sampler seeds (image id, 2 * step + stage).

    A sample then does not depend on how a batch is split across replicas, and each
    sampling stage of a step (anchors, RoIs, ...) draws its own stream. ``step`` is a
    runtime tensor in training (a Python int that changes per step would reach XLA as
    a new constant and recompile the step).
    """
    images = batch["images"]
    batch_size = tf.shape(images)[0]
    if "image_id" in batch:
        ids = tf.cast(tf.math.floormod(tf.cast(batch["image_id"], tf.int64), 2**31 - 1), tf.int32)
    else:
        ids = tf.range(batch_size, dtype=tf.int32)
    step = tf.cast(0 if step is None else step, tf.int32)
    return tf.stack([ids, tf.fill([batch_size], step * 2 + stage)], axis=1)


class Detector(keras.Model):
    """Base class of the detectors: a functional model built from forward + postprocess.

    Subclasses set ``loss_keys`` and implement ``build_layers``, ``forward``,
    ``loss_terms`` and ``postprocess`` (module docstring). ``build_layers`` assigns each
    layer to its own attribute (TF checkpoints do not see layers in lists or dicts).
    """

    loss_keys: tuple[str, ...] = ("total_loss",)

    def __init__(self, config: ModelConfig | dict | None = None, **kwargs):
        if config is None:
            config = ModelConfig()
        elif isinstance(config, dict):
            config = from_dict(ModelConfig, config)
        self.config = config
        self.build_layers(config)
        images = keras.Input(shape=(None, None, 3), name="images", dtype="float32")
        image_info = keras.Input(shape=(6,), name="image_info", dtype="float32")
        outputs = self.postprocess(self.forward(images, image_info), image_info)
        super().__init__(inputs={"images": images, "image_info": image_info}, outputs=outputs, **kwargs)

    # -- what a detector implements -------------------------------------------------
    def build_layers(self, config: ModelConfig) -> None:
        raise NotImplementedError

    def forward(
        self, images, image_info, training: bool = False, targets: dict | None = None, step=None
    ) -> dict:
        raise NotImplementedError

    def loss_terms(self, raw: dict, targets: dict, step=None) -> dict[str, tf.Tensor]:
        raise NotImplementedError

    def postprocess(self, raw: dict, image_info) -> dict:
        raise NotImplementedError

    # -- shared -----------------------------------------------------------------------
    def compute_losses(self, batch: dict, training: bool = True, step=0) -> dict[str, tf.Tensor]:
        """Scalar float32 losses of one batch (docs/design.md), keyed by ``loss_keys``.

        ``step`` (scalar int tensor) and each image's ``image_id`` seed the samplers.
        Weight decay is the trainer's business.
        """
        image_info = tf.cast(batch["image_info"], tf.float32)
        raw = self.forward(batch["images"], image_info, training=training, targets=batch, step=step)
        result = {k: tf.cast(v, tf.float32) for k, v in self.loss_terms(raw, batch, step).items()}
        result["total_loss"] = tf.add_n([result[k] for k in self.loss_keys if k != "total_loss"])
        return result

    def trainable_weight_count(self) -> int:
        """Number of values in conv/dense kernels and biases (the usual 'parameters')."""
        return int(sum(int(tf.size(w)) for w in self.weights if "kernel" in w.path or "bias" in w.path))

    def get_config(self):
        return {"config": to_dict(self.config), "name": self.name}

    @classmethod
    def from_config(cls, config):
        return cls(**config)
