"""Multi-process tests: restart after SIGKILL, and two MultiWorkerMirroredStrategy workers.

Every subprocess is bounded by a deadline and killed with SIGKILL when it runs
over: a MultiWorkerMirroredStrategy worker whose peer never comes up hangs
forever and ignores SIGTERM (STACK_NOTES).

Run as a script, this file is one MultiWorkerMirroredStrategy worker (see
``worker_main``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 240


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2", **extra)
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


def _kill(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()  # SIGKILL: a stuck collective ignores SIGTERM
            p.wait()


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _latest_step(model_dir: str) -> int:
    """Step of the newest complete checkpoint (from the 'checkpoint' state file), -1 if none."""
    path = os.path.join(model_dir, "checkpoint")
    if not os.path.exists(path):
        return -1
    with open(path, encoding="utf-8") as f:
        match = re.search(r'^model_checkpoint_path: ".*ckpt-(\d+)"', f.read(), re.M)
    return int(match.group(1)) if match else -1


def _tiny_config(tmp_path, train_steps: int, **train):
    from test_training import tiny_experiment

    from fpn_tf.config import to_dict

    # a constant LR: the schedule does not depend on --train_steps
    config = tiny_experiment(
        tmp_path, train_steps=train_steps, lr_decay_fractions=(), warmup_steps=0, **train
    )
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(to_dict(config)))
    return config, str(path)


@pytest.mark.slow
def test_sigkill_then_restart_resumes_from_the_last_checkpoint(tmp_path):
    """scripts/train.py killed with SIGKILL mid-run; the same command resumes exactly.

    The restarted run trains two more steps from checkpoint N; the same two
    steps run in this process from a copy of checkpoint N give the same weights,
    so the restart used checkpoint N's weights, optimizer state and step.
    """
    import keras
    import tensorflow as tf

    from fpn_tf.training import distribute
    from fpn_tf.training.experiment import default_model_fn, train_dataset_fn
    from fpn_tf.training.trainer import Trainer

    config, config_path = _tiny_config(tmp_path, train_steps=10_000, checkpoint_every=3)
    model_dir = str(tmp_path / "run")
    command = [sys.executable, os.path.join(REPO, "scripts", "train.py"), "--config", config_path]
    command += ["--model_dir", model_dir]
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(command, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while _latest_step(model_dir) < 6:
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint at step >= 6 in time"
            time.sleep(0.5)
    finally:
        _kill([proc])
        log.close()
    assert proc.returncode == -9
    step = _latest_step(model_dir)
    assert 6 <= step < 10_000 and step % 3 == 0
    shutil.copytree(model_dir, tmp_path / "reference")

    restart = subprocess.run(
        command + ["--train_steps", str(step + 2), "--eval_after"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    output = restart.stdout + restart.stderr
    assert restart.returncode == 0, output[-3000:]
    assert f"resumed from {model_dir}/ckpt-{step} at step {step}" in output
    assert f"step {step + 2}: " in restart.stdout and "eval: AP" in restart.stdout
    assert _latest_step(model_dir) == step + 2

    train_cfg = dataclasses.replace(config.train, train_steps=step + 2)
    strategy = distribute.make_strategy("one_device")
    keras.utils.set_random_seed(config.train.seed)  # as train() does: tf.data's shuffle depends on it
    reference = Trainer(default_model_fn(config), train_cfg, str(tmp_path / "reference"), strategy=strategy)
    assert int(reference.step.numpy()) == step
    reference.fit(train_dataset_fn(config))
    resumed = Trainer(default_model_fn(config), train_cfg, model_dir, strategy=strategy)
    assert int(resumed.step.numpy()) == step + 2
    for a, b in zip(resumed.model.weights, reference.model.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7, err_msg=a.path)
    assert tf.train.latest_checkpoint(model_dir).endswith(f"ckpt-{step + 2}")


def worker_main(config_path: str, model_dir: str, weights_out: str) -> None:
    """One MultiWorkerMirroredStrategy worker (TF_CONFIG from the environment)."""
    from fpn_tf.training import distribute

    strategy = distribute.make_strategy("multi_worker")  # before any other TF op
    from fpn_tf.config import load_config
    from fpn_tf.training.experiment import default_model_fn, train_dataset_fn
    from fpn_tf.training.trainer import Trainer

    config = load_config(config_path)
    trainer = Trainer(default_model_fn(config), config.train, model_dir, strategy=strategy)
    result = trainer.fit(train_dataset_fn(config, model_dir, trainer.is_chief))
    np.savez(weights_out, *[v.numpy() for v in trainer.model.weights])
    print(json.dumps({"step": result.step, "chief": trainer.is_chief, "losses": result.losses}))


@pytest.mark.slow
def test_two_multi_worker_processes_end_with_identical_weights(tmp_path):
    from fpn_tf.data.pipeline import build_dataset

    config, config_path = _tiny_config(tmp_path, train_steps=4, checkpoint_every=2)
    build_dataset(config.data, config.model.input, "train", 2, training=True)  # write the data once
    model_dir = str(tmp_path / "run")
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs, logs = [], []
    try:
        for index in range(2):
            tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
            logs.append(open(tmp_path / f"worker{index}.log", "w"))
            command = [sys.executable, os.path.abspath(__file__), config_path, model_dir]
            command.append(str(tmp_path / f"weights{index}.npz"))
            procs.append(
                subprocess.Popen(
                    command, env=_env(TF_CONFIG=tf_config), stdout=logs[-1], stderr=subprocess.STDOUT
                )
            )
        deadline = time.monotonic() + TIMEOUT_S
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break  # one worker failed: its peer would wait for it forever
            time.sleep(0.5)
    finally:
        _kill(procs)
        for f in logs:
            f.close()
    outputs = [(tmp_path / f"worker{i}.log").read_text() for i in range(2)]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    # gRPC may log after the result line (a peer that already shut down): take the
    # last line the worker printed as its JSON result.
    results = [json.loads([ln for ln in out.splitlines() if ln.startswith('{"step"')][-1]) for out in outputs]
    assert [r["step"] for r in results] == [4, 4]
    assert [r["chief"] for r in results] == [True, False]
    assert results[0]["losses"] == results[1]["losses"]  # reduced over both workers
    w0, w1 = np.load(tmp_path / "weights0.npz"), np.load(tmp_path / "weights1.npz")
    assert len(w0.files) == len(w1.files) > 50
    for name in w0.files:
        np.testing.assert_array_equal(w0[name], w1[name])
    assert _latest_step(model_dir) == 4
    assert not [d for d in os.listdir(model_dir) if d.startswith(".tmp")]  # worker 1's copies removed


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    worker_main(*sys.argv[1:4])
