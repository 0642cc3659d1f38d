"""Interrupted training runs resume to the weights of an uninterrupted one (same data order).

SIGKILL of ``scripts/train.py`` mid-run, and SIGTERM to one worker of a 2-worker
MultiWorkerMirroredStrategy cluster on 127.0.0.1. Every subprocess is bounded
by a deadline and killed with SIGKILL (a worker whose peer is gone hangs and
ignores SIGTERM, see /work/shared/STACK_NOTES.md).

Run as a script, this file is one MultiWorkerMirroredStrategy worker training
``TinyDetector`` on shuffled data (see ``worker_main``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from test_multi_worker import REPO, TIMEOUT_S, _env, _free_ports, _kill, _latest_step, _tiny_config

HERE = os.path.abspath(__file__)


@pytest.mark.slow
def test_fault_sigkill_mid_run_then_restart(tmp_path):
    """scripts/train.py killed with SIGKILL mid-run, then the same command -> weights equal to an
    uninterrupted run of the same length (the input continues its order)"""
    import tensorflow as tf

    from fpn_tf.training.experiment import train

    config, config_path = _tiny_config(tmp_path, train_steps=10_000, checkpoint_every=3)
    model_dir = str(tmp_path / "run")
    command = [sys.executable, os.path.join(REPO, "scripts", "train.py"), "--config", config_path]
    command += ["--model_dir", model_dir]
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(command, env=_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + TIMEOUT_S
            while _latest_step(model_dir) < 6:
                assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint at step >= 6 in time"
                time.sleep(0.2)
            with open(os.path.join(model_dir, "train.lock")) as f:
                assert json.load(f)["pid"] == proc.pid, "the running trainer holds the directory's lock"
        finally:
            _kill([proc])
    assert proc.returncode == -signal.SIGKILL
    step = _latest_step(model_dir)
    length = step + 3
    restart = subprocess.run(
        command + ["--train_steps", str(length)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    output = restart.stdout + restart.stderr
    assert restart.returncode == 0, output[-3000:]
    assert f"resumed from {model_dir}/ckpt-{step} at step {step}" in output
    assert f"replacing a stale lock of pid {proc.pid}" in output, "the killed run's lock, loudly"
    assert not os.path.exists(os.path.join(model_dir, "train.lock")), "released at the end"
    assert "input position restored from" in output and f"input-{step}" in output

    train(config, str(tmp_path / "straight"), train_steps=length, xla=False)  # what train.py runs
    resumed = tf.train.load_checkpoint(os.path.join(model_dir, f"ckpt-{length}"))
    straight = tf.train.load_checkpoint(str(tmp_path / "straight" / f"ckpt-{length}"))
    # every tensor: model, optimizer slots, step (save_counter counts saves, not steps)
    names = [
        n
        for n in resumed.get_variable_to_shape_map()
        if "OBJECT_GRAPH" not in n and not n.startswith("save_counter/")
    ]
    assert len(names) > 100 and {n.split("/")[0] for n in names} == {"model", "optimizer", "step"}
    for name in names:
        np.testing.assert_allclose(
            resumed.get_tensor(name), straight.get_tensor(name), rtol=1e-5, atol=1e-6, err_msg=name
        )


def worker_main(model_dir: str, train_steps: str, out: str) -> None:
    """One worker: TinyDetector, shuffled data sharded per worker, progress in ``out.progress``."""
    from fpn_tf.training import distribute

    strategy = distribute.make_strategy("multi_worker")  # before any other TF op
    import keras
    from test_faults_checkpoints import shuffled_dataset_fn
    from test_training import make_model, tiny_examples, train_config

    from fpn_tf.training.hooks import Hook
    from fpn_tf.training.trainer import Trainer

    class Progress(Hook):
        def after_step(self, trainer, step, losses) -> None:
            with open(out + ".progress", "w") as f:
                f.write(str(step))

    keras.utils.set_random_seed(0)
    cfg = train_config(train_steps=int(train_steps), checkpoint_every=1000)
    trainer = Trainer(make_model, cfg, model_dir, strategy=strategy)
    result = trainer.fit(
        shuffled_dataset_fn(tiny_examples(16, seed=6), 4), trainer.default_hooks() + [Progress()]
    )
    np.savez(out, *[v.numpy() for v in trainer.model.weights])
    print(json.dumps({"step": result.step, "stopped_early": result.stopped_early}), flush=True)


def run_cluster(tmp_path, name: str, model_dir: str, train_steps: int, sigterm_worker_1_at: int = 0):
    """Two workers to the end (or SIGTERM to worker 1 once it reports step ``sigterm_worker_1_at``).

    Returns ``[(exit code, JSON result or None, weights), ...]`` per worker.
    """
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    outs = [str(tmp_path / f"{name}{i}.npz") for i in range(2)]
    procs, logs = [], []
    try:
        for index in range(2):
            tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
            logs.append(open(tmp_path / f"{name}{index}.log", "w"))
            command = [sys.executable, HERE, model_dir, str(train_steps), outs[index]]
            env = _env(TF_CONFIG=tf_config)
            procs.append(subprocess.Popen(command, env=env, stdout=logs[-1], stderr=subprocess.STDOUT))
        deadline, signalled = time.monotonic() + TIMEOUT_S, False
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break  # one worker failed: its peer would wait for it forever
            if sigterm_worker_1_at and not signalled and os.path.exists(outs[1] + ".progress"):
                with open(outs[1] + ".progress") as f:
                    text = f.read()
                if text and int(text) >= sigterm_worker_1_at:
                    procs[1].send_signal(signal.SIGTERM)
                    signalled = True
            time.sleep(0.05)
    finally:
        _kill(procs)
        for f in logs:
            f.close()
    results = []
    for index, p in enumerate(procs):
        text = (tmp_path / f"{name}{index}.log").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith('{"step"')]
        assert p.returncode == 0 and lines, f"{name} worker {index}:\n{text[-3000:]}"
        results.append((json.loads(lines[-1]), np.load(outs[index])))
    return results


def test_fault_second_run_on_a_training_directory_is_refused(tmp_path):
    """A second run on a model_dir that a live process (or one on another host) trains into ->
    DirectoryLockedError naming its pid and host, before anything in the directory is read or written"""
    from tiny import tree_hashes

    from fpn_tf.run_directory import DirectoryLockedError
    from fpn_tf.training.experiment import train

    config, _ = _tiny_config(tmp_path, train_steps=2)
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        for pid, host in ((holder.pid, socket.gethostname()), (1234, "other-machine")):
            (model_dir / "train.lock").write_text(json.dumps({"pid": pid, "host": host, "started": "then"}))
            before = tree_hashes(model_dir)
            with pytest.raises(DirectoryLockedError, match=f"by pid {pid} on {host}"):
                train(config, str(model_dir), xla=False)
            assert tree_hashes(model_dir) == before
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_fault_sigterm_to_one_of_two_multi_worker_processes(tmp_path):
    """SIGTERM to one worker of a 2-worker MultiWorkerMirroredStrategy cluster -> both save a checkpoint at
    the same step and exit 0; restarting both resumes to the weights of an uninterrupted run (same data
    order)"""
    model_dir = str(tmp_path / "run")
    stopped = run_cluster(tmp_path, "stopped", model_dir, 100_000, sigterm_worker_1_at=5)
    step = stopped[0][0]["step"]
    assert [r["stopped_early"] for r, _ in stopped] == [True, True]
    assert stopped[1][0]["step"] == step and 5 < step < 100_000
    assert _latest_step(model_dir) == step
    for pipeline in ("pipeline-0-of-2", "pipeline-1-of-2"):  # each worker's input position
        assert os.path.exists(os.path.join(model_dir, "input_state", pipeline, f"input-{step}.index"))

    length = step + 6
    resumed = run_cluster(tmp_path, "resumed", model_dir, length)
    straight = run_cluster(tmp_path, "straight", str(tmp_path / "straight"), length)
    assert [r["step"] for r, _ in resumed + straight] == [length] * 4
    (_, w_resumed), (_, w_resumed_1) = resumed
    w_straight = straight[0][1]
    assert len(w_resumed.files) == 16
    for name in w_resumed.files:
        np.testing.assert_array_equal(w_resumed[name], w_resumed_1[name])  # the workers agree
        np.testing.assert_allclose(w_resumed[name], w_straight[name], rtol=1e-6, atol=1e-7, err_msg=name)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(HERE))
    worker_main(*sys.argv[1:4])
