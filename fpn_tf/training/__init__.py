"""fpn_tf.training."""
