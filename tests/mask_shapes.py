"""Exact instance masks for the shape images of ``tests.tiny.draw_shape_images``."""

from __future__ import annotations

import numpy as np


def full_image_mask(box, label: int, size: int) -> np.ndarray:
    """bool [size, size]: the pixels ``draw_shape_images`` paints for one object."""
    yy, xx = np.mgrid[0:size, 0:size]
    y, x, y2, _ = (int(v) for v in box)
    s = y2 - y
    if label == 1:
        return (yy >= y) & (yy < y + s) & (xx >= x) & (xx < x + s)
    if label == 2:
        c = s / 2.0
        return (yy - y - c + 0.5) ** 2 + (xx - x - c + 0.5) ** 2 <= c * c
    rel_y = (yy - y) / s
    return (yy >= y) & (yy < y + s) & (np.abs(xx - x - s / 2.0) <= rel_y * s / 2.0)


def add_masks(batch: dict, mask_size: int = 28) -> dict:
    """``batch`` plus gt_masks uint8 [N, G, M, M] (each mask sampled at M x M grid centres of its box)
    and full_masks bool [N, G, size, size]."""
    images, boxes, classes = batch["images"], batch["gt_boxes"], batch["gt_classes"]
    n, g, size = images.shape[0], boxes.shape[1], images.shape[1]
    crops = np.zeros((n, g, mask_size, mask_size), np.uint8)
    full = np.zeros((n, g, size, size), bool)
    t = (np.arange(mask_size) + 0.5) / mask_size
    for i in range(n):
        for j in range(g):
            if classes[i, j] <= 0:
                continue
            full[i, j] = full_image_mask(boxes[i, j], int(classes[i, j]), size)
            y1, x1, y2, x2 = boxes[i, j]
            rows = np.clip(np.floor(y1 + t * (y2 - y1)).astype(int), 0, size - 1)
            cols = np.clip(np.floor(x1 + t * (x2 - x1)).astype(int), 0, size - 1)
            crops[i, j] = full[i, j][np.ix_(rows, cols)]
    return {**batch, "gt_masks": crops, "full_masks": full}
