"""Mask R-CNN: parameter count, layers, losses, torchvision import and parity, SavedModel masks.

The parity test builds torchvision's ``maskrcnn_resnet50_fpn`` with non-trivial
random weights in a subprocess (torchvision must not be imported after
TensorFlow), imports its state dict into ``build_mask_rcnn(preset=
"torchvision_v1")``, exports a SavedModel and runs it in a fresh process on the
800x1216 photo-like image of the Faster R-CNN parity test; each matched
detection's box-relative mask is pasted into image pixels
(``mask_ops.paste_mask_numpy``) and compared with torchvision's pasted mask.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from fpn_tf.models.mask_head import ClassMasks, MaskHead, ToInputPixels
from fpn_tf.models.mask_rcnn import MaskRCNN, build_mask_rcnn
from fpn_tf.models.weights_torchvision import WeightImportError
from fpn_tf.models.weights_torchvision_mask import (
    infer_torchvision_mask_config,
    load_torchvision_mask_state_dict,
    torchvision_mask_state_dict,
)
from fpn_tf.ops.mask_ops import paste_mask_numpy, paste_masks
from tests.mask_shapes import add_masks
from tests.test_torchvision_import import (
    HAS_TORCHVISION,
    NEEDS_TORCHVISION,
    REPO,
    SCORE_THRESHOLD,
    TORCH_SCRIPT,
    compare_detections,
    photo_like_image,
)
from tests.tiny import cycle_batches, draw_shape_images, tiny_model_config, train_tiny


def _np(x) -> np.ndarray:
    return x.numpy() if hasattr(x, "numpy") else np.asarray(x)


def tiny_mask_config(num_classes: int = 4, **overrides):
    cfg = tiny_model_config(num_classes=num_classes, type="mask_rcnn", **overrides)
    return dataclasses.replace(cfg, mask_head=dataclasses.replace(cfg.mask_head, conv_channels=32))


# ------------------------------------------------------------------ structure
@pytest.mark.slow
def test_parameter_count_equals_torchvision():
    """Conv/dense values of torchvision's maskrcnn_resnet50_fpn: 44,401,393 (91 classes), 44,024,653 (21)."""
    assert build_mask_rcnn(preset="torchvision_v1").trainable_weight_count() == 44_401_393
    assert build_mask_rcnn(preset="torchvision_v1", num_classes=21).trainable_weight_count() == 44_024_653


def test_layers_get_config_round_trip():
    head = MaskHead(5, num_convs=2, conv_channels=8, name="mh")
    pooled = tf.random.stateless_normal([2, 3, 14, 14, 6], seed=[1, 2])
    logits = head(pooled)
    assert logits.shape == (2, 3, 28, 28, 5) and logits.dtype == tf.float32
    clone = MaskHead.from_config(head.get_config())
    assert (clone.num_classes, clone.num_convs, clone.conv_channels, clone.name) == (5, 2, 8, "mh")
    clone(pooled)
    clone.set_weights(head.get_weights())
    np.testing.assert_allclose(_np(clone(pooled)), _np(logits), atol=1e-6)
    serialized = keras.saving.serialize_keras_object(head)
    assert type(keras.saving.deserialize_keras_object(serialized)) is MaskHead
    for layer in (ClassMasks(name="cm"), ToInputPixels(name="tip")):
        again = type(layer).from_config(layer.get_config())
        assert again.name == layer.name
    classes = tf.constant([[2, 0, 4]] * 2)
    masks = _np(ClassMasks()(logits, classes))
    np.testing.assert_allclose(masks[:, 0], _np(tf.sigmoid(logits[:, 0, :, :, 2])), atol=1e-6)
    assert masks.shape == (2, 3, 28, 28) and np.all(masks[:, 1] == 0)
    info = tf.constant([[100.0, 200.0, 50.0, 100.0, 0.5, 0.5]])
    np.testing.assert_allclose(_np(ToInputPixels()(tf.constant([[[10.0, 20.0, 30.0, 40.0]]]), info)),
                               [[[5.0, 10.0, 15.0, 20.0]]])  # fmt: skip
    with pytest.raises(ValueError, match="MaskRCNN is model.type 'mask_rcnn', got a config of type 'faster"):
        MaskRCNN(dataclasses.replace(tiny_mask_config(), type="faster_rcnn"))


def _tiny_batch(num: int = 2, seed: int = 0):
    batch = add_masks(draw_shape_images(num, seed=seed), mask_size=28)
    full = batch.pop("full_masks")
    return {k: tf.constant(v) for k, v in batch.items()}, full


def test_losses_and_inference_outputs():
    keras.utils.set_random_seed(0)
    model = build_mask_rcnn(config=tiny_mask_config())
    batch, _ = _tiny_batch()
    losses = model.compute_losses(batch, step=tf.constant(0))
    assert set(losses) == set(model.loss_keys) and "mask_loss" in losses
    # An untrained head predicts ~0.5 everywhere: sigmoid CE ~ log 2.
    assert 0.6 < float(losses["mask_loss"]) < 0.8
    total = sum(float(v) for k, v in losses.items() if k != "total_loss")
    assert float(losses["total_loss"]) == pytest.approx(total, rel=1e-5)
    no_masks = {k: v for k, v in batch.items() if k != "gt_masks"}
    with pytest.raises(ValueError, match="gt_masks.*mask_size"):
        model.compute_losses(no_masks)
    out = model({"images": batch["images"], "image_info": batch["image_info"]})
    assert out["detection_masks"].shape == (2, 20, 28, 28)
    masks, n = _np(out["detection_masks"]), _np(out["num_detections"])
    assert np.all(masks[0, n[0]:] == 0) and np.all((masks >= 0) & (masks <= 1))  # fmt: skip
    grads = tf.GradientTape
    with grads() as tape:
        loss = model.compute_losses(batch, step=tf.constant(1))["mask_loss"]
    g = tape.gradient(loss, model.mask_head.trainable_weights)
    assert all(x is not None and float(tf.reduce_sum(tf.abs(x))) > 0 for x in g)


# ------------------------------------------------------------------ torchvision layout (no torch needed)
def _random_weights(model, seed):
    rng = np.random.default_rng(seed)
    for v in model.weights:
        value = rng.normal(0, 0.05, v.shape)
        if "moving_variance" in v.path or "gamma" in v.path:
            value = rng.uniform(0.5, 1.5, v.shape)
        v.assign(value.astype("float32"))


def test_state_dict_round_trip_and_errors(tmp_path):
    cfg = tiny_mask_config(num_classes=5)
    cfg = dataclasses.replace(cfg, roi_head=dataclasses.replace(cfg.roi_head, score_threshold=0.0))
    source, target = build_mask_rcnn(config=cfg), build_mask_rcnn(config=cfg)
    _random_weights(source, 0)
    sd = torchvision_mask_state_dict(source)
    assert sd["roi_heads.mask_head.3.0.weight"].shape == (32, 32, 3, 3)
    assert sd["roi_heads.mask_predictor.conv5_mask.weight"].shape == (32, 32, 2, 2)  # [in, out, kh, kw]
    assert sd["roi_heads.mask_predictor.mask_fcn_logits.weight"].shape == (5, 32, 1, 1)
    np.savez(tmp_path / "m.npz", **sd)
    result = load_torchvision_mask_state_dict(target, str(tmp_path / "m.npz"))
    assert len(result.loaded) == len(sd)
    batch, _ = _tiny_batch(1)
    inputs = {"images": batch["images"], "image_info": batch["image_info"]}
    a, b = source(inputs), target(inputs)
    assert int(a["num_detections"][0]) > 0
    np.testing.assert_array_equal(_np(a["detection_masks"]), _np(b["detection_masks"]))
    # torchvision < 0.13 named the mask convs mask_fcn{i}.
    old = {k.replace("mask_head.0.0.", "mask_head.mask_fcn1."): v for k, v in sd.items()}
    load_torchvision_mask_state_dict(target, old)
    bad = {k: v for k, v in sd.items() if k != "roi_heads.mask_predictor.conv5_mask.bias"}
    with pytest.raises(WeightImportError, match="1 missing key.*conv5_mask.bias"):
        load_torchvision_mask_state_dict(target, bad)
    inferred = infer_torchvision_mask_config(sd)
    assert (inferred.type, inferred.num_classes, inferred.mask_head.conv_channels) == ("mask_rcnn", 5, 32)
    assert inferred.roi_head.aligned is False and inferred.input.mask_size == 56


# ------------------------------------------------------------------ SavedModel round trip (tiny)
SERVE_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import tensorflow as tf

    loaded = tf.saved_model.load(sys.argv[1])
    image = np.load(sys.argv[2]).astype(np.uint8)
    out = loaded.signatures["image_tensor"](images=tf.constant(image))
    np.savez(sys.argv[3], **{k: v.numpy() for k, v in out.items()})
    """
)


def _serve_in_fresh_process(path: str, image: np.ndarray, folder) -> dict:
    np.save(folder / "image.npy", image)
    subprocess.run(
        [sys.executable, "-c", SERVE_SCRIPT, path, str(folder / "image.npy"), str(folder / "served.npz")],
        check=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    return dict(np.load(folder / "served.npz"))


def _exported_random_mask_model(tmp_path, weight_seed: int, **export_kwargs):
    """A tiny Mask R-CNN with random weights and no score threshold, exported: ``(model, version path)``."""
    from fpn_tf.export.saved_model import export_saved_model

    keras.utils.set_random_seed(0)
    cfg = tiny_mask_config()
    cfg = dataclasses.replace(cfg, roi_head=dataclasses.replace(cfg.roi_head, score_threshold=0.0))
    model = build_mask_rcnn(config=cfg)
    _random_weights(model, weight_seed)
    return model, export_saved_model(model, str(tmp_path), "tiny_mask", **export_kwargs)


@pytest.mark.slow
def test_masks_survive_saved_model_in_a_fresh_process(tmp_path):
    from fpn_tf.data.preprocess import preprocess_for_inference

    model, path = _exported_random_mask_model(tmp_path, 3, full_image_masks=True)
    image = draw_shape_images(1, size=128)["images"][0][:100, :120].round()  # a non-square original
    served = _serve_in_fresh_process(path, image[None], tmp_path)
    padded, info = preprocess_for_inference(tf.constant(image), model.config.input)
    ours = {k: _np(v) for k, v in model({"images": padded[None], "image_info": info[None]}).items()}
    n = int(ours["num_detections"][0])
    assert n > 0 and int(served["num_detections"][0]) == n
    assert served["detection_masks"].shape == (1, 20, 28, 28)
    diff = np.abs(served["detection_masks"] - ours["detection_masks"]).max()
    print(f"\nSavedModel detection_masks max |diff| {diff:.2e} over {n} detections")
    assert diff <= 1e-4
    full = served["detection_masks_image"]
    assert full.shape == (1, 20, 100, 120) and full.dtype == np.uint8
    for d in range(n):
        expected = paste_mask_numpy(ours["detection_masks"][0, d], ours["detection_boxes"][0, d], (100, 120))
        agree = np.mean(full[0, d] == (expected >= 0.5))
        assert agree >= 0.999, d
    tensor_paste = _np(paste_masks(ours["detection_masks"], ours["detection_boxes"], (100, 120)))
    np.testing.assert_allclose(tensor_paste[0, 0], paste_mask_numpy(
        ours["detection_masks"][0, 0], ours["detection_boxes"][0, 0], (100, 120)), atol=1e-5)  # fmt: skip


# ------------------------------------------------------------------ parity with torchvision
def _replaced(text: str, old: str, new: str) -> str:
    assert old in text, f"the Faster R-CNN parity script changed: {old!r} not found"
    return text.replace(old, new)


_TORCH_MASKS = """
masks = detections.pop("masks")[:, 0].numpy()  # pasted probabilities [N, h, w]
out.update({f"det_{k}": v.numpy() for k, v in detections.items()})
crops, table = [], []
for m in masks:  # each mask's nonzero bounding region only (the full stack is ~400 MB)
    ys, xs = np.nonzero(m)
    if not len(ys):
        table.append([0, 0, 0, 0])
        continue
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crops.append(m[y0:y1, x0:x1].ravel())
    table.append([y0, x0, y1 - y0, x1 - x0])
out["det_mask_crops"] = np.concatenate(crops) if crops else np.zeros(0, np.float32)
out["det_mask_table"] = np.asarray(table, np.int64).reshape(-1, 4)
"""
_RPN_INIT = "    torch.nn.init.normal_(model.rpn.head.bbox_pred.weight, std=0.005, generator=gen)\n"
MASK_TORCH_SCRIPT = _replaced(
    _replaced(
        _replaced(TORCH_SCRIPT, "fasterrcnn_resnet50_fpn(", "maskrcnn_resnet50_fpn("),
        'out.update({f"det_{k}": v.numpy() for k, v in detections.items()})\n',
        _TORCH_MASKS,
    ),
    _RPN_INIT,
    # mask logits spread over a few units (not all ~0.5 probabilities)
    _RPN_INIT + "    torch.nn.init.normal_(model.roi_heads.mask_predictor.mask_fcn_logits.weight, std=0.05, "
    "generator=gen)\n",
)


def _their_mask(theirs: dict, i: int, shape) -> np.ndarray:
    table = theirs["det_mask_table"]
    start = int(np.sum(table[:i, 2] * table[:i, 3]))
    y0, x0, h, w = (int(v) for v in table[i])
    out = np.zeros(shape, np.float32)
    out[y0 : y0 + h, x0 : x0 + w] = theirs["det_mask_crops"][start : start + h * w].reshape(h, w)
    return out


@pytest.fixture(scope="module")
def mask_parity(tmp_path_factory):
    if not HAS_TORCHVISION:
        pytest.skip("torchvision is not installed (optional extra fpn_tf[torch]); parity needs it")
    from fpn_tf.export.saved_model import export_saved_model
    from fpn_tf.models.presets import torchvision_coco_label_map

    folder = tmp_path_factory.mktemp("mask_parity")
    image = photo_like_image()
    np.save(folder / "image.npy", image)
    subprocess.run(
        [
            sys.executable,
            "-c",
            MASK_TORCH_SCRIPT,
            str(folder / "image.npy"),
            str(folder),
            str(SCORE_THRESHOLD),
        ],
        check=True,
        timeout=900,
    )
    theirs = dict(np.load(folder / "torchvision_out.npz"))
    model = build_mask_rcnn(preset="torchvision_v1")
    load_torchvision_mask_state_dict(model, str(folder / "torchvision.pth"))
    model.detection_generator.score_threshold = SCORE_THRESHOLD
    path = export_saved_model(model, str(folder / "saved"), "mask", label_map=torchvision_coco_label_map())
    served = _serve_in_fresh_process(path, image[None], folder)
    return theirs, served, image.shape[:2]


@NEEDS_TORCHVISION
@pytest.mark.slow
def test_saved_model_masks_match_torchvision(mask_parity):
    theirs, served, hw = mask_parity
    n = int(served["num_detections"][0])
    assert len(theirs["det_scores"]) >= 50 and n == len(theirs["det_scores"])
    boxes, scores = served["detection_boxes"][0, :n], served["detection_scores"][0, :n]
    classes = served["detection_classes"][0, :n]
    result = compare_detections(theirs, boxes, scores, classes)
    print(f"\ndetections: {n}, {result}")
    assert result["matched"] >= 0.98
    their_boxes = theirs["det_boxes"][:, [1, 0, 3, 2]]
    prob_diffs, ious, nonempty = [], [], 0
    for i, (box, label) in enumerate(zip(their_boxes, theirs["det_labels"])):
        same = np.flatnonzero(classes == label)
        j = same[np.argmin(np.abs(boxes[same] - box).max(axis=1))]
        if np.abs(boxes[j] - box).max() > 0.05:
            continue
        ours = paste_mask_numpy(served["detection_masks"][0, j], boxes[j], hw)
        ref = _their_mask(theirs, i, hw)
        support = (ours > 0) | (ref > 0)
        prob_diffs.append(np.abs(ours - ref)[support].mean())
        a, b = ours > 0.5, ref > 0.5
        union = (a | b).sum()
        nonempty += bool(union)
        ious.append((a & b).sum() / union if union else 1.0)  # both empty (tiny boxes): they agree
    print(
        f"masks: {len(ious)} compared ({nonempty} non-empty at 0.5), mean |prob diff| "
        f"{np.mean(prob_diffs):.2e} (worst {np.max(prob_diffs):.2e}), "
        f"binary IoU min {np.min(ious):.4f} mean {np.mean(ious):.5f}"
    )
    assert len(ious) >= 0.98 * len(their_boxes) and nonempty >= 0.5 * len(ious)
    assert np.mean(prob_diffs) <= 1e-3 and np.min(ious) >= 0.99


# ------------------------------------------------------------------ learning
def _segm_coco_gt(batch: dict, full_masks: np.ndarray) -> dict:
    from fpn_tf.evaluation.coco_evaluator import mask_to_rle

    size = batch["images"].shape[1]
    images, annotations = [], []
    for i, image_id in enumerate(batch["image_id"]):
        images.append({"id": int(image_id), "height": size, "width": size})
        for j, label in enumerate(batch["gt_classes"][i]):
            if label <= 0:
                continue
            y1, x1, y2, x2 = (float(v) for v in batch["gt_boxes"][i, j])
            annotations.append({
                "id": len(annotations) + 1, "image_id": int(image_id), "category_id": int(label),
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float(full_masks[i, j].sum()), "iscrowd": 0,
                "segmentation": mask_to_rle(full_masks[i, j]),
            })  # fmt: skip
    return {"images": images, "annotations": annotations, "categories": [{"id": k} for k in (1, 2, 3)]}


@pytest.mark.slow
def test_overfits_twenty_shape_images_to_high_segm_ap50():
    from fpn_tf.evaluation.coco_evaluator import detections_to_coco, evaluate_detections

    keras.utils.set_random_seed(0)
    model = build_mask_rcnn(config=tiny_mask_config())
    tensors, full_masks = _tiny_batch(20, seed=0)
    losses = train_tiny(model, cycle_batches(tensors), steps=400, loss_key="mask_loss")
    first, last = losses[:20], losses[20:]
    print(f"\nmask loss: first 20 steps {np.mean(first):.3f}, last 20 {np.mean(last[-20:]):.3f}")
    assert np.mean(last[-20:]) < 0.5 * np.mean(first)
    out = {
        k: _np(v)
        for k, v in model({"images": tensors["images"], "image_info": tensors["image_info"]}).items()
    }
    batch = {k: _np(v) for k, v in tensors.items()}
    dets = detections_to_coco(
        batch["image_id"], out["detection_boxes"], out["detection_scores"], out["detection_classes"],
        out["num_detections"], masks=out["detection_masks"], image_hw=batch["image_info"][:, :2],
    )  # fmt: skip
    gt = _segm_coco_gt(batch, full_masks)
    box = evaluate_detections(gt, dets, iou_type="bbox")
    segm = evaluate_detections(gt, dets, iou_type="segm")
    print(f"box AP50 {box['AP50']:.3f}, segm AP50 {segm['AP50']:.3f}, segm AP {segm['AP']:.3f}")
    assert segm["AP50"] >= 0.9


# ------------------------------------------------------------------ predict.py and the serving client
def _load_script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_serving_client_handles_mask_outputs():
    from fpn_tf.export.serving import MASK_OUTPUT_KEYS

    client = _load_script("serving_client")
    assert client.MASK_OUTPUT_KEYS == MASK_OUTPUT_KEYS
    masks = np.zeros((1, 2, 28, 28), np.float32)
    masks[0, 0, :14] = 0.9  # the top half of the first box
    outputs = {
        "num_detections": np.array([2]),
        "detection_scores": np.array([[0.9, 0.8]]),
        "detection_classes": np.array([[3, 1]]),
        "detection_boxes": np.array([[[0, 0, 10, 10], [5, 5, 20, 20]]], np.float32),
        "detection_masks": masks,
    }
    text = client.describe(outputs, ["a.png"], {3: "disk"}, 0.5)
    assert "disk (3) 0.900" in text and "mask 50% of its box" in text and "mask 0% of its box" in text
    outputs["detection_masks_image"] = np.zeros((1, 2, 30, 30), np.uint8)
    outputs["detection_masks_image"][0, 0, :4, :5] = 1
    assert "mask 20 px" in client.describe(outputs, ["a.png"], {}, 0.5)


@pytest.mark.slow
def test_predict_script_writes_rle_masks_and_overlays(tmp_path):
    from PIL import Image
    from pycocotools import mask as mask_utils

    model, path = _exported_random_mask_model(tmp_path, 4)
    image = draw_shape_images(1, size=128)["images"][0][:100, :120].round().astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "shapes.png")
    done = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "predict.py"), f"--saved_model={path}",
         f"--inputs={tmp_path / 'shapes.png'}", f"--output_dir={tmp_path / 'out'}", "--min_score=0"],
        env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    record = json.loads((tmp_path / "out" / "detections.json").read_text())
    detections = record["images"][0]["detections"]
    assert detections and all("segmentation" in d for d in detections)
    decoded = [mask_utils.decode({**d["segmentation"], "counts": d["segmentation"]["counts"].encode()})
               for d in detections]  # fmt: skip
    assert decoded[0].shape == (100, 120) and any(m.sum() > 0 for m in decoded)
    drawn = np.asarray(Image.open(tmp_path / "out" / "shapes.png"))
    filled = np.any(np.stack(decoded), axis=0)
    assert drawn.shape == (100, 120, 3)
    assert np.abs(drawn[filled].astype(int) - image[filled]).mean() > 5  # masks tinted the pixels


@pytest.mark.slow
def test_train_then_evaluate_mask_rcnn_reports_segm_ap(tmp_path):
    """train() on synthetic shapes with masks (the real pipeline), then evaluate() and the SavedModel."""
    from fpn_tf import run_directory
    from fpn_tf.config import DataConfig, EvalConfig, ExperimentConfig, TrainConfig
    from fpn_tf.data.label_map import LabelMap
    from fpn_tf.evaluation.evaluate import evaluate, restore_model
    from fpn_tf.export.saved_model import export_saved_model
    from fpn_tf.training.experiment import train

    model = tiny_mask_config(image_size=64)
    model = dataclasses.replace(
        model, input=dataclasses.replace(model.input, random_flip=False, mask_size=28)
    )
    data = DataConfig(
        source="synthetic", train_dir=str(tmp_path / "train"), eval_dir=str(tmp_path / "eval"),
        synthetic_num_train=8, synthetic_num_eval=4, synthetic_image_size=64, synthetic_num_classes=3,
    )  # fmt: skip
    train_cfg = TrainConfig(batch_size=2, train_steps=3, base_learning_rate=0.01, warmup_steps=1,
                            checkpoint_every=3, log_every=1)  # fmt: skip
    config = ExperimentConfig(model=model, data=data, train=train_cfg, eval=EvalConfig(batch_size=2))
    model_dir = str(tmp_path / "run")
    result = train(config, model_dir, xla=False)
    assert "mask_loss" in result.losses and np.isfinite(result.losses["mask_loss"])
    metrics = evaluate(run_directory.read_config(model_dir, required=True), model_dir=model_dir)
    for key in ("AP", "AP50", "segm_AP", "segm_AP50", "segm_AP75", "segm_APs", "segm_APm", "segm_APl"):
        assert -1.0 <= metrics[key] <= 1.0, key
    label_map = LabelMap.from_json(open(os.path.join(model_dir, "label_map.json"), encoding="utf-8").read())
    export_saved_model(
        restore_model(config, result.checkpoint), str(tmp_path / "export"), "t", label_map=label_map
    )
    served = evaluate(config, saved_model=str(tmp_path / "export" / "t"))
    for key in ("AP", "segm_AP", "segm_AP50"):
        assert served[key] == pytest.approx(metrics[key], abs=1e-6), key
