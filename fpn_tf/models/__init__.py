"""fpn_tf.models."""
