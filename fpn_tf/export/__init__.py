"""fpn_tf.export."""
