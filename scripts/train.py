"""Trains Faster R-CNN + FPN (a custom tf.distribute loop; see fpn_tf/training/trainer.py).

    python scripts/train.py --config configs/demo.yaml --model_dir runs/demo --eval_after
    python scripts/train.py --config configs/faster_rcnn_r50_fpn_coco.yaml --model_dir runs/r50 \\
        --strategy mirrored --num_gpus 8 --init_checkpoint weights/resnet50.weights.h5

Batch: ``train.batch_size`` / ``--batch_size`` is the GLOBAL batch (the paper's
16 = 2 per GPU x 8 GPUs), split evenly over the replicas; or give
``--batch_size_per_replica`` (the global batch follows the replica count). The
LR is not rescaled: see docs/distributed.md. ``--config`` takes a path or the
name of a shipped config (``--config demo``).

Running it again with the same ``--model_dir`` resumes from the last checkpoint
(weights, optimizer state and step). Ctrl-C or SIGTERM save a checkpoint first.
Multi-worker: start one process per machine with ``--strategy multi_worker``
and each machine's TF_CONFIG; the chief writes the checkpoints and logs.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "Experiment YAML (configs/*.yaml).", required=True)
flags.DEFINE_string("model_dir", None, "Checkpoints, TensorBoard logs, config.yaml go here.", required=True)
flags.DEFINE_enum(
    "strategy", "one_device", ["one_device", "mirrored", "multi_worker", "tpu"], "tf.distribute."
)
flags.DEFINE_integer("num_gpus", None, "mirrored: local GPUs to use (default: all).")
flags.DEFINE_integer(
    "num_cpu_devices", 0, "Split the CPU into N logical devices (mirrored runs without a GPU); 0: leave."
)
flags.DEFINE_string("tpu", "", "tpu: TPU name or address ('' = local TPU VM).")
flags.DEFINE_enum(
    "xla",
    "auto",
    ["auto", "true", "false"],
    "XLA-compile the per-replica step; auto: on GPU/TPU, off on CPU.",
)
flags.DEFINE_enum(
    "mixed_precision", "float32", ["float32", "mixed_float16", "mixed_bfloat16"], "Keras dtype policy."
)
flags.DEFINE_integer("train_steps", None, "Override train.train_steps (the LR drops scale with it).")
flags.DEFINE_integer("batch_size", None, "Override train.batch_size (GLOBAL batch, split over replicas).")
flags.DEFINE_integer(
    "batch_size_per_replica",
    None,
    "Images per replica (GPU); the global batch is this x the replicas in sync (all workers).",
)
flags.DEFINE_string(
    "init_checkpoint", None, "Initial weights for a fresh run (.weights.h5 or TF checkpoint)."
)
flags.DEFINE_multi_string("override", [], "Config override key.path=value (repeatable).")
flags.DEFINE_bool("eval_after", False, "Evaluate the final checkpoint on the eval split (COCO AP).")
flags.DEFINE_bool(
    "allow_config_change",
    False,
    "Resume a model_dir whose config.yaml differs from this config (beyond train_steps and the "
    "logging / checkpoint intervals); changes that alter the model's variables are refused anyway.",
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Devices and the strategy first: both must exist before TensorFlow runs any op.
    from fpn_tf.training import distribute

    if FLAGS.num_cpu_devices:
        distribute.configure_logical_cpus(FLAGS.num_cpu_devices)
    strategy = distribute.make_strategy(FLAGS.strategy, num_gpus=FLAGS.num_gpus, tpu_address=FLAGS.tpu)

    from fpn_tf.checkpoints import DamagedCheckpointError
    from fpn_tf.config import ConfigError, load_config
    from fpn_tf.run_directory import DirectoryLockedError
    from fpn_tf.training.experiment import train

    try:
        config = load_config(FLAGS.config, FLAGS.override)
    except (ConfigError, OSError) as e:
        logging.error("%s", e)
        return 2
    xla = None if FLAGS.xla == "auto" else FLAGS.xla == "true"
    batch_size = FLAGS.batch_size
    if FLAGS.batch_size_per_replica is not None:
        if batch_size is not None:
            raise app.UsageError("give --batch_size (global) or --batch_size_per_replica, not both")
        batch_size = FLAGS.batch_size_per_replica * strategy.num_replicas_in_sync
        logging.info(
            "global batch %d = %d per replica x %d replicas",
            batch_size,
            FLAGS.batch_size_per_replica,
            strategy.num_replicas_in_sync,
        )
    try:
        result = train(
            config,
            FLAGS.model_dir,
            strategy=strategy,
            xla=xla,
            mixed_precision=FLAGS.mixed_precision,
            train_steps=FLAGS.train_steps,
            batch_size=batch_size,
            init_checkpoint=FLAGS.init_checkpoint,
            allow_config_change=FLAGS.allow_config_change,
        )
    except (ConfigError, DirectoryLockedError) as e:
        logging.error("%s", e)
        return 2
    except (FloatingPointError, DamagedCheckpointError) as e:
        logging.error("%s", e)
        return 1
    print(
        f"step {result.step}: "
        + "  ".join(f"{k} {v:.4f}" for k, v in sorted(result.losses.items()))
        + f"  ({result.steps_per_second:.2f} steps/s) checkpoint {result.checkpoint}"
    )
    if result.stopped_early:
        print("stopped early; run the same command again to resume")
        return 0
    if FLAGS.eval_after and distribute.is_chief(strategy):
        from fpn_tf.evaluation.evaluate import evaluate, format_metrics

        metrics = evaluate(config, model_dir=FLAGS.model_dir, checkpoint=result.checkpoint)
        print("eval:", format_metrics(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main))
