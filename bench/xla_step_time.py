"""Training steps per second with and without XLA, per strategy and precision.

    python bench/xla_step_time.py                         # the demo config, 20 steps a run
    python bench/xla_step_time.py --strategies=mirrored --precisions=mixed_bfloat16 --steps=30

Each run is ``fpn_tf.training.experiment.train`` in its own process (a fresh model
dir; ``mirrored`` splits the CPU into ``--num_cpu_devices`` logical devices, which
must happen before TensorFlow starts). The rate is the trainer's own
``TrainResult.steps_per_second``: steps after the first (the first traces and
compiles), over their wall time. For each (strategy, precision) the XLA and
non-XLA runs alternate, ``--repeats`` times, with the order rotated, so load
from other work on the machine hits both; the table shows medians and the
ratio XLA / no XLA. The numbers behind ``fpn_tf.training.xla_choice``
and docs/distributed.md come from this script.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLAGS = flags.FLAGS
flags.DEFINE_string("config", os.path.join(_ROOT, "configs", "demo.yaml"), "experiment YAML")
flags.DEFINE_multi_string("override", [], "config overrides key.path=value")
flags.DEFINE_list("strategies", ["one_device", "mirrored"], "one_device and/or mirrored")
flags.DEFINE_list("precisions", ["float32", "mixed_bfloat16"], "Keras dtype policies")
flags.DEFINE_integer("steps", 20, "training steps per run (the first is not timed)")
flags.DEFINE_integer("batch_size", None, "global batch (default: the config's)")
flags.DEFINE_integer("num_cpu_devices", 2, "logical CPU devices for mirrored runs")
flags.DEFINE_integer("repeats", 1, "runs per configuration (median reported)")
flags.DEFINE_string("output", "", "write the results as JSON here")
flags.DEFINE_string("worker", "", "internal: run one configuration 'strategy,precision,xla'")


def worker(spec: str) -> None:
    """One training run; prints one JSON line with its rate and first-step time."""
    strategy_name, precision, xla = spec.split(",")
    from fpn_tf.training import distribute

    if strategy_name == "mirrored":
        distribute.configure_logical_cpus(FLAGS.num_cpu_devices)
    strategy = distribute.make_strategy(strategy_name)
    from fpn_tf.config import load_config
    from fpn_tf.training.experiment import train

    config = load_config(FLAGS.config, FLAGS.override)
    with tempfile.TemporaryDirectory() as model_dir:
        start = time.perf_counter()
        result = train(
            config,
            model_dir,
            strategy=strategy,
            xla=xla == "true",
            mixed_precision=precision,
            train_steps=FLAGS.steps,
            batch_size=FLAGS.batch_size,
        )
        total = time.perf_counter() - start
    timed = FLAGS.steps - 1
    first = total - timed / result.steps_per_second if result.steps_per_second > 0 else total
    print(
        "RESULT "
        + json.dumps(
            {"steps_per_second": result.steps_per_second, "first_step_and_setup_s": round(first, 1)}
        ),
        flush=True,
    )


def run_one(strategy: str, precision: str, xla: bool) -> dict:
    args = [sys.executable, os.path.abspath(__file__), f"--worker={strategy},{precision},{str(xla).lower()}"]
    args += [
        f"--config={FLAGS.config}",
        f"--steps={FLAGS.steps}",
        f"--num_cpu_devices={FLAGS.num_cpu_devices}",
    ]
    args += [f"--override={o}" for o in FLAGS.override]
    if FLAGS.batch_size:
        args.append(f"--batch_size={FLAGS.batch_size}")
    env = dict(os.environ, PYTHONPATH=_ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(args, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"run {strategy} {precision} xla={xla} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main(argv):
    del argv
    if FLAGS.worker:
        worker(FLAGS.worker)
        return 0
    rows = []
    for strategy in FLAGS.strategies:
        for precision in FLAGS.precisions:
            rates = {True: [], False: []}
            firsts = {True: [], False: []}
            for r in range(FLAGS.repeats):
                for xla in (True, False) if r % 2 == 0 else (False, True):
                    out = run_one(strategy, precision, xla)
                    rates[xla].append(out["steps_per_second"])
                    firsts[xla].append(out["first_step_and_setup_s"])
                    print(f"  {strategy} {precision} xla={xla}: {out}", flush=True)
            row = {
                "strategy": strategy,
                "precision": precision,
                "xla_steps_per_second": statistics.median(rates[True]),
                "steps_per_second": statistics.median(rates[False]),
                "xla_first_step_s": statistics.median(firsts[True]),
                "first_step_s": statistics.median(firsts[False]),
            }
            row["ratio"] = row["xla_steps_per_second"] / row["steps_per_second"]
            rows.append(row)
    print("| strategy | precision | steps/s no XLA | steps/s XLA | XLA / no XLA | first step + setup s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['strategy']} | {r['precision']} | {r['steps_per_second']:.2f} | "
            f"{r['xla_steps_per_second']:.2f} | {r['ratio']:.2f} | "
            f"{r['first_step_s']:.0f} (XLA {r['xla_first_step_s']:.0f}) |"
        )
    if FLAGS.output:
        with open(FLAGS.output, "w", encoding="utf-8") as f:
            json.dump({"config": FLAGS.config, "steps": FLAGS.steps, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main))
