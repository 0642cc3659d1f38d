"""One round-trip check for every registered Keras layer (as KerasHub's run_layer_test).

``check_layer_round_trip(layer, args)``: the layer serialises through the Keras
registry ("fpn_tf>Name"), deserialises to the same class and config, and the clone,
given the original's weights, computes the same outputs on ``args``.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf


def _flat(outputs) -> list[np.ndarray]:
    return [np.asarray(t) for t in tf.nest.flatten(outputs)]


def check_layer_round_trip(layer: keras.layers.Layer, args: tuple, kwargs: dict | None = None, atol=1e-6):
    """Asserts config, class, weights and outputs survive get_config -> from_config."""
    kwargs = kwargs or {}
    expected = layer(*args, **kwargs)
    serialized = keras.saving.serialize_keras_object(layer)
    assert serialized["registered_name"] == f"fpn_tf>{type(layer).__name__}"
    clone = keras.saving.deserialize_keras_object(serialized)
    assert type(clone) is type(layer)
    assert clone.get_config() == layer.get_config()
    clone(*args, **kwargs)  # builds the variables
    assert len(clone.weights) == len(layer.weights)
    clone.set_weights(layer.get_weights())
    got = clone(*args, **kwargs)
    want_flat, got_flat = _flat(expected), _flat(got)
    assert len(want_flat) == len(got_flat)
    for w, g in zip(want_flat, got_flat):
        assert w.shape == g.shape
        np.testing.assert_allclose(g, w, atol=atol)
    return clone
