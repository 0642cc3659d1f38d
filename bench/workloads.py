"""The timed workloads: fpn_tf (Keras, XLA, bfloat16, SavedModel) and torchvision.

A workload is built from a plain-dict ``spec`` (so that it can cross a process
boundary) and offers ``setup()`` (build, trace / compile, one call),
``run() -> seconds`` (one timed call, outputs materialised), ``flops()`` and
``describe()``. ``worker_main`` runs one workload in its own process and obeys the
parent's commands over a pipe, so every configuration has its own peak memory
while the parent alternates the configurations repeat by repeat.

spec keys:
  impl: "keras" | "keras_xla" | "keras_bf16" | "saved_model" | "saved_model_bf16" |
    "torchvision"
  task: "inference" | "train"
  height, width: the image size (before padding); batch: images per call
  model: "faster_rcnn" (default) | "retinanet": the detector (torchvision's
    ``fasterrcnn_resnet50_fpn`` or ``retinanet_resnet50_fpn`` for the peer)
  model_config: fpn_tf ModelConfig as a dict (fpn_tf only; its ``type`` is the model)
  saved_model_dir: an exported version directory (saved_model impls)
  seed, intra_op_threads, inter_op_threads, count_flops
"""

from __future__ import annotations

import math
import os
import resource
import time
import traceback

IMPLS = ("keras", "keras_xla", "keras_bf16", "saved_model", "saved_model_bf16", "torchvision")
TF_IMPLS = IMPLS[:-1]
NUM_GT_BOXES = 4  # GT boxes per image in the training batches


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def gt_boxes_yxyx(height: int, width: int) -> list[list[float]]:
    """NUM_GT_BOXES fixed boxes (y1, x1, y2, x2) spread over an image, in pixels."""
    fractions = [
        (0.10, 0.10, 0.45, 0.30),
        (0.20, 0.50, 0.60, 0.95),
        (0.55, 0.05, 0.95, 0.40),
        (0.40, 0.35, 0.70, 0.60),
    ]
    return [[f[0] * height, f[1] * width, f[2] * height, f[3] * width] for f in fractions[:NUM_GT_BOXES]]


def padded(size: int, divisibility: int) -> int:
    return int(math.ceil(size / divisibility) * divisibility)


# --------------------------------------------------------------------- fpn_tf
class FpnTfWorkload:
    """fpn_tf inference or one SGD training step, Keras model or SavedModel."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.impl = spec["impl"]
        self.task = spec["task"]
        if self.task == "train" and self.impl not in ("keras", "keras_xla", "keras_bf16"):
            raise ValueError(f"{self.impl} has no training workload")
        self._fn = None
        self._args = None

    def _config(self):
        import dataclasses

        from fpn_tf.config import ModelConfig, from_dict

        cfg = from_dict(ModelConfig, self.spec["model_config"])
        if self.impl == "keras_bf16":
            cfg = dataclasses.replace(cfg, compute_dtype="mixed_bfloat16")
        return cfg

    def _inputs(self, cfg):
        import numpy as np
        import tensorflow as tf

        h, w, b = self.spec["height"], self.spec["width"], self.spec["batch"]
        div = cfg.input.size_divisibility
        ph, pw = padded(h, div), padded(w, div)
        rng = np.random.default_rng(self.spec.get("seed", 0))
        images = np.zeros((b, ph, pw, 3), np.float32)
        images[:, :h, :w] = rng.uniform(0, 255, (b, h, w, 3))
        info = np.tile(np.array([[h, w, h, w, 1.0, 1.0]], np.float32), (b, 1))
        inputs = {"images": tf.constant(images), "image_info": tf.constant(info)}
        if self.task == "train":
            g = cfg.input.max_gt_boxes
            boxes = np.zeros((b, g, 4), np.float32)
            classes = -np.ones((b, g), np.int32)
            boxes[:, :NUM_GT_BOXES] = gt_boxes_yxyx(h, w)
            classes[:, :NUM_GT_BOXES] = 1 + np.arange(NUM_GT_BOXES) % (cfg.num_classes - 1)
            inputs.update(
                gt_boxes=tf.constant(boxes),
                gt_classes=tf.constant(classes),
                image_id=tf.range(1, b + 1, dtype=tf.int64),
            )
        return inputs

    def setup(self) -> None:
        import keras
        import tensorflow as tf

        from fpn_tf.models.build import build_model

        cfg = self._config()
        self.inputs = self._inputs(cfg)
        if self.impl.startswith("saved_model"):
            loaded = tf.saved_model.load(self.spec["saved_model_dir"])
            self._loaded = loaded
            images, info = self.inputs["images"], self.inputs["image_info"]
            self._fn = lambda: loaded.detect(images, info)
            self._trace_fn = None
            self._fn()
            return
        keras.utils.set_random_seed(self.spec.get("seed", 0))
        model = build_model(cfg)
        self.model = model
        jit = self.impl == "keras_xla"
        if self.task == "inference":
            infer = tf.function(lambda x: model(x, training=False), jit_compile=jit)
            self._trace_fn = infer
            self._args = (self.inputs,)
        else:
            optimizer = keras.optimizers.SGD(learning_rate=1e-4, momentum=0.9)
            variables = model.trainable_variables
            optimizer.build(variables)

            def train_step(batch, step):
                with tf.GradientTape() as tape:
                    losses = model.compute_losses(batch, training=True, step=step)
                grads = tape.gradient(losses["total_loss"], variables)
                optimizer.apply_gradients(zip(grads, variables))
                return losses["total_loss"]

            train = tf.function(train_step, jit_compile=jit)
            self._trace_fn = train
            self._step = 0
            self._args = (self.inputs, tf.constant(0))
        self._fn = self._call
        self._fn()

    def _call(self):
        if self.task == "train":
            import tensorflow as tf

            self._step += 1
            return self._trace_fn(self.inputs, tf.constant(self._step))
        return self._trace_fn(*self._args)

    def run(self) -> float:
        import tensorflow as tf

        start = time.perf_counter()
        out = self._fn()
        tf.nest.map_structure(lambda t: t.numpy(), out)
        return time.perf_counter() - start

    def flops(self) -> int | None:
        """FLOPs of one call from the traced graph (Keras impls; the SavedModel's
        dynamic-shape graph is not countable, its math is the Keras model's)."""
        if self._trace_fn is None:
            return None
        from bench.flops import tf_flops

        return tf_flops(self._trace_fn.get_concrete_function(*self._args))

    def describe(self) -> dict:
        import tensorflow as tf

        cfg = self._config()
        div = cfg.input.size_divisibility
        return {
            "framework": f"tensorflow {tf.__version__}",
            "network_input": [padded(self.spec["height"], div), padded(self.spec["width"], div)],
            "compute_dtype": cfg.compute_dtype if not self.impl.endswith("bf16") else "mixed_bfloat16",
            "xla": self.impl == "keras_xla",
        }


# ------------------------------------------------------------------ torchvision
TORCHVISION_MODELS = {"faster_rcnn": "fasterrcnn_resnet50_fpn", "retinanet": "retinanet_resnet50_fpn"}


class TorchvisionWorkload:
    """torchvision ``fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)``,
    or ``retinanet_resnet50_fpn`` with ``spec["model"] == "retinanet"``.

    Inference under ``torch.inference_mode()`` in eval mode; training = one SGD
    step (forward with targets, backward, ``optimizer.step()``) in train mode.
    The model's own transform resizes with min_size = min(h, w) and max_size =
    max(h, w), i.e. at scale 1, and pads to a multiple of 32.
    """

    def __init__(self, spec: dict):
        self.spec = spec
        self.task = spec["task"]

    def setup(self) -> None:
        import torch
        import torchvision

        torch.manual_seed(self.spec.get("seed", 0))
        h, w, b = self.spec["height"], self.spec["width"], self.spec["batch"]
        kwargs = {"min_size": min(h, w), "max_size": max(h, w)}
        name = TORCHVISION_MODELS[self.spec.get("model", "faster_rcnn")]
        model = getattr(torchvision.models.detection, name)(weights=None, weights_backbone=None, **kwargs)
        self.model = model
        generator = torch.Generator().manual_seed(self.spec.get("seed", 0))
        self.images = [torch.rand(3, h, w, generator=generator) for _ in range(b)]
        if self.task == "inference":
            model.eval()
        else:
            model.train()
            boxes = torch.tensor([[x1, y1, x2, y2] for y1, x1, y2, x2 in gt_boxes_yxyx(h, w)])
            labels = 1 + torch.arange(NUM_GT_BOXES) % 90
            self.targets = [{"boxes": boxes.clone(), "labels": labels.clone()} for _ in range(b)]
            self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        self._call()

    def _call(self):
        import torch

        if self.task == "inference":
            with torch.inference_mode():
                return self.model(self.images)
        self.optimizer.zero_grad(set_to_none=True)
        losses = self.model(self.images, self.targets)
        loss = sum(losses.values())
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def run(self) -> float:
        start = time.perf_counter()
        self._call()
        return time.perf_counter() - start

    def flops(self) -> int | None:
        from bench.flops import torch_flops

        return torch_flops(self._call)

    def describe(self) -> dict:
        import torch
        import torchvision

        h, w = self.spec["height"], self.spec["width"]
        return {
            "framework": f"torch {torch.__version__}, torchvision {torchvision.__version__}",
            "torchvision_model": TORCHVISION_MODELS[self.spec.get("model", "faster_rcnn")],
            "network_input": [padded(h, 32), padded(w, 32)],
            "compute_dtype": "float32",
            "xla": False,
        }


def make_workload(spec: dict):
    if spec["impl"] not in IMPLS:
        raise ValueError(f"unknown impl {spec['impl']!r}; valid: {', '.join(IMPLS)}")
    return TorchvisionWorkload(spec) if spec["impl"] == "torchvision" else FpnTfWorkload(spec)


def configure_threads(spec: dict) -> None:
    """Thread pools of TF or torch, set before either runs anything.

    In a shared process (no isolation) a later call finds the pools running and
    keeps them as they are.
    """
    intra = int(spec.get("intra_op_threads") or len(os.sched_getaffinity(0)))
    inter = int(spec.get("inter_op_threads") or 1)
    try:
        if spec["impl"] == "torchvision":
            import torch

            torch.set_num_threads(intra)
            torch.set_num_interop_threads(inter)
        else:
            import tensorflow as tf

            tf.config.threading.set_intra_op_parallelism_threads(intra)
            tf.config.threading.set_inter_op_parallelism_threads(inter)
    except RuntimeError:
        pass  # already initialised in this process


def export_for_benchmark(model_config: dict, compute_dtype: str, export_base: str, seed: int = 0) -> str:
    """Builds the seeded model and exports it with fpn_tf.export; returns the version dir."""
    import dataclasses

    import keras

    from fpn_tf.config import ModelConfig, from_dict
    from fpn_tf.export.saved_model import export_saved_model
    from fpn_tf.models.build import build_model

    keras.utils.set_random_seed(seed)
    cfg = dataclasses.replace(from_dict(ModelConfig, model_config), compute_dtype=compute_dtype)
    model = build_model(cfg)
    return export_saved_model(model, export_base, f"bench_{compute_dtype}")


def worker_main(conn, spec: dict) -> None:
    """Process entry point: one workload, driven by commands over ``conn``.

    Commands: ("setup",), ("run",), ("finish",), ("export", model_config, dtype,
    base) and ("peak",) (a peak-meter process: bench/peak.py's four rates, repeatable);
    the process ends after "finish", "export" or an error. Every reply is a
    dict; {"error": traceback} when a command failed.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    workload = None
    while True:
        try:
            command = conn.recv()
        except EOFError:  # the parent went away
            return
        try:
            if command[0] == "setup":
                configure_threads(spec)
                start = time.perf_counter()
                workload = make_workload(spec)
                workload.setup()
                conn.send({"setup_s": time.perf_counter() - start, **workload.describe()})
            elif command[0] == "run":
                cpu = time.process_time()
                seconds = workload.run()
                conn.send({"seconds": seconds, "cpu_seconds": time.process_time() - cpu})
            elif command[0] == "peak":  # this machine's matmul / conv GFLOP/s (bench/peak.py)
                if workload is None:
                    from bench.peak import PeakMeter

                    configure_threads(spec)
                    workload = PeakMeter()
                conn.send({"rates": workload.measure()})
            elif command[0] == "export":
                configure_threads(spec)
                conn.send({"path": export_for_benchmark(*command[1:])})
                return
            elif command[0] == "finish":
                rss = peak_rss_mb()  # before counting FLOPs, which builds more graph
                flops = workload.flops() if spec.get("count_flops") and workload is not None else None
                conn.send({"peak_rss_mb": rss, "flops": flops})
                return
            else:
                raise ValueError(f"unknown command {command!r}")
        except Exception:  # reported to the parent, which prints it and stops
            conn.send({"error": traceback.format_exc()})
            return
