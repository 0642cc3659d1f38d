"""Packaging: configs found by name, shipped by a non-editable install, TensorFlow from an extra."""

from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fpn_tf.config import load_config, to_dict
from fpn_tf.config_files import packaged_config_names, resolve_config_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_CONFIGS = sorted(
    n[: -len(".yaml")] for n in os.listdir(os.path.join(REPO, "configs")) if n.endswith(".yaml")
)


def test_a_config_loads_by_name_or_path():
    assert packaged_config_names() == REPO_CONFIGS
    by_path = load_config(os.path.join(REPO, "configs", "demo.yaml"), ["train.batch_size=2"])
    assert to_dict(load_config("demo", ["train.batch_size=2"])) == to_dict(by_path)
    assert to_dict(load_config("demo.yaml", ["train.batch_size=2"])) == to_dict(by_path)
    assert by_path.train.batch_size == 2


def test_an_unknown_config_names_the_shipped_ones(tmp_path):
    shipped = sorted(p.stem for p in (Path(__file__).parent.parent / "configs").glob("*.yaml"))
    with pytest.raises(FileNotFoundError, match="'no_such_config'.*" + ", ".join(shipped)):
        resolve_config_path("no_such_config")
    with pytest.raises(FileNotFoundError, match="sub/demo.yaml"):
        resolve_config_path("sub/demo.yaml")  # a path is never looked up by name
    local = tmp_path / "demo.yaml"
    local.write_text("train:\n  batch_size: 6\n")
    assert resolve_config_path(str(local)) == str(local)  # an existing file wins


def test_a_non_editable_install_ships_the_configs_and_takes_tf_from_an_extra(tmp_path):
    pytest.importorskip("setuptools")  # --no-build-isolation builds with this venv's setuptools
    source = tmp_path / "src"  # a copy: building writes build/ and *.egg-info next to setup.py
    source.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy(os.path.join(REPO, name), source / name)
    for name in ("fpn_tf", "configs"):
        shutil.copytree(os.path.join(REPO, name), source / name, ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip, "--target", str(target), str(source)], check=True, capture_output=True, timeout=300)

    shipped = sorted(
        n[: -len(".yaml")] for n in os.listdir(target / "fpn_tf" / "configs") if n.endswith(".yaml")
    )
    assert shipped == REPO_CONFIGS
    # Found by name from the installed package, outside any source tree.
    probe = "from fpn_tf.config import load_config; from fpn_tf.config_files import resolve_config_path; "
    probe += "print(resolve_config_path('demo')); print(load_config('demo').model.num_classes)"
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    )
    path, num_classes = out.stdout.split()
    assert path == str(target / "fpn_tf" / "configs" / "demo.yaml")
    assert num_classes == "4"

    (dist_info,) = [p for p in os.listdir(target) if p.endswith(".dist-info")]
    with open(target / dist_info / "METADATA", encoding="utf-8") as f:
        requires = email.message_from_file(f).get_all("Requires-Dist")
    base = [r for r in requires if "extra ==" not in r]
    assert not [r for r in base if r.startswith("tensorflow") and not r.startswith("tensorflow-datasets")]
    assert 'tensorflow[and-cuda]==2.21.*; extra == "and-cuda"' in requires
    cpu = [r for r in requires if 'extra == "cpu"' in r]
    assert any(r.startswith("tensorflow-cpu==2.21.*") and "x86_64" in r for r in cpu), cpu
    assert not [r for r in requires if "tensorflow-cpu" in r and "and-cuda" in r]
