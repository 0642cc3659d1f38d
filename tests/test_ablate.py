"""scripts/ablate.py (the paper's Tables 1 and 3) and the conv5 RoI head of Table 3(a)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tiny import draw_shape_images, tiny_model_config

import fpn_tf
from fpn_tf.config import BackboneConfig, ExperimentConfig, FPNConfig, ModelConfig, load_config, to_dict
from fpn_tf.models.conv5_head import Conv5Head
from fpn_tf.models.resnet import build_resnet, build_resnet_stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_script():
    spec = importlib.util.spec_from_file_location("ablate", os.path.join(ROOT, "scripts", "ablate.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["ablate"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


ablate = _load_script()


def _values(layer) -> int:
    return sum(int(np.prod(w.shape)) for w in layer.weights)


# ------------------------------------------------------------------ res5 stage and conv5 head
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_res5_stage_is_the_backbones_layer4(name):
    cfg = BackboneConfig(name=name, width_multiplier=0.25)
    full = build_resnet(cfg)
    layer4 = {w.path.split("/")[0]: tuple(w.shape) for w in full.weights if w.path.startswith("layer4_")}
    stage = build_resnet_stage(cfg, 5, full.output["C4"].shape[-1])
    assert {w.path.split("/")[0]: tuple(w.shape) for w in stage.weights} == layer4
    x = tf.zeros([3, 14, 14, full.output["C4"].shape[-1]])
    assert stage(x).shape == (3, 7, 7, full.output["C5"].shape[-1])
    assert build_resnet_stage(cfg, 5, full.output["C4"].shape[-1], stride=1)(x).shape[1:3] == (14, 14)


def test_res5_stage_rejects_bad_arguments_and_follows_freeze_at():
    with pytest.raises(ValueError, match="stage must be 2..5"):
        build_resnet_stage(BackboneConfig(), 6, 1024)
    with pytest.raises(ValueError, match="stride must be 1 or 2"):
        build_resnet_stage(BackboneConfig(), 5, 1024, stride=3)
    cfg = BackboneConfig(name="resnet18", width_multiplier=0.25)
    assert build_resnet_stage(dataclasses.replace(cfg, freeze_at=4), 5, 32).trainable_weights
    assert not build_resnet_stage(dataclasses.replace(cfg, freeze_at=5), 5, 32).trainable_weights


def test_conv5_head_shapes_pooling_and_config_round_trip():
    cfg = BackboneConfig(name="resnet18", width_multiplier=0.25, norm="bn")
    head = Conv5Head(5, cfg, in_channels=64)
    pooled = tf.random.stateless_normal([2, 3, 14, 14, 64], seed=[1, 2])
    logits, deltas = head(pooled, training=False)
    assert logits.shape == (2, 3, 5) and deltas.shape == (2, 3, 5, 4)
    # The class layer sees the global average pool of res5's 7x7 output.
    hidden = tf.reduce_mean(head.res5(tf.reshape(pooled, [6, 14, 14, 64]), training=False), axis=[1, 2])
    expected = tf.reshape(head.class_logits(hidden), [2, 3, 5])
    np.testing.assert_allclose(logits.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    # res5 (conv + bn, 128 channels) + class (128*5 + 5) + box (128*20 + 20).
    assert _values(head) == _values(head.res5) + 128 * 5 + 5 + 128 * 20 + 20

    clone = Conv5Head.from_config(head.get_config())
    assert clone.get_config() == head.get_config()
    clone(pooled)
    assert [tuple(w.shape) for w in clone.weights] == [tuple(w.shape) for w in head.weights]
    with pytest.raises(ValueError, match="64-channel"):
        Conv5Head(5, cfg, in_channels=64)(tf.zeros([1, 2, 14, 14, 32]))


def _c4_conv5_config(num_classes: int = 4) -> ModelConfig:
    cfg = tiny_model_config(num_classes=num_classes)
    roi = dataclasses.replace(cfg.roi_head, head="conv5", pooler_resolution=14)
    return dataclasses.replace(cfg, fpn=FPNConfig(variant="c4", num_channels=32), roi_head=roi)


def test_faster_rcnn_with_conv5_head_trains_and_detects():
    model = fpn_tf.build_faster_rcnn(config=_c4_conv5_config())
    assert isinstance(model.box_head, Conv5Head)
    assert model.levels == ["C4"]
    batch = {k: tf.constant(v) for k, v in draw_shape_images(2, size=128, seed=1).items()}
    with tf.GradientTape() as tape:
        losses = model.compute_losses(batch, training=True)
    assert all(np.isfinite(float(v)) for v in losses.values())
    assert float(losses["rcnn_class_loss"]) > 0
    grads = tape.gradient(losses["total_loss"], model.box_head.res5.trainable_weights)
    assert all(g is not None for g in grads)
    assert float(tf.linalg.global_norm(grads)) > 0
    out = model({"images": batch["images"], "image_info": batch["image_info"]}, training=False)
    assert out["detection_boxes"].shape == (2, 20, 4)
    # The model's config (and so a checkpoint's config.yaml) rebuilds the same head.
    rebuilt = fpn_tf.FasterRCNN.from_config(model.get_config())
    assert isinstance(rebuilt.box_head, Conv5Head)
    assert rebuilt.trainable_weight_count() == model.trainable_weight_count()


def test_unknown_roi_head_names_the_valid_ones():
    cfg = tiny_model_config()
    cfg = dataclasses.replace(cfg, roi_head=dataclasses.replace(cfg.roi_head, head="4conv1fc"))
    with pytest.raises(ValueError, match="roi_head.head must be one of 2fc, conv5, got '4conv1fc'"):
        fpn_tf.build_faster_rcnn(config=cfg)


# ------------------------------------------------------------------ rows and anchors
def test_rows_follow_the_paper_and_change_only_their_settings():
    assert [r.key for r in ablate.select_rows("1")] == [
        "t1a_c4",
        "t1b_c5",
        "t1c_fpn",
        "t1d_bottom_up",
        "t1e_no_lateral",
        "t1f_p2_only",
    ]
    assert [r.key for r in ablate.select_rows("3")] == ["t3a_c4_conv5", "t3b_c5_2fc", "t3c_fpn_2fc"]
    assert [r.key for r in ablate.select_rows("1,3", "t3c_fpn_2fc,t1a_c4")] == ["t1a_c4", "t3c_fpn_2fc"]
    with pytest.raises(ValueError, match="t9_x"):
        ablate.select_rows("1,3", "t9_x")
    with pytest.raises(ValueError, match="--tables"):
        ablate.select_rows("2")

    base = load_config(os.path.join(ROOT, "configs", "ablation.yaml"))
    plain = to_dict(base)
    for row in ablate.ROWS:
        cfg = ablate.row_config(base, row)
        d = to_dict(cfg)
        assert d["model"]["fpn"]["variant"] == row.variant
        assert (d["model"]["type"] == "rpn") == (row.table == 1)
        if row.table == 3:
            assert d["model"]["roi_head"]["head"] == row.head
            assert d["model"]["roi_head"]["pooler_resolution"] == (14 if row.head == "conv5" else 7)
        # Nothing else differs: data, training budget, seed, anchors, RPN.
        for section in ("data", "train", "eval"):
            assert d[section] == plain[section]
        for section in ("backbone", "anchors", "rpn", "input"):
            assert d["model"][section] == plain["model"][section]
    digests = {ablate.config_digest(ablate.row_config(base, r)) for r in ablate.ROWS}
    assert len(digests) == len(ablate.ROWS)


def test_anchor_counts_reproduce_the_papers_table1_column():
    base = ExperimentConfig()  # the paper's anchors 32..512, R-50
    counts = {
        r.row: ablate.anchor_count(ablate.row_config(base, r).model, ablate.PAPER_IMAGE_HW, pad=False)
        for r in ablate.ROWS
        if r.table == 1
    }
    assert counts == {"a": 47250, "b": 12000, "c": 199974, "d": 199974, "e": 199974, "f": 750000}
    assert {k: ablate.format_count(v) for k, v in counts.items()} == {
        row: paper[0] for row, paper in ablate.PAPER_TABLE1.items()
    }
    # Padded to 64: a 256-px image has 16x16 C4 locations with 15 anchors each.
    c4 = ablate.row_config(base, ablate.ROWS[0]).model
    assert ablate.anchor_count(c4, (256, 256)) == 16 * 16 * 15
    assert ablate.anchor_count(c4, (250, 250)) == 16 * 16 * 15
    assert ablate.anchor_count(c4, (250, 250), pad=False) == 16 * 16 * 15
    assert ablate.format_count(1234) == "1.2k" and ablate.format_count(999) == "999"


# ------------------------------------------------------------------ document and chart
def _fake_results(values: dict[str, float]) -> dict:
    """Result records with every metric of a row set to ``values[row key]``."""
    out = {}
    for r in ablate.ROWS:
        if r.key in values:
            names = ablate.TABLE1_METRICS if r.table == 1 else ablate.TABLE3_METRICS
            out[r.key] = {
                "metrics": {n: values[r.key] for n in names},
                "anchors": 3840,
                "parameters": 1_500_000,
                "train_seconds": 60.0,
                "eval_seconds": 5.0,
                "steps_per_second": 2.0,
            }
    return out


def test_tables_and_ordering_checks():
    results = _fake_results({"t1a_c4": 0.2, "t1c_fpn": 0.4, "t3c_fpn_2fc": 0.123})
    t1 = ablate.table1_markdown(results)
    lines = t1.splitlines()
    assert lines[0].startswith("| RPN | feature | # anchors")
    assert lines[2] == (
        "| (a) baseline on conv4 | C4 | 3.8k / 47k |  |  | 20.0 | 36.1 | 20.0 | 48.3 | 20.0 | 32.0 | "
        "20.0 | 58.7 | 20.0 | 62.2 |"
    )
    assert lines[3].startswith("| (b) baseline on conv5 | C5 | – / 12k |  |  | – | 36.3 |")
    assert lines[4].startswith("| (c) FPN | {P_k} | 3.8k / 200k | ✓ | ✓ | 40.0 | 44.0 |")
    t3 = ablate.table3_markdown(results).splitlines()
    assert t3[2].startswith("| (a) baseline on conv4 | RPN, C4 | C4 | conv5 |  |  | – | 53.1 |")
    assert t3[4].startswith("| (c) FPN | RPN, {P_k} | {P_k} | 2fc | ✓ | ✓ | 12.3 | 56.9 |")
    checks = dict(ablate.ordering_checks(results))
    assert checks["Table 1: FPN AR^1k_s > C4 baseline AR^1k_s (40.0 vs 20.0)"] is True
    assert checks["Table 1: FPN AR^1k_s > C5 baseline AR^1k_s"] is None
    worse = dict(ablate.ordering_checks(_fake_results({"t1a_c4": 0.5, "t1c_fpn": 0.4})))
    assert worse["Table 1: FPN AR^1k_s > C4 baseline AR^1k_s (40.0 vs 50.0)"] is False


def test_write_doc_keeps_text_outside_the_markers(tmp_path):
    path = str(tmp_path / "doc.md")
    ablate.write_doc(path, f"{ablate.BEGIN}\nfirst\n{ablate.END}")
    with open(path) as f:
        text = f.read()
    assert text.startswith("# FPN ablations") and "first" in text
    with open(path, "w") as f:
        f.write(f"# Mine\n\nintro\n\n{ablate.BEGIN}\nold\n{ablate.END}\n\n## Discussion\nkept\n")
    ablate.write_doc(path, f"{ablate.BEGIN}\nnew\n{ablate.END}")
    with open(path) as f:
        text = f.read()
    assert text == f"# Mine\n\nintro\n\n{ablate.BEGIN}\nnew\n{ablate.END}\n\n## Discussion\nkept\n"


def _bar_height(pixels: np.ndarray, colour: tuple[int, int, int]) -> int:
    """Height in pixels of the tallest run of ``colour`` in any column."""
    mask = np.all(pixels == np.array(colour, np.uint8), axis=-1)
    return int(mask.sum(axis=0).max())


def test_chart_bars_are_proportional_to_the_values(tmp_path):
    path = str(tmp_path / "chart.png")
    # Only FPN rows get the FPN colour: Table 1 FPN at 20 %, Table 3 FPN absent.
    ablate.draw_chart(_fake_results({"t1c_fpn": 0.2, "t1a_c4": 0.3}), path, width=900, height=400)
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape == (400, 900, 3)
    legend = image[400 - 30 :]
    for colour in (ablate.RUN_COLOUR, ablate.FPN_COLOUR, ablate.PAPER_COLOUR):
        assert _bar_height(legend, colour) == 15
    image = image[: 400 - 70 + 1]  # the plot area, above the axis labels and the legend
    fpn = _bar_height(image, ablate.FPN_COLOUR)
    c4 = _bar_height(image, ablate.RUN_COLOUR)
    # Axis 0..50 over the plot height (top 60, bottom height - 70): 20 % -> 0.4 of 270 px.
    assert abs(fpn - 0.4 * 270) <= 2 and abs(c4 - 0.6 * 270) <= 2
    # The paper's bars are drawn for every row, the tallest being Table 1(c)'s 44.9.
    assert abs(_bar_height(image, ablate.PAPER_COLOUR) - 44.9 / 50 * 270) <= 2


# ------------------------------------------------------------------ the script, tiny
@pytest.mark.slow
def test_tiny_run_fills_tables_and_resumes(tmp_path, capsys):
    out, doc, chart = tmp_path / "runs", tmp_path / "ablations.md", tmp_path / "ablations.png"
    argv = ["--tiny", f"--out_dir={out}", f"--doc={doc}", f"--chart={chart}"]
    argv += ["--rows=t1c_fpn,t1b_c5,t3a_c4_conv5"]
    assert ablate.main(argv) == 0
    with open(out / "results.json") as f:
        results = json.load(f)
    assert sorted(results) == ["t1b_c5", "t1c_fpn", "t3a_c4_conv5"]
    for key, rec in results.items():
        assert rec["steps"] == 2
        names = ablate.TABLE1_METRICS if key.startswith("t1") else ablate.TABLE3_METRICS
        for name in names:
            value = rec["metrics"][name]
            assert value == -1.0 or 0.0 <= value <= 1.0
        assert rec["metrics"]["num_images"] == 4
    # 128-px tiny images: C5 has 4x4 locations with 15 anchors, FPN P2..P6 3 each.
    assert results["t1b_c5"]["anchors"] == 4 * 4 * 15
    assert results["t1c_fpn"]["anchors"] == 3 * (32 * 32 + 16 * 16 + 8 * 8 + 4 * 4 + 2 * 2)
    assert results["t1b_c5"]["paper_scale_anchors"] == 12000
    conv5 = results["t3a_c4_conv5"]["metrics"]
    # Two steps train nothing, but pycocotools ran on real detections: AP is a number
    # in [0, 1] (not the -1 of "no detections") and never above AP50.
    assert 0.0 <= conv5["AP"] <= conv5["AP50"] <= 1.0
    assert results["t3a_c4_conv5"]["final_losses"]["rcnn_class_loss"] > 0
    text = doc.read_text()
    assert "python scripts/ablate.py --tiny" in text
    fpn_ar = ablate._pct(results["t1c_fpn"]["metrics"]["AR@100"])
    assert f"| (c) FPN | {{P_k}} | 4.1k / 200k | ✓ | ✓ | {fpn_ar} | 44.0 |" in text
    assert Image.open(chart).size == (1100, 460)

    # Again: every row is done, nothing retrains, the results stay and the report keeps
    # the first run's command, date and wall time.
    with open(out / "run.json") as f:
        run = json.load(f)
    capsys.readouterr()
    assert ablate.main(argv + ["--chart=" + str(tmp_path / "again.png")]) == 0
    assert capsys.readouterr().out.count("done before, skipped") == 3
    with open(out / "results.json") as f:
        assert json.load(f) == results
    with open(out / "run.json") as f:
        assert json.load(f) == run
    assert f"Run on {run['date']}" in doc.read_text() and run["wall_time"] in doc.read_text()
    keras.backend.clear_session()
