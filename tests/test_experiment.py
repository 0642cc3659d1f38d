"""fpn_tf.training.experiment: a training directory's record and evaluation during training."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import pytest
from test_training import tiny_experiment

from fpn_tf.config import ConfigError, load_config
from fpn_tf.training.experiment import config_differences, train


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_config_differences_names_dotted_keys():
    old = {"model": {"num_classes": 4, "rpn": {"nms_iou": 0.7}}, "train": {"seed": 0}}
    new = {"model": {"num_classes": 5, "rpn": {"nms_iou": 0.7}}, "train": {"seed": 1}}
    assert config_differences(old, new) == ["model.num_classes (4 -> 5)", "train.seed (0 -> 1)"]
    assert config_differences(old, old) == []


@pytest.mark.slow
def test_rerun_with_another_config_changes_nothing(tmp_path):
    """A changed num_classes is refused before anything is written; so is a changed
    optimiser setting without the flag; more steps resume."""
    config = tiny_experiment(tmp_path, train_steps=2)
    model_dir = tmp_path / "run"
    train(config, str(model_dir), xla=False)
    record = model_dir / "config.yaml"
    before = {p.name: _digest(p) for p in model_dir.iterdir() if p.is_file()}

    other_classes = dataclasses.replace(config, model=dataclasses.replace(config.model, num_classes=6))
    with pytest.raises(ConfigError, match=r"model\.num_classes \(4 -> 6\)"):
        train(other_classes, str(model_dir), xla=False)
    # Even when changes are allowed, variables that do not fit are refused, and the
    # directory's record is still the first run's.
    with pytest.raises(ConfigError, match=r"do not fit the changed config \(model\.num_classes"):
        train(other_classes, str(model_dir), xla=False, allow_config_change=True)
    other_lr = dataclasses.replace(config, train=dataclasses.replace(config.train, base_learning_rate=0.5))
    with pytest.raises(
        ConfigError, match=r"train\.base_learning_rate \(0\.01 -> 0\.5\).*--allow_config_change"
    ):
        train(other_lr, str(model_dir), xla=False)
    assert {p.name: _digest(p) for p in model_dir.iterdir() if p.is_file()} == before

    result = train(config, str(model_dir), xla=False, train_steps=3)  # a longer run: free
    assert result.step == 3
    assert load_config(str(record)).train.train_steps == 3


@pytest.mark.slow
def test_evaluation_during_training_keeps_the_best_checkpoint(tmp_path):
    config = tiny_experiment(tmp_path, train_steps=4, eval_every=2)
    model_dir = tmp_path / "run"
    train(config, str(model_dir), xla=False)
    with open(model_dir / "best" / "metrics.json", encoding="utf-8") as f:
        best = json.load(f)
    assert best["step"] in (2, 4)
    assert 0.0 <= best["metrics"]["AP"] <= 1.0
    assert os.path.exists(best["checkpoint"] + ".index")
    # The TensorBoard eval scalars were written at both evaluation steps.
    from test_training import summary_tags

    assert "eval/AP" in summary_tags(str(model_dir / "eval"))
