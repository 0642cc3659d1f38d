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
same layers. The trainer calls only ``compute_losses``; the evaluator, the exporter,
serving and ``scripts/predict.py`` call the model (``model(inputs)``), read its
output dict by key and ask the methods below what else they need, never a
detector's type or attributes:

    detection_boxes [B, D, 4], detection_scores [B, D], detection_classes [B, D]
    (contiguous labels 1..K-1, 0 in padding), num_detections [B]: box detectors;
    detection_masks [B, D, M, M]: box-relative mask probabilities (mask detectors);
    proposal_boxes [B, N, 4] / proposal_scores [B, N] (+ proposal_masks [B, N, M, M]):
    proposal models.

    scored_outputs()            what evaluation scores (fpn_tf.detector_types.SCORED_OUTPUTS)
    proposal_outputs(images, image_info)   RPN proposals for AR (models with an RPN)
    served_config()             the config with the inference settings the model runs with
    serving_problem()           why it cannot serve detections (None when it can)

Adding a detector: a module under ``fpn_tf/models/`` with a ``Detector`` subclass and
a ``build_<name>()`` function, and one entry in ``fpn_tf.detector_types.DETECTOR_TYPES``
(docs/design.md walks through it).

Shapes: B images, H/W padded input size, D detections per image, N proposals per
image, M mask side. image_info [B, 6] is (orig_h, orig_w, valid_h, valid_w, scale_y, scale_x).
"""

from __future__ import annotations

import contextlib
import dataclasses

import keras
import tensorflow as tf

from fpn_tf import detector_types
from fpn_tf.config import ModelConfig, from_dict, to_dict
from fpn_tf.detector_types import COMPUTE_DTYPES
from fpn_tf.layers.normalization import PixelNormalization
from fpn_tf.models.fpn_backbone import build_pyramid
from fpn_tf.models.keras_training import KerasTraining


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


def with_generator_settings(section, generator):
    """``section`` (a config dataclass) with ``generator``'s score threshold, NMS IoU and detections
    per image.

    The detection generators' settings may be changed after building; ``served_config``
    records the values a model runs with.
    """
    return dataclasses.replace(
        section,
        score_threshold=float(generator.score_threshold),
        nms_iou=float(generator.nms_iou),
        detections_per_image=int(generator.detections_per_image),
    )


def pyramid_channels(specs: dict[str, tuple[int, int]]) -> int:
    """The one channel count of a pyramid's levels (shared heads need one)."""
    channels = {c for c, _ in specs.values()}
    if len(channels) != 1:
        raise ValueError(f"pyramid levels differ in channels {channels}; a shared head needs one")
    (in_channels,) = channels
    return in_channels


class Detector(KerasTraining, keras.Model):
    """Base class of the detectors: a functional model built from forward + postprocess.

    Subclasses set ``loss_keys`` and implement ``build_layers``, ``forward``,
    ``loss_terms`` and ``postprocess`` (module docstring). ``build_layers`` assigns each
    layer to its own attribute (TF checkpoints do not see layers in lists or dicts).
    ``compile`` / ``fit`` / ``evaluate`` / ``predict`` come from ``KerasTraining``
    (fpn_tf/models/keras_training.py).
    """

    loss_keys: tuple[str, ...] = ("total_loss",)

    def __init__(self, config: ModelConfig | dict | None = None, **kwargs):
        model_type = detector_types.type_of_detector_class(type(self))
        if config is None:
            config = ModelConfig(type=model_type)
        elif isinstance(config, dict):
            config = from_dict(ModelConfig, {"type": model_type, **config})
        if config.type != model_type:
            raise ValueError(
                f"{type(self).__name__} is model.type {model_type!r}, got a config of type {config.type!r}"
            )
        self.config = config
        self.build_layers(config)
        images = keras.Input(shape=(None, None, 3), name="images", dtype="float32")
        image_info = keras.Input(shape=(6,), name="image_info", dtype="float32")
        outputs = self.postprocess(self.forward(images, image_info), image_info)
        super().__init__(inputs={"images": images, "image_info": image_info}, outputs=outputs, **kwargs)
        self.init_keras_training()

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

    # -- what the evaluator, the exporter and serving ask ------------------------------
    def scored_outputs(self) -> tuple[str, ...]:
        """What evaluation scores: some of "boxes", "masks", "proposals", "segments"."""
        return detector_types.detector_type(self.config.type).scores

    def proposal_outputs(self, images, image_info) -> dict[str, tf.Tensor]:
        """Test-time proposals for AR: proposal_boxes [B, N, 4] (original pixels), ... .

        Only detectors with a proposal stage implement it (``has_proposals``).
        """
        raise NotImplementedError(f"model.type {self.config.type!r} has no proposal stage")

    @property
    def has_proposals(self) -> bool:
        return type(self).proposal_outputs is not Detector.proposal_outputs

    def served_config(self) -> ModelConfig:
        """``config`` with the inference settings the model runs with now (the exported record).

        A detector whose settings can be changed after building (e.g. a detection
        generator's score threshold) overrides this to read them back.
        """
        return self.config

    def serving_problem(self) -> str | None:
        """Why the model cannot serve detections (None: it can); the exporter refuses with it."""
        if "boxes" in self.scored_outputs() or "segments" in self.scored_outputs():
            return None
        return f"model.type {self.config.type!r} has no detections to serve"

    # -- shared -----------------------------------------------------------------------
    def build_pyramid(self, cfg: ModelConfig) -> dict[str, tuple[int, int]]:
        """Builds the pixel normaliser and the pyramid (ResNet + ``cfg.neck``) once.

        Sets ``self.normalizer`` and ``self.pyramid``; returns the pyramid's
        ``{level: (channels, stride)}`` read off the built layers (finest first). The
        pyramid's convs run under ``cfg.compute_dtype``.
        """
        self.normalizer = PixelNormalization(
            cfg.input.pixel_mean, cfg.input.pixel_std, dtype="float32", name="pixel_normalization"
        )
        with dtype_policy(compute_policy(cfg)):
            self.pyramid, specs = build_pyramid(cfg, name="pyramid")
        return specs

    def pyramid_features(self, images, image_info, training=False) -> dict:
        """Raw images [B, H, W, 3] (0..255) -> the pyramid's levels ``{"P2": [B, h, w, C], ...}``."""
        return self.pyramid(self.normalizer(images, image_info), training=training)

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
