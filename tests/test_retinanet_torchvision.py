"""torchvision RetinaNet weight import: mapping semantics (no torch needed) and full-model parity.

The parity test builds torchvision's ``retinanet_resnet50_fpn`` with non-trivial
random weights (in a subprocess: importing torchvision after TensorFlow
segfaults), imports its state dict into ``build_retinanet(preset="torchvision_v1")``
and compares P3..P7 in process, then the detections of a SavedModel run in a
fresh process. Skipped without torchvision.
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
from test_torchvision_import import HAS_TORCHVISION, SAVED_MODEL_SCRIPT, photo_like_image
from tiny_retinanet import tiny_retinanet_config

from fpn_tf.data.preprocess import preprocess_for_inference
from fpn_tf.models.presets import preset_config, torchvision_coco_label_map
from fpn_tf.models.retinanet import build_retinanet
from fpn_tf.models.weights_torchvision import WeightImportError
from fpn_tf.models.weights_torchvision_retinanet import (
    infer_torchvision_retinanet_config,
    load_torchvision_retinanet_state_dict,
    torchvision_retinanet_state_dict,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(seed: int, norm: str = "none"):
    keras.utils.set_random_seed(seed)
    cfg = tiny_retinanet_config(
        num_classes=5,
        preset="torchvision_v1",
        backbone={"name": "resnet18", "width_multiplier": 0.25, "bn_epsilon": 1e-5},
        retinanet={"norm": norm, "score_threshold": 0.0},
    )
    model = build_retinanet(config=cfg)
    rng = np.random.default_rng(seed)
    for v in model.weights:  # everything non-trivial, BN statistics included
        value = rng.normal(0, 0.05, v.shape)
        if "moving_variance" in v.path or "gamma" in v.path:
            value = rng.uniform(0.5, 1.5, v.shape)
        v.assign(value.astype("float32"))
    return model


def test_state_dict_layout_round_trip_and_inferred_config(tmp_path):
    for norm in ("none", "group_norm"):
        source, target = _tiny(0, norm), _tiny(1, norm)
        sd = torchvision_retinanet_state_dict(source)
        assert sd["backbone.fpn.inner_blocks.0.0.weight"].shape == (32, 32, 1, 1)  # C3 lateral (x0.25)
        assert sd["backbone.fpn.extra_blocks.p7.weight"].shape == (32, 32, 3, 3)
        assert sd["head.classification_head.cls_logits.weight"].shape == (9 * 5, 32, 3, 3)
        assert ("head.regression_head.conv.3.1.weight" in sd) == (norm == "group_norm")
        bias = source.head.box_deltas.bias.numpy()
        np.testing.assert_array_equal(
            sd["head.regression_head.bbox_reg.bias"], bias.reshape(9, 4)[:, [1, 0, 3, 2]].reshape(-1)
        )
        np.savez(tmp_path / f"{norm}.npz", **sd)
        result = load_torchvision_retinanet_state_dict(target, str(tmp_path / f"{norm}.npz"))
        assert len(result.loaded) == len(sd) and len(sd) == len(target.weights)
        for a, b in zip(source.weights, target.weights, strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
        inferred = infer_torchvision_retinanet_config(sd)
        assert (inferred.num_classes, inferred.retinanet.norm, inferred.fpn.extra_block) == (
            5,
            norm,
            "conv_p5",
        )
        assert (inferred.backbone.name, inferred.backbone.width_multiplier) == ("resnet18", 0.25)
    image = np.random.default_rng(3).uniform(0, 255, (120, 150, 3)).astype("float32")
    padded, info = preprocess_for_inference(image, source.config.input)
    batch = {"images": padded[None], "image_info": info[None]}
    out_a, out_b = source(batch), target(batch)
    assert int(out_a["num_detections"][0]) > 0
    for key in out_a:
        np.testing.assert_array_equal(out_a[key], out_b[key], err_msg=key)


def test_errors_name_every_key_and_old_layout_loads():
    source, target = _tiny(0), _tiny(1)
    sd = torchvision_retinanet_state_dict(source)
    bad = dict(sd)
    del bad["backbone.fpn.extra_blocks.p6.bias"]
    bad["head.classification_head.cls_logits.weight"] = np.zeros((9 * 91, 32, 3, 3), "float32")
    before = [v.numpy().copy() for v in target.weights]
    with pytest.raises(WeightImportError) as info:
        load_torchvision_retinanet_state_dict(target, bad)
    message = str(info.value)
    assert "1 missing key(s)" in message and "backbone.fpn.extra_blocks.p6.bias" in message
    assert "head.classification_head.cls_logits.weight: state dict shape (819, 32, 3, 3)" in message
    for v, old in zip(target.weights, before, strict=True):
        np.testing.assert_array_equal(v.numpy(), old)
    # torchvision < 0.13: tower convs at conv.0, conv.2, ... (ReLUs in between).
    old = {k.replace(f"conv.{i}.0.", f"conv.{2 * i}."): v for k, v in sd.items() for i in [_tower_index(k)]}
    load_torchvision_retinanet_state_dict(target, old)
    np.testing.assert_array_equal(target.head.box_conv3.kernel.numpy(), source.head.box_conv3.kernel.numpy())
    no_bg = build_retinanet(config=dataclasses.replace(source.config, retinanet=dataclasses.replace(
        source.config.retinanet, background_channel=False)))  # fmt: skip
    with pytest.raises(WeightImportError, match="background_channel=False"):
        load_torchvision_retinanet_state_dict(no_bg, sd)


def _tower_index(key: str) -> int:
    parts = key.split(".")
    return int(parts[3]) if len(parts) > 4 and parts[2] == "conv" and parts[0] == "head" else -1


# ------------------------------------------------------------------ full-model parity
TORCH_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import torch
    import torchvision
    from torchvision.ops.misc import FrozenBatchNorm2d

    image_path, out_dir = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = torchvision.models.detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None).eval()
    calibration = torch.from_numpy(np.load(image_path)[::-1].copy()).permute(2, 0, 1) / 255.0
    with torch.no_grad():
        # Random BN affine parameters, statistics measured on a flipped image, then frozen with
        # eps 0 (as torchvision's COCO v1 weights) after a small perturbation.
        norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for m in norms:
            m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
            m.reset_running_stats()
            m.momentum = None
            m.train()
        model.backbone(model.transform([calibration])[0].tensors)

        def freeze(module):
            for name, child in module.named_children():
                if isinstance(child, torch.nn.BatchNorm2d):
                    n = child.num_features
                    frozen = FrozenBatchNorm2d(n, eps=0.0)
                    frozen.weight.copy_(child.weight)
                    frozen.bias.copy_(child.bias)
                    noise = torch.randn(n, generator=gen) * 0.05 * child.running_var.sqrt()
                    frozen.running_mean.copy_(child.running_mean + noise)
                    frozen.running_var.copy_(child.running_var * (torch.rand(n, generator=gen) * 0.45 + 0.8))
                    setattr(module, name, frozen)
                else:
                    freeze(child)

        freeze(model)
        # A trained head's spread (the N(0, 0.01) init scores every anchor ~0.01): He-scaled
        # towers, class logits around -2.5, and torchvision's unused background channel 0 of
        # each anchor far below the threshold, as training leaves it.
        head = model.head
        for tower in (head.classification_head.conv, head.regression_head.conv):
            for block in tower:
                torch.nn.init.normal_(block[0].weight, std=(2.0 / (256 * 9)) ** 0.5, generator=gen)
        torch.nn.init.normal_(head.classification_head.cls_logits.weight, std=0.01, generator=gen)
        bias = torch.randn(9, 91, generator=gen) * 0.5 - 2.5
        bias[:, 0] = -30.0
        head.classification_head.cls_logits.bias.copy_(bias.reshape(-1))
        torch.nn.init.normal_(head.regression_head.bbox_reg.weight, std=0.01, generator=gen)
        # Rescale the output convs so that the class logits vary by ~0.3 around their bias and
        # the box deltas by ~0.1 (unscaled, the towers' activations saturate every score at 1).
        feats = list(model.backbone(model.transform([calibration])[0].tensors).values())
        for tower, conv, spread in ((head.classification_head.conv, head.classification_head.cls_logits, 0.3),
                                    (head.regression_head.conv, head.regression_head.bbox_reg, 0.1)):
            std = torch.cat([(conv(tower(f)) - conv.bias[:, None, None]).flatten() for f in feats]).std()
            conv.weight.mul_(spread / std)
    torch.save(model.state_dict(), f"{out_dir}/torchvision.pth")

    image = torch.from_numpy(np.load(image_path)).permute(2, 0, 1) / 255.0
    out = {}
    with torch.no_grad():
        images, _ = model.transform([image])
        features = model.backbone(images.tensors)
        for level, name in zip(features, ["P3", "P4", "P5", "P6", "P7"]):
            out[name] = features[level].numpy()
        out["anchors"] = model.anchor_generator(images, list(features.values()))[0].numpy()
        detections = model([image])[0]
    out.update({f"det_{k}": v.numpy() for k, v in detections.items()})
    out["padded_hw"] = np.asarray(images.tensors.shape[-2:])
    np.savez(f"{out_dir}/torchvision_out.npz", **out)
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TORCHVISION, reason="torchvision is not installed (optional extra fpn_tf[torch])")
def test_parity_with_torchvision_through_a_saved_model(tmp_path):
    image = photo_like_image()
    np.save(tmp_path / "image.npy", image)
    subprocess.run([sys.executable, "-c", TORCH_SCRIPT, str(tmp_path / "image.npy"), str(tmp_path)],
                   check=True, timeout=900)  # fmt: skip
    theirs = dict(np.load(tmp_path / "torchvision_out.npz"))
    weights = str(tmp_path / "torchvision.pth")
    model = build_retinanet(config=infer_torchvision_retinanet_config(weights))
    assert model.config == preset_config("torchvision_v1", model_type="retinanet")
    load_torchvision_retinanet_state_dict(model, weights)

    padded, info = preprocess_for_inference(tf.constant(image), model.config.input)
    images, image_info = padded[None], info[None]
    assert tuple(images.shape[1:3]) == tuple(theirs["padded_hw"])
    ours = {k: v.numpy() for k, v in model.pyramid(model.normalizer(images, image_info)).items()}
    for level in ("P3", "P4", "P5", "P6", "P7"):
        expected = theirs[level][0].transpose(1, 2, 0)
        error = np.abs(ours[level][0] - expected).max() / np.abs(expected).max()
        print(f"\n{level} {expected.shape}: max |diff| = {error:.2e} x max |value|")
        assert error <= 1e-3, level
    anchors = model.detection_generator.anchors({k: tf.constant(v) for k, v in ours.items()})
    ours_anchors = np.concatenate([anchors[level].numpy() for level in model.levels])
    np.testing.assert_array_equal(ours_anchors, theirs["anchors"][:, [1, 0, 3, 2]])

    from fpn_tf.export.saved_model import export_saved_model

    path = export_saved_model(
        model, str(tmp_path / "saved"), "retinanet", label_map=torchvision_coco_label_map()
    )
    command = [sys.executable, "-c", SAVED_MODEL_SCRIPT, path, str(tmp_path / "image.npy")]
    command.append(str(tmp_path / "served.npz"))
    subprocess.run(command, check=True, timeout=600, env={**os.environ, "PYTHONPATH": REPO})
    served = np.load(tmp_path / "served.npz")
    n = int(served["num_detections"][0])
    labels, scores = theirs["det_labels"], theirs["det_scores"]
    boxes = theirs["det_boxes"][:, [1, 0, 3, 2]]
    print(f"\ndetections: {n} (torchvision {len(labels)})")
    assert n == len(labels) >= 50
    # Same classes in the same order, except that detections whose torchvision scores lie
    # within 1e-5 of each other (float32 near-ties, e.g. 0.9999746 twice) may come in either order.
    ours_classes, ours_scores = served["detection_classes"][0, :n], served["detection_scores"][0, :n]
    ours_boxes = served["detection_boxes"][0, :n]
    cuts = np.flatnonzero(scores[:-1] - scores[1:] >= 1e-5) + 1
    score_diff = box_diff = 0.0
    swapped = 0
    for run in np.split(np.arange(n), cuts):
        np.testing.assert_array_equal(np.sort(ours_classes[run]), np.sort(labels[run]))
        for i in run:
            same = run[ours_classes[run] == labels[i]]
            j = same[np.argmin(np.abs(ours_boxes[same] - boxes[i]).max(axis=1))]
            swapped += int(j != i)
            score_diff = max(score_diff, abs(float(ours_scores[j] - scores[i])))
            box_diff = max(box_diff, float(np.abs(ours_boxes[j] - boxes[i]).max()))
    print(f"max score diff {score_diff:.2e}, max box diff {box_diff:.4f} px, {swapped} in near-tie swaps")
    assert score_diff <= 1e-4 and box_diff <= 0.05


@pytest.mark.slow
def test_import_script_recognises_a_retinanet(tmp_path):
    from fpn_tf.export.saved_model import restore_model
    from fpn_tf.run_directory import read_config

    source = _tiny(0, "group_norm")
    np.savez(tmp_path / "tiny.npz", **torchvision_retinanet_state_dict(source))
    model_dir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "import_torchvision.py"),
         f"--weights={tmp_path / 'tiny.npz'}", f"--model_dir={model_dir}"],
        env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(retinanet, resnet18 x0.25, 5 classes, batch-norm eps 0, score threshold 0.05)" in done.stdout
    config = read_config(str(model_dir))
    assert (config.model.type, config.model.retinanet.norm) == ("retinanet", "group_norm")
    restored = restore_model(config.model, str(model_dir))
    for a, b in zip(source.weights, restored.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
