"""Peak memory of one Mask R-CNN training step vs Faster R-CNN, fed by the real input pipeline.

    python bench/mask_memory.py                       # 2 images 800x1333, 100 masks each
    python bench/mask_memory.py --tiny                # 128 px, narrow ResNet-18: the smoke test
    python bench/mask_memory.py --mask_size=112 --num_classes=2

The parent writes a COCO-JSON folder under a temporary directory: ``--num_images``
JPEG images of ``--size`` holding ``--num_masks`` instances each (ellipses at
random places and sizes, half as polygons, half as compressed RLE, so both paths
of ``fpn_tf/data/masks.py`` run). Then, each in its own fresh process (so that
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` is that configuration's own peak):

- ``pipeline``: ``fpn_tf.data.pipeline.build_dataset`` (training mode, batch =
  all images, ``input.mask_size`` M, ``max_gt_boxes`` = ``--num_masks``) iterated
  for ``--pipeline_batches`` batches, without a model;
- ``faster_rcnn`` and ``mask_rcnn``: the same pipeline, R50-FPN (random init,
  frozen BN, ``--num_classes``), one batch taken from it and ONE training step
  (``compute_losses`` + gradient + SGD apply in a ``tf.function``).

The pipeline crops each ground-truth mask to its box at M x M (``masks.crop_masks``,
one instance at a time), so a batch carries ``B * G * M * M`` bytes of masks
(1.2 MB at M = 56) instead of ``B * G * H * W`` full-image masks (213 MB as uint8
for 2 x 100 x 800 x 1333; the JSON records both). The mask model's peak should
therefore stay close to Faster R-CNN's; the difference is the mask head's own
activations and gradients.

Results (peak RSS in MiB per configuration, the RSS just before the step, the
losses, the machine and the load average) are printed and written as JSON
(``--output``).
"""

from __future__ import annotations

import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from absl import app, flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

FLAGS = flags.FLAGS
flags.DEFINE_string("size", "800x1333", "image size HxW (the images are not resized: min/max size match)")
flags.DEFINE_integer("num_images", 2, "images per batch (the whole dataset)")
flags.DEFINE_integer("num_masks", 100, "ground-truth instances per image (= input.max_gt_boxes)")
flags.DEFINE_integer("mask_size", 56, "input.mask_size M: each GT mask cropped to its box at M x M")
flags.DEFINE_integer("num_classes", 91, "classes including background (2..91)")
flags.DEFINE_integer("pipeline_batches", 3, "batches the pipeline-only process reads")
flags.DEFINE_list("configs", ["pipeline", "faster_rcnn", "mask_rcnn"], "which processes to run")
flags.DEFINE_bool("tiny", False, "128 px images, 8 masks, a narrow ResNet-18 + FPN(d=32): seconds")
flags.DEFINE_string("output", "bench/results/mask_memory.json", "where the JSON results go")
# child mode (internal): one configuration in this process
flags.DEFINE_string("child", None, "internal: run one configuration on --data_dir and print JSON")
flags.DEFINE_string("data_dir", None, "internal: the COCO-JSON folder of the child")


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise app.UsageError(f"--size {text!r} must look like HEIGHTxWIDTH, e.g. 800x1333") from None
    if h < 32 or w < 32:
        raise app.UsageError(f"--size {text!r} is too small (at least 32x32)")
    return h, w


# ------------------------------------------------------------------ the data
def _ellipse(h: int, w: int, cy: float, cx: float, ry: float, rx: float, n: int = 16) -> list[float]:
    """A closed polygon [x0, y0, x1, y1, ...] of n points on an ellipse, clipped to the image."""
    import numpy as np

    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    xs = np.clip(cx + rx * np.cos(t), 0, w - 1)
    ys = np.clip(cy + ry * np.sin(t), 0, h - 1)
    return [float(v) for xy in zip(xs, ys) for v in xy]


def write_coco_folder(
    root: str, num_images: int, size: tuple[int, int], num_masks: int, seed: int = 0
) -> str:
    """Writes ``root/images/*.jpg`` and ``root/annotations.json``; returns the JSON path.

    Instance k of an image is an ellipse of radii 8..max(12, min(h, w) / 6) px;
    even k are stored as a polygon, odd k as a compressed RLE (one full-image raster
    per instance here, in the parent, never in the measured processes).
    """
    import numpy as np
    import pycocotools.mask as mask_utils
    from PIL import Image

    h, w = size
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        name = f"img_{i}.jpg"
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(root, "images", name), quality=90)
        images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
        for k in range(num_masks):
            r_max = max(12.0, min(h, w) / 6)
            ry, rx = rng.uniform(8, r_max, 2)
            cy, cx = rng.uniform(ry, h - ry), rng.uniform(rx, w - rx)
            poly = _ellipse(h, w, cy, cx, ry, rx)
            rle = mask_utils.merge(mask_utils.frPyObjects([poly], h, w))
            if k % 2 == 0:
                segmentation = [poly]
            else:
                segmentation = {"size": [h, w], "counts": rle["counts"].decode("ascii")}
            x, y, bw, bh = (float(v) for v in mask_utils.toBbox(rle))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": 1,
                    "bbox": [x, y, bw, bh],
                    "area": float(mask_utils.area(rle)),
                    "iscrowd": 0,
                    "segmentation": segmentation,
                }
            )
    path = os.path.join(root, "annotations.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(
            {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "blob"}]}, f
        )
    return path


# ------------------------------------------------------------------ a child
def child_configs(
    kind: str, tiny: bool, size, num_masks: int, mask_size: int, num_classes: int, data_dir: str
):
    """(DataConfig, InputConfig, ModelConfig or None) of one child."""
    from fpn_tf.config import DataConfig, InputConfig, ModelConfig, from_dict

    h, w = size
    input_values = {
        "min_size": min(h, w),
        "max_size": max(h, w),
        "max_gt_boxes": num_masks,
        "mask_size": mask_size if kind != "faster_rcnn" else 0,
    }
    data = DataConfig(
        source="coco_json",
        train_dir=os.path.join(data_dir, "images"),
        train_annotations=os.path.join(data_dir, "annotations.json"),
        shuffle_buffer=4,
    )
    values = {
        "type": kind if kind != "pipeline" else "mask_rcnn",
        "num_classes": num_classes,
        "input": input_values,
    }
    if tiny:
        values.update(
            backbone={"name": "resnet18", "width_multiplier": 0.25},
            fpn={"num_channels": 32},
            anchors={"sizes": [8.0, 16.0, 32.0, 64.0, 128.0]},
            roi_head={"batch_size_per_image": 64, "fc_dim": 128, "detections_per_image": 20},
        )
    model = from_dict(ModelConfig, values)
    return data, from_dict(InputConfig, input_values), (None if kind == "pipeline" else model)


def run_child(kind: str) -> dict:
    """One configuration in this process: returns its measurements."""
    import keras
    import tensorflow as tf

    from fpn_tf.data.pipeline import build_dataset
    from fpn_tf.models.build import build_model

    size = (128, 128) if FLAGS.tiny else parse_size(FLAGS.size)
    data, input_config, model_config = child_configs(
        kind, FLAGS.tiny, size, FLAGS.num_masks, FLAGS.mask_size, FLAGS.num_classes, FLAGS.data_dir
    )
    ds, _info = build_dataset(data, input_config, "train", FLAGS.num_images, training=True, seed=0)
    out = {"config": kind, "mask_size": input_config.mask_size, "rss_after_imports_mb": current_rss_mb()}
    it = iter(ds)
    if model_config is None:
        start = time.perf_counter()
        for _ in range(FLAGS.pipeline_batches):
            batch = next(it)
        out["seconds"] = time.perf_counter() - start
        out["batch_shapes"] = {k: list(v.shape) for k, v in batch.items()}
        out["valid_gt"] = int(tf.reduce_sum(tf.cast(batch["gt_classes"] > 0, tf.int32)))
        if "gt_masks" in batch:
            out["gt_mask_bytes"] = int(tf.size(batch["gt_masks"]))
            out["gt_mask_pixels_set"] = int(tf.reduce_sum(tf.cast(batch["gt_masks"], tf.int64)))
        out["peak_rss_mb"] = peak_rss_mb()
        return out
    batch = next(it)
    out["batch_shapes"] = {k: list(v.shape) for k, v in batch.items()}
    keras.utils.set_random_seed(0)
    model = build_model(model_config)
    variables = model.trainable_variables
    optimizer = keras.optimizers.SGD(learning_rate=1e-4, momentum=0.9)
    optimizer.build(variables)

    @tf.function
    def train_step(batch):
        with tf.GradientTape() as tape:
            losses = model.compute_losses(batch, training=True, step=tf.constant(0))
        grads = tape.gradient(losses["total_loss"], variables)
        optimizer.apply_gradients(zip(grads, variables))
        return losses

    out["params"] = int(sum(int(tf.size(v)) for v in model.weights))
    out["rss_before_step_mb"] = current_rss_mb()
    start = time.perf_counter()
    losses = train_step(batch)
    out["losses"] = {k: float(v) for k, v in losses.items()}
    out["seconds"] = time.perf_counter() - start  # includes tracing
    out["peak_rss_mb"] = peak_rss_mb()
    return out


# ------------------------------------------------------------------ the parent
def run_parent() -> dict:
    size = (128, 128) if FLAGS.tiny else parse_size(FLAGS.size)
    num_masks = 8 if FLAGS.tiny else FLAGS.num_masks
    if not 2 <= FLAGS.num_classes <= 91:
        raise app.UsageError(f"--num_classes must be 2..91, got {FLAGS.num_classes}")
    for kind in FLAGS.configs:
        if kind not in ("pipeline", "faster_rcnn", "mask_rcnn"):
            raise app.UsageError(f"--configs: unknown {kind!r}; valid: pipeline, faster_rcnn, mask_rcnn")
    h, w = size
    meta = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.relpath(sys.argv[0], _ROOT)] + sys.argv[1:]),
        "image_size": [h, w],
        "num_images": FLAGS.num_images,
        "masks_per_image": num_masks,
        "mask_size": FLAGS.mask_size,
        "num_classes": FLAGS.num_classes,
        "tiny": FLAGS.tiny,
        "box_cropped_mask_bytes": FLAGS.num_images * num_masks * FLAGS.mask_size**2,
        "full_image_mask_bytes_uint8": FLAGS.num_images * num_masks * h * w,
        "load_average_before": list(os.getloadavg()),
    }
    results = []
    with tempfile.TemporaryDirectory(prefix="fpn_tf_mask_memory_") as root:
        write_coco_folder(root, FLAGS.num_images, size, num_masks)
        for kind in FLAGS.configs:
            args = [
                sys.executable,
                os.path.abspath(__file__),
                f"--child={kind}",
                f"--data_dir={root}",
                f"--num_images={FLAGS.num_images}",
                f"--num_masks={num_masks}",
                f"--mask_size={FLAGS.mask_size}",
                f"--num_classes={FLAGS.num_classes}",
                f"--size={FLAGS.size}",
                f"--pipeline_batches={FLAGS.pipeline_batches}",
                f"--tiny={FLAGS.tiny}",
            ]
            env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
            print(f"{kind} ...", flush=True)
            proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=_ROOT)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                raise RuntimeError(f"{kind} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
            result = json.loads(lines[-1][len("RESULT ") :])
            results.append(result)
            print(f"  peak RSS {result['peak_rss_mb']:.0f} MiB ({result['seconds']:.1f} s)", flush=True)
    meta["load_average_after"] = list(os.getloadavg())
    by_kind = {r["config"]: r for r in results}
    if "mask_rcnn" in by_kind and "faster_rcnn" in by_kind:
        meta["mask_over_faster_rss"] = (
            by_kind["mask_rcnn"]["peak_rss_mb"] / by_kind["faster_rcnn"]["peak_rss_mb"]
        )
        meta["mask_minus_faster_rss_mb"] = (
            by_kind["mask_rcnn"]["peak_rss_mb"] - by_kind["faster_rcnn"]["peak_rss_mb"]
        )
    return {"meta": meta, "results": results}


def format_table(report: dict) -> str:
    lines = [
        "| process | input.mask_size | peak RSS MiB | RSS before the step MiB | seconds |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        before = r.get("rss_before_step_mb")
        lines.append(
            f"| {r['config']} | {r['mask_size']} | {r['peak_rss_mb']:.0f} "
            f"| {'–' if before is None else format(before, '.0f')} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if FLAGS.child:
        print("RESULT " + json.dumps(run_child(FLAGS.child)), flush=True)
        return
    report = run_parent()
    meta = report["meta"]
    print(format_table(report))
    if "mask_over_faster_rss" in meta:
        print(
            f"mask_rcnn / faster_rcnn peak RSS: {meta['mask_over_faster_rss']:.3f} "
            f"(+{meta['mask_minus_faster_rss_mb']:.0f} MiB); box-cropped masks "
            f"{meta['box_cropped_mask_bytes'] / 2**20:.1f} MiB vs full-image "
            f"{meta['full_image_mask_bytes_uint8'] / 2**20:.0f} MiB"
        )
    print(
        f"load average before {meta['load_average_before'][0]:.2f}, after {meta['load_average_after'][0]:.2f}"
    )
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
    with open(FLAGS.output, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    print(f"results written to {FLAGS.output}")


if __name__ == "__main__":
    app.run(main)
