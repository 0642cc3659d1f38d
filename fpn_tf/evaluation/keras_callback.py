"""COCO evaluation as a Keras callback: pycocotools AP after every N epochs of ``fit``.

    model.fit(train, epochs=12, steps_per_epoch=500,
              callbacks=[fpn_tf.CocoEvaluation(data_config, every_epochs=2),
                         keras.callbacks.ModelCheckpoint("best.keras", monitor="val_AP", mode="max")])

Each evaluation runs ``fpn_tf.evaluation.evaluate.evaluate`` on the in-memory model
(the same code as ``scripts/evaluate.py``: the eval split of ``data``, what the
detector's ``scored_outputs`` name — box AP, mask AP as ``segm_*``, proposal AR)
and adds every metric to the epoch's logs as ``val_<name>`` (``val_AP``,
``val_AP50``, ``val_segm_AP``, ``val_AR@100``, ...), so History, TensorBoard,
ModelCheckpoint and EarlyStopping see them. Epochs in between log nothing under
those names.
"""

from __future__ import annotations

import keras
from absl import logging

from fpn_tf.config import DataConfig, EvalConfig, ExperimentConfig


class CocoEvaluation(keras.callbacks.Callback):
    """pycocotools evaluation of ``self.model`` on ``data``'s eval split.

    Args:
      data: where the evaluation images and annotations are (``DataConfig``:
        ``eval_dir`` / ``eval_annotations`` for COCO-JSON, the tfds split, or the
        synthetic set).
      every_epochs: evaluate after epochs ``every_epochs``, ``2 * every_epochs``, ...
        and after the last epoch of ``fit``.
      num_images: evaluate the first N images (0 = all).
      batch_size: evaluation batch size.
      prefix: the logs' key prefix (Keras' validation metrics use ``val_``).
    """

    def __init__(
        self,
        data: DataConfig,
        every_epochs: int = 1,
        num_images: int = 0,
        batch_size: int = 1,
        prefix: str = "val_",
    ):
        super().__init__()
        if every_epochs < 1:
            raise ValueError(f"CocoEvaluation: every_epochs must be >= 1, got {every_epochs}")
        if not isinstance(data, DataConfig):
            raise TypeError(
                f"CocoEvaluation: data must be a fpn_tf.config.DataConfig, got {type(data).__name__}"
            )
        self.data = data
        self.every_epochs = int(every_epochs)
        self.eval_config = EvalConfig(batch_size=int(batch_size), num_images=int(num_images))
        self.prefix = prefix
        self.history: list[tuple[int, dict[str, float]]] = []  # (epoch, metrics) of every run
        self._epochs: int | None = None

    def on_train_begin(self, logs=None):
        self._epochs = self.params.get("epochs") if self.params else None

    def on_epoch_end(self, epoch, logs=None):
        last = self._epochs is not None and epoch + 1 == self._epochs
        if (epoch + 1) % self.every_epochs and not last:
            return
        from fpn_tf.evaluation.evaluate import evaluate  # pycocotools: only when used

        config = ExperimentConfig(model=self.model.config, data=self.data, eval=self.eval_config)
        metrics = evaluate(config, model=self.model)
        self.history.append((epoch, metrics))
        logging.info("epoch %d: %s", epoch + 1, {k: round(v, 4) for k, v in metrics.items()})
        if logs is not None:
            logs.update({f"{self.prefix}{k}": float(v) for k, v in metrics.items()})
