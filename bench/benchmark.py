"""Speed and memory of fpn_tf's Faster R-CNN (or RetinaNet) + FPN, side by side with torchvision.

    python bench/benchmark.py                              # fpn_tf only, the full grid
    python bench/benchmark.py --compare=torchvision        # + torchvision, alternating
    python bench/benchmark.py --tiny                       # seconds: the smoke test's run
    python bench/benchmark.py --tasks=inference --sizes=512x512 --batch_sizes=1 \\
        --impls=keras,keras_bf16 --compare=torchvision --repeats=5
    python bench/benchmark.py --model=retinanet --compare=torchvision --tasks=inference \
        --sizes=800x1333 --batch_sizes=1 --impls=keras,keras_bf16 --repeats=3

Measures, for each group (task, image size, batch):
- inference latency of one batch: the Keras model in a ``tf.function`` without
  (``keras``) and with XLA (``keras_xla``), with ``compute_dtype="mixed_bfloat16"``
  (``keras_bf16``), and the exported SavedModel's ``detect`` function
  (``saved_model``, ``saved_model_bf16``), all on the same preprocessed input;
- the time of one training step (``compute_losses`` + gradient + SGD apply in a
  ``tf.function``), reported per image;
- with ``--compare=torchvision``: torchvision's ``fasterrcnn_resnet50_fpn(weights=None,
  weights_backbone=None)`` on the same images, when torch is importable.

``--model=retinanet`` benchmarks ``fpn_tf.build_retinanet(preset="torchvision_v1")``
(R50, P3..P7, 91 classes; ``--config`` / ``--override`` apply on top) against
torchvision's ``retinanet_resnet50_fpn(weights=None, weights_backbone=None)`` the
same way: same images, same groups, same alternation.

Every configuration runs in its own process (``--isolate``, the default), so its
peak resident memory (``ru_maxrss``) is its own; the parent alternates the
configurations of a group repeat by repeat (rotating who goes first), so noise
from other work on the machine hits all of them alike. After ``--warmup`` calls
(plus the first, tracing / compiling call) each configuration is timed
``--repeats`` times; the table shows medians. FLOPs come from TF's op statistics
on the traced graph and from ``torch.utils.flop_counter`` (2 FLOPs per MAC).

The machine is recorded with the results: CPU model, the ISA features that decide
the kernels (avx2, avx512f, avx512_bf16, amx_bf16 / amx_tile from /proc/cpuinfo),
and the load average before and after. With ``--measure_peak`` (the default) a
separate process measures TensorFlow's float32 and bfloat16 matmul and conv
GFLOP/s (``bench/peak.py``) before the groups and once per repeat round inside each
group, so each configuration's GMAC/s is also reported as a fraction of the peak
measured under the same load (``of f32 peak``: the median of the group's
float32-conv samples; bfloat16 configurations also against the bfloat16 conv peak).
Results are printed as a table and written as JSON (``--output``).
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading

from absl import app, flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from bench import workloads  # noqa: E402
from bench.peak import summarise as summarise_peak  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum(
    "model", "faster_rcnn", ["faster_rcnn", "retinanet"], "the detector (and torchvision's counterpart)"
)
flags.DEFINE_list("tasks", ["inference", "train"], "inference and/or train")
flags.DEFINE_list("sizes", ["800x1333", "512x512"], "inference image sizes HxW (before padding)")
flags.DEFINE_list("batch_sizes", ["1", "4"], "inference batch sizes")
flags.DEFINE_list("train_sizes", ["800x1333"], "training image sizes HxW")
flags.DEFINE_list("train_batch_sizes", ["1", "2"], "training batch sizes")
flags.DEFINE_list(
    "impls",
    ["keras", "keras_xla", "keras_bf16", "saved_model"],
    f"fpn_tf inference variants: {workloads.TF_IMPLS}",
)
flags.DEFINE_list(
    "train_impls",
    ["keras", "keras_bf16"],
    "fpn_tf training variants: keras, keras_bf16 (compute_dtype=mixed_bfloat16), keras_xla",
)
flags.DEFINE_enum("compare", "", ["", "torchvision"], "also time this peer, alternating with fpn_tf")
flags.DEFINE_integer("repeats", 7, "timed calls per configuration (the median is reported)")
flags.DEFINE_integer("warmup", 1, "untimed calls after the first (tracing / compiling) call")
flags.DEFINE_bool("tiny", False, "a narrow model at 128 px, 1 repeat, no warm-up: the smoke test")
flags.DEFINE_string("config", None, "experiment YAML whose model section is benchmarked (default: defaults)")
flags.DEFINE_multi_string("override", [], "config overrides, e.g. --override=model.num_classes=81")
flags.DEFINE_bool("isolate", True, "one process per configuration (separate peak memory)")
flags.DEFINE_integer("intra_op_threads", 0, "threads per op (0: the cores this process may use)")
flags.DEFINE_integer("inter_op_threads", 1, "ops run concurrently (TF and torch)")
flags.DEFINE_bool("count_flops", True, "count FLOPs of each configuration")
flags.DEFINE_bool("measure_peak", True, "measure this machine's matmul / conv peak in the same run")
flags.DEFINE_string("output", "benchmark_results.json", "where the JSON results go")


@dataclasses.dataclass
class Group:
    task: str
    height: int
    width: int
    batch: int
    impls: list[str]

    @property
    def name(self) -> str:
        return f"{self.task} {self.height}x{self.width} b{self.batch}"


def tiny_model_config() -> dict:
    """A narrow ResNet-18 + FPN(d=32) for 128 px images (as tests/tiny.py)."""
    from fpn_tf.config import (
        AnchorConfig,
        BackboneConfig,
        FPNConfig,
        InputConfig,
        ModelConfig,
        RoIHeadConfig,
        RPNConfig,
        to_dict,
    )

    cfg = ModelConfig(
        num_classes=4,
        backbone=BackboneConfig(name="resnet18", width_multiplier=0.25),
        fpn=FPNConfig(num_channels=32),
        anchors=AnchorConfig(sizes=(8.0, 16.0, 32.0, 64.0, 128.0)),
        rpn=RPNConfig(
            pre_nms_topk_train=300, pre_nms_topk_test=200, post_nms_topk_train=200, post_nms_topk_test=100
        ),
        roi_head=RoIHeadConfig(batch_size_per_image=64, fc_dim=128, detections_per_image=20),
        input=InputConfig(min_size=128, max_size=128, max_gt_boxes=8),
    )
    return to_dict(cfg)


def tiny_retinanet_config() -> dict:
    """A narrow ResNet-18 + FPN(d=32) RetinaNet on P3..P7 for 128 px images (as tests/tiny_retinanet.py)."""
    from fpn_tf.config import ModelConfig, from_dict, to_dict

    values = {
        "type": "retinanet",
        "num_classes": 4,
        "backbone": {"name": "resnet18", "width_multiplier": 0.25},
        "fpn": {"num_channels": 32},
        "anchors": {"sizes": [12.0, 24.0, 48.0, 96.0, 192.0]},
        "retinanet": {"topk_candidates": 200, "detections_per_image": 20},
        "input": {"min_size": 128, "max_size": 128, "max_gt_boxes": 8},
    }
    return to_dict(from_dict(ModelConfig, values))


def model_config_for_flags() -> dict:
    """The benchmarked ModelConfig (a dict) of --model, --tiny, --config and --override."""
    from fpn_tf.config import load_config, to_dict

    if FLAGS.tiny:
        return tiny_retinanet_config() if FLAGS.model == "retinanet" else tiny_model_config()
    overrides = list(FLAGS.override)
    if FLAGS.model == "retinanet" and not FLAGS.config:
        overrides = ["model.type=retinanet", "model.preset=torchvision_v1"] + overrides
    cfg = load_config(FLAGS.config, overrides).model
    if cfg.type != FLAGS.model:
        raise app.UsageError(f"--model={FLAGS.model} but the config's model.type is {cfg.type!r}")
    return to_dict(cfg)


def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise app.UsageError(f"image size {text!r} must look like HEIGHTxWIDTH, e.g. 800x1333") from None
    if h < 32 or w < 32:
        raise app.UsageError(f"image size {text!r} is too small (at least 32x32)")
    return h, w


def parse_ints(values: list[str], name: str) -> list[int]:
    try:
        out = [int(v) for v in values]
    except ValueError:
        raise app.UsageError(f"--{name} must be integers, got {values}") from None
    if any(v < 1 for v in out):
        raise app.UsageError(f"--{name} must be positive, got {values}")
    return out


def build_groups(peer: str | None) -> list[Group]:
    for impl in FLAGS.impls:
        if impl not in workloads.TF_IMPLS:
            raise app.UsageError(f"--impls: unknown {impl!r}; valid: {', '.join(workloads.TF_IMPLS)}")
    for impl in FLAGS.train_impls:
        if impl not in ("keras", "keras_xla", "keras_bf16"):
            raise app.UsageError(f"--train_impls: unknown {impl!r}; valid: keras, keras_xla, keras_bf16")
    for task in FLAGS.tasks:
        if task not in ("inference", "train"):
            raise app.UsageError(f"--tasks: unknown {task!r}; valid: inference, train")
    peers = [peer] if peer else []
    groups = []
    if FLAGS.tiny:
        sizes, batches, train_sizes, train_batches = [(128, 128)], [1], [(128, 128)], [1]
    else:
        sizes = [parse_size(s) for s in FLAGS.sizes]
        train_sizes = [parse_size(s) for s in FLAGS.train_sizes]
        batches = parse_ints(FLAGS.batch_sizes, "batch_sizes")
        train_batches = parse_ints(FLAGS.train_batch_sizes, "train_batch_sizes")
    if "inference" in FLAGS.tasks:
        for h, w in sizes:
            for b in batches:
                groups.append(Group("inference", h, w, b, list(FLAGS.impls) + peers))
    if "train" in FLAGS.tasks:
        for h, w in train_sizes:
            for b in train_batches:
                groups.append(Group("train", h, w, b, list(FLAGS.train_impls) + peers))
    return groups


class Worker:
    """One configuration: a child process (``isolate``) or a thread, spoken to by pipe.

    torchvision always gets a process: importing torch into a process that already
    runs TensorFlow can crash (a segfault in triton's import).
    """

    def __init__(self, spec: dict, isolate: bool):
        import multiprocessing

        self.spec = spec
        if isolate or spec["impl"] == "torchvision":
            ctx = multiprocessing.get_context("spawn")
            self.conn, child = ctx.Pipe()
            self.proc = ctx.Process(target=workloads.worker_main, args=(child, spec), daemon=True)
        else:
            self.conn, child = multiprocessing.Pipe()
            self.proc = threading.Thread(target=workloads.worker_main, args=(child, spec), daemon=True)
        self.proc.start()

    def ask(self, *command) -> dict:
        self.conn.send(command)
        try:
            reply = self.conn.recv()
        except EOFError:
            reply = {"error": f"the worker process died (exit code {getattr(self.proc, 'exitcode', '?')})"}
        if "error" in reply:
            raise RuntimeError(f"{self.spec['impl']} ({self.spec['task']}): {reply['error']}")
        return reply

    def close(self) -> None:
        self.conn.close()  # a worker still waiting for a command sees EOF and ends
        self.proc.join(timeout=60)
        if isinstance(self.proc, threading.Thread):
            return
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


def base_spec(model_config: dict) -> dict:
    return {
        "model_config": model_config,
        "seed": 0,
        "intra_op_threads": FLAGS.intra_op_threads,
        "inter_op_threads": FLAGS.inter_op_threads,
        "count_flops": FLAGS.count_flops,
        "model": FLAGS.model,
    }


def export_models(impls: set[str], model_config: dict, export_base: str) -> dict[str, str]:
    """Exports the SavedModels the groups need, each from a fresh process."""
    paths = {}
    for impl in sorted(impls):
        dtype = "mixed_bfloat16" if impl == "saved_model_bf16" else "float32"
        print(f"exporting the {dtype} SavedModel ...", flush=True)
        worker = Worker({**base_spec(model_config), "impl": impl, "task": "inference"}, FLAGS.isolate)
        try:
            paths[impl] = worker.ask("export", model_config, dtype, export_base)["path"]
        finally:
            worker.close()
    return paths


def run_group(
    group: Group, model_config: dict, saved_models: dict[str, str], peak: Worker | None = None
) -> list[dict]:
    """Sets up every configuration of a group, then times them alternately.

    ``peak``: a peak-meter worker, asked once per repeat round (after the round's
    configurations), so the group's peak is measured under the group's load.
    """
    repeats = 1 if FLAGS.tiny else FLAGS.repeats
    warmup = 0 if FLAGS.tiny else FLAGS.warmup
    results, workers, peak_samples = [], [], []
    try:
        for impl in group.impls:
            spec = {
                **base_spec(model_config),
                "impl": impl,
                "task": group.task,
                "height": group.height,
                "width": group.width,
                "batch": group.batch,
                "saved_model_dir": saved_models.get(impl),
            }
            worker = Worker(spec, FLAGS.isolate)
            workers.append(worker)
            info = worker.ask("setup")
            print(f"  {impl:17s} ready in {info['setup_s']:.1f} s", flush=True)
            results.append({"impl": impl, **info, "times_s": [], "cpu_times_s": []})
        for _ in range(warmup):
            for worker in workers:
                worker.ask("run")
        n = len(workers)
        for r in range(repeats):
            for i in range(n):  # rotate who goes first, so no one always follows the same peer
                k = (r + i) % n
                reply = workers[k].ask("run")
                results[k]["times_s"].append(reply["seconds"])
                results[k]["cpu_times_s"].append(reply["cpu_seconds"])
            if peak is not None:
                peak_samples.append(peak.ask("peak")["rates"])
        for worker, result in zip(workers, results):
            result.update(worker.ask("finish"))
    finally:
        for worker in workers:
            worker.close()
    for result in results:
        times = result["times_s"]
        result.update(
            task=group.task,
            height=group.height,
            width=group.width,
            batch=group.batch,
            model=FLAGS.model,
            median_s=statistics.median(times),
            min_s=min(times),
            median_cpu_s=statistics.median(result["cpu_times_s"]),
            per_image_s=statistics.median(times) / group.batch,
            isolated=FLAGS.isolate,
        )
    # The SavedModels run the Keras model's math: take its FLOPs where counted.
    keras_flops = {
        r["compute_dtype"]: r["flops"] for r in results if r["impl"].startswith("keras") and r["flops"]
    }
    peer = next((r for r in results if r["impl"] == "torchvision"), None)
    for result in results:
        if result["flops"] is None and result["impl"].startswith("saved_model"):
            result["flops"] = keras_flops.get(result["compute_dtype"]) or keras_flops.get("float32")
        result["gflops_per_s"] = result["flops"] / result["median_s"] / 1e9 if result["flops"] else None
        result["vs_torchvision"] = result["median_s"] / peer["median_s"] if peer else None
        result["rss_vs_torchvision"] = result["peak_rss_mb"] / peer["peak_rss_mb"] if peer else None
        add_peak_fractions(result, peak_samples)
    return results


def add_peak_fractions(result: dict, peak_samples: list[dict]) -> None:
    """GMAC/s, the group's measured peaks and the fractions of them (None without)."""
    rate = result["gflops_per_s"]
    result["gmacs_per_s"] = rate / 2 if rate else None
    result["peak_gflops_samples"] = peak_samples
    group_peak = (
        {key: statistics.median(s[key] for s in peak_samples) for key in peak_samples[0]}
        if peak_samples
        else {}
    )
    result["group_peak_gflops"] = group_peak or None
    f32, bf16 = group_peak.get("float32_conv"), group_peak.get("bfloat16_conv")
    result["of_f32_conv_peak"] = rate / f32 if rate and f32 else None
    result["of_bf16_conv_peak"] = rate / bf16 if rate and bf16 else None


ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def machine_info() -> dict:
    cpu, flags_seen = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags_seen = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    memory_gb = None
    try:
        memory_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    versions = {}
    for package in ("tensorflow-cpu", "tensorflow", "keras", "torch", "torchvision"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "isa": sorted(f for f in ISA_FLAGS if f in flags_seen),
        "memory_gb": memory_gb,
        "python": platform.python_version(),
        "versions": versions,
    }


def format_table(results: list[dict]) -> str:
    header = (
        f"{'group':28s} {'impl':17s} {'median s':>9s} {'s/image':>8s} {'min s':>8s} {'cpu s':>7s} "
        f"{'vs tv':>6s} {'GFLOP':>8s} {'GFLOP/s':>8s} {'GMAC/s':>7s} {'f32 pk':>6s} {'peak MB':>8s} "
        f"{'mem vs tv':>9s}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        group = f"{r['task']} {r['height']}x{r['width']} b{r['batch']}"

        def fmt(value, spec):
            return format(value, spec) if value is not None else "-"

        lines.append(
            f"{group:28s} {r['impl']:17s} {r['median_s']:9.3f} {r['per_image_s']:8.3f} {r['min_s']:8.3f} "
            f"{r['median_cpu_s']:7.2f} "
            f"{fmt(r['vs_torchvision'], '6.2f'):>6s} {fmt(r['flops'] and r['flops'] / 1e9, '8.1f'):>8s} "
            f"{fmt(r['gflops_per_s'], '8.1f'):>8s} {fmt(r.get('gmacs_per_s'), '7.1f'):>7s} "
            f"{fmt(r.get('of_f32_conv_peak'), '6.0%'):>6s} {r['peak_rss_mb']:8.0f} "
            f"{fmt(r['rss_vs_torchvision'], '9.2f'):>9s}"
        )
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    model_config = model_config_for_flags()
    peer = FLAGS.compare or None
    if peer == "torchvision" and not (
        importlib.util.find_spec("torch") and importlib.util.find_spec("torchvision")
    ):
        print("torch / torchvision are not importable: --compare=torchvision is skipped", flush=True)
        peer = None
    groups = build_groups(peer)
    started = datetime.datetime.now(datetime.timezone.utc)
    meta = {
        "date_utc": started.isoformat(timespec="seconds"),
        "command": " ".join([os.path.relpath(sys.argv[0], _ROOT)] + sys.argv[1:]),
        "model": FLAGS.model,
        "machine": machine_info(),
        "load_average_before": list(os.getloadavg()),
        "repeats": 1 if FLAGS.tiny else FLAGS.repeats,
        "warmup": 0 if FLAGS.tiny else FLAGS.warmup,
        "isolated_processes": FLAGS.isolate,
        "intra_op_threads": FLAGS.intra_op_threads or len(os.sched_getaffinity(0)),
        "inter_op_threads": FLAGS.inter_op_threads,
        "model_config": model_config,
    }
    machine = meta["machine"]
    print(
        f"model {FLAGS.model}; {machine['cpu']}, {machine['cores']} cores, "
        f"ISA {' '.join(machine['isa']) or '-'}; "
        f"load average {meta['load_average_before'][0]:.2f}",
        flush=True,
    )
    results, errors = [], []
    export_base = tempfile.mkdtemp(prefix="fpn_tf_bench_")
    peak = None
    if FLAGS.measure_peak:
        peak = Worker({**base_spec(model_config), "impl": "peak", "task": "peak"}, FLAGS.isolate)
        meta["peak_gflops_start"] = [peak.ask("peak")["rates"] for _ in range(2)]
        print(
            "measured peak GFLOP/s: "
            + ", ".join(f"{k} {v:.0f}" for k, v in summarise_peak(meta["peak_gflops_start"]).items()),
            flush=True,
        )
    try:
        needed = {impl for g in groups for impl in g.impls if impl.startswith("saved_model")}
        try:
            saved_models = export_models(needed, model_config, export_base)
        except RuntimeError as e:
            errors.append(str(e))
            print(f"export failed, the SavedModel rows are skipped:\n{e}", file=sys.stderr, flush=True)
            saved_models = {}
            for g in groups:
                g.impls = [i for i in g.impls if not i.startswith("saved_model")]
        for group in groups:
            print(f"{group.name}: {', '.join(group.impls)}", flush=True)
            try:
                group_results = run_group(group, model_config, saved_models, peak)
                results.extend(group_results)
                print(format_table(group_results), flush=True)
            except RuntimeError as e:
                errors.append(f"{group.name}: {e}")
                print(f"{group.name} failed:\n{e}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(export_base, ignore_errors=True)
        if peak is not None:
            peak.close()
    # Every row of a group carries the group's samples: duplicates do not change a max.
    samples = meta.get("peak_gflops_start", []) + [
        s for r in results for s in r.get("peak_gflops_samples") or []
    ]
    meta["peak_gflops"] = summarise_peak(samples) if samples else None
    meta["load_average_after"] = list(os.getloadavg())
    meta["wall_s"] = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
    if results:
        print("\nall groups:\n" + format_table(results))
    before, after = meta["load_average_before"][0], meta["load_average_after"][0]
    if meta["peak_gflops"]:
        print(
            "best measured peak GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in meta["peak_gflops"].items())
        )
    print(
        f"\nload average before {before:.2f}, after {after:.2f}; {machine['cores']} cores, {machine['cpu']}"
    )
    out_dir = os.path.dirname(os.path.abspath(FLAGS.output))
    os.makedirs(out_dir, exist_ok=True)
    with open(FLAGS.output, "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "results": results, "errors": errors}, f, indent=1)
    print(f"results written to {FLAGS.output}")
    if errors:
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
