"""fpn_tf.ops."""
