"""bench/benchmark.py runs end to end in --tiny mode and writes a complete JSON report.

No timing is asserted: only that every configuration ran, was timed, and reported
its FLOPs and peak memory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

# Subprocesses (benchmark runs): not in the quick loop.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_TORCHVISION = bool(importlib.util.find_spec("torch") and importlib.util.find_spec("torchvision"))


def _run(tmp_path, *args) -> dict:
    out = tmp_path / "bench.json"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "benchmark.py"), "--tiny", f"--output={out}", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "median s" in proc.stdout  # the table
    return json.loads(out.read_text())


def test_tiny_benchmark_in_one_process_covers_every_variant(tmp_path):
    args = ["--noisolate", "--impls=keras,keras_bf16,saved_model", "--train_impls=keras"]
    if HAS_TORCHVISION:
        args.append("--compare=torchvision")
    report = _run(tmp_path, *args)
    assert report["errors"] == []
    assert report["meta"]["repeats"] == 1 and report["meta"]["machine"]["cores"] >= 1
    # The machine's ISA and its measured matmul / conv peak are part of the report.
    assert isinstance(report["meta"]["machine"]["isa"], list)
    peaks = report["meta"]["peak_gflops"]
    assert set(peaks) == {"float32_matmul", "float32_conv", "bfloat16_matmul", "bfloat16_conv"}
    assert all(v > 0 for v in peaks.values())
    rows = {(r["task"], r["impl"]): r for r in report["results"]}
    expected = {
        ("inference", "keras"),
        ("inference", "keras_bf16"),
        ("inference", "saved_model"),
        ("train", "keras"),
    }
    if HAS_TORCHVISION:
        expected |= {("inference", "torchvision"), ("train", "torchvision")}
    assert set(rows) == expected
    for row in rows.values():
        assert (row["height"], row["width"], row["batch"]) == (128, 128, 1)
        assert len(row["times_s"]) == 1 and row["median_s"] > 0
        assert row["flops"] > 0 and row["gflops_per_s"] > 0
        assert row["peak_rss_mb"] > 0
        assert row["gmacs_per_s"] == row["gflops_per_s"] / 2
        assert 0 < row["of_f32_conv_peak"] and row["group_peak_gflops"]["float32_conv"] > 0
    assert rows[("inference", "keras_bf16")]["compute_dtype"] == "mixed_bfloat16"
    assert rows[("inference", "keras")]["network_input"] == [128, 128]
    # The SavedModel runs the same graph as the Keras model: same FLOPs. bfloat16 adds only the
    # folding of the frozen norms into the conv kernels (one multiply per weight, a bias per output).
    f32_flops = rows[("inference", "keras")]["flops"]
    assert rows[("inference", "saved_model")]["flops"] == f32_flops
    assert f32_flops <= rows[("inference", "keras_bf16")]["flops"] <= 1.02 * f32_flops
    # A training step costs more than a forward pass.
    assert rows[("train", "keras")]["flops"] > 2 * rows[("inference", "keras")]["flops"]
    if HAS_TORCHVISION:
        assert rows[("inference", "torchvision")]["vs_torchvision"] == 1.0
        assert rows[("inference", "keras")]["vs_torchvision"] > 0


def test_tiny_benchmark_isolates_each_configuration_in_a_process(tmp_path):
    report = _run(tmp_path, "--tasks=inference", "--impls=keras")
    assert report["meta"]["isolated_processes"] is True
    (row,) = report["results"]
    assert row["impl"] == "keras" and row["isolated"] is True
    # A fresh process importing TensorFlow and building a model: hundreds of MB.
    assert row["peak_rss_mb"] > 200


def test_bad_sizes_are_rejected_with_a_clear_message(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "bench", "benchmark.py"),
            "--sizes=800by1333",
            "--tasks=inference",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode != 0
    assert "800by1333" in proc.stderr and "HEIGHTxWIDTH" in proc.stderr


def test_tiny_retinanet_benchmark_has_rows_beside_torchvision_retinanet(tmp_path):
    args = ["--model=retinanet", "--noisolate", "--tasks=inference", "--impls=keras,keras_bf16"]
    args += ["--nomeasure_peak"]
    if HAS_TORCHVISION:
        args.append("--compare=torchvision")
    report = _run(tmp_path, *args)
    assert report["errors"] == [] and report["meta"]["model"] == "retinanet"
    assert report["meta"]["model_config"]["type"] == "retinanet"
    rows = {r["impl"]: r for r in report["results"]}
    assert set(rows) == {"keras", "keras_bf16"} | ({"torchvision"} if HAS_TORCHVISION else set())
    for row in rows.values():
        assert row["model"] == "retinanet" and row["median_s"] > 0 and row["flops"] > 0
    # bfloat16 folds the frozen norms into the conv kernels: a few more FLOPs
    assert rows["keras"]["flops"] <= rows["keras_bf16"]["flops"] <= 1.02 * rows["keras"]["flops"]
    if HAS_TORCHVISION:
        assert rows["keras"]["vs_torchvision"] > 0
        assert rows["torchvision"]["torchvision_model"] == "retinanet_resnet50_fpn"


def test_model_flag_must_match_the_config_type(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "bench", "benchmark.py"),
            "--model=retinanet",
            "--config=" + os.path.join(ROOT, "configs", "demo.yaml"),
            "--tasks=inference",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode != 0
    assert "--model=retinanet" in proc.stderr and "'faster_rcnn'" in proc.stderr


def test_segment_proposals_speed_times_every_table_row(tmp_path):
    """bench/segment_proposals_speed.py at a small size: one time per Table 6 row, pyramid included."""
    out = tmp_path / "speed.json"
    script = os.path.join(ROOT, "bench", "segment_proposals_speed.py")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(
        [sys.executable, script, "--size=96", "--repeats=1", f"--output={out}"],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["seconds_per_image"]) == {"pyramid", "mlp5", "mlp7", "dual", "dual28"}
    assert all(t > 0 for t in report["seconds_per_image"].values())
    assert report["size"] == 96
