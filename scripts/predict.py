"""Detects objects in images: a JSON of detections and a PNG per image with boxes drawn.

Either a SavedModel written by scripts/export.py::

    python scripts/predict.py --saved_model saved_models/fpn/1 --inputs photos/ --output_dir out

or a training directory (checkpoint + config.yaml + label_map.json)::

    python scripts/predict.py --model_dir runs/coco --inputs a.jpg,b.png --output_dir out

Both run the same code: the serving graph of ``fpn_tf.export.serving``.
``--inputs`` takes image files and folders (their .jpg/.jpeg/.png/.bmp/.gif/.webp
files); more paths may follow the flags. Files that cannot be read or decoded
are skipped with a message (and listed under "skipped" in the JSON); the exit
status is 1 only when no image could be processed.

Nothing is overwritten: an ``--output_dir`` that is an input folder or holds an
input image is refused, and a PNG or JSON whose name exists already gets a
``_1``, ``_2``, ... suffix (``detections_1.json`` for a second run into the same
folder; the script prints the names it wrote).

The JSON (``<output_dir>/detections.json``)::

    {"box_format": "y1, x1, y2, x2 in original-image pixels",
     "images": [{"file", "height", "width", "visualization",
                 "detections": [{"box", "score", "category_id", "category_name"}]}],
     "skipped": [{"file", "error"}]}

A mask model (outputs with ``detection_masks``, e.g. Mask R-CNN) adds to each
detection ``"segmentation"``: its mask pasted into original-image pixels
(``fpn_tf.ops.mask_ops.paste_mask_numpy``, probability > 0.5) as a COCO RLE
``{"size": [h, w], "counts": str}`` (``pycocotools.mask.decode`` reads it), and
the PNGs show each mask filled in its class colour under the labelled box.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_list("inputs", [], "Image files and/or folders (comma separated); more may follow as arguments.")
flags.DEFINE_string("saved_model", None, "A SavedModel version directory (or its parent: highest version).")
flags.DEFINE_string("model_dir", None, "A training directory holding checkpoints (instead of --saved_model).")
flags.DEFINE_string("config", None, "Experiment YAML for --model_dir (default: <model_dir>/config.yaml).")
flags.DEFINE_multi_string("override", [], "Config overrides key.path=value (with --model_dir).")
flags.DEFINE_string(
    "label_map", None, "Label map JSON for --model_dir (default: <model_dir>/label_map.json)."
)
flags.DEFINE_string("output_dir", "predictions", "Where detections.json and the PNGs go.")
flags.DEFINE_float("min_score", 0.3, "Detections with a lower score are left out of the JSON and PNGs.")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
BOX_FORMAT = "y1, x1, y2, x2 in original-image pixels"


def collect_inputs(paths: list[str]) -> list[str]:
    """Image files from files and folders (a folder's image files, sorted, not recursive)."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS))
            if not names:
                logging.warning("%s holds no image files (%s)", path, ", ".join(IMAGE_EXTENSIONS))
            files.extend(os.path.join(path, n) for n in names)
        else:
            files.append(path)
    return files


def short_error(error: Exception) -> str:
    """The useful line of a TensorFlow error (the assertion text or the op's message)."""
    text = getattr(error, "message", None) or str(error)
    for line in text.splitlines():
        if "could not decode" in line or "assertion failed" in line:
            return line.strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("Graph execution")]
    return lines[0] if lines else type(error).__name__


def load_detector(flag_values):
    """(detect(encoded bytes) -> outputs dict of numpy arrays, label map)."""
    import tensorflow as tf

    from fpn_tf.export import saved_model

    if bool(flag_values.saved_model) == bool(flag_values.model_dir):
        raise app.UsageError("give exactly one of --saved_model and --model_dir")
    if flag_values.saved_model:
        loaded, label_map = saved_model.load_exported(flag_values.saved_model)
        signature = loaded.signatures["serving_default"]

        def detect(encoded: bytes) -> dict:
            outputs = signature(encoded_images=tf.constant([encoded]))
            return {k: v.numpy()[0] for k, v in outputs.items()}

        return detect, label_map

    from fpn_tf import run_directory
    from fpn_tf.export.serving import DetectionModule

    config = run_directory.read_config(flag_values.model_dir, flag_values.config, flag_values.override)
    model = saved_model.restore_model(config.model, flag_values.model_dir)
    module = DetectionModule(
        model, run_directory.read_label_map(flag_values.model_dir, flag_values.label_map)
    )

    def detect(encoded: bytes) -> dict:
        outputs = module.serve_encoded(tf.constant([encoded]))
        return {k: v.numpy()[0] for k, v in outputs.items()}

    return detect, module.label_map


def detections_to_json(outputs: dict, label_map, min_score: float, image_hw=None) -> list[dict]:
    """One image's serving outputs -> [{"box", "score", "category_id", "category_name"}].

    With ``detection_masks`` in the outputs and the original ``image_hw``, each
    detection also gets "segmentation" (RLE of its pasted mask; module docstring).
    """
    from fpn_tf.evaluation.coco_evaluator import pasted_mask_rle

    with_masks = "detection_masks" in outputs and image_hw is not None
    names = dict(zip(label_map.category_ids, label_map.names, strict=True))
    result = []
    for i in range(int(outputs["num_detections"])):
        score = float(outputs["detection_scores"][i])
        if score < min_score:
            continue
        category_id = int(outputs["detection_classes"][i])
        result.append(
            {
                "box": [round(float(v), 3) for v in outputs["detection_boxes"][i]],
                "score": round(score, 6),
                "category_id": category_id,
                "category_name": names.get(category_id, str(category_id)),
            }
        )
        if with_masks:
            box = outputs["detection_boxes"][i]
            result[-1]["segmentation"] = pasted_mask_rle(outputs["detection_masks"][i], box, image_hw)
    return result


def segments_to_json(outputs: dict, image_hw, min_score: float, max_count: int = 20):
    """One image's segment proposals (serving outputs with ``proposal_masks``) -> JSON rows and masks.

    Keeps the best ``max_count`` with score >= ``min_score``; each mask is pasted into
    the original image (``paste_mask_numpy``) and thresholded at 0.5. Returns
    ``([{"box", "score", "segmentation": COCO RLE}], [binary [h, w] masks])``.
    """
    from fpn_tf.evaluation.coco_evaluator import mask_to_rle
    from fpn_tf.ops.mask_ops import paste_mask_numpy

    rows, masks = [], []
    for i in range(min(int(outputs["num_proposals"]), max_count)):
        score = float(outputs["proposal_scores"][i])
        if score < min_score:
            continue
        box = outputs["proposal_boxes"][i]
        mask = paste_mask_numpy(outputs["proposal_masks"][i], box, image_hw) > 0.5
        rows.append(
            {
                "box": [round(float(v), 3) for v in box],
                "score": round(score, 6),
                "segmentation": mask_to_rle(mask),
            }
        )
        masks.append(mask)
    return rows, masks


def check_output_dir(output_dir: str, files: list[str], input_paths: list[str]) -> None:
    """Refuses an output folder that is an input folder or holds an input image.

    The PNGs written there could otherwise replace a user's image (``a.png`` drawn
    over ``a.png``). A folder inside an input folder is fine: folders are not
    searched recursively.
    """
    out = os.path.realpath(output_dir)
    for path in input_paths:
        if os.path.isdir(path) and os.path.realpath(path) == out:
            raise app.UsageError(
                f"--output_dir {output_dir} is the input folder {path}: choose another folder"
            )
    for path in files:
        if os.path.dirname(os.path.realpath(path)) == out:
            raise app.UsageError(
                f"--output_dir {output_dir} holds the input image {path}: choose a folder without inputs"
            )


def unique_path(output_dir: str, stem: str, ext: str, used: set[str]) -> str:
    """``output_dir/stem.ext``, or ``stem_1.ext``, ``stem_2.ext``, ... : never an existing file."""
    name, k = f"{stem}{ext}", 1
    while name in used or os.path.lexists(os.path.join(output_dir, name)):
        name, k = f"{stem}_{k}{ext}", k + 1
    used.add(name)
    return os.path.join(output_dir, name)


def unique_png_path(output_dir: str, image_path: str, used: set[str]) -> str:
    stem = os.path.splitext(os.path.basename(image_path))[0] or "image"
    return unique_path(output_dir, stem, ".png", used)


def write_new(path: str, write) -> None:
    """Creates ``path`` (exclusively: never replaces a file) and calls ``write(f)``."""
    with open(path, "xb") as f:
        write(f)


def main(argv):
    import tensorflow as tf

    from fpn_tf.data.preprocess import decode_image
    from fpn_tf.export.visualize import draw_detections, draw_segments

    files = collect_inputs(list(FLAGS.inputs) + list(argv[1:]))
    if not files:
        raise app.UsageError("no input images: pass --inputs with image files or folders")
    check_output_dir(FLAGS.output_dir, files, list(FLAGS.inputs) + list(argv[1:]))
    detect, label_map = load_detector(FLAGS)
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    images, skipped, used = [], [], set()
    for path in files:
        try:
            with open(path, "rb") as f:
                encoded = f.read()
            image = decode_image(tf.constant(encoded)).numpy()
            outputs = detect(encoded)
        except (OSError, tf.errors.OpError) as e:
            message = short_error(e) if isinstance(e, tf.errors.OpError) else f"{type(e).__name__}: {e}"
            logging.error("skipping %s: %s", path, message)
            print(f"skipping {path}: {message}", file=sys.stderr)
            skipped.append({"file": path, "error": message})
            continue
        h, w = image.shape[:2]
        png = unique_png_path(FLAGS.output_dir, path, used)
        if "proposal_masks" in outputs:  # a segment proposer (§6): mask overlays
            detections, masks = segments_to_json(outputs, image.shape[:2], FLAGS.min_score)
            drawn = draw_segments(image, masks, [d["score"] for d in detections])
        else:
            detections = detections_to_json(outputs, label_map, FLAGS.min_score, (h, w))
            masks = None
            if detections and "segmentation" in detections[0]:
                from pycocotools import mask as mask_utils

                masks = [
                    mask_utils.decode({**d["segmentation"], "counts": d["segmentation"]["counts"].encode()})
                    for d in detections
                ]
            drawn = draw_detections(
                image,
                [d["box"] for d in detections],
                [d["score"] for d in detections],
                [d["category_id"] for d in detections],
                [d["category_name"] for d in detections],
                masks=masks,
            )
        write_new(png, lambda f, drawn=drawn: drawn.save(f, format="PNG"))
        h, w = image.shape[:2]
        images.append({"file": path, "height": h, "width": w, "visualization": png, "detections": detections})
        print(f"{path}: {len(detections)} detection(s) with score >= {FLAGS.min_score} -> {png}")
    out = unique_path(FLAGS.output_dir, "detections", ".json", set())
    text = json.dumps({"box_format": BOX_FORMAT, "images": images, "skipped": skipped}, indent=1)
    write_new(out, lambda f: f.write(text.encode("utf-8")))
    print(f"wrote {out}: {len(images)} image(s), {len(skipped)} skipped")
    if not images:
        return 1
    return 0


if __name__ == "__main__":
    app.run(main)
