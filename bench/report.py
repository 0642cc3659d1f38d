"""Markdown tables from the JSON of ``bench/benchmark.py`` and ``bench/profile_parts.py``.

    python bench/report.py bench/results/benchmark.json [--profile=bench/results/profile_parts_800x1333.json]

Prints the results table, the floors of issue 6 checked against the torchvision
rows of the same run, and (with ``--profile``) the per-part table; this is how
docs/benchmarks.md is made.
"""

from __future__ import annotations

import json

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("profile", None, "profile_parts.py JSON to render as well")

# (description, task, size, batch, impl, ratio key, floor): issue 6's floors.
FLOORS = (
    ("float32 inference 800x1333, batch 1", "inference", (800, 1333), 1, "keras", "vs_torchvision", 0.8),
    (
        "bfloat16 inference 800x1333, batch 1",
        "inference",
        (800, 1333),
        1,
        "keras_bf16",
        "vs_torchvision",
        0.5,
    ),
    ("float32 training step per image, batch 2", "train", (800, 1333), 2, "keras", "vs_torchvision", 0.47),
    (
        "bfloat16 training step per image, batch 2",
        "train",
        (800, 1333),
        2,
        "keras_bf16",
        "vs_torchvision",
        0.47,
    ),
)


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def results_table(results: list[dict]) -> str:
    lines = [
        "| task | image | batch | impl | median s | s / image | CPU s | vs torchvision | GFLOP | GFLOP/s "
        "| peak RSS MB | RSS vs torchvision |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['task']} | {r['height']}×{r['width']} | {r['batch']} | {r['impl']} | {r['median_s']:.3f} "
            f"| {r['per_image_s']:.3f} | {r['median_cpu_s']:.2f} | {_fmt(r['vs_torchvision'], '.2f')} "
            f"| {_fmt(r['flops'] and r['flops'] / 1e9, '.0f')} | {_fmt(r['gflops_per_s'], '.0f')} "
            f"| {r['peak_rss_mb']:.0f} | {_fmt(r['rss_vs_torchvision'], '.2f')} |"
        )
    return "\n".join(lines)


def floors_table(results: list[dict]) -> str:
    rows = {(r["task"], (r["height"], r["width"]), r["batch"], r["impl"]): r for r in results}
    lines = ["| floor | measured | required | met |", "|---|---:|---:|---|"]
    for text, task, size, batch, impl, key, floor in FLOORS:
        r = rows.get((task, size, batch, impl))
        if r is None or r.get(key) is None:
            continue
        lines.append(
            f"| {text} vs torchvision | {r[key]:.2f}× | ≤ {floor}× | {'yes' if r[key] <= floor else 'no'} |"
        )
    inference = [r for r in results if r["task"] == "inference" and r.get("rss_vs_torchvision") is not None]
    for r in inference:
        if r["impl"] == "torchvision":
            continue
        ok = r["rss_vs_torchvision"] <= 1.0
        lines.append(
            f"| peak inference RSS, {r['impl']}, {r['height']}×{r['width']} b{r['batch']} | "
            f"{r['rss_vs_torchvision']:.2f}× | ≤ 1× | {'yes' if ok else 'no'} |"
        )
    return "\n".join(lines)


def profile_table(profile: dict) -> str:
    lines = [
        "| part | GFLOP | float32 s | GFLOP/s | float32 + XLA s | bfloat16 s | GFLOP/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    totals = [0.0, 0.0, 0.0, 0.0]
    for p in profile["parts"]:
        f32, xla, bf16 = p["f32_graph_median_s"], p["f32_xla_median_s"], p["bf16_graph_median_s"]
        for i, v in enumerate((p["gflop"], f32, xla, bf16)):
            totals[i] += v
        lines.append(
            f"| {p['part']} | {p['gflop']:.1f} | {f32:.3f} | {p['gflop'] / f32:.0f} | {xla:.3f} | {bf16:.3f} "
            f"| {p['gflop'] / bf16:.0f} |"
        )
    g, f32, xla, bf16 = totals
    lines.append(
        f"| **sum** | {g:.1f} | {f32:.3f} | {g / f32:.0f} | {xla:.3f} | {bf16:.3f} | {g / bf16:.0f} |"
    )
    return "\n".join(lines)


def main(argv):
    if len(argv) != 2:
        raise app.UsageError("usage: report.py RESULTS.json [--profile=PROFILE.json]")
    with open(argv[1], encoding="utf-8") as f:
        report = json.load(f)
    meta = report["meta"]
    machine = meta["machine"]
    print(f"Run of {meta['date_utc']}: `{meta['command']}`")
    print(
        f"Machine: {machine['cpu']}, {machine['cores']} cores, ISA {', '.join(machine['isa'])}, "
        f"{machine['memory_gb']} GB; {', '.join(f'{k} {v}' for k, v in machine['versions'].items())}."
    )
    print(
        f"Load average (1 min) before {meta['load_average_before'][0]:.2f}, after "
        f"{meta['load_average_after'][0]:.2f}; {meta['repeats']} repeats after {meta['warmup']} warm-up; "
        f"{meta['wall_s'] / 60:.0f} min.\n"
    )
    print(results_table(report["results"]))
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
