"""A training directory's records (fpn_tf.run_directory) and overrides applied in memory."""

from __future__ import annotations

import os

import pytest

from fpn_tf import run_directory
from fpn_tf.config import (
    ConfigError,
    ExperimentConfig,
    ModelConfig,
    apply_overrides,
    load_config,
    to_dict,
    with_overrides,
)
from fpn_tf.data.label_map import LabelMap


def test_config_and_label_map_round_trip_without_leftovers(tmp_path):
    config = ExperimentConfig(model=ModelConfig(type="mask_rcnn", num_classes=4))
    label_map = LabelMap([7, 3, 11], ["seven", "three", "eleven"])
    assert run_directory.write_config(config, str(tmp_path)) == str(tmp_path / "config.yaml")
    assert run_directory.write_label_map(label_map, str(tmp_path)) == str(tmp_path / "label_map.json")
    assert sorted(os.listdir(tmp_path)) == ["config.yaml", "label_map.json"], "no .tmp file is left"
    assert run_directory.read_config(str(tmp_path)) == config
    assert run_directory.stored_config(str(tmp_path)) == to_dict(config)
    read = run_directory.read_label_map(str(tmp_path))
    assert (read.category_ids, read.names) == ([3, 7, 11], ["three", "seven", "eleven"])


def test_explicit_files_win_and_missing_records_fall_back_or_fail(tmp_path):
    run_directory.write_config(ExperimentConfig(model=ModelConfig(num_classes=5)), str(tmp_path))
    other = tmp_path / "other.yaml"
    other.write_text("model: {type: retinanet, num_classes: 3}\n")
    assert run_directory.read_config(str(tmp_path), str(other)).model.type == "retinanet"
    overridden = run_directory.read_config(str(tmp_path), overrides=["train.batch_size=3"])
    assert (overridden.model.num_classes, overridden.train.batch_size) == (5, 3)

    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_directory.read_config(str(empty)) == load_config(None), "no record: the defaults"
    with pytest.raises(ConfigError, match=r"empty/config\.yaml does not exist"):
        run_directory.read_config(str(empty), required=True)
    assert run_directory.stored_config(str(empty)) is None
    assert run_directory.read_label_map(str(empty)) is None


def test_damaged_records_are_named(tmp_path):
    (tmp_path / "config.yaml").write_text("model: {num_clases: 3}\n")
    with pytest.raises(ConfigError, match=r"config\.yaml.*num_clases"):
        run_directory.stored_config(str(tmp_path))
    (tmp_path / "label_map.json").write_text('{"category_ids": [1, 1], "names": ["a", "b"]}')
    with pytest.raises(ValueError, match=r"label_map\.json: not a label map.*duplicate category ids \[1\]"):
        run_directory.read_label_map(str(tmp_path))
    (tmp_path / "label_map.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"label_map\.json: not a label map"):
        run_directory.read_label_map(str(tmp_path))


def test_overrides_apply_in_memory_like_a_yaml_file(tmp_path):
    """with_overrides(config) == the same config written to YAML and loaded with the overrides."""
    config = ExperimentConfig(model=ModelConfig(type="retinanet", num_classes=7))
    overrides = ["train.batch_size=3", "model.anchors.sizes=[16,32,64,128,256]", "data.source=coco_json"]
    path = run_directory.write_config(config, str(tmp_path))
    assert with_overrides(config, overrides) == load_config(path, overrides)
    assert with_overrides(config, overrides).model.anchors.sizes == (16, 32, 64, 128, 256)

    values = {"train": {"batch_size": 2}}
    assert apply_overrides(values, ["train.seed=4"]) == {"train": {"batch_size": 2, "seed": 4}}
    assert values == {"train": {"batch_size": 2}}, "the caller's dict is not changed"
    with pytest.raises(ConfigError, match="must look like key.path=value"):
        apply_overrides({}, ["train.batch_size"])
    with pytest.raises(ConfigError, match="batch_size is not a section"):
        apply_overrides(values, ["train.batch_size.x=1"])
    with pytest.raises(ConfigError, match="train.batch_sise"):
        with_overrides(config, ["train.batch_sise=2"])
