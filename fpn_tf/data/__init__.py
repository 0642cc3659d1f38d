"""fpn_tf.data."""
