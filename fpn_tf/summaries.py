"""TensorBoard scalars for training and evaluation, without the tensorboard package.

``tf.summary.scalar`` lives in the (optional) tensorboard package, which
tensorflow-cpu does not install; ``write_scalars`` writes the same event records
(plugin "scalars") with TF's own ``tf.summary.write``.
"""

from __future__ import annotations

import tensorflow as tf
from tensorflow.core.framework import summary_pb2


def write_scalars(writer: tf.summary.SummaryWriter, scalars: dict[str, float], step: int) -> None:
    """Writes ``{tag: value}`` at ``step`` and flushes."""
    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = "scalars"
    with writer.as_default(step=step):
        for name, value in scalars.items():
            tf.summary.write(name, tf.constant(float(value), tf.float32), metadata=metadata)
    writer.flush()
