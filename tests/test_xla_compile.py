"""XLA compiles each function once per input shape, never again for new step values.

A subprocess (this file run as a script) trains a tiny Faster R-CNN for a few
steps with ``xla=True`` and with ``xla=False``, then runs XLA inference on a few
batches, with ``XLA_FLAGS=--xla_dump_to=DIR``: XLA writes one
``module_*.<function>.before_optimizations.txt`` per compilation, so counting
them per function name counts compilations (STACK_NOTES). Every step sees new
images, image ids, ground truth and step number; a value that reached XLA as a
compile-time constant would give one module per step (the bug this guards:
a nested jit-compiled RoIAlign made the step's inputs constants).
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
TIMEOUT_S = 420


def count_compilations(dump_dir: str) -> dict[str, int]:
    """{function name: number of HLO modules} of an XLA dump directory.

    File names look like ``module_0345.a_inference_match_boxes_4277__.16.before_optimizations.txt``
    (``a_inference___backward__pool_7550_10050__`` for a gradient): the prefix,
    leading underscores, TF's function counters and the module id are dropped,
    giving "match_boxes", "backward__pool", "replica_gradients_fn".
    """
    counts: collections.Counter = collections.Counter()
    for name in os.listdir(dump_dir):
        if not name.endswith(".before_optimizations.txt"):
            continue
        function = name.split(".", 2)[1]
        function = re.sub(r"^a_(inference|forward)_+", "", function)
        function = re.sub(r"(_\d+)+_+(XlaMustCompile.*)?$", "", function)
        counts[function] += 1
    return dict(counts)


def worker_main(out_dir: str) -> None:
    """Trains with and without XLA and runs XLA inference; dumps go to XLA_FLAGS."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import tensorflow as tf
    from test_training import dataset_fn_for, train_config
    from tiny import draw_shape_images, tiny_model_config

    from fpn_tf.evaluation.evaluate import _predict_fns
    from fpn_tf.models.faster_rcnn import build_faster_rcnn
    from fpn_tf.training.trainer import Trainer

    config = tiny_model_config(image_size=64)
    examples = draw_shape_images(2 * STEPS, size=64, seed=3)
    for xla in (True, False):
        trainer = Trainer(
            lambda: build_faster_rcnn(config=config),
            train_config(train_steps=STEPS, batch_size=2),
            os.path.join(out_dir, f"model_xla_{xla}"),
            xla=xla,
        )
        result = trainer.fit(dataset_fn_for(examples, 2))
        assert result.step == STEPS, result
    detect, propose = _predict_fns(trainer.model, proposals=True, xla=True)
    for i in range(3):
        images = tf.constant(examples["images"][2 * i : 2 * i + 2])
        info = tf.constant(examples["image_info"][2 * i : 2 * i + 2])
        detect(images, info)
        propose(images, info)


def test_auto_xla_is_off_on_cpu_and_says_why(caplog):
    import logging

    from absl import logging as absl_logging

    from fpn_tf.training import distribute
    from fpn_tf.training.xla_choice import AUTO_XLA, auto_xla, device_type

    assert AUTO_XLA == {"CPU": False, "GPU": True, "TPU": True}
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.INFO)
    try:
        for name in ("one_device", "mirrored"):
            strategy = distribute.make_strategy(name)
            assert device_type(strategy) == "CPU"
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="absl"):
                assert auto_xla(strategy) is False
            assert any(m.startswith("--xla auto: off on CPU (") for m in caplog.messages), caplog.messages
    finally:
        absl_logging.set_verbosity(verbosity)


def types_worker_main(out_dir: str) -> None:
    """Trains every other detector type a few XLA steps; each step is one module (dumps: XLA_FLAGS)."""
    import dataclasses

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from mask_shapes import add_masks
    from test_training import dataset_fn_for, train_config
    from tiny import draw_shape_images, tiny_model_config
    from tiny_retinanet import tiny_retinanet_config

    from fpn_tf.config import SegmentProposalConfig
    from fpn_tf.models.build import build_model
    from fpn_tf.training.trainer import Trainer

    base = tiny_model_config(image_size=64)
    masked = dataclasses.replace(base.input, mask_size=28)
    configs = {
        "rpn": dataclasses.replace(base, type="rpn"),
        "mask_rcnn": dataclasses.replace(base, type="mask_rcnn", input=masked),
        "retinanet": tiny_retinanet_config(image_size=64),
        "segment_proposals": dataclasses.replace(
            base, type="segment_proposals", input=masked, segment=SegmentProposalConfig(hidden_dim=16)
        ),
    }
    assert sorted(configs) == sorted(set(TYPES_CHECKED)), "every type but faster_rcnn (counted above)"
    examples = add_masks(draw_shape_images(2 * STEPS, size=64, seed=3))
    for name in TYPES_CHECKED:
        trainer = Trainer(
            lambda cfg=configs[name]: build_model(cfg),
            train_config(train_steps=STEPS, batch_size=2),
            os.path.join(out_dir, f"model_{name}"),
            xla=True,
        )
        result = trainer.fit(dataset_fn_for(examples, 2))
        assert result.step == STEPS, (name, result)


TYPES_CHECKED = ("rpn", "mask_rcnn", "retinanet", "segment_proposals")


def _compilations(tmp_path, *worker_args: str) -> dict[str, int]:
    """Runs this file's worker in a subprocess with an XLA dump; its ``count_compilations``."""
    dump = str(tmp_path / "xla_dump")
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2", XLA_FLAGS=f"--xla_dump_to={dump}")
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), str(tmp_path), *worker_args],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return count_compilations(dump)


@pytest.mark.slow
def test_every_detector_type_compiles_its_xla_step_once(tmp_path):
    """The other types' XLA training steps: one module each over STEPS steps (faster_rcnn: below)."""
    from fpn_tf.detector_types import DETECTOR_TYPES

    assert set(TYPES_CHECKED) | {"faster_rcnn"} == set(DETECTOR_TYPES), "a new type needs its count here"
    counts = _compilations(tmp_path, "types")
    # One per type (a step value reaching XLA as a constant would give one per step).
    assert counts.get("replica_gradients_fn") == len(TYPES_CHECKED), counts


@pytest.mark.slow
def test_each_jit_function_compiles_once(tmp_path):
    counts = _compilations(tmp_path)
    assert counts == {
        # xla=True: the whole per-replica step is one module, compiled once for STEPS steps.
        "replica_gradients_fn": 1,
        # xla=False: the parts compiled on their own (fpn_tf/ops/xla.py), once each.
        "match_boxes": 1,
        "pool": 1,
        "backward__pool": 1,
        # inference: one input shape, three batches.
        "detect": 1,
        "propose": 1,
    }


if __name__ == "__main__":
    if sys.argv[2:] == ["types"]:
        types_worker_main(sys.argv[1])
    else:
        worker_main(sys.argv[1])
