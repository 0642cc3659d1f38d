"""A small multi-scale detection dataset of shapes, written as PNG + COCO JSON.

Made for training and testing a Faster R-CNN + FPN on a CPU in minutes: the class
of an object is its shape (square, disk, triangle, cross, ring, diamond), its
colour is random, so the network has to learn shape. Object sizes (the square
root of the box area) run from 8 px to 0.8 * min(256, image_size) px, log-uniform,
with a third of them under 32 px (COCO "small"), so every pyramid level gets
work. Images hold 0-6 objects (10% hold none) on cluttered backgrounds (a smooth colour
gradient, pixel noise, thin random lines and soft blobs of distractor colour).
Objects may overlap a little but never hide one another (the overlap of any two
is at most 20% of the smaller box).

Each annotation's ``segmentation`` is the exact visible mask of its object as
a compressed RLE: the pixels the shape covers at least half (``_mask`` >= 0.5)
minus those covered by the objects painted over it (smaller ones are painted
last). ``area`` stays the shape's anti-aliased coverage, as in version 1, so
box metrics are unchanged; images and boxes are identical to version 1.

Everything follows from ``(seed, split, image index)``: the same arguments give
byte-identical annotation JSON, and a folder already holding a dataset with the
same arguments is not rewritten.
"""

from __future__ import annotations

import json
import math
import os
import zlib

import numpy as np
from PIL import Image, ImageDraw

from fpn_tf.data.masks import encode_binary_mask

SHAPES = ("square", "disk", "triangle", "cross", "ring", "diamond")
_VERSION = 2  # 2: annotations carry RLE segmentations
_SS = 4  # supersampling factor of the shape masks (anti-aliased edges)
_META = "synthetic_meta.json"
_ANNOTATIONS = "annotations.json"
_IMAGES = "images"


def default_synthetic_root() -> str:
    """Cache folder for generated datasets: ``$FPN_TF_CACHE/synthetic`` or ``~/.cache/fpn_tf/synthetic``."""
    base = os.environ.get("FPN_TF_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fpn_tf")
    return os.path.join(base, "synthetic")


def default_synthetic_dir(split: str, num_images: int, image_size: int, num_classes: int, seed: int) -> str:
    """A cache folder named after every argument, so different datasets never collide."""
    name = f"s{image_size}_c{num_classes}_seed{seed}_n{num_images}"
    return os.path.join(default_synthetic_root(), name, split)


def _mask(shape: str, w: float, h: float, ox: float, oy: float, pw: int, ph: int) -> np.ndarray:
    """Coverage in [0, 1] of one shape in a ``ph x pw`` patch; the box starts at (ox, oy)."""
    img = Image.new("L", (pw * _SS, ph * _SS), 0)
    d = ImageDraw.Draw(img)
    x0, y0 = ox * _SS, oy * _SS
    x1, y1 = (ox + w) * _SS, (oy + h) * _SS
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "square":
        d.rectangle([x0, y0, x1 - 1, y1 - 1], fill=255)
    elif shape == "disk":
        d.ellipse([x0, y0, x1 - 1, y1 - 1], fill=255)
    elif shape == "triangle":
        d.polygon([(cx, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=255)
    elif shape == "cross":
        tw, th = (x1 - x0) * 0.17, (y1 - y0) * 0.17
        d.rectangle([cx - tw, y0, cx + tw - 1, y1 - 1], fill=255)
        d.rectangle([x0, cy - th, x1 - 1, cy + th - 1], fill=255)
    elif shape == "ring":
        d.ellipse([x0, y0, x1 - 1, y1 - 1], fill=255)
        iw, ih = (x1 - x0) * 0.27, (y1 - y0) * 0.27
        d.ellipse([cx - iw, cy - ih, cx + iw - 1, cy + ih - 1], fill=0)
    elif shape == "diamond":
        d.polygon([(cx, y0), (x1 - 1, cy), (cx, y1 - 1), (x0, cy)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    fine = np.asarray(img, np.float64) / 255.0
    return fine.reshape(ph, _SS, pw, _SS).mean(axis=(1, 3))  # exact coverage in 1/16 steps


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """float32 ``[size, size, 3]`` in [0, 255]: gradient + noise + blobs + lines."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    angle = rng.uniform(0, 2 * math.pi)
    t = np.clip(0.5 + (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)), 0.0, 1.0)[..., None]
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    img = c0 * (1 - t) + c1 * t
    for _ in range(rng.integers(0, 4)):  # soft blobs of a distractor colour
        cy, cx = rng.uniform(0, size, 2)
        sigma = rng.uniform(0.03, 0.15) * size
        a = 0.6 * np.exp(-((yy * (size - 1) - cy) ** 2 + (xx * (size - 1) - cx) ** 2) / (2 * sigma**2))
        img = img * (1 - a[..., None]) + rng.uniform(0, 255, 3) * a[..., None]
    img = img + rng.normal(0, 6, img.shape)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(pil)
    for _ in range(rng.integers(0, 6)):  # thin distractor lines
        p = rng.uniform(0, size, 4)
        d.line([(p[0], p[1]), (p[2], p[3])], fill=tuple(int(v) for v in rng.integers(0, 256, 3)), width=1)
    return np.asarray(pil, np.float32)


def _overlap_ok(box, boxes) -> bool:
    x, y, w, h = box
    for bx, by, bw, bh in boxes:
        iw = min(x + w, bx + bw) - max(x, bx)
        ih = min(y + h, by + bh) - max(y, by)
        if iw > 0 and ih > 0 and iw * ih > 0.2 * min(w * h, bw * bh):
            return False
    return True


def render_image(
    rng: np.random.Generator, image_size: int, num_classes: int
) -> tuple[np.ndarray, list[dict]]:
    """One image: uint8 ``[image_size, image_size, 3]`` and its objects ``{"class", "bbox" [x, y, w, h],
    "area", "segmentation"}``.

    ``segmentation`` is the visible mask as a compressed RLE (see the module docstring).
    """
    s = image_size
    img = _background(rng, s)
    max_side = 0.8 * min(256, s)
    objects = []
    num_objects = 0 if rng.uniform() < 0.1 else int(rng.integers(1, 7))
    for _ in range(num_objects):
        # 28% drawn small: large objects fail placement more often, so ~1/3 of the kept ones are small.
        if rng.uniform() < 0.28:
            size = math.exp(rng.uniform(math.log(8), math.log(min(31.9, max_side))))
        else:
            size = math.exp(rng.uniform(math.log(min(32.0, max_side)), math.log(max_side)))
        aspect = math.exp(rng.uniform(math.log(0.75), math.log(1.33)))  # w / h
        w = min(round(size * math.sqrt(aspect) * _SS) / _SS, s)
        h = min(round(size / math.sqrt(aspect) * _SS) / _SS, s)
        for _try in range(20):
            x = round(rng.uniform(0, s - w) * _SS) / _SS
            y = round(rng.uniform(0, s - h) * _SS) / _SS
            if _overlap_ok((x, y, w, h), [o["bbox"] for o in objects]):
                objects.append({"class": int(rng.integers(0, num_classes)), "bbox": [x, y, w, h]})
                break
    objects.sort(key=lambda o: -o["bbox"][2] * o["bbox"][3])  # large first: small ones stay on top
    covered = np.zeros((len(objects), s, s), bool)
    for k, o in enumerate(objects):
        x, y, w, h = o["bbox"]
        px0, py0 = int(math.floor(x)), int(math.floor(y))
        px1, py1 = min(int(math.ceil(x + w)), s), min(int(math.ceil(y + h)), s)
        a = _mask(SHAPES[o["class"]], w, h, x - px0, y - py0, px1 - px0, py1 - py0)
        region = img[py0:py1, px0:px1]
        bg = region.reshape(-1, 3).mean(0)
        colour = rng.uniform(0, 255, 3)
        for _try in range(20):  # decent contrast against the local background
            if np.linalg.norm(colour - bg) >= 110:
                break
            colour = rng.uniform(0, 255, 3)
        else:
            colour = np.where(bg > 127, 20.0, 235.0)
        fill = colour + rng.normal(0, 4, region.shape)
        img[py0:py1, px0:px1] = region * (1 - a[..., None]) + fill * a[..., None]
        o["area"] = round(float(a.sum()), 2)
        covered[k, py0:py1, px0:px1] = a >= 0.5
    for k, o in enumerate(objects):  # no random draws here: images and boxes stay as in version 1
        visible = covered[k] & ~covered[k + 1 :].any(axis=0)
        o["segmentation"] = encode_binary_mask(visible)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), objects


def _split_code(split: str) -> int:
    return zlib.crc32(split.encode("utf-8"))


def write_synthetic_coco(
    out_dir: str,
    num_images: int,
    image_size: int = 256,
    num_classes: int = 3,
    seed: int = 0,
    split: str = "train",
) -> tuple[str, str]:
    """Writes (or finds) the synthetic dataset in ``out_dir``.

    Layout: ``out_dir/images/000001.png ...``, ``out_dir/annotations.json`` (COCO
    instances; image ids and category ids start at 1, categories named after
    ``SHAPES``), ``out_dir/synthetic_meta.json`` (the arguments; written last).
    A different ``split`` draws from a different random stream.

    Returns:
      ``(image_dir, annotation_path)``.
    """
    if not 1 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes must be 1..{len(SHAPES)} (shapes {SHAPES}), got {num_classes}")
    if num_images < 1 or image_size < 16:
        raise ValueError(f"need num_images >= 1 and image_size >= 16, got {num_images}, {image_size}")
    image_dir = os.path.join(out_dir, _IMAGES)
    ann_path = os.path.join(out_dir, _ANNOTATIONS)
    meta_path = os.path.join(out_dir, _META)
    meta = {
        "version": _VERSION,
        "num_images": num_images,
        "image_size": image_size,
        "num_classes": num_classes,
        "seed": seed,
        "split": split,
    }
    if os.path.isfile(meta_path) and os.path.isfile(ann_path):
        with open(meta_path, encoding="utf-8") as f:
            if json.load(f) == meta:
                return image_dir, ann_path
    if os.path.isfile(meta_path):
        os.remove(meta_path)  # the folder is being rewritten: never leave a stale meta behind
    os.makedirs(image_dir, exist_ok=True)
    coco = _render_dataset(image_dir, num_images, image_size, num_classes, seed, split)
    for path, data in ((ann_path, coco), (meta_path, meta)):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, sort_keys=True)
        os.replace(tmp, path)
    return image_dir, ann_path


def _render_dataset(
    image_dir: str, num_images: int, image_size: int, num_classes: int, seed: int, split: str
) -> dict:
    """Renders the images into ``image_dir`` (each written atomically); returns the COCO dict."""
    images, annotations = [], []
    for i in range(num_images):
        rng = np.random.default_rng([seed, _split_code(split), i])
        pixels, objects = render_image(rng, image_size, num_classes)
        file_name = f"{i + 1:06d}.png"
        tmp = os.path.join(image_dir, f".{file_name}.{os.getpid()}.tmp")
        Image.fromarray(pixels).save(tmp, format="PNG")
        os.replace(tmp, os.path.join(image_dir, file_name))
        images.append({"id": i + 1, "file_name": file_name, "height": image_size, "width": image_size})
        for o in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": o["class"] + 1,
                    "bbox": [round(v, 2) for v in o["bbox"]],
                    "area": o["area"],
                    "iscrowd": 0,
                    "segmentation": o["segmentation"],
                }
            )
    return {
        "info": {"description": f"fpn_tf synthetic shapes, split {split}", "version": str(_VERSION)},
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": k + 1, "name": SHAPES[k], "supercategory": "shape"} for k in range(num_classes)
        ],
    }
