"""COCO evaluation of a trained model (box AP; proposal AR with --proposals; segment proposers: segment AR).

    python scripts/evaluate.py --model_dir runs/demo              # latest checkpoint
    python scripts/evaluate.py --model_dir runs/demo --checkpoint runs/demo/ckpt-2000
    python scripts/evaluate.py --config configs/demo.yaml --saved_model saved_models/fpn

The run's config is ``<model_dir>/config.yaml`` (written by scripts/train.py)
unless --config is given. Prints AP, AP50, AP75, APs, APm, APl (and AR@100,
AR@1000, ARs/m/l@1000), writes ``<checkpoint>.metrics.json`` and TensorBoard
scalars under ``<model_dir>/eval``.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "Training directory (latest checkpoint, config.yaml).")
flags.DEFINE_string("checkpoint", None, "A specific checkpoint prefix (default: the latest in --model_dir).")
flags.DEFINE_string("saved_model", None, "Evaluate an exported SavedModel instead of a checkpoint.")
flags.DEFINE_string("config", None, "Experiment YAML (default: <model_dir>/config.yaml).")
flags.DEFINE_multi_string("override", [], "Config override key.path=value (repeatable).")
flags.DEFINE_bool("proposals", None, "Also compute proposal AR (default: only for model.type rpn).")
flags.DEFINE_integer("num_images", None, "Evaluate the first N images (default: eval.num_images; 0 = all).")
flags.DEFINE_integer("batch_size", None, "Eval batch size (default: eval.batch_size).")
flags.DEFINE_bool("xla", False, "XLA-compile inference.")
flags.DEFINE_string("metrics_json", None, "Where to write the metrics (default: <checkpoint>.metrics.json).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not (FLAGS.model_dir or FLAGS.checkpoint or FLAGS.saved_model):
        raise app.UsageError("give --model_dir, --checkpoint or --saved_model")
    from fpn_tf import run_directory
    from fpn_tf.evaluation.evaluate import evaluate, format_metrics

    model_dir = FLAGS.model_dir
    if not model_dir and FLAGS.checkpoint:
        model_dir = os.path.dirname(os.path.abspath(FLAGS.checkpoint))  # its config.yaml, eval logs
    config = run_directory.read_config(model_dir, FLAGS.config, FLAGS.override, required=True)
    metrics = evaluate(
        config,
        model_dir=model_dir,
        checkpoint=FLAGS.checkpoint,
        saved_model=FLAGS.saved_model,
        proposals=FLAGS.proposals,
        num_images=FLAGS.num_images,
        batch_size=FLAGS.batch_size,
        xla=FLAGS.xla,
        metrics_path=FLAGS.metrics_json,
    )
    print(format_metrics(metrics))
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main))
