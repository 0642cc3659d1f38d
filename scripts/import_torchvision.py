"""Imports a torchvision Faster R-CNN, Mask R-CNN or RetinaNet + FPN checkpoint as a training directory.

A state dict with ``roi_heads.mask_*`` keys (``maskrcnn_resnet50_fpn``) becomes a
``model.type: mask_rcnn`` model (``fpn_tf.models.weights_torchvision_mask``), one with
``head.classification_head`` keys (``retinanet_resnet50_fpn``) a ``model.type: retinanet``
model (``fpn_tf.models.weights_torchvision_retinanet``).

    python scripts/import_torchvision.py \
        --weights fasterrcnn_resnet50_fpn_coco-258fb6c6.pth --model_dir runs/torchvision_v1
    python scripts/import_torchvision.py --weights model.npz --model_dir runs/tv --export \
        --export_dir saved_models --name fpn_torchvision

Writes into ``--model_dir`` what scripts/evaluate.py, scripts/export.py and
scripts/predict.py read from a training directory:

- ``ckpt-1.*`` + ``checkpoint``: ``tf.train.Checkpoint(model=model)``;
- ``config.yaml``: the experiment, its model the ``torchvision_v1`` preset (of
  ``model.type`` faster_rcnn, or retinanet for a ``retinanet_resnet50_fpn`` state
  dict, recognised by its ``head.classification_head`` keys) with
  the depth, width, FPN channels and class count read from the state dict
  (``--override model.a.b=value`` changes what does not affect the weights);
- ``label_map.json``: torchvision's 91-id COCO labelling for a 91-class model
  (label == COCO category id), else ``--label_map`` if given.

``--export`` also writes a SavedModel (``fpn_tf.export.saved_model``). The state
dict is read with ``torch.load(weights_only=True)`` (``.pth``; needs the
``fpn_tf[torch]`` extra) or ``np.load(allow_pickle=False)`` (``.npz``).
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("weights", None, "torchvision state dict: .pth / .pt (torch) or .npz (numpy).")
flags.DEFINE_string(
    "model_dir", None, "Directory to write the checkpoint, config.yaml and label_map.json to."
)
flags.DEFINE_multi_string(
    "override", [], "Config override key.path=value, e.g. model.roi_head.score_threshold=0.3."
)
flags.DEFINE_string(
    "label_map", None, "Label map JSON for a model that is not torchvision's 91-class COCO one."
)
flags.DEFINE_float(
    "bn_epsilon",
    None,
    "Frozen batch-norm eps the torchvision model ran with (a state dict does not record it): 0.0 for "
    "torchvision's COCO weights (the default, overwrite_eps), 1e-5 for a model built with "
    "weights_backbone=... or reloaded into *_fpn(weights=None).",
)
flags.DEFINE_bool(
    "export", False, "Also export a float32 SavedModel for TF Serving (parity with torchvision)."
)
flags.DEFINE_string("export_dir", "saved_models", "With --export: writes <export_dir>/<name>/<version>/.")
flags.DEFINE_string("name", "fpn_torchvision", "With --export: the model name (TF Serving's MODEL_NAME).")
flags.DEFINE_integer("version", None, "With --export: version number; default one more than the highest.")
flags.mark_flags_as_required(["weights", "model_dir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import tensorflow as tf

    from fpn_tf import run_directory
    from fpn_tf.config import ConfigError, ExperimentConfig, with_overrides
    from fpn_tf.models import weights_torchvision_retinanet as retinanet_weights
    from fpn_tf.models.build import build_model
    from fpn_tf.models.presets import torchvision_coco_label_map
    from fpn_tf.models.weights_torchvision import (
        WeightImportError,
        infer_torchvision_config,
        load_torchvision_state_dict,
        read_state_dict,
    )
    from fpn_tf.models.weights_torchvision_mask import (
        infer_torchvision_mask_config,
        is_mask_state_dict,
        load_torchvision_mask_state_dict,
    )

    start = time.perf_counter()
    if tf.train.latest_checkpoint(FLAGS.model_dir):
        logging.error("%s already holds a checkpoint; choose an empty --model_dir", FLAGS.model_dir)
        return 2
    try:
        state = read_state_dict(FLAGS.weights)
        if is_mask_state_dict(state):
            infer, load = infer_torchvision_mask_config, load_torchvision_mask_state_dict
        elif retinanet_weights.is_torchvision_retinanet(state):
            infer = retinanet_weights.infer_torchvision_retinanet_config
            load = retinanet_weights.load_torchvision_retinanet_state_dict
        else:
            infer, load = infer_torchvision_config, load_torchvision_state_dict
        overrides = list(FLAGS.override)
        if FLAGS.bn_epsilon is not None:
            overrides.append(f"model.backbone.bn_epsilon={FLAGS.bn_epsilon!r}")
        config = with_overrides(ExperimentConfig(model=infer(state)), overrides)
        model = build_model(config.model)
        result = load(model, state)
    except (WeightImportError, ConfigError, FileNotFoundError, ValueError) as e:
        logging.error("%s", e)
        return 2
    eps = config.model.backbone.bn_epsilon
    if FLAGS.bn_epsilon is None and not any(
        o.startswith("model.backbone.bn_epsilon=") for o in FLAGS.override
    ):
        # Assumed, not read: say so where the user sees it (a wrong eps moves boxes by up to hundreds of px).
        logging.warning(
            "batch-norm eps is not in a state dict: assuming %g, as torchvision's COCO weights run "
            "(overwrite_eps). If your torchvision model's frozen batch norms use eps 1e-5 (built with "
            "weights_backbone=... or loaded into *_fpn(weights=None)), pass --bn_epsilon 1e-5.",
            eps,
        )
    label_map = None
    if FLAGS.label_map:
        try:
            label_map = run_directory.read_label_map(None, FLAGS.label_map)
        except (OSError, ValueError) as e:
            logging.error("--label_map %s", e)
            return 2
        if label_map.num_classes != config.model.num_classes:
            logging.error(
                "%s has %d categories; the checkpoint has %d classes (with background)",
                FLAGS.label_map,
                len(label_map),
                config.model.num_classes,
            )
            return 2
    elif config.model.num_classes == 91:
        label_map = torchvision_coco_label_map()
    else:
        logging.warning(
            "no --label_map: exports will report the contiguous labels 1..%d", config.model.num_classes - 1
        )

    os.makedirs(FLAGS.model_dir, exist_ok=True)
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model), FLAGS.model_dir, max_to_keep=1)
    checkpoint = manager.save()
    run_directory.write_config(config, FLAGS.model_dir)
    if label_map is not None:
        run_directory.write_label_map(label_map, FLAGS.model_dir)
    backbone = config.model.backbone
    print(
        f"imported {len(result.loaded)} tensors from {FLAGS.weights} ({config.model.type}, {backbone.name} "
        f"x{backbone.width_multiplier:g}, {config.model.num_classes} classes, batch-norm eps {eps:g}, "
        f"score threshold {served_threshold(model)}) -> {checkpoint} in {time.perf_counter() - start:.1f} s"
    )
    if FLAGS.export:
        from fpn_tf.export.saved_model import export_saved_model

        reason = (
            "float32 for parity with torchvision (scripts/export.py --compute_dtype auto picks "
            "bfloat16 on CPUs with AVX512-BF16 / AMX)"
        )
        print(f"exporting float32: {reason}")
        path = export_saved_model(
            model,
            FLAGS.export_dir,
            FLAGS.name,
            version=FLAGS.version,
            label_map=label_map,
            precision_reason=reason,
        )
        print(f"exported {path} (float32)")
    return 0


def served_threshold(model) -> str:
    """The detection score threshold the imported model uses (torchvision's box_score_thresh: 0.05)."""
    config = model.served_config()
    section = config.retinanet if config.type == "retinanet" else config.roi_head
    return f"{section.score_threshold:g}"


if __name__ == "__main__":
    sys.exit(app.run(main))
