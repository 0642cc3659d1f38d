"""scripts/gpu_check.sh refuses to run, and says why, on a machine without an NVIDIA GPU."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine may have a GPU")
def test_gpu_check_says_no_gpu_and_fails_fast():
    proc = subprocess.run(
        ["bash", os.path.join(REPO, "scripts", "gpu_check.sh")], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "no NVIDIA GPU visible" in proc.stderr
    assert not os.path.exists(os.path.join(REPO, ".venv-gpu-check"))  # nothing installed
