"""Drawing detections on images for people (Pillow)."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def class_colour(category_id: int) -> tuple[int, int, int]:
    """A bright, stable RGB colour per category id (golden-ratio hue steps)."""
    hue = (int(category_id) * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_detections(
    image: np.ndarray,
    boxes: np.ndarray,
    scores: Sequence[float],
    category_ids: Sequence[int],
    names: Sequence[str],
    min_score: float = 0.0,
    masks: Sequence[np.ndarray] | None = None,
    mask_alpha: float = 0.45,
) -> Image.Image:
    """Draws boxes with "name score" labels (and filled instance masks) on a copy of ``image``.

    Args:
      image: uint8 ``[h, w, 3]`` RGB (the original image).
      boxes: float ``[N, 4]`` ``(y1, x1, y2, x2)`` in that image's pixels.
      scores: ``[N]``; detections below ``min_score`` are not drawn.
      category_ids: ``[N]`` category ids (they choose the colour).
      names: ``[N]`` class names written beside the score.
      masks: optional ``[N]`` binary ``[h, w]`` masks in the image's pixels (e.g.
        ``mask_ops.paste_mask_numpy(...) > 0.5``), filled in the class colour at
        ``mask_alpha`` opacity, under the boxes and labels.

    Returns:
      An RGB ``PIL.Image`` of the same size as ``image``.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"draw_detections needs a uint8 [h, w, 3] image, got {image.dtype} {image.shape}")
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    if not len(boxes) == len(scores) == len(category_ids) == len(names):
        raise ValueError(
            f"draw_detections: {len(boxes)} boxes, {len(scores)} scores, "
            f"{len(category_ids)} category ids and {len(names)} names differ in number"
        )
    if masks is not None:
        if len(masks) != len(boxes):
            raise ValueError(f"draw_detections: {len(masks)} masks for {len(boxes)} boxes")
        image = _fill_masks(image, masks, scores, category_ids, min_score, mask_alpha)
    canvas = Image.fromarray(image, "RGB")
    draw = ImageDraw.Draw(canvas)
    h, w = image.shape[:2]
    width = max(1, round(min(h, w) / 300))
    font = ImageFont.load_default(size=max(10, round(min(h, w) / 40)))
    # Lowest scores first so the most confident boxes end up on top.
    for i in np.argsort(np.asarray(scores, np.float32), kind="stable"):
        score = float(scores[i])
        if score < min_score:
            continue
        y1, x1, y2, x2 = (float(v) for v in boxes[i])
        colour = class_colour(int(category_ids[i]))
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=width)
        text = f"{names[i]} {score:.2f}"
        left, top, right, bottom = draw.textbbox((x1, y1), text, font=font)
        text_h = bottom - top
        ty = y1 - text_h - 2 if y1 - text_h - 2 >= 0 else y1
        left, top, right, bottom = draw.textbbox((x1, ty), text, font=font)
        draw.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=colour)
        draw.text((x1, ty), text, fill=(0, 0, 0), font=font)
    return canvas


def _fill_masks(image, masks, scores, category_ids, min_score: float, alpha: float) -> np.ndarray:
    """``image`` with each mask blended in its class colour (lowest scores first, best on top)."""
    out = image.astype(np.float32)
    for i in np.argsort(np.asarray(scores, np.float32), kind="stable"):
        if float(scores[i]) < min_score:
            continue
        mask = np.asarray(masks[i], bool)
        if mask.shape != image.shape[:2]:
            raise ValueError(f"draw_detections: mask {i} has shape {mask.shape}, the image {image.shape[:2]}")
        colour = np.asarray(class_colour(int(category_ids[i])), np.float32)
        out[mask] = (1.0 - alpha) * out[mask] + alpha * colour
    return np.round(out).astype(np.uint8)


def draw_segments(image: np.ndarray, masks: Sequence[np.ndarray], scores: Sequence[float], alpha=0.45):
    """Blends each binary mask ``[h, w]`` over a copy of ``image`` in its own colour, score at its top-left.

    Segment proposals (class-agnostic) are coloured by rank; the lowest score is drawn first.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"draw_segments needs a uint8 [h, w, 3] image, got {image.dtype} {image.shape}")
    if len(masks) != len(scores):
        raise ValueError(f"draw_segments: {len(masks)} masks and {len(scores)} scores differ in number")
    out = image.astype(np.float32)
    order = np.argsort(np.asarray(scores, np.float32), kind="stable")
    for rank, i in enumerate(order):
        mask = np.asarray(masks[i], bool)
        out[mask] = (1 - alpha) * out[mask] + alpha * np.array(class_colour(len(order) - rank), np.float32)
    canvas = Image.fromarray(out.round().astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(10, round(min(image.shape[:2]) / 40)))
    for i in order:
        ys, xs = np.nonzero(np.asarray(masks[i], bool))
        if len(ys):
            draw.text(
                (int(xs.min()), int(ys.min())), f"{float(scores[i]):.2f}", fill=(255, 255, 255), font=font
            )
    return canvas
