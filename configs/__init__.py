"""Experiment YAMLs, installed as the package ``fpn_tf.configs`` (see fpn_tf/config_files.py)."""
