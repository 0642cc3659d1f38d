"""fpn_tf/detector_types.py: one entry per detector type and per neck, complete and consistent.

A type or neck registered incompletely (a class that does not import, a builder that
fpn_tf does not export, defaults that name no section, configs built four ways that
disagree) fails here; so does a detector name in the code of the evaluator, the
exporter or scripts/predict.py (they must ask the ``Detector`` interface instead).
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib
import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from tiny import draw_shape_images, tiny_model_config

import fpn_tf
from fpn_tf import detector_types as T
from fpn_tf.config import (
    ConfigError,
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    ModelConfig,
    from_dict,
    load_config,
)
from fpn_tf.levels import pyramid_level_names
from fpn_tf.models.build import build_model
from fpn_tf.models.detector import Detector
from fpn_tf.models.presets import resolve_model_config
from fpn_tf.neck_configs import NeckConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _section_names() -> set[str]:
    cfg = ModelConfig()
    return {f.name for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))}


@pytest.mark.parametrize("name", sorted(T.DETECTOR_TYPES))
def test_every_detector_type_is_registered_completely(name, tmp_path):
    entry = T.DETECTOR_TYPES[name]
    cls = T.import_path(entry.detector)
    assert issubclass(cls, Detector) and T.type_of_detector_class(cls) == name
    module = __import__(cls.__module__, fromlist=[entry.builder])
    assert callable(getattr(module, entry.builder))
    assert getattr(fpn_tf, entry.builder) is getattr(module, entry.builder)
    assert getattr(fpn_tf, cls.__name__) is cls and entry.builder in fpn_tf.__all__
    assert entry.scores and set(entry.scores) <= set(T.SCORED_OUTPUTS)
    sections = _section_names()
    assert entry.head_section == "" or entry.head_section in sections
    for delta in [entry.defaults, *entry.presets.values()]:
        assert set(delta) <= sections, f"{name}: a default or preset names no ModelConfig section"
    # The four ways to ask for the type's defaults give one config.
    direct = ModelConfig(type=name)
    (tmp_path / "m.yaml").write_text(f"model:\n  type: {name}\n")
    assert direct == from_dict(ModelConfig, {"type": name}) == load_config(str(tmp_path / "m.yaml")).model
    assert direct == resolve_model_config(name, None, None, None, None, {})  # what build_<type>() uses
    for preset in entry.presets:
        assert ModelConfig(type=name, preset=preset) == from_dict(
            ModelConfig, {"type": name, "preset": preset}
        )


@pytest.mark.slow
def test_builders_without_arguments_give_the_types_defaults():
    """``build_<type>()`` (ResNet-50, full size) has exactly ``ModelConfig(type=<type>)``."""
    for name, entry in T.DETECTOR_TYPES.items():
        model = getattr(fpn_tf, entry.builder)()
        assert model.config == ModelConfig(type=name), name
        assert type(model)().config == model.config  # the class without a config: its own type
        keras.backend.clear_session()


def test_type_defaults_that_differ_from_faster_rcnn():
    assert ModelConfig(type="segment_proposals").fpn.num_channels == 128  # App. A: d = 128
    assert (
        ModelConfig(type="retinanet").fpn.min_level == 3
        and ModelConfig(type="retinanet").fpn.num_extra_levels == 2
    )
    assert ModelConfig(type="mask_rcnn").input.mask_size == 28
    assert ModelConfig().fpn.num_channels == 256 and ModelConfig().input.mask_size == 0
    with pytest.raises(ConfigError, match="unknown model.type 'yolo'; valid types: faster_rcnn, rpn"):
        ModelConfig(type="yolo")
    with pytest.raises(ConfigError, match="unknown model.preset 'v9' for model.type 'retinanet'"):
        from_dict(ModelConfig, {"type": "retinanet", "preset": "v9"})


def test_build_takes_sections_as_dicts_and_names_unknown_keys():
    model = fpn_tf.build_faster_rcnn(
        num_classes=4,
        backbone="resnet18",
        config={"backbone": {"width_multiplier": 0.25}, "input": {"min_size": 64, "max_size": 64}},
        fpn={"num_channels": 16},
        rpn={"post_nms_topk_test": 50},
    )
    cfg = model.config
    assert (cfg.num_classes, cfg.backbone.name, cfg.backbone.width_multiplier) == (4, "resnet18", 0.25)
    assert cfg.fpn.num_channels == 16 and cfg.fpn.min_level == 2 and cfg.rpn.post_nms_topk_test == 50
    assert model.get_layer("pyramid").output["P2"].shape[-1] == 16
    # backbone: a ResNet name, or the whole section like every other one.
    section = fpn_tf.build_retinanet(
        backbone={"name": "resnet18", "width_multiplier": 0.25, "norm": "bn"}
    ).config
    assert (section.backbone.name, section.backbone.width_multiplier, section.backbone.norm) == (
        "resnet18",
        0.25,
        "bn",
    )
    with pytest.raises(ConfigError, match="unknown config key\\(s\\) backbone.depth"):
        fpn_tf.build_faster_rcnn(backbone={"depth": 50})
    with pytest.raises(ConfigError, match="unknown config key\\(s\\) fpn.num_chanels; FPNConfig accepts"):
        fpn_tf.build_faster_rcnn(fpn={"num_chanels": 64})
    with pytest.raises(ConfigError, match="unknown config key\\(s\\) colour"):
        fpn_tf.build_retinanet(colour="red")
    with pytest.raises(ValueError, match="build_retinanet was given a config of model.type 'faster_rcnn'"):
        fpn_tf.build_retinanet(config=ModelConfig())


def test_rpn_only_is_read_as_the_rpn_type(caplog):
    cfg = from_dict(ModelConfig, {"rpn_only": True})
    assert cfg.type == "rpn" and "model.type: rpn" in caplog.text
    assert from_dict(ModelConfig, {"rpn_only": False}).type == "faster_rcnn"
    with pytest.raises(ConfigError, match="only a faster_rcnn could be rpn_only"):
        from_dict(ModelConfig, {"type": "retinanet", "rpn_only": True})


# ------------------------------------------------------------------ necks
@pytest.mark.parametrize("neck", sorted(T.NECK_TYPES))
def test_every_neck_is_registered_completely(neck):
    """Each neck imports, is accepted by the config checks, and builds the levels ``model.fpn`` names."""
    assert callable(T.import_path(T.NECK_TYPES[neck]))
    cfg = from_dict(ModelConfig, {**_tiny_dict(), "neck": {"type": neck}})
    keras.utils.set_random_seed(0)
    model = build_model(cfg)
    pyramid = model.get_layer("pyramid")
    assert list(pyramid.output) == pyramid_level_names(cfg.fpn)
    out = model(_inputs(64), training=False)
    assert out["detection_boxes"].shape == (1, cfg.roi_head.detections_per_image, 4)


def test_unknown_neck_and_fpn_variant_with_another_neck_are_named():
    with pytest.raises(ConfigError, match="model.neck.type must be one of fpn"):
        load_config(None, ["model.neck.type=fpnn"])
    NeckConfig()  # the default is the FPN
    assert ModelConfig().neck.type == "fpn"


def _tiny_dict() -> dict:
    from fpn_tf.config import to_dict

    d = to_dict(tiny_model_config(num_classes=4, image_size=64))
    d.pop("neck")
    return d


def _inputs(size: int) -> dict:
    data = draw_shape_images(1, size=size, seed=0)
    return {"images": tf.constant(data["images"]), "image_info": tf.constant(data["image_info"])}


# ------------------------------------------------------------------ the interface, not the type
_DETECTOR_NAMES = re.compile(
    r"faster_rcnn|mask_rcnn|retinanet|segment_propos|rpn_only|roi_head|detection_generator"
)


def _code_lines_outside_docstrings(path: pathlib.Path) -> list[tuple[int, str]]:
    source = path.read_text(encoding="utf-8")
    docstring_lines: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = getattr(node, "body", [])
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                if isinstance(body[0].value.value, str):
                    docstring_lines.update(range(body[0].lineno, body[0].end_lineno + 1))
    return [(i, line) for i, line in enumerate(source.splitlines(), 1) if i not in docstring_lines]


def test_evaluation_export_and_predict_know_no_detector():
    """``grep faster_rcnn|...|roi_head|detection_generator`` finds nothing but docstrings there."""
    files = [
        *sorted((ROOT / "fpn_tf/evaluation").glob("*.py")),
        *sorted((ROOT / "fpn_tf/export").glob("*.py")),
    ]
    files.append(ROOT / "scripts/predict.py")
    found = [
        f"{path.relative_to(ROOT)}:{i}: {line.strip()}"
        for path in files
        for i, line in _code_lines_outside_docstrings(path)
        if _DETECTOR_NAMES.search(line)
    ]
    assert found == []


def test_rpn_type_is_scored_by_proposal_ar_only(tmp_path):
    """model.type rpn: the evaluator asks the model what it scores (AR), without knowing the type."""
    from fpn_tf.evaluation.evaluate import evaluate

    cfg = dataclasses.replace(tiny_model_config(num_classes=4, image_size=64), type="rpn")
    keras.utils.set_random_seed(0)
    model = build_model(cfg)
    assert model.scored_outputs() == ("proposals",) and model.has_proposals
    assert "no detections to serve" in model.serving_problem()
    data = DataConfig(
        source="synthetic",
        train_dir=str(tmp_path / "train"),
        eval_dir=str(tmp_path / "eval"),
        synthetic_num_train=2,
        synthetic_num_eval=2,
        synthetic_image_size=64,
    )
    metrics = evaluate(ExperimentConfig(model=cfg, data=data, eval=EvalConfig(batch_size=2)), model=model)
    assert "AR@100" in metrics and "AP" not in metrics and metrics["num_images"] == 2
    assert 0.0 <= metrics["AR@100"] <= 1.0
    assert np.isfinite(metrics["AR@1000"])


def test_choice_lists_are_the_codes():
    """The choices the config checks offer are the ones the code builds (one source, no drift)."""
    from fpn_tf.models import resnet

    assert tuple(resnet._ARCHITECTURES) == T.RESNETS
    assert resnet._NORMS is T.BACKBONE_NORMS
