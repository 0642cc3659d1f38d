"""fpn_tf.evaluation."""
