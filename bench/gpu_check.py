"""The Python part of scripts/gpu_check.sh: GPU training / inference figures for R50-FPN.

    python bench/gpu_check.py                      # on a GPU machine (what gpu_check.sh runs)
    python bench/gpu_check.py --allow_cpu --tiny   # the code path on a CPU, a narrow model at 128 px

1. TensorFlow must see at least one GPU (else exit 3, unless ``--allow_cpu``).
2. Training: Faster R-CNN R50-FPN (paper defaults, 91 classes) on 800x1333
   images (padded to 832x1344) of random boxes, ``--batch_per_gpu`` images per
   GPU, MirroredStrategy over every GPU, via ``fpn_tf.training.trainer.Trainer``
   (the custom loop): mixed_float16 + XLA, float32 + XLA, and mixed_float16
   without XLA (the measurement behind ``--xla auto`` on GPU). Reports
   images/s per GPU (steps after the first, which compiles), the loss scale and
   skipped steps, and peak GPU memory (``tf.config.experimental.get_memory_info``).
3. Inference: the trained weights in a float32 and a mixed_float16 model, each
   in a ``tf.function(jit_compile=True)``, latency at batch 1 and 8 (median of
   ``--repeats``) on GPU:0.
4. mixed_float16 detections against float32 on the same weights and images: the
   share of float32's top detections that float16 reproduces (same class, IoU
   >= 0.8) and their score difference. Fails (exit 4) below ``--min_agreement``.

Prints one line per figure and writes them as JSON (``--output``).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

from absl import app, flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 25, "training steps per run (the first compiles and is not timed)")
flags.DEFINE_integer("batch_per_gpu", 2, "training images per GPU (paper: 2)")
flags.DEFINE_integer("repeats", 10, "timed inference calls per batch size")
flags.DEFINE_float("min_agreement", 0.8, "least share of float32 detections float16 must reproduce")
flags.DEFINE_bool("compare_no_xla", True, "also train mixed_float16 without XLA")
flags.DEFINE_bool("allow_cpu", False, "run without a GPU (to test this script)")
flags.DEFINE_bool("tiny", False, "a narrow ResNet-18 + FPN at 128 px (to test this script)")
flags.DEFINE_string("output", "gpu_check.json", "where the figures go (JSON)")

HEIGHT, WIDTH = 800, 1333


def model_config():
    from fpn_tf.config import ModelConfig, to_dict

    if not FLAGS.tiny:
        return ModelConfig(num_classes=91), (HEIGHT, WIDTH)
    sys.path.insert(0, os.path.join(_ROOT, "tests"))
    from tiny import tiny_model_config

    cfg = tiny_model_config(num_classes=4, image_size=128)
    assert to_dict(cfg)
    return cfg, (128, 128)


def random_batch(num: int, hw: tuple[int, int], divisor: int, num_classes: int, seed: int) -> dict:
    """Images of bright random rectangles on noise; GT = the rectangles (batch dict of docs/design.md)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    h, w = hw
    ph, pw = -(-h // divisor) * divisor, -(-w // divisor) * divisor
    images = np.zeros((num, ph, pw, 3), np.float32)
    images[:, :h, :w] = rng.uniform(0, 80, (num, h, w, 3))
    boxes = np.zeros((num, 8, 4), np.float32)
    classes = -np.ones((num, 8), np.int32)
    for i in range(num):
        for j in range(int(rng.integers(1, 9))):
            bh, bw = (int(v) for v in rng.integers(h // 20, h // 3, 2))
            y, x = int(rng.integers(0, h - bh)), int(rng.integers(0, w - bw))
            images[i, y : y + bh, x : x + bw] = rng.uniform(150, 255, 3)
            boxes[i, j] = (y, x, y + bh, x + bw)
            classes[i, j] = int(rng.integers(1, num_classes))
    info = np.tile(np.array([[h, w, h, w, 1.0, 1.0]], np.float32), (num, 1))
    ids = np.arange(seed * 1000, seed * 1000 + num, dtype=np.int64)
    return {"images": images, "image_info": info, "gt_boxes": boxes, "gt_classes": classes, "image_id": ids}


def peak_memory_gb(reset: bool = False) -> float | None:
    import tensorflow as tf

    if not tf.config.list_physical_devices("GPU"):
        return None
    info = tf.config.experimental.get_memory_info("GPU:0")
    if reset:
        tf.config.experimental.reset_memory_stats("GPU:0")
    return info["peak"] / 2**30


def train_run(strategy, cfg, hw, policy: str, xla: bool, figures: dict):
    """One training run; returns the trained Trainer."""
    import tensorflow as tf

    from fpn_tf.config import TrainConfig
    from fpn_tf.models.faster_rcnn import build_faster_rcnn
    from fpn_tf.training.optimizer import loss_scale_scalars
    from fpn_tf.training.trainer import Trainer

    replicas = strategy.num_replicas_in_sync
    batch = random_batch(4 * FLAGS.batch_per_gpu, hw, cfg.input.size_divisibility, cfg.num_classes, seed=1)

    def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        ds = tf.data.Dataset.from_tensor_slices(batch).repeat()
        return ds.batch(ctx.get_per_replica_batch_size(FLAGS.batch_per_gpu * replicas), drop_remainder=True)

    train = TrainConfig(
        batch_size=FLAGS.batch_per_gpu * replicas,
        train_steps=FLAGS.steps,
        base_learning_rate=0.0025 * replicas * FLAGS.batch_per_gpu / 2,  # 0.02 at 16 images
        warmup_steps=0,
        lr_decay_fractions=(),
        checkpoint_every=10**9,
        log_every=10**9,
    )
    peak_memory_gb(reset=True)
    with tempfile.TemporaryDirectory() as model_dir:
        trainer = Trainer(
            lambda: build_faster_rcnn(config=cfg),
            train,
            model_dir,
            strategy=strategy,
            xla=xla,
            mixed_precision=policy,
        )
        start = time.perf_counter()
        result = trainer.fit(dataset_fn)
        total = time.perf_counter() - start
    name = f"train_{policy}_{'xla' if xla else 'no_xla'}"
    figures[name] = {
        "images_per_second_per_gpu": result.steps_per_second * FLAGS.batch_per_gpu,
        "steps_per_second": result.steps_per_second,
        "first_step_s": round(total - (FLAGS.steps - 1) / max(result.steps_per_second, 1e-9), 1),
        "final_total_loss": result.losses.get("total_loss"),
        "peak_gpu_memory_gb": peak_memory_gb(),
        **loss_scale_scalars(trainer.optimizer),
    }
    print(name, json.dumps(figures[name]), flush=True)
    return trainer


def inference_models(cfg, weights):
    """float32 and mixed_float16 models holding ``weights`` (variables are float32 in both)."""
    import keras

    from fpn_tf.models.faster_rcnn import build_faster_rcnn

    models = {}
    for policy in ("float32", "mixed_float16"):
        previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy(policy)
        try:
            models[policy] = build_faster_rcnn(config=cfg)
        finally:
            keras.config.set_dtype_policy(previous)
        models[policy].set_weights(weights)
    return models


def time_inference(models, cfg, hw, figures: dict) -> dict:
    import tensorflow as tf

    outputs = {}
    for policy, model in models.items():
        fn = tf.function(
            lambda images, info, m=model: m({"images": images, "image_info": info}), jit_compile=True
        )
        for batch_size in (1, 8):
            data = random_batch(batch_size, hw, cfg.input.size_divisibility, cfg.num_classes, seed=7)
            images, info = tf.constant(data["images"]), tf.constant(data["image_info"])
            peak_memory_gb(reset=True)
            out = fn(images, info)  # compiles
            for v in out.values():
                v.numpy()
            times = []
            for _ in range(FLAGS.repeats):
                start = time.perf_counter()
                out = fn(images, info)
                out["num_detections"].numpy()
                times.append(time.perf_counter() - start)
            name = f"inference_{policy}_batch{batch_size}"
            median = statistics.median(times)
            figures[name] = {
                "seconds_per_batch": median,
                "seconds_per_image": median / batch_size,
                "peak_gpu_memory_gb": peak_memory_gb(),
            }
            print(name, json.dumps(figures[name]), flush=True)
            outputs[(policy, batch_size)] = {k: v.numpy() for k, v in out.items()}
    return outputs


def detection_agreement(reference: dict, other: dict, top_k: int = 20) -> dict:
    """Share of ``reference``'s top detections that ``other`` reproduces (same class, IoU >= 0.8)."""
    import numpy as np

    from fpn_tf.ops.box_ops import pairwise_iou

    matched, total, score_diffs = 0, 0, []
    for b in range(reference["detection_boxes"].shape[0]):
        n_ref = min(int(reference["num_detections"][b]), top_k)
        n_oth = int(other["num_detections"][b])
        if n_ref == 0:
            continue
        total += n_ref
        if n_oth == 0:
            continue
        iou = np.asarray(
            pairwise_iou(reference["detection_boxes"][b, :n_ref], other["detection_boxes"][b, :n_oth])
        )
        same = reference["detection_classes"][b, :n_ref, None] == other["detection_classes"][b, None, :n_oth]
        iou = np.where(same, iou, 0.0)
        for i in range(n_ref):
            j = int(np.argmax(iou[i]))
            if iou[i, j] >= 0.8:
                matched += 1
                score_diffs.append(
                    abs(float(reference["detection_scores"][b, i] - other["detection_scores"][b, j]))
                )
    return {
        "reference_detections": total,
        "agreement": matched / total if total else None,
        "mean_abs_score_difference": float(np.mean(score_diffs)) if score_diffs else None,
    }


def main(argv):
    del argv
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    print(f"TensorFlow {tf.__version__}, built with CUDA: {tf.test.is_built_with_cuda()}, GPUs: {len(gpus)}")
    for gpu in gpus:
        print("  ", gpu.name, tf.config.experimental.get_device_details(gpu).get("device_name", ""))
    if not gpus and not FLAGS.allow_cpu:
        print("FAIL: TensorFlow sees no GPU (tf.config.list_physical_devices('GPU') is empty)")
        return 3
    from fpn_tf.training import distribute

    strategy = distribute.make_strategy("mirrored")
    cfg, hw = model_config()
    figures: dict = {
        "tensorflow": tf.__version__,
        "gpus": len(gpus),
        "replicas": strategy.num_replicas_in_sync,
    }
    figures["image_size"] = list(hw)
    runs = [("mixed_float16", True), ("float32", True)]
    if FLAGS.compare_no_xla:
        runs.append(("mixed_float16", False))
    trainer = None
    for policy, xla in runs:
        result = train_run(strategy, cfg, hw, policy, xla, figures)
        if trainer is None:
            trainer = result
    models = inference_models(cfg, trainer.model.get_weights())
    outputs = time_inference(models, cfg, hw, figures)
    figures["fp16_vs_fp32_detections"] = detection_agreement(
        outputs[("float32", 8)], outputs[("mixed_float16", 8)]
    )
    print("fp16_vs_fp32_detections", json.dumps(figures["fp16_vs_fp32_detections"]), flush=True)
    with open(FLAGS.output, "w", encoding="utf-8") as f:
        json.dump(figures, f, indent=2)
    print(f"figures written to {FLAGS.output}")
    agreement = figures["fp16_vs_fp32_detections"]["agreement"]
    if agreement is not None and agreement < FLAGS.min_agreement:
        print(
            f"FAIL: float16 reproduces {agreement:.0%} of float32's detections (< {FLAGS.min_agreement:.0%})"
        )
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main))
