"""Markdown tables from the JSON of ``bench/benchmark.py`` and ``bench/profile_parts.py``.

    python bench/report.py bench/results/benchmark.json [--profile=bench/results/profile_parts_800x1333.json]

Prints the machine (CPU, ISA, measured peaks, load), the results table (with
GMAC/s and the fraction of the float32 conv peak measured in the same run), the
floors of issue 17 checked against the torchvision rows and the peak of the
same run, and (with ``--profile``) the per-part table; this is how
docs/benchmarks.md is made.
"""

from __future__ import annotations

import json

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("profile", None, "profile_parts.py JSON to render as well")

_HD = (800, 1333)
# (description, task, size, batch, impl, key, bound, "max" | "min"): issue 17's floors
# (issue 6's were 0.8×, 0.5×, 0.47×, 0.47× and inference RSS ≤ 1×).
FLOORS = (
    (
        "float32 inference 800×1333 b1 vs torchvision",
        "inference",
        _HD,
        1,
        "keras",
        "vs_torchvision",
        0.6,
        "max",
    ),
    (
        "bfloat16 inference 800×1333 b1 vs torchvision",
        "inference",
        _HD,
        1,
        "keras_bf16",
        "vs_torchvision",
        0.25,
        "max",
    ),
    (
        "float32 training per image, b2, vs torchvision",
        "train",
        _HD,
        2,
        "keras",
        "vs_torchvision",
        0.4,
        "max",
    ),
    (
        "peak training RSS b2, float32, vs torchvision",
        "train",
        _HD,
        2,
        "keras",
        "rss_vs_torchvision",
        0.9,
        "max",
    ),
    (
        "peak training RSS b2, bfloat16, vs torchvision",
        "train",
        _HD,
        2,
        "keras_bf16",
        "rss_vs_torchvision",
        0.9,
        "max",
    ),
    (
        "float32 inference 800×1333 b1, of the f32 conv peak",
        "inference",
        _HD,
        1,
        "keras",
        "of_f32_conv_peak",
        0.5,
        "min",
    ),
)


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def results_table(results: list[dict]) -> str:
    lines = [
        "| task | image | batch | impl | median s | s / image | CPU s | vs torchvision | GFLOP | GMAC/s "
        "| of f32 conv peak | peak RSS MB | RSS vs torchvision |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['task']} | {r['height']}×{r['width']} | {r['batch']} | {r['impl']} | {r['median_s']:.3f} "
            f"| {r['per_image_s']:.3f} | {r['median_cpu_s']:.2f} | {_fmt(r['vs_torchvision'], '.2f')} "
            f"| {_fmt(r['flops'] and r['flops'] / 1e9, '.0f')} | {_fmt(r.get('gmacs_per_s'), '.0f')} "
            f"| {_fmt(r.get('of_f32_conv_peak'), '.0%')} "
            f"| {r['peak_rss_mb']:.0f} | {_fmt(r['rss_vs_torchvision'], '.2f')} |"
        )
    return "\n".join(lines)


def floors_table(results: list[dict]) -> str:
    rows = {(r["task"], (r["height"], r["width"]), r["batch"], r["impl"]): r for r in results}
    lines = ["| floor | measured | required | met |", "|---|---:|---:|---|"]
    for text, task, size, batch, impl, key, bound, sense in FLOORS:
        r = rows.get((task, size, batch, impl))
        if r is None or r.get(key) is None:
            lines.append(f"| {text} | not measured | {'≤' if sense == 'max' else '≥'} {bound} | – |")
            continue
        ok = r[key] <= bound if sense == "max" else r[key] >= bound
        value, need = (
            (f"{r[key]:.2f}×", f"≤ {bound}×") if sense == "max" else (f"{r[key]:.0%}", f"≥ {bound:.0%}")
        )
        lines.append(f"| {text} | {value} | {need} | {'yes' if ok else '**no**'} |")
    return "\n".join(lines)


def profile_table(profile: dict) -> str:
    lines = [
        "| part | GFLOP | float32 s | GFLOP/s | float32 + XLA s | bfloat16 s | GFLOP/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def row(name: str, g: float, f32: float, xla: float, bf16: float) -> str:
        return f"| {name} | {g:.1f} | {f32:.3f} | {g / f32:.0f} | {xla:.3f} | {bf16:.3f} | {g / bf16:.0f} |"

    keys = ("gflop", "f32_graph_median_s", "f32_xla_median_s", "bf16_graph_median_s")
    # profile_parts.py writes the whole model as a last row (older files do not have it)
    parts = [p for p in profile["parts"] if not p["part"].startswith("whole model")]
    wholes = [p for p in profile["parts"] if p["part"].startswith("whole model")]
    for p in parts:
        lines.append(row(p["part"], *(p[k] for k in keys)))
    lines.append(row("**sum of parts**", *(sum(p[k] for p in parts) for k in keys)))
    for p in wholes:
        lines.append(row(f"**{p['part']}**", *(p[k] for k in keys)))
    return "\n".join(lines)


def main(argv):
    if len(argv) != 2:
        raise app.UsageError("usage: report.py RESULTS.json [--profile=PROFILE.json]")
    with open(argv[1], encoding="utf-8") as f:
        report = json.load(f)
    meta = report["meta"]
    machine = meta["machine"]
    model = meta.get("model", "faster_rcnn")
    print(f"Run of {meta['date_utc']}: `{meta['command']}` (model {model})")
    print(
        f"Machine: {machine['cpu']}, {machine['cores']} cores, ISA {', '.join(machine['isa'])}, "
        f"{machine['memory_gb']} GB; {', '.join(f'{k} {v}' for k, v in machine['versions'].items())}."
    )
    if meta.get("peak_gflops"):
        peaks = ", ".join(f"{k} {v:.0f}" for k, v in meta["peak_gflops"].items())
        print(f"Best measured peak in this run (bench/peak.py, GFLOP/s): {peaks}.")
    print(
        f"Load average (1 min) before {meta['load_average_before'][0]:.2f}, after "
        f"{meta['load_average_after'][0]:.2f}; {meta['repeats']} repeats after {meta['warmup']} warm-up; "
        f"{meta['wall_s'] / 60:.0f} min.\n"
    )
    print(results_table(report["results"]))
    if model == "faster_rcnn":  # the floors are Faster R-CNN's
        print()
        print(floors_table(report["results"]))
    if report.get("errors"):
        print("\nErrors:\n" + "\n".join(report["errors"]))
    if FLAGS.profile:
        with open(FLAGS.profile, encoding="utf-8") as f:
            profile = json.load(f)
        h, w = profile["size"]
        print(
            f"\nPer part, {h}×{w}, batch {profile['batch']}, median of {profile['repeats']} "
            f"(load {profile['load_average_before']:.2f} → {profile['load_average_after']:.2f}):\n"
        )
        print(profile_table(profile))


if __name__ == "__main__":
    app.run(main)
