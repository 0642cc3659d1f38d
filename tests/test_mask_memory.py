"""bench/mask_memory.py --tiny: each configuration in its own process, through the real pipeline.

No memory bound is asserted at this scale (TensorFlow's own ~500 MB dominate);
the 800x1333 numbers are in docs/benchmarks.md. What is checked: the three
processes ran, the batches carry box-cropped M x M masks of every instance (no
full-image masks), and both models took a finite training step.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_mask_memory_measures_pipeline_faster_and_mask_rcnn(tmp_path):
    out = tmp_path / "mask_memory.json"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "bench", "mask_memory.py"),
            "--tiny",
            "--mask_size=28",
            "--num_classes=3",
            "--pipeline_batches=2",
            f"--output={out}",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {r["config"]: r for r in report["results"]}
    assert set(rows) == {"pipeline", "faster_rcnn", "mask_rcnn"}
    meta = report["meta"]
    assert meta["masks_per_image"] == 8 and meta["num_images"] == 2
    # 2 images x 8 instances, each cropped to its box at 28 x 28; nothing image-sized.
    pipe = rows["pipeline"]
    assert pipe["batch_shapes"]["gt_masks"] == [2, 8, 28, 28]
    assert pipe["valid_gt"] == 16
    assert pipe["gt_mask_bytes"] == meta["box_cropped_mask_bytes"] == 2 * 8 * 28 * 28
    # Ellipses fill ~pi/4 of their box: far from empty or full.
    assert 0.5 < pipe["gt_mask_pixels_set"] / pipe["gt_mask_bytes"] < 0.95
    assert "gt_masks" not in rows["faster_rcnn"]["batch_shapes"]
    assert rows["mask_rcnn"]["batch_shapes"]["gt_masks"] == [2, 8, 28, 28]
    for kind in ("faster_rcnn", "mask_rcnn"):
        r = rows[kind]
        assert math.isfinite(r["losses"]["total_loss"]) and r["losses"]["total_loss"] > 0
        # The step's peak lies above the process's resident size before the step.
        assert r["peak_rss_mb"] >= r["rss_before_step_mb"] > 0
    assert any("mask" in k for k in rows["mask_rcnn"]["losses"])
    assert not any("mask" in k for k in rows["faster_rcnn"]["losses"])
    ratio = rows["mask_rcnn"]["peak_rss_mb"] / rows["faster_rcnn"]["peak_rss_mb"]
    assert meta["mask_over_faster_rss"] == ratio
