"""fpn_tf: Feature Pyramid Networks (Lin et al., CVPR 2017) with Faster R-CNN for TensorFlow / Keras 3."""
