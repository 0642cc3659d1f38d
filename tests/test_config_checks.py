"""Load-time config validation (fpn_tf/config_checks.py): every bad value is refused when
the YAML is read, naming its dotted key, and the user's file is left as it was."""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import typing

import pytest
import yaml

from fpn_tf import config as C
from fpn_tf.config_checks import RULES, check_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _config_classes():
    seen, todo = [], [C.ExperimentConfig]
    while todo:
        cls = todo.pop()
        seen.append(cls)
        for f in dataclasses.fields(cls):
            t = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(t):
                todo.append(t)
    return seen


def test_every_numeric_field_has_a_range_rule():
    """A new int / float / tuple-of-number field without a rule in RULES fails here."""
    missing = []
    for cls in _config_classes():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            t = hints[f.name]
            is_tuple = typing.get_origin(t) is tuple
            numeric = t in (int, float) or (is_tuple and typing.get_args(t)[0] in (int, float))
            if numeric and f.name not in RULES.get(cls.__name__, {}):
                missing.append(f"{cls.__name__}.{f.name}")
    assert missing == []


def test_defaults_and_shipped_configs_are_valid():
    check_config(C.ExperimentConfig())
    paths = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
    assert len(paths) >= 5
    for path in paths:
        C.load_config(path)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.input.min_size=0", "model.input.min_size must be >= 1, got 0"),
        ("model.input.min_size=-5", "model.input.min_size must be >= 1, got -5"),
        ("train.checkpoint_every=0", "train.checkpoint_every must be >= 1, got 0"),
        ("train.log_every=0", "train.log_every must be >= 1, got 0"),
        ("train.batch_size=0", "train.batch_size must be >= 1, got 0"),
        ("eval.batch_size=0", "eval.batch_size must be >= 1, got 0"),
        ("model.num_classes=1", "model.num_classes must be >= 2, got 1"),
        ("model.rpn.positive_fraction=1.5", "model.rpn.positive_fraction must be in [0, 1], got 1.5"),
        ("model.roi_head.foreground_iou=-0.1", "model.roi_head.foreground_iou must be in [0, 1], got -0.1"),
        ("model.roi_head.nms_iou=2", "model.roi_head.nms_iou must be in [0, 1], got 2.0"),
        ("model.input.max_size=100", "model.input.min_size (800) must be <= model.input.max_size (100)"),
        ("model.anchors.sizes=[32,64]", "model.anchors.sizes has 2 sizes but the pyramid has 5 levels"),
        ("model.anchors.sizes=[32,0,128,256,512]", "model.anchors.sizes[1] must be > 0, got 0.0"),
        ("model.input.pixel_std=[1,0,1]", "model.input.pixel_std[1] must be > 0"),
        ("model.rpn.box_coder_weights=[1,1,1]", "model.rpn.box_coder_weights must have 4 values, got 3"),
        ("model.fpn.min_level=1", "model.fpn.min_level must be in [2, 5], got 1"),
        ("model.roi_head.min_level=7", "model.roi_head.min_level (7) must be <= model.roi_head.max_level"),
        ("model.backbone.width_multiplier=0", "model.backbone.width_multiplier must be > 0, got 0.0"),
        ("model.backbone.name=resnet42", "model.backbone.name must be one of resnet18"),
        ("train.momentum=1", "train.momentum must be in [0, 1), got 1.0"),
        ("train.lr_decay_fractions=[0.9,0.5]", "train.lr_decay_fractions must be increasing"),
        ("data.bad_image_policy=ignore", "data.bad_image_policy must be one of skip, error, got 'ignore'"),
    ],
)
def test_fault_config_value_out_of_range_names_its_key(tmp_path, override, message):
    """Config value out of range (size 0, interval 0, IoU 1.5, ...) -> ConfigError naming key and file."""
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  num_classes: 4\ntrain:\n  batch_size: 2\n")
    before = _sha(path)
    with pytest.raises(C.ConfigError) as e:
        C.load_config(str(path), [override])
    assert message in str(e.value)
    assert str(path) in str(e.value)
    assert _sha(path) == before


def test_fault_config_file_lists_every_problem(tmp_path):
    """YAML with several bad values -> one ConfigError listing every dotted key."""
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  checkpoint_every: 0\n  log_every: 0\ninput_typo: 1\n")
    with pytest.raises(C.ConfigError, match="unknown config key"):
        C.load_config(str(path))
    path.write_text("train:\n  checkpoint_every: 0\n  log_every: 0\nmodel:\n  num_classes: 1\n")
    with pytest.raises(C.ConfigError) as e:
        C.load_config(str(path))
    # every problem is listed in one error, each by its dotted key
    for key in ("train.checkpoint_every", "train.log_every", "model.num_classes"):
        assert key in str(e.value)


def test_fault_yaml_exponent_float_is_accepted(tmp_path):
    """`1e-5` (a string to PyYAML) in a file or --override for a float field -> accepted as 1e-05."""
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  backbone:\n    bn_epsilon: 1e-5\ntrain:\n  weight_decay: 5E-4\n")
    assert yaml.safe_load(path.read_text())["model"]["backbone"]["bn_epsilon"] == "1e-5"
    cfg = C.load_config(str(path))
    assert cfg.model.backbone.bn_epsilon == 1e-5 and cfg.train.weight_decay == 5e-4
    overrides = ["model.backbone.bn_epsilon=1e-3", "model.anchors.aspect_ratios=[5e-1, 1, 2e0]"]
    cfg = C.load_config(None, overrides)
    assert cfg.model.backbone.bn_epsilon == 1e-3
    assert cfg.model.anchors.aspect_ratios == (0.5, 1.0, 2.0)
    # strings that are not numbers, and integer fields, still refuse text
    with pytest.raises(C.ConfigError, match="model.backbone.bn_epsilon: expected a number, got 'small'"):
        C.load_config(None, ["model.backbone.bn_epsilon=small"])
    with pytest.raises(C.ConfigError, match="train.batch_size: expected an integer, got '1e1'"):
        C.load_config(None, ["train.batch_size='1e1'"])
    with pytest.raises(C.ConfigError, match="model.backbone.bn_epsilon: expected a finite number"):
        C.load_config(None, ["model.backbone.bn_epsilon=1e999"])


def test_fault_from_dict_checks_sections_built_on_their_own():
    """Bad value in a saved model config (from_dict of a section) -> ConfigError naming the key."""
    with pytest.raises(C.ConfigError, match="num_classes must be >= 2, got 1"):
        C.from_dict(C.ModelConfig, {"num_classes": 1})
    with pytest.raises(C.ConfigError, match="nms_iou must be in \\[0, 1\\], got -1.0"):
        C.from_dict(C.RPNConfig, {"nms_iou": -1.0})
    assert C.from_dict(C.ModelConfig, C.to_dict(C.ModelConfig())) == C.ModelConfig()


def test_reliability_doc_matches_the_fault_tests():
    """docs/reliability.md is generated from the test_fault_* docstrings: it must be current."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "reliability_matrix.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    with open(os.path.join(ROOT, "docs", "reliability.md"), encoding="utf-8") as f:
        assert f.read().count("| `tests/test_") >= 20
