"""Serving compute dtype: bfloat16 by default where the CPU has AVX512-BF16 or AMX, stated in the assets."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from fpn_tf.config import ExperimentConfig, to_dict
from fpn_tf.export import saved_model as sm
from fpn_tf.export.precision import cpu_info, resolve_serving_dtype
from tests.tiny import tiny_model_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_auto_picks_bfloat16_only_with_bfloat16_units():
    assert resolve_serving_dtype("auto", ["avx2", "avx512f", "avx512_bf16"])[0] == "mixed_bfloat16"
    assert resolve_serving_dtype("auto", ["avx2", "avx512f", "amx_bf16", "amx_tile"])[0] == "mixed_bfloat16"
    dtype, reason = resolve_serving_dtype("auto", ["avx2", "avx512f"])
    assert dtype == "float32" and "neither" in reason
    assert resolve_serving_dtype("auto", [])[0] == "float32"
    # An explicit request wins over the CPU.
    assert resolve_serving_dtype("float32", ["amx_bf16"])[0] == "float32"
    assert resolve_serving_dtype("mixed_bfloat16", [])[0] == "mixed_bfloat16"
    with pytest.raises(ValueError, match="bfloat16'"):
        resolve_serving_dtype("bfloat16")


def test_cpu_info_reads_model_and_isa(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Some Xeon\nflags\t\t: fpu sse avx2 avx512f amx_bf16 amx_tile\n"
        "processor\t: 1\nmodel name\t: Some Xeon\nflags\t\t: fpu sse avx2 avx512f amx_bf16 amx_tile\n"
    )
    assert cpu_info(str(cpuinfo)) == {"cpu": "Some Xeon", "isa": ["amx_bf16", "amx_tile", "avx2", "avx512f"]}
    assert cpu_info(str(tmp_path / "missing")) == {"cpu": "unknown", "isa": []}


@pytest.mark.slow
def test_export_script_serves_the_resolved_dtype_and_records_why(tmp_path):
    config = ExperimentConfig(model=tiny_model_config())
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(to_dict(config)))
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "2"}
    paths = {}
    for requested in ("auto", "float32"):
        proc = subprocess.run(
            [
                sys.executable,
                "scripts/export.py",
                f"--config={tmp_path / 'config.yaml'}",
                f"--export_dir={tmp_path / 'exports'}",
                "--name=m",
                f"--compute_dtype={requested}",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
            cwd=ROOT,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        paths[requested] = sm.resolve_version_dir(str(tmp_path / "exports" / "m"))
    expected, reason = resolve_serving_dtype("auto")
    for requested, want in (("auto", expected), ("float32", "float32")):
        precision = sm.read_serving_precision(paths[requested])
        assert precision["compute_dtype"] == want
        assert sm.read_model_config(paths[requested]).compute_dtype == want
        assert precision["export_cpu"] == cpu_info()
    assert sm.read_serving_precision(paths["auto"])["reason"] == reason
    assert "requested at export" in sm.read_serving_precision(paths["float32"])["reason"]
    with open(os.path.join(paths["float32"], "assets", "serving_precision.json"), encoding="utf-8") as f:
        assert json.load(f)["compute_dtype"] == "float32"
