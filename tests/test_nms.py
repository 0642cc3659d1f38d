"""Padded greedy NMS (fpn_tf.ops.nms) against a plain numpy greedy reference."""

import importlib.util
import math
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from fpn_tf.ops import nms

METHODS = ["kernel", "tiled"]


def reference_nms(boxes, scores, iou_threshold, score_threshold=-math.inf):
    """torchvision's greedy NMS in float32: suppress when IoU > threshold; ties: lower index."""
    boxes = np.asarray(boxes, np.float32)
    scores = np.asarray(scores, np.float32)
    area = (boxes[:, 3] - boxes[:, 1]) * (boxes[:, 2] - boxes[:, 0])
    keep = []
    suppressed = np.zeros(len(boxes), bool)
    with np.errstate(invalid="ignore", divide="ignore"):
        for i in np.argsort(-scores, kind="stable"):
            if suppressed[i] or not scores[i] > score_threshold:
                continue
            keep.append(int(i))
            h = np.maximum(np.minimum(boxes[i, 2], boxes[:, 2]) - np.maximum(boxes[i, 0], boxes[:, 0]), 0)
            w = np.maximum(np.minimum(boxes[i, 3], boxes[:, 3]) - np.maximum(boxes[i, 1], boxes[:, 1]), 0)
            inter = (w * h).astype(np.float32)
            iou = inter / (area[i] + area - inter)
            suppressed |= iou > np.float32(iou_threshold)
    return keep


def random_boxes(rng, batch, n, size=100.0):
    """Overlapping boxes with duplicates and tied scores."""
    centre = rng.uniform(0, size, (batch, n, 2))
    hw = rng.uniform(2, size / 3, (batch, n, 2))
    boxes = np.concatenate([centre - hw / 2, centre + hw / 2], -1).astype(np.float32)
    boxes[:, 1::7] = boxes[:, 0:1]  # fully overlapping copies of box 0
    scores = np.round(rng.uniform(0, 1, (batch, n)), 1).astype(np.float32)  # many ties
    return boxes, scores


def check_against_reference(indices, valid, boxes, scores, m, iou_threshold, score_threshold=-math.inf):
    indices, valid = np.asarray(indices), np.asarray(valid)
    assert indices.shape == valid.shape == (boxes.shape[0], m)
    assert indices.dtype == np.int32 and valid.dtype == bool
    for b in range(boxes.shape[0]):
        expected = reference_nms(boxes[b], scores[b], iou_threshold, score_threshold)[:m]
        count = int(valid[b].sum())
        assert valid[b, :count].all() and not valid[b, count:].any(), "valid must be a prefix"
        assert indices[b, :count].tolist() == expected
        assert (indices[b, count:] == 0).all()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_greedy_reference(method, seed):
    rng = np.random.default_rng(seed)
    boxes, scores = random_boxes(rng, batch=2, n=60)
    for m, thr, score_thr in [(60, 0.5, -math.inf), (10, 0.3, -math.inf), (60, 0.7, 0.45)]:
        indices, valid = nms.non_max_suppression_padded(
            boxes, scores, m, thr, score_thr, method=method, tile_size=16
        )
        check_against_reference(indices, valid, boxes, scores, m, thr, score_thr)


@pytest.mark.parametrize("method", METHODS)
def test_ties_duplicates_threshold_equality_and_odd_boxes(method):
    boxes = np.array(
        [
            [0, 0, 10, 10],
            [0, 0, 10, 5],  # IoU with box 0 exactly 0.5: not suppressed at 0.5
            [0, 0, 10, 10],  # duplicate of box 0, same score: box 0 wins (lower index)
            [-20, -20, -10, -10],  # entirely negative coordinates
            [30, 30, 40, 40],
            [5, 5, 5, 5],  # zero area: never suppresses, never suppressed
            [5, 5, 5, 5],
            [0, 0, 10, 10],  # duplicate with a higher score: kept first, suppresses 0 and 2
        ],
        np.float32,
    )[None]
    scores = np.array([[0.9, 0.8, 0.9, 0.7, 0.9, 0.6, 0.6, 0.95]], np.float32)
    indices, valid = nms.non_max_suppression_padded(boxes, scores, 10, 0.5, method=method)
    assert np.asarray(indices)[0].tolist() == [7, 4, 1, 3, 5, 6, 0, 0, 0, 0]
    assert np.asarray(valid)[0].tolist() == [True] * 6 + [False] * 4
    check_against_reference(indices, valid, boxes, scores, 10, 0.5)
    # Without box 7 the tie between 0 and 2 goes to the lower index.
    indices, valid = nms.non_max_suppression_padded(boxes[:, :7], scores[:, :7], 3, 0.5, method=method)
    assert np.asarray(indices)[0].tolist() == [0, 4, 1]


@pytest.mark.parametrize("method", METHODS)
def test_padding_score_threshold_and_empty(method):
    boxes = np.array([[[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]]] * 2, np.float32)
    scores = np.array([[0.3, -math.inf, 0.1], [0.01, 0.02, 0.03]], np.float32)
    indices, valid = nms.non_max_suppression_padded(boxes, scores, 5, 0.5, method=method)
    assert np.asarray(indices).tolist() == [[0, 2, 0, 0, 0], [2, 1, 0, 0, 0]]  # -inf never kept
    assert np.asarray(valid).sum(1).tolist() == [2, 3]
    indices, valid = nms.non_max_suppression_padded(boxes, scores, 5, 0.5, score_threshold=0.1, method=method)
    assert np.asarray(indices).tolist() == [[0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]  # 0.1 is not > 0.1
    assert np.asarray(valid).sum(1).tolist() == [1, 0]
    indices, valid = nms.non_max_suppression_padded(
        np.zeros([2, 0, 4]), np.zeros([2, 0]), 3, 0.5, method=method
    )
    assert np.asarray(indices).shape == (2, 3) and not np.asarray(valid).any()


def test_tiled_stops_early_and_spans_tiles():
    """Many tiles, cascaded suppression inside a tile, output full before the last tile."""
    rng = np.random.default_rng(5)
    # A chain: box i overlaps i+1 by IoU 0.6, so greedy keeps every second box.
    chain = np.array([[0, 2 * i, 10, 2 * i + 10] for i in range(40)], np.float32)
    boxes = np.concatenate([chain, rng.uniform(0, 50, (60, 2)).repeat(2, 1) + [0, 0, 5, 5]])[None]
    boxes = boxes.astype(np.float32)
    scores = np.concatenate([np.linspace(1, 0.6, 40), rng.uniform(0, 0.5, 60)]).astype(np.float32)[None]
    for m in [5, 30, 100]:
        indices, valid = nms.non_max_suppression_padded(boxes, scores, m, 0.5, method="tiled", tile_size=8)
        check_against_reference(indices, valid, boxes, scores, m, 0.5)


@pytest.mark.parametrize("method", METHODS)
def test_batched_nms_equals_per_group_nms(method):
    rng = np.random.default_rng(3)
    boxes, scores = random_boxes(rng, batch=2, n=80)
    boxes[0, :5] -= 60.0  # negative coordinates must not let groups overlap
    groups = rng.integers(0, 4, (2, 80)).astype(np.int32)
    m = 40
    indices, valid = nms.batched_nms_padded(boxes, scores, groups, m, 0.5, 0.05, method=method)
    indices, valid = np.asarray(indices), np.asarray(valid)
    for b in range(2):
        kept = []
        for g in range(4):
            members = np.flatnonzero(groups[b] == g)
            kept += [members[i] for i in reference_nms(boxes[b, members], scores[b, members], 0.5, 0.05)]
        kept.sort(key=lambda i: (-scores[b, i], i))
        assert indices[b, : valid[b].sum()].tolist() == kept[:m]
    # Identical boxes in different groups are all kept.
    same = np.tile(np.array([[[0, 0, 10, 10]]], np.float32), [1, 3, 1])
    indices, valid = nms.batched_nms_padded(same, [[0.5, 0.7, 0.6]], [[0, 1, 1]], 3, 0.5, method=method)
    assert np.asarray(indices).tolist() == [[1, 0, 0]] and np.asarray(valid).tolist() == [[True, True, False]]


def test_xla_equals_eager_and_auto_dispatch():
    rng = np.random.default_rng(7)
    boxes, scores = random_boxes(rng, batch=2, n=50)
    groups = rng.integers(0, 3, (2, 50)).astype(np.int32)

    def run(b, s, g):
        plain = nms.non_max_suppression_padded(b, s, 20, 0.5, 0.2)
        tiled = nms.non_max_suppression_padded(b, s, 20, 0.5, 0.2, method="tiled", tile_size=16)
        grouped = nms.batched_nms_padded(b, s, g, 20, 0.5)
        return plain, tiled, grouped, nms._in_xla_context()

    eager = run(boxes, scores, groups)
    compiled = tf.function(run, jit_compile=True)(boxes, scores, groups)
    assert not eager[3] and bool(compiled[3])  # "auto": kernel in eager, tiled under XLA
    for e, c in zip(tf.nest.flatten(eager[:3]), tf.nest.flatten(compiled[:3])):
        np.testing.assert_array_equal(np.asarray(e), np.asarray(c))
    check_against_reference(*compiled[0], boxes, scores, 20, 0.5, 0.2)
    # Graph mode without XLA takes the kernel path, with the same result.
    graph = tf.function(run)(boxes, scores, groups)
    for e, c in zip(tf.nest.flatten(eager[:3]), tf.nest.flatten(graph[:3])):
        np.testing.assert_array_equal(np.asarray(e), np.asarray(c))
    with pytest.raises(ValueError, match="method='kernel' cannot be compiled with XLA"):
        tf.function(
            lambda b, s: nms.non_max_suppression_padded(b, s, 5, 0.5, method="kernel"), jit_compile=True
        )(boxes, scores)


def test_xla_default_tiles_on_many_boxes():
    """Three default (512) tiles, compiled, against the reference."""
    rng = np.random.default_rng(11)
    boxes, scores = random_boxes(rng, batch=1, n=1200, size=400.0)
    compiled = tf.function(lambda b, s: nms.non_max_suppression_padded(b, s, 300, 0.6), jit_compile=True)
    check_against_reference(*compiled(boxes, scores), boxes, scores, 300, 0.6)


TORCHVISION_SCRIPT = """
import sys
import numpy as np
import torch
import torchvision

data = np.load(sys.argv[1])
boxes = torch.from_numpy(data["boxes"][:, [1, 0, 3, 2]].copy())  # x1, y1, x2, y2
scores, groups = torch.from_numpy(data["scores"]), torch.from_numpy(data["groups"]).long()
np.savez(
    sys.argv[2],
    nms=torchvision.ops.nms(boxes, scores, 0.5).numpy(),
    batched=torchvision.ops.batched_nms(boxes, scores, groups, 0.5).numpy(),
)
"""


def test_matches_torchvision_when_available(tmp_path):
    """Parity with torchvision.ops.nms / batched_nms, run in a separate process: importing
    torchvision after TensorFlow can crash the interpreter."""
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision not installed")
    rng = np.random.default_rng(13)
    boxes, scores = random_boxes(rng, batch=1, n=300, size=200.0)
    scores = rng.permutation(scores.size).astype(np.float32)[None] / scores.size  # torch: ties unspecified
    groups = rng.integers(0, 5, (1, 300)).astype(np.int32)
    np.savez(tmp_path / "in.npz", boxes=boxes[0], scores=scores[0], groups=groups[0])
    subprocess.run(
        [sys.executable, "-c", TORCHVISION_SCRIPT, str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
        check=True,
        timeout=300,
    )
    theirs = np.load(tmp_path / "out.npz")
    for method in METHODS:
        indices, valid = nms.non_max_suppression_padded(boxes, scores, 300, 0.5, method=method)
        assert np.asarray(indices)[0, : np.asarray(valid).sum()].tolist() == theirs["nms"].tolist()
        indices, valid = nms.batched_nms_padded(boxes, scores, groups, 300, 0.5, method=method)
        assert np.asarray(indices)[0, : np.asarray(valid).sum()].tolist() == theirs["batched"].tolist()


def test_bad_inputs_raise_clear_errors():
    boxes, scores = np.zeros([1, 3, 4], np.float32), np.zeros([1, 3], np.float32)
    with pytest.raises(ValueError, match="boxes must be"):
        nms.non_max_suppression_padded(boxes[0], scores, 2, 0.5)
    with pytest.raises(ValueError, match="scores must be"):
        nms.non_max_suppression_padded(boxes, scores[0], 2, 0.5)
    with pytest.raises(ValueError, match="max_output_size"):
        nms.non_max_suppression_padded(boxes, scores, 0, 0.5)
    with pytest.raises(ValueError, match="iou_threshold"):
        nms.non_max_suppression_padded(boxes, scores, 2, 1.5)
    with pytest.raises(ValueError, match="method"):
        nms.non_max_suppression_padded(boxes, scores, 2, 0.5, method="fast")
    with pytest.raises(ValueError, match="groups must be an integer"):
        nms.batched_nms_padded(boxes, scores, np.zeros([1, 3], np.float32), 2, 0.5)
