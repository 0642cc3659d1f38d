"""PAFPN (PANet's bottom-up path on the FPN, fpn_tf/models/pafpn.py): sizes, counts, both styles."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf
from tiny import draw_shape_images, tiny_model_config

from fpn_tf.config import BackboneConfig, FPNConfig
from fpn_tf.models.build import build_model
from fpn_tf.models.fpn_backbone import build_fpn_backbone
from fpn_tf.models.pafpn import BottomUpPath
from fpn_tf.neck_configs import NeckConfig


def _count(layer) -> int:
    return int(sum(np.prod(w.shape) for w in layer.weights))


def test_r50_pafpn_adds_six_3x3_convs_to_the_fpn():
    """FPN 3,344,384 (test_fpn) + 3 stride-2 and 3 fusing 3x3 convs of 256 -> 256 (590,080 each)."""
    backbone = build_fpn_backbone(BackboneConfig(), FPNConfig(), neck=NeckConfig(type="pafpn"))
    assert _count(backbone.get_layer("fpn")) == 3_344_384
    assert _count(backbone.get_layer("pafpn")) == 6 * (3 * 3 * 256 * 256 + 256) == 3_540_480
    out = backbone(tf.zeros([1, 200, 264, 3]))
    assert {k: tuple(v.shape[1:3]) for k, v in out.items()} == {
        "P2": (50, 66), "P3": (25, 33), "P4": (13, 17), "P5": (7, 9), "P6": (4, 5)
    }  # fmt: skip


def _conv(x, layer, stride):
    kernel, bias = layer.kernel, layer.bias
    if stride == 2:
        x = tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])
        return tf.nn.conv2d(x, kernel, 2, "VALID") + bias
    return tf.nn.conv2d(x, kernel, 1, "SAME") + bias


@pytest.mark.parametrize("style", ["paper", "mmdetection"])
def test_both_styles_compute_their_definition(style):
    """paper: N_k = relu(fuse(P_k + relu(down(N_{k-1})))); mmdetection: no ReLU, down reads S_{k-1}."""
    rng = np.random.default_rng(0)
    sizes = {2: (17, 9), 3: (9, 5), 4: (5, 3), 5: (3, 2)}  # odd: each level ceil(H / 2) of the one below
    pyramid = {
        f"P{k}": tf.constant(rng.normal(size=(1, h, w, 4)).astype(np.float32)) for k, (h, w) in sizes.items()
    }
    path = BottomUpPath(4, 2, 5, style=style)
    got = path(pyramid)
    act = tf.nn.relu if style == "paper" else tf.identity
    previous, expected = pyramid["P2"], {"P2": pyramid["P2"]}
    for k in (3, 4, 5):
        summed = pyramid[f"P{k}"] + act(_conv(previous, getattr(path, f"down{k}"), 2))
        expected[f"P{k}"] = act(_conv(summed, getattr(path, f"fuse{k}"), 1))
        previous = expected[f"P{k}"] if style == "paper" else summed
    for k, v in expected.items():
        np.testing.assert_allclose(got[k].numpy(), v.numpy(), rtol=1e-5, atol=1e-5, err_msg=k)


def test_a_detector_on_pafpn_trains_its_bottom_up_path():
    """Faster R-CNN with model.neck.type pafpn: the loss has a gradient in every bottom-up conv."""
    keras.utils.set_random_seed(0)
    cfg = dataclasses.replace(tiny_model_config(image_size=64), neck=NeckConfig(type="pafpn"))
    model = build_model(cfg)
    batch = {k: tf.constant(v) for k, v in draw_shape_images(2, size=64).items()}
    with tf.GradientTape() as tape:
        loss = model.compute_losses(batch, training=True, step=0)["total_loss"]
    path = model.get_layer("pyramid").get_layer("pafpn")
    grads = tape.gradient(loss, path.trainable_weights)
    assert len(grads) == 12 and all(g is not None and float(tf.reduce_max(tf.abs(g))) > 0 for g in grads)
    with pytest.raises(ValueError, match="builds on the full FPN"):
        build_model(dataclasses.replace(cfg, fpn=dataclasses.replace(cfg.fpn, variant="bottom_up")))
