"""Keras-native training for every detector: ``compile`` / ``fit`` / ``evaluate`` / ``predict``.

``Detector`` inherits ``KerasTraining``, which fills Keras' own extension points
(``train_step``, ``test_step``, ``predict_step``) with the detector's
``compute_losses`` and its inference graph, so plain Keras code works::

    model = fpn_tf.build_faster_rcnn(num_classes=4)
    train, _ = fpn_tf.build_dataset(data_config, model.config.input, "train", batch_size=2, training=True)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9, global_clipnorm=10.0))
    model.fit(train, epochs=2, steps_per_epoch=100, callbacks=[fpn_tf.CocoEvaluation(config)])
    detections = model.predict(uint8_images)           # raw RGB [B, h, w, 3], any size
    model.export("detector.onnx", format="onnx", input_size=(800, 1333))   # or "openvino" (.xml)

Data: ``fit`` / ``evaluate`` take the batch dicts of ``fpn_tf.data.pipeline.build_dataset``
(docs/design.md "The batch"); a dataset yielding ``(batch, ignored)`` pairs works too.
No ``loss=`` is given to ``compile``: the detector's losses are its own
(``loss_terms``); ``fit`` logs each of ``loss_keys`` (``total_loss`` as Keras'
``loss``) averaged over the epoch. ``predict`` takes raw RGB images (uint8 or
float 0..255, ``[B, h, w, 3]``, one size per batch; a ``tf.data.Dataset`` of
batches may change size from batch to batch) or already-preprocessed
``{"images", "image_info"}`` dicts, and returns the detector's outputs with
boxes in each image's original pixels.

What differs from ``scripts/train.py``'s custom loop (fpn_tf/training/trainer.py),
deliberately: the optimizer is the Keras optimizer you compile with, with Keras'
meaning of ``weight_decay`` (decoupled: ``w -= lr * wd * w``) and ``global_clipnorm``;
the custom loop applies torchvision's coupled L2 (``g += wd * w``) and its warmup
schedule (``fpn_tf.training.optimizer``), saves the input position for exact
resumption and runs under MultiWorkerMirroredStrategy, where Keras 3.15's ``fit``
fails (keras-team/keras#20585). The sampler seeds are the same
(image id, ``optimizer.iterations``).

Shapes: B images, h/w an image's own size, H/W the padded network input.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from fpn_tf.data.preprocess import preprocess_for_inference

# The key Keras reports ``total_loss`` under (what ``fit``'s progress bar and
# EarlyStopping / ModelCheckpoint(monitor="loss") read).
KERAS_LOSS_NAME = "loss"


def _batch_of(data) -> dict:
    """The batch dict of a ``fit`` / ``evaluate`` element (``batch`` or ``(batch, ...)``)."""
    if isinstance(data, (tuple, list)):
        data = data[0]
    if not isinstance(data, dict) or "images" not in data:
        raise ValueError(
            "a detector trains on the batch dicts of fpn_tf.data.pipeline.build_dataset "
            "({'images', 'image_info', 'gt_boxes', 'gt_classes', ...}); got "
            f"{type(data).__name__}{sorted(data) if isinstance(data, dict) else ''}"
        )
    missing = [k for k in ("image_info", "gt_boxes", "gt_classes") if k not in data]
    if missing:
        raise ValueError(f"the training batch lacks {missing} (keys: {sorted(data)})")
    return data


class KerasTraining:
    """Mixin for ``Detector``: Keras' ``train_step`` / ``test_step`` / ``predict_step``.

    Needs the host class to provide ``compute_losses(batch, training, step)``,
    ``loss_keys`` and ``config`` (a ``ModelConfig``), and to call
    ``init_keras_training()`` once it is built.
    """

    def init_keras_training(self) -> None:
        """Creates one running mean per loss term (call once, after ``keras.Model.__init__``).

        Keras lists tracked metrics in ``self.metrics`` and resets them every epoch;
        metrics hold no checkpointed state, so checkpoints of a compiled and an
        uncompiled detector are the same.
        """
        self.loss_term_means = [
            keras.metrics.Mean(name=KERAS_LOSS_NAME if k == "total_loss" else k) for k in self.loss_keys
        ]

    def _report(self, terms: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        for key, mean in zip(self.loss_keys, self.loss_term_means):
            mean.update_state(terms[key])
        return {mean.name: mean.result() for mean in self.loss_term_means}

    def train_step(self, data):
        batch = _batch_of(data)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        with tf.GradientTape() as tape:
            terms = self.compute_losses(batch, training=True, step=self.optimizer.iterations)
            # Keras sums gradients over replicas; dividing gives the global batch mean.
            loss = terms["total_loss"] / replicas
            scaled = self.optimizer.scale_loss(loss)  # a LossScaleOptimizer's scale, else as is
        variables = self.trainable_variables
        gradients = tape.gradient(scaled, variables)
        self.optimizer.apply(gradients, variables)
        return self._report(terms)

    def test_step(self, data):
        batch = _batch_of(data)
        terms = self.compute_losses(batch, training=False, step=tf.constant(0, tf.int64))
        return self._report(terms)

    def predict_step(self, data):
        if isinstance(data, (tuple, list)):
            data = data[0]
        if isinstance(data, dict):
            if "images" not in data or "image_info" not in data:
                raise ValueError(
                    f"predict takes raw images or {{'images', 'image_info'}}; got keys {sorted(data)}"
                )
            return self({"images": data["images"], "image_info": data["image_info"]}, training=False)
        images, image_info = self.preprocess_raw_images(data)
        return self({"images": images, "image_info": image_info}, training=False)

    def preprocess_raw_images(self, images) -> tuple[tf.Tensor, tf.Tensor]:
        """Raw RGB ``[B, h, w, 3]`` (uint8 or float 0..255) -> images [B, H, W, 3], image_info [B, 6].

        The inference resize of ``config.input`` (as serving and evaluation do),
        padded to a multiple of ``size_divisibility``.
        """
        images = tf.convert_to_tensor(images)
        if images.shape.rank != 4 or images.shape[-1] != 3:
            raise ValueError(f"predict takes RGB images [B, h, w, 3]; got shape {images.shape}")
        cfg = self.config.input
        return tf.map_fn(
            lambda image: preprocess_for_inference(image, cfg),
            images,
            fn_output_signature=(tf.TensorSpec([None, None, 3], tf.float32), tf.TensorSpec([6], tf.float32)),
        )

    def export(self, filepath, format="tf_saved_model", verbose=None, input_signature=None, **kwargs):
        """Keras' ``export``, with fpn_tf's ONNX / OpenVINO exports for ``format="onnx" | "openvino"``.

        Those take ``input_size=(H, W)``, ``batch_size=1`` and ``label_map=None``
        (fpn_tf/export/portable.py: uint8 images of that size in, the SavedModel's
        outputs out). ``"litert"`` is refused with the reason; other formats are
        Keras' own (its ``tf_saved_model`` holds the raw ``call``; the serving
        SavedModel with encoded-image signatures is ``fpn_tf.export.saved_model``).
        """
        if format in ("onnx", "openvino", "litert"):
            from fpn_tf.export import portable  # tf2onnx / openvino: only when asked for

            return portable.export_portable(
                self,
                str(filepath),
                format,
                label_map=kwargs.pop("label_map", None),
                input_hw=kwargs.pop("input_size", None),
                batch_size=kwargs.pop("batch_size", 1),
            )
        return super().export(
            filepath, format=format, verbose=verbose, input_signature=input_signature, **kwargs
        )
