"""Runs a trained model over the eval split and computes COCO AP (and proposal AR).

A model whose outputs hold ``proposal_masks`` (the segment proposer, paper §6) is
scored by class-agnostic segment AR (``evaluate_segment_ar``) instead of AP.

The model comes from a training directory (the trainer's checkpoint; the run's
``config.yaml`` is read from there when no config is given) or from an exported
SavedModel (``fpn_tf.export``; its ``detect`` function is called, which already
maps labels to dataset category ids). When the outputs hold ``detection_masks``
(Mask R-CNN) the masks are pasted into original pixels and mask AP is reported
beside box AP as ``segm_AP``, ``segm_AP50``, ... (pycocotools, RLE). Metrics are printed, written as JSON
beside the checkpoint (``<model_dir>/ckpt-<step>.metrics.json``) and logged to
TensorBoard under ``<model_dir>/eval`` at the checkpoint's step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import keras
import tensorflow as tf
from absl import logging

from fpn_tf import checkpoints
from fpn_tf.checkpoints import checkpoint_prefix
from fpn_tf.config import ExperimentConfig
from fpn_tf.data.pipeline import build_dataset
from fpn_tf.detector_types import detector_type
from fpn_tf.evaluation.coco_evaluator import (
    PROPOSAL_METRICS,
    detections_to_coco,
    evaluate_detections,
    evaluate_proposals,
    evaluate_segment_ar,
    proposals_to_coco,
)
from fpn_tf.summaries import write_scalars

PRINTED_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR@10")
# Mask models also report mask AP under these names (segm_AP, segm_AP50, ...).
SEGM_PREFIX = "segm_"


def resolve_checkpoint(model_dir: str | None, checkpoint: str | None) -> str:
    """A checkpoint prefix: ``checkpoint`` (prefix or .index) or the latest in ``model_dir``."""
    if not (checkpoint or model_dir):
        raise ValueError("give a model_dir or a checkpoint")
    return checkpoint_prefix(checkpoint or model_dir)


def checkpoint_step(prefix: str) -> int:
    """The trainer's global step stored in checkpoint ``prefix`` (-1 if absent)."""
    try:
        return int(tf.train.load_checkpoint(prefix).get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE"))
    except (tf.errors.NotFoundError, ValueError):
        return -1


def restore_model(config: ExperimentConfig, prefix: str) -> keras.Model:
    """``build_model(config.model)`` with the weights of the trainer's checkpoint."""
    return checkpoints.restore_model(config.model, prefix)


def _predict_fns(model: keras.Model, proposals: bool, xla: bool):
    @tf.function(jit_compile=xla)
    def detect(images, image_info):
        return model({"images": images, "image_info": image_info}, training=False)

    @tf.function(jit_compile=xla)
    def propose(images, image_info):
        return model.proposal_outputs(images, image_info)

    return detect, (propose if proposals else None)


@dataclasses.dataclass
class _Results:
    """COCO-format results gathered over the eval batches, by kind of model output."""

    detections: list = dataclasses.field(default_factory=list)
    proposals: list = dataclasses.field(default_factory=list)  # RPN boxes (AR, Table 1)
    segments: list = dataclasses.field(default_factory=list)  # segment proposals (§6)
    image_ids: list = dataclasses.field(default_factory=list)
    with_masks: bool = False
    model_seconds: float = 0.0
    timed_images: int = 0

    def add_outputs(self, ids, out: dict, image_hw, label_map) -> None:
        """One batch of model outputs (numpy): detections (+ masks) or segment proposals."""
        if "proposal_masks" in out:  # masks pasted into the original image
            self.segments += proposals_to_coco(
                ids,
                out["proposal_boxes"],
                out["proposal_scores"],
                out["num_proposals"],
                masks=out["proposal_masks"],
                image_hw=image_hw,
            )
            return
        masks = out.get("detection_masks")
        self.with_masks = self.with_masks or masks is not None
        # Mask models: each box-relative mask is pasted into original pixels and
        # RLE-encoded one at a time (no full-image stack).
        self.detections += detections_to_coco(
            ids,
            out["detection_boxes"],
            out["detection_scores"],
            out["detection_classes"],
            out["num_detections"],
            label_map,
            masks=masks,
            image_hw=image_hw if masks is not None else None,
        )

    def metrics(self, coco_gt, with_proposals: bool, scored: tuple[str, ...]) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self.segments:
            metrics.update(evaluate_segment_ar(coco_gt, self.segments, self.image_ids))
        elif "boxes" in scored:
            metrics.update(evaluate_detections(coco_gt, self.detections, self.image_ids))
            if self.with_masks:
                segm = evaluate_detections(coco_gt, self.detections, self.image_ids, iou_type="segm")
                metrics.update({f"{SEGM_PREFIX}{k}": v for k, v in segm.items()})
        if with_proposals:
            metrics.update(evaluate_proposals(coco_gt, self.proposals, self.image_ids))
        return metrics


def _run(dataset, detect, propose, limit: int, label_map) -> tuple[_Results, float]:
    """Runs ``detect`` (and ``propose``) over the eval batches; (results, wall seconds)."""
    results = _Results()
    start = time.perf_counter()
    for batch in dataset:
        ids = batch["image_id"].numpy()
        if limit > 0:
            keep = min(len(ids), limit - len(results.image_ids))
            if keep <= 0:
                break
            batch = {k: v[:keep] for k, v in batch.items()}
            ids = ids[:keep]
        images, image_info = batch["images"], batch["image_info"]
        if detect is not None:
            tick = time.perf_counter()
            out = {k: v.numpy() for k, v in detect(images, image_info).items()}
            if results.image_ids:  # the first batch traces the function: not timed
                results.model_seconds += time.perf_counter() - tick
                results.timed_images += len(ids)
            results.add_outputs(ids, out, image_info.numpy()[:, 0:2], label_map)
        if propose is not None:
            p = propose(images, image_info)
            results.proposals += proposals_to_coco(
                ids, p["proposal_boxes"].numpy(), p["proposal_scores"].numpy(), p["num_proposals"].numpy()
            )
        results.image_ids += [int(i) for i in ids]
    seconds = time.perf_counter() - start
    if not results.image_ids:
        raise ValueError("the eval split yielded no images")
    return results, seconds


def _record(metrics: dict, metrics_path, prefix, saved_model, step: int, model_dir) -> None:
    """Writes the metrics JSON (default ``<checkpoint>.metrics.json``) and TensorBoard ``eval/`` scalars."""
    if metrics_path is None and prefix is not None:
        metrics_path = prefix + ".metrics.json"
    if metrics_path:
        record = {"checkpoint": prefix, "saved_model": saved_model, "step": step, "metrics": metrics}
        with open(metrics_path, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
    if model_dir and step >= 0:
        writer = tf.summary.create_file_writer(os.path.join(model_dir, "eval"))
        write_scalars(writer, {f"eval/{k}": v for k, v in metrics.items() if k != "num_images"}, step)


def evaluate(
    config: ExperimentConfig,
    model_dir: str | None = None,
    checkpoint: str | None = None,
    saved_model: str | None = None,
    model: keras.Model | None = None,
    proposals: bool | None = None,
    num_images: int | None = None,
    batch_size: int | None = None,
    xla: bool = False,
    metrics_path: str | None = None,
    step: int | None = None,
) -> dict[str, float]:
    """Evaluates on ``config.data``'s eval split; returns the metrics dict.

    Args:
        config: the experiment (model, data, eval settings).
        model_dir, checkpoint: restore the trainer's checkpoint (``checkpoint``
            or the latest in ``model_dir``).
        saved_model: evaluate an export instead (a version dir or its parent).
        model: evaluate this in-memory model instead.
        proposals: also compute proposal AR (default: for the models whose
            ``scored_outputs`` are proposals, e.g. ``model.type: rpn``, which report
            AR only).
        num_images: evaluate the first N images (default ``config.eval.num_images``, 0 = all).
        batch_size: default ``config.eval.batch_size``.
        xla: compile inference with XLA.
        metrics_path: JSON output (default: ``<checkpoint>.metrics.json``; none
            for a SavedModel or an in-memory model unless given).
        step: the training step of an in-memory ``model`` (evaluation during
            training): with ``model_dir`` the metrics go to TensorBoard at it.

    Returns:
        COCO metrics (fractions; see ``coco_evaluator``), ``segm_*`` mask metrics
        for mask models, ``AR@…`` when
        proposals are evaluated, ``num_images`` and ``seconds_per_image``.

    Long by this docstring and its argument checks; the work is ``_run``, ``_Results``
    and ``_record``.
    """
    scored = detector_type(config.model.type).scores
    proposals = "proposals" in scored if proposals is None else bool(proposals)
    detects = any(kind in scored for kind in ("boxes", "segments"))
    limit = config.eval.num_images if num_images is None else int(num_images)
    dataset, info = build_dataset(
        config.data,
        config.model.input,
        "eval",
        batch_size or config.eval.batch_size,
        training=False,
    )
    step, prefix, label_map = (-1 if step is None else int(step)), None, info.label_map
    if saved_model:
        if proposals:
            raise ValueError("proposal AR needs the model itself: a SavedModel serves detections only")
        from fpn_tf.export.saved_model import load_exported

        loaded, _ = load_exported(saved_model)
        detect, propose, label_map = loaded.detect, None, None  # detect() returns category ids
    else:
        if model is None:
            prefix = resolve_checkpoint(model_dir, checkpoint)
            step = checkpoint_step(prefix)
            model = restore_model(config, prefix)
            model_dir = model_dir or os.path.dirname(prefix)
        scored = model.scored_outputs()
        if model.config.num_classes != info.label_map.num_classes and "boxes" in scored:
            raise ValueError(
                f"the model has num_classes={model.config.num_classes} but the eval data has "
                f"{len(info.label_map)} categories (+ background = {info.label_map.num_classes})"
            )
        if proposals and not model.has_proposals:
            raise ValueError(f"model.type {model.config.type!r} has no proposal stage to score by AR")
        detect, propose = _predict_fns(model, proposals, xla)
    if not detects:
        detect = None

    results, seconds = _run(dataset, detect, propose, limit, label_map)
    image_ids = results.image_ids
    metrics = results.metrics(info.coco_gt, proposals, scored)
    metrics["num_images"] = len(image_ids)
    metrics["seconds_per_image"] = seconds / len(image_ids)
    if results.timed_images:  # the model call alone (no tracing, no COCO conversion): the paper's "time"
        metrics["model_seconds_per_image"] = results.model_seconds / results.timed_images
    logging.info("%s", format_metrics(metrics))

    _record(metrics, metrics_path, prefix, saved_model, step, model_dir)
    return metrics


def format_metrics(metrics: dict[str, float]) -> str:
    """One line: the COCO numbers in percent (as the paper's tables print them)."""
    segm = tuple(SEGM_PREFIX + k for k in PRINTED_METRICS)
    keys = [k for k in PRINTED_METRICS + segm + PROPOSAL_METRICS if k in metrics]
    parts = [f"{k} {100.0 * metrics[k]:.1f}" if metrics[k] >= 0 else f"{k} n/a" for k in keys]
    timing = f"{metrics['seconds_per_image']:.3f} s/image"
    if "model_seconds_per_image" in metrics:
        timing += f", model {metrics['model_seconds_per_image']:.3f} s/image"
    parts.append(f"({int(metrics['num_images'])} images, {timing})")
    return "  ".join(parts)
