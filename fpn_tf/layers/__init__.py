"""fpn_tf.layers."""
