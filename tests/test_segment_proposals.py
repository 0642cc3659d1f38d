"""FPN segmentation proposals (§6, Appendix A): label rules, losses, inference, overfit, export."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from tiny import draw_shape_images, tiny_model_config, train_tiny

from fpn_tf.config import (
    ConfigError,
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    SegmentProposalConfig,
    load_config,
)
from fpn_tf.models.segment_proposals import SegmentProposer, paper_config, segment_losses
from fpn_tf.ops import segment_labels as L

PAPER_LEVELS = [2, 3, 4, 5, 6]
PAPER_SCALES = (32.0, 64.0, 128.0, 256.0, 512.0)
TINY_SCALES = (8.0, 16.0, 32.0, 64.0, 128.0)
R2 = math.sqrt(2.0)


def _entries(mlps=(5, 7)):
    return L.canonical_entries(PAPER_LEVELS, mlps, PAPER_SCALES, 0.25)


def _tiny_cfg(**segment):
    seg = SegmentProposalConfig(**{"hidden_dim": 16, "scales": TINY_SCALES, **segment})
    cfg = tiny_model_config(type="segment_proposals", segment=seg)
    return dataclasses.replace(cfg, input=dataclasses.replace(cfg.input, mask_size=28))


def test_paper_defaults():
    seg = SegmentProposalConfig()
    assert seg.mlps == (5, 7) and seg.hidden_dim == 512 and seg.mask_size == 14
    assert seg.scales == PAPER_SCALES and seg.padding == 0.25
    assert (seg.batch_size_per_image, seg.positive_fraction, seg.mask_loss_weight) == (128, 0.25, 10.0)
    assert seg.proposals_per_image == 1000
    paper = paper_config()
    assert paper.type == "segment_proposals" and paper.fpn.num_channels == 128  # d = 128
    assert paper.segment == seg and paper.fpn.extra_block == "maxpool"  # P2..P6 as §5.1
    model_cfg = load_config("configs/segment_proposals_r50_fpn_coco.yaml").model
    assert model_cfg == dataclasses.replace(paper, input=model_cfg.input, num_classes=81)
    assert model_cfg.input.mask_size > 0


def test_head_parameters_are_the_papers_mlps():
    model = SegmentProposer(_tiny_cfg(hidden_dim=512))
    channels = model.config.fpn.num_channels
    for k in (5, 7):
        conv = getattr(model.head, f"conv{k}")
        assert tuple(conv.kernel.shape) == (k, k, channels, 512)
        assert tuple(getattr(model.head, f"score{k}").kernel.shape) == (1, 1, 512, 1)
        assert tuple(getattr(model.head, f"mask{k}").kernel.shape) == (512, 14 * 14)


def test_bad_mlps_are_named():
    with pytest.raises(ConfigError, match="segment.mlps"):
        load_config(None, ["model.type=segment_proposals", "model.segment.mlps=[5,6]"])


def test_canonical_scales_and_25_percent_padding():
    entries = _entries()
    five = [e for e in entries if e.kernel == 5]
    seven = [e for e in entries if e.kernel == 7]
    assert [e.level for e in five] == PAPER_LEVELS and [e.level for e in seven] == PAPER_LEVELS
    assert [e.scale for e in five] == list(PAPER_SCALES)
    np.testing.assert_allclose([e.window for e in five], [40, 80, 160, 320, 640])
    np.testing.assert_allclose([e.scale for e in seven], np.array(PAPER_SCALES) * R2)
    np.testing.assert_allclose([e.window for e in seven], np.array([40, 80, 160, 320, 640]) * R2)
    assert [e.kernel for e in entries] == [5] * 5 + [7] * 5  # MLP-major location order


@pytest.mark.parametrize(
    "mlps, scale, want",
    [
        ((5, 7), 32.0, (2, 5)),
        ((5, 7), 32.0 * R2, (2, 7)),
        ((5, 7), 128.0 * R2, (4, 7)),  # the paper's example
        ((5, 7), 512.0, (6, 5)),
        ((5, 7), 100.0, (3, 7)),  # log2 100 = 6.64: nearest 6.5 (64√2) not 7 (128)
        ((5, 7), 118.0, (4, 5)),  # 6.88: nearest 7
        ((5, 7), 10.0, (2, 5)),  # below the range: the nearest, P2
        ((5, 7), 5000.0, (6, 7)),
        ((5,), 100.0, (4, 5)),  # one MLP: whole octaves only
        ((5,), 90.0, (3, 5)),
        ((7,), 100.0, (3, 7)),
        ((7,), 40.0, (2, 7)),
    ],
)
def test_scale_to_level_and_mlp(mlps, scale, want):
    entries = _entries(mlps)
    index = int(L.assign_entries(tf.constant([scale]), entries)[0])
    assert (entries[index].level, entries[index].kernel) == want


def test_max_scale_distance_leaves_far_objects_unassigned():
    entries = L.canonical_entries([4], (5,), PAPER_SCALES, 0.25)  # one map: 128 px
    got = L.assign_entries(tf.constant([128.0, 150.0, 128.0 * 2**0.3, 64.0]), entries, max_distance=0.25)
    assert got.numpy().tolist() == [0, 0, -1, -1]


def test_scale_is_the_masks_extent_not_the_box():
    # A 40 x 20 box whose mask fills only its top half: the object is 20 x 20.
    boxes = tf.constant([[[10.0, 10.0, 50.0, 30.0]]])
    masks = np.zeros((1, 1, 28, 28), np.uint8)
    masks[0, 0, :14, :] = 1
    tight = L.mask_extent_boxes(boxes, tf.constant(masks)).numpy()[0, 0]
    np.testing.assert_allclose(tight, [10, 10, 30, 30], atol=1e-5)
    empty = L.mask_extent_boxes(boxes, tf.zeros((1, 1, 28, 28), tf.uint8)).numpy()[0, 0]
    np.testing.assert_allclose(empty, [10, 10, 50, 30])  # no pixel: the box


def _labels(boxes, sizes=None, image_hw=(256, 256), mlps=(5, 7), valid=None):
    entries = L.canonical_entries(PAPER_LEVELS, mlps, PAPER_SCALES, 0.25)
    sizes = sizes or [(image_hw[0] // 2**e.level, image_hw[1] // 2**e.level) for e in entries]
    geo = L.location_geometry(sizes, entries)
    boxes = tf.constant([boxes], tf.float32)
    valid = tf.ones(boxes.shape[:2], tf.bool) if valid is None else tf.constant([valid])
    info = tf.constant([[*image_hw, *image_hw, 1.0, 1.0]], tf.float32)
    labels, matched = L.segment_labels(boxes, valid, geo, entries, info)
    return entries, {k: v.numpy() for k, v in geo.items()}, labels.numpy()[0], matched.numpy()[0]


def test_positives_are_the_3x3_cells_around_the_centre_at_the_objects_level_and_mlp():
    # A 64 x 64 object centred at (101, 75): P3 (stride 8), 5x5 MLP; its centre's cell is (12, 9).
    entries, geo, labels, matched = _labels([[69.0, 43.0, 133.0, 107.0]])
    pos = np.flatnonzero(labels == 1)
    assert len(pos) == 9
    entry = entries[geo["entry"][pos[0]]]
    assert (entry.level, entry.kernel) == (3, 5)
    assert set(map(tuple, geo["cells"][pos])) == {(r, c) for r in (11, 12, 13) for c in (8, 9, 10)}
    # every positive location lies within one cell (2^k px per axis, plus half a cell) of the centre
    assert np.all(np.abs(geo["centres"][pos] - [101.0, 75.0]) <= 1.5 * 8)
    assert np.all(matched[pos] == 0)
    # everything else in the image is a negative (trains the score only)
    assert np.all(labels[labels != 1] == 0)


def test_a_location_claimed_by_two_objects_takes_the_nearest_centre():
    # two 32 px objects (P2, 5x5) whose centres are 6 px apart: their 3x3 blocks overlap
    entries, geo, labels, matched = _labels([[40.0, 40.0, 72.0, 72.0], [46.0, 40.0, 78.0, 72.0]])
    pos = np.flatnonzero(labels == 1)
    for r in pos:
        d = [np.sum((geo["centres"][r] - c) ** 2) for c in ([56.0, 56.0], [62.0, 56.0])]
        assert matched[r] == int(np.argmin(d))
    assert set(matched[pos]) == {0, 1}


def test_padding_rows_and_padded_pixels():
    # a padding GT row gives no positives; locations centred outside valid_h x valid_w are ignored
    entries = _entries()
    sizes = [(64 // 2**e.level, 64 // 2**e.level) for e in entries]
    geo = L.location_geometry(sizes, entries)
    info = tf.constant([[40.0, 64.0, 40.0, 64.0, 1.0, 1.0]])
    boxes = tf.constant([[[10.0, 10.0, 42.0, 42.0]]])
    labels, _ = L.segment_labels(boxes, tf.constant([[False]]), geo, entries, info)
    labels = labels.numpy()[0]
    outside = geo["centres"].numpy()[:, 0] >= 40.0
    assert np.all(labels[outside] == -1) and np.all(labels[~outside] == 0)


def test_negatives_train_only_the_score_and_the_mask_weight_is_10():
    rng = np.random.default_rng(0)
    sampled = tf.constant([[1, 0, 0, 1, -1, 0]])
    score = tf.constant(rng.normal(size=(1, 6)), tf.float32)
    masks = tf.Variable(rng.normal(size=(1, 6, 4, 4)).astype(np.float32))
    targets = tf.constant(rng.uniform(size=(1, 6, 4, 4)), tf.float32)
    with tf.GradientTape() as tape:
        loss = segment_losses(score, masks, sampled, targets, 10.0)
    grad = tape.gradient(loss["segment_mask_loss"], masks).numpy()[0]
    assert np.all(np.abs(grad[[0, 3]]).sum(axis=(1, 2)) > 0)
    assert np.all(grad[[1, 2, 4, 5]] == 0)  # negatives and unfilled slots: no mask gradient
    one = segment_losses(score, masks, sampled, targets, 1.0)
    np.testing.assert_allclose(loss["segment_mask_loss"], 10.0 * one["segment_mask_loss"], rtol=1e-6)
    # score loss: sigmoid cross-entropy over the 5 sampled (not the unfilled slot)
    s = score.numpy()[0]
    y = np.array([1, 0, 0, 1, 0, 0], np.float32)
    bce = np.maximum(s, 0) - s * y + np.log1p(np.exp(-np.abs(s)))
    np.testing.assert_allclose(loss["segment_score_loss"], bce[[0, 1, 2, 3, 5]].mean(), rtol=1e-5)


def _masked_batch(num_images=2, size=128, seed=0):
    batch = draw_shape_images(num_images, size, seed=seed)
    g = batch["gt_boxes"].shape[1]
    batch["gt_masks"] = np.ones((num_images, g, 28, 28), np.uint8)  # squares' masks fill their box
    return {k: tf.constant(v) for k, v in batch.items()}


def test_training_samples_128_per_image_at_1_to_3():
    model = SegmentProposer(_tiny_cfg())
    batch = _masked_batch(2, 128)
    raw = model.forward(
        batch["images"], batch["image_info"], training=True, targets=batch, step=tf.constant(0)
    )
    sampled = raw["sampled_labels"].numpy()
    assert sampled.shape == (2, 128) and raw["head"]["mask_logits"].shape == (2, 128, 14, 14)
    geo = model.head.geometry(model._features(batch["images"], batch["image_info"]))
    boxes = L.mask_extent_boxes(batch["gt_boxes"], batch["gt_masks"])
    labels, _ = L.segment_labels(boxes, batch["gt_classes"] > 0, geo, model.head.entries, batch["image_info"])
    for b in range(2):
        available = int(np.sum(labels.numpy()[b] == 1))
        assert 0 < available <= 27  # at most 3 objects x 9 cells
        assert np.sum(sampled[b] == 1) == min(available, 32)
        assert np.sum(sampled[b] == 0) == 128 - np.sum(sampled[b] == 1)
    # with many positives the 1:3 cap binds: 32 positives, 96 negatives
    labels = tf.constant(np.r_[np.ones(200), np.zeros(2000)][None].astype(np.int32))
    from fpn_tf.ops.sampler import sample_balanced

    _, s = sample_balanced(labels, 128, 0.25, tf.constant([[1, 2]]))
    assert np.sum(s.numpy() == 1) == 32 and np.sum(s.numpy() == 0) == 96


def test_top_1000_locations_without_nms_and_windows_in_original_pixels():
    model = SegmentProposer(_tiny_cfg())
    images = tf.constant(draw_shape_images(1, 256)["images"])
    info = tf.constant([[128.0, 128.0, 256.0, 256.0, 2.0, 2.0]])  # original 128 px shown at 256
    out = {k: v.numpy() for k, v in model({"images": images, "image_info": info}).items()}
    assert out["proposal_masks"].shape == (1, 1000, 14, 14) and out["num_proposals"][0] == 1000
    head = model.head(model._features(images, info), info)
    dense = np.sort(tf.sigmoid(head["score_logits"]).numpy()[0])[::-1]
    assert head["score_logits"].shape[1] == 2 * sum((256 // 2**k) ** 2 for k in PAPER_LEVELS)
    # exactly the 1000 best of all scores, in order: nothing suppressed
    np.testing.assert_allclose(out["proposal_scores"][0], dense[:1000], rtol=1e-5, atol=1e-7)
    boxes = out["proposal_boxes"][0]
    windows = np.array([e.window / 2.0 for e in model.head.entries])  # input px -> original px
    side = boxes[:, 2] - boxes[:, 0]
    assert np.all(np.min(np.abs(side[:, None] - windows[None]), axis=1) < 1e-3)
    np.testing.assert_allclose(boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0], atol=1e-4)  # square
    assert np.all((out["proposal_masks"] >= 0) & (out["proposal_masks"] <= 1))


def test_few_locations_pad_to_the_static_count():
    model = SegmentProposer(_tiny_cfg(mlps=(5,)))
    images = tf.zeros((1, 64, 64, 3))
    info = tf.constant([[64.0, 48.0, 64.0, 48.0, 1.0, 1.0]])  # width 48: the last P2 columns ignored
    out = model({"images": images, "image_info": info})
    inside = sum((64 // 2**k) * math.ceil(48 / 2**k - 0.5) for k in PAPER_LEVELS)
    assert out["proposal_scores"].shape == (1, 1000)
    assert int(out["num_proposals"][0]) == inside < 1000
    assert float(tf.reduce_sum(out["proposal_masks"][0, inside:])) == 0.0


def test_image_pyramid_baseline_runs_one_map_over_scales():
    cfg = _tiny_cfg(mlps=(5,), levels=(4,), image_pyramid=(0.5, 1.0, 2.0), max_scale_distance=0.25)
    cfg = dataclasses.replace(cfg, fpn=dataclasses.replace(cfg.fpn, variant="c4"))
    model = SegmentProposer(cfg)
    assert model.head_levels == ["C4"]
    images = tf.constant(draw_shape_images(1, 128)["images"])
    info = tf.constant([[128.0, 128.0, 128.0, 128.0, 1.0, 1.0]])
    out = model({"images": images, "image_info": info})
    per_scale = sum((int(128 * f) // 16) ** 2 for f in (0.5, 1.0, 2.0))
    assert int(out["num_proposals"][0]) == per_scale  # 16 + 64 + 256 locations, all kept
    sides = set(
        np.round((out["proposal_boxes"][0, :per_scale, 2] - out["proposal_boxes"][0, :per_scale, 0]), 3)
    )
    assert sides == {round(40.0 / f, 3) for f in (0.5, 1.0, 2.0)}  # P4's 32 px scale seen at 3 sizes
    batch = _masked_batch(2, 128)
    losses = model.compute_losses(batch, step=tf.constant(2))  # step 2: trained at scale 2.0
    assert np.isfinite(float(losses["total_loss"]))


def _overfit_config(tmp_path):
    from fpn_tf.data.synthetic import write_synthetic_coco

    image_dir, ann = write_synthetic_coco(str(tmp_path / "syn"), 20, image_size=128, num_classes=3, seed=0)
    cfg = _tiny_cfg(hidden_dim=64, proposals_per_image=100)
    cfg = dataclasses.replace(cfg, input=dataclasses.replace(cfg.input, max_gt_boxes=8, random_flip=False))
    data = DataConfig(
        source="coco_json",
        train_dir=image_dir,
        train_annotations=ann,
        eval_dir=image_dir,
        eval_annotations=ann,
    )
    return ExperimentConfig(model=cfg, data=data, eval=EvalConfig(batch_size=4))


@pytest.mark.slow
def test_tiny_model_overfits_20_synthetic_images(tmp_path):
    from fpn_tf.data.pipeline import build_dataset
    from fpn_tf.evaluation.evaluate import evaluate

    keras.utils.set_random_seed(0)
    exp = _overfit_config(tmp_path)
    batches = list(build_dataset(exp.data, exp.model.input, "train", 4, training=False)[0])
    model = SegmentProposer(exp.model)
    losses = train_tiny(model, lambda i: batches[i % 5], 450, learning_rate=1e-3, clip_norm=None)
    first, last = losses[:5], losses[-5:]
    assert np.mean(last) < 0.1 * np.mean(first)
    metrics = evaluate(exp, model=model)
    assert metrics["AR@100"] >= 0.8, metrics
    assert metrics["model_seconds_per_image"] > 0


_FRESH = """
import json, sys
import numpy as np, tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
out = loaded.signatures["image_tensor"](images=tf.constant(np.load(sys.argv[2])))
np.savez(sys.argv[3], **{k: v.numpy() for k, v in out.items()})
"""


@pytest.mark.slow
def test_saved_model_round_trip_in_a_fresh_process(tmp_path):
    from fpn_tf.export.saved_model import export_saved_model
    from fpn_tf.export.serving import DetectionModule

    keras.utils.set_random_seed(1)
    cfg = _tiny_cfg(proposals_per_image=50)
    cfg = dataclasses.replace(cfg, num_classes=4)
    model = SegmentProposer(cfg)
    path = export_saved_model(model, str(tmp_path), "segments", version=1)
    images = draw_shape_images(2, 96, seed=3)["images"].astype(np.uint8)
    np.save(tmp_path / "images.npy", images)
    script = tmp_path / "fresh.py"
    script.write_text(_FRESH)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    subprocess.run(
        [sys.executable, str(script), path, str(tmp_path / "images.npy"), str(tmp_path / "out.npz")],
        check=True,
        env=env,
        timeout=300,
    )
    got = dict(np.load(tmp_path / "out.npz"))
    module = DetectionModule(model)  # held: its tf.functions keep only a weak reference
    want = {k: v.numpy() for k, v in module.serve_image_tensor(tf.constant(images)).items()}
    assert (
        set(got)
        == set(want)
        == {
            "proposal_boxes",
            "proposal_boxes_normalized",
            "proposal_scores",
            "proposal_masks",
            "num_proposals",
        }
    )
    assert got["proposal_masks"].shape == (2, 50, 14, 14)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-4, err_msg=k)
    with open(os.path.join(path, "assets", "model_config.json"), encoding="utf-8") as f:
        assert json.load(f)["type"] == "segment_proposals"


@pytest.mark.slow
def test_table_script_tiny_run_writes_doc_and_chart(tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    import segment_proposals_table as table

    doc, chart = tmp_path / "s.md", tmp_path / "s.png"
    args = ["--tiny", "--out_dir", str(tmp_path / "run"), "--doc", str(doc), "--chart", str(chart)]
    assert table.main(args) == 0
    text = doc.read_text()
    assert table.BEGIN in text and table.END in text
    for row in table.ROWS:
        assert f"| {row.name} |" in text
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(results) == {r.key for r in table.ROWS}
    assert chart.stat().st_size > 1000
    pyramid = table.row_config(table.load_config(table.parse_args([]).config), table.ROWS[0]).model
    assert pyramid.fpn.variant == "c4" and pyramid.segment.levels == (4,)
    np.testing.assert_allclose(pyramid.segment.image_pyramid, 2.0 ** np.arange(-2, 1.01, 0.5))
