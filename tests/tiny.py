"""Small model configurations and hand-made detection data shared by the tests."""

from __future__ import annotations

import dataclasses

import numpy as np

from fpn_tf.config import (
    AnchorConfig,
    BackboneConfig,
    FPNConfig,
    InputConfig,
    ModelConfig,
    RoIHeadConfig,
    RPNConfig,
)


def tiny_model_config(num_classes: int = 4, image_size: int = 128, **overrides) -> ModelConfig:
    """A narrow ResNet-18 + FPN(d=32) for CPU tests on ≤ 256 px images."""
    cfg = ModelConfig(
        num_classes=num_classes,
        backbone=BackboneConfig(name="resnet18", width_multiplier=0.25, freeze_at=0, norm="bn"),
        fpn=FPNConfig(num_channels=32),
        anchors=AnchorConfig(sizes=(8.0, 16.0, 32.0, 64.0, 128.0)),
        rpn=RPNConfig(
            pre_nms_topk_train=300,
            pre_nms_topk_test=200,
            post_nms_topk_train=200,
            post_nms_topk_test=100,
        ),
        roi_head=RoIHeadConfig(batch_size_per_image=64, fc_dim=128, detections_per_image=20),
        input=InputConfig(min_size=image_size, max_size=image_size, max_gt_boxes=8),
    )
    return dataclasses.replace(cfg, **overrides)


def draw_shape_images(num_images: int, size: int = 128, seed: int = 0, max_objects: int = 3):
    """Images with squares (label 1), disks (2) and triangles (3) of 10..60 px.

    Returns a batch dict of numpy arrays in the layout of docs/design.md:
    images [N, size, size, 3] float32 0..255, image_info [N, 6], gt_boxes
    [N, max_objects, 4] (y1, x1, y2, x2) pixels, gt_classes [N, max_objects]
    (-1 padded), image_id [N].
    """
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 60, size=(num_images, size, size, 3)).astype(np.float32)
    boxes = np.zeros((num_images, max_objects, 4), np.float32)
    classes = -np.ones((num_images, max_objects), np.int32)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(num_images):
        placed = []
        for j in range(rng.integers(1, max_objects + 1)):
            for _ in range(20):
                s = int(rng.integers(10, 60))
                y, x = (int(v) for v in rng.integers(0, size - s, size=2))
                if all(y + s <= py or py + ps <= y or x + s <= px or px + ps <= x for py, px, ps in placed):
                    break
            else:
                continue
            placed.append((y, x, s))
            label = int(rng.integers(1, 4))
            colour = rng.uniform(140, 255, size=3)
            if label == 1:
                mask = (yy >= y) & (yy < y + s) & (xx >= x) & (xx < x + s)
            elif label == 2:
                c = s / 2.0
                mask = (yy - y - c + 0.5) ** 2 + (xx - x - c + 0.5) ** 2 <= c * c
            else:
                rel_y = (yy - y) / s
                mask = (yy >= y) & (yy < y + s) & (np.abs(xx - x - s / 2.0) <= rel_y * s / 2.0)
            images[i][mask] = colour
            boxes[i, j] = (y, x, y + s, x + s)
            classes[i, j] = label
    info = np.tile(np.array([[size, size, size, size, 1.0, 1.0]], np.float32), (num_images, 1))
    return {
        "images": images,
        "image_info": info,
        "gt_boxes": boxes,
        "gt_classes": classes,
        "image_id": np.arange(1, num_images + 1, dtype=np.int64),
    }


def train_tiny(
    model, batch_at, steps: int, learning_rate=2e-3, clip_norm: float | None = 10.0, loss_key="total_loss"
):
    """The tests' overfit loop: Adam, optional global-norm clipping, one ``tf.function`` step.

    ``batch_at(i)`` gives step i's batch (``cycle_batches`` cycles a fixed set);
    ``learning_rate`` is a float or a Keras schedule. Returns ``losses[loss_key]``
    of every step as floats (the model's ``compute_losses(batch, training=True, step=i)``).
    """
    import keras
    import tensorflow as tf

    optimizer = keras.optimizers.Adam(learning_rate=learning_rate)
    variables = model.trainable_variables

    @tf.function
    def step(batch, i):
        with tf.GradientTape() as tape:
            losses = model.compute_losses(batch, training=True, step=i)
        grads = tape.gradient(losses["total_loss"], variables)
        if clip_norm:
            grads, _ = tf.clip_by_global_norm(grads, clip_norm)
        optimizer.apply_gradients(zip(grads, variables))
        return losses[loss_key]

    return [float(step(batch_at(i), tf.constant(i))) for i in range(steps)]


def cycle_batches(tensors: dict, batch_size: int = 4):
    """``batch_at(i)``: consecutive slices of ``batch_size`` rows of every tensor, cycling."""
    count = len(next(iter(tensors.values())))

    def batch_at(i):
        start = (i * batch_size) % count
        return {k: v[start : start + batch_size] for k, v in tensors.items()}

    return batch_at


def tree_hashes(folder) -> dict[str, str]:
    """{relative path: sha256} of every file under ``folder`` (to show a failure changed nothing)."""
    import hashlib
    import os

    out = {}
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out
