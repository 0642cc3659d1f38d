"""Reproduces the FPN paper's Table 6 (segmentation proposals, §6) at CPU scale.

    python scripts/segment_proposals_table.py --config configs/segment_proposals_cpu.yaml \
        --out_dir runs/segment_proposals
    python scripts/segment_proposals_table.py --tiny --out_dir /tmp/seg --doc /tmp/s.md --chart /tmp/s.png

Every row trains with the real trainer (``fpn_tf.training.experiment.train``)
from the same config, data, steps and seed and is evaluated by
``fpn_tf.evaluation.evaluate`` (class-agnostic segment AR@10/100/1000 and
AR_s/m/l@1000, pycocotools ``iouType="segm"``; time = the model call per image,
excluding the COCO conversion). Only what the paper's row changes differs:

* single MLP [5×5], single MLP [7×7], dual MLP [5×5, 7×7], dual + 28×28 masks;
* the image-pyramid baseline (DeepMask / SharpMask's protocol): one map (C4,
  stride 16, no pyramid) with one 5×5 MLP whose canonical scale is the FPN's P4
  scale, run over the image scales 2^{-2:0.5:1} at inference and merged to the
  top 1000; trained on the batch resized by those scales in turn, with objects
  more than a quarter octave from the canonical scale as negatives.

Results are kept in ``<out_dir>/results.json`` (a finished row is skipped when
run again); the table, beside the paper's, goes into ``--doc`` between the markers
``<!-- segtable:begin -->`` / ``<!-- segtable:end -->`` and a Pillow bar chart of
AR and AR_s into ``--chart``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # doc_markers, also when loaded by path

from doc_markers import write_between_markers  # noqa: E402

from fpn_tf.config import ExperimentConfig, load_config, to_dict  # noqa: E402

BEGIN, END = "<!-- segtable:begin -->", "<!-- segtable:end -->"
PYRAMID_SCALES = tuple(2.0 ** (e / 2.0) for e in range(-4, 3))  # 2^{-2:0.5:1}
TINY_OVERRIDES = (
    "data.synthetic_num_train=8",
    "data.synthetic_num_eval=4",
    "train.train_steps=2",
    "train.batch_size=2",
    "model.segment.hidden_dim=8",
    "model.segment.proposals_per_image=50",
)


@dataclasses.dataclass(frozen=True)
class Row:
    key: str
    name: str
    paper: tuple[float, float, float, float, float]  # AR, AR_s, AR_m, AR_l, time (s)
    segment: dict
    pyramid: bool = False


ROWS = (
    Row("pyramid", "image pyramid (DeepMask-style)", (37.1, 15.8, 50.1, 54.9, 0.49), {}, pyramid=True),
    Row("mlp5", "single MLP [5×5]", (43.4, 32.5, 49.2, 53.7, 0.15), {"mlps": (5,)}),
    Row("mlp7", "single MLP [7×7]", (43.5, 30.0, 49.6, 57.8, 0.19), {"mlps": (7,)}),
    Row("dual", "dual MLP [5×5, 7×7]", (45.7, 31.9, 51.5, 60.8, 0.24), {"mlps": (5, 7)}),
    Row("dual28", "+ 2x mask resolution", (46.7, 31.7, 53.1, 63.2, 0.25), {"mlps": (5, 7), "mask_size": 28}),
)
METRICS = ("AR@1000", "ARs@1000", "ARm@1000", "ARl@1000")


def row_config(base: ExperimentConfig, row: Row) -> ExperimentConfig:
    """``base`` with only what ``row`` changes."""
    model = base.model
    segment = dataclasses.replace(model.segment, **row.segment)
    if row.pyramid:
        segment = dataclasses.replace(
            segment, mlps=(5,), levels=(4,), image_pyramid=PYRAMID_SCALES, max_scale_distance=0.25
        )
        model = dataclasses.replace(model, fpn=dataclasses.replace(model.fpn, variant="c4"))
    return dataclasses.replace(base, model=dataclasses.replace(model, segment=segment))


def config_digest(config: ExperimentConfig) -> str:
    text = json.dumps(to_dict(config), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def run_row(config: ExperimentConfig, model_dir: str) -> dict:
    """Trains one row into ``model_dir`` and evaluates it; returns its result record."""
    import keras

    from fpn_tf.evaluation.evaluate import evaluate
    from fpn_tf.training.experiment import train

    keras.backend.clear_session()
    start = time.perf_counter()
    result = train(config, model_dir, xla=False)
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    metrics = evaluate(config, model_dir=model_dir)
    keras.backend.clear_session()
    return {
        "config_digest": config_digest(config),
        "metrics": {k: float(v) for k, v in metrics.items()},
        "steps": int(result.step),
        "final_losses": result.losses,
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(time.perf_counter() - start, 1),
    }


def _pct(value) -> str:
    if value is None:
        return "–"
    return "n/a" if value < 0 else f"{100.0 * value:.1f}"


def table_markdown(results: dict) -> str:
    lines = [
        "| row | AR | AR_s | AR_m | AR_l | time (s) | paper AR | AR_s | AR_m | AR_l | time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in ROWS:
        rec = results.get(row.key)
        m = rec["metrics"] if rec else {}
        ours = [_pct(m.get(k)) for k in METRICS]
        t = f"{m['model_seconds_per_image']:.3f}" if "model_seconds_per_image" in m else "–"
        paper = [f"{v:.1f}" for v in row.paper[:4]] + [f"{row.paper[4]:.2f}"]
        lines.append(f"| {row.name} | {' | '.join(ours)} | {t} | {' | '.join(paper)} |")
    return "\n".join(lines)


def checks(results: dict) -> list[tuple[str, bool | None]]:
    def get(key, metric):
        rec = results.get(key)
        return rec["metrics"].get(metric) if rec else None

    out = []
    dual = get("dual", "AR@1000")
    for single in ("mlp5", "mlp7"):
        s = get(single, "AR@1000")
        out.append((f"dual MLP AR ≥ {single} AR", None if None in (dual, s) else dual >= s))
    for key in ("mlp5", "mlp7", "dual", "dual28"):
        a, b = get(key, "ARs@1000"), get("pyramid", "ARs@1000")
        out.append((f"{key} AR_s > image pyramid AR_s", None if None in (a, b) else a > b))
        a, b = get(key, "model_seconds_per_image"), get("pyramid", "model_seconds_per_image")
        out.append((f"{key} faster per image than the image pyramid", None if None in (a, b) else a < b))
    return out


def results_markdown(results: dict, config: ExperimentConfig, run: dict, chart: str) -> str:
    m = config.model
    check_lines = [f"- {'✓' if ok else ('✗' if ok is False else '–')} {text}" for text, ok in checks(results)]
    extra = [
        "- AR@10 / AR@100 of each row: "
        + ", ".join(
            f"{k} {_pct(results[k]['metrics'].get('AR@10'))} / {_pct(results[k]['metrics'].get('AR@100'))}"
            for k in (r.key for r in ROWS)
            if k in results
        )
    ]
    return "\n".join(
        [
            BEGIN,
            f"Generated {run['date']} by `{run['command']}` in {run['minutes']:.1f} min on {run['machine']}.",
            "",
            f"Setting: {config.data.synthetic_num_train} training / {config.data.synthetic_num_eval} eval "
            f"synthetic {config.data.synthetic_image_size}-px images, {config.train.train_steps} steps of "
            f"{config.train.batch_size} images, {m.backbone.name} × {m.backbone.width_multiplier} from "
            f"scratch, d = {m.fpn.num_channels}, MLP width {m.segment.hidden_dim}, canonical scales "
            f"{list(m.segment.scales)} on P2..P6, {m.segment.proposals_per_image} proposals per image. "
            "AR is segment AR@1000 (pycocotools `segm`, class-agnostic, IoU .50:.95), in percent; "
            "time is the model call per image on this CPU (batch "
            f"{config.eval.batch_size}, COCO conversion excluded). Paper: ResNet-50, COCO, M40 GPU.",
            "",
            table_markdown(results),
            "",
            *check_lines,
            *extra,
            "",
            f"![Table 6 at CPU scale]({chart})",
            END,
        ]
    )


DOC_TEMPLATE = """# Segmentation proposals (paper §6, Table 6) at CPU scale

Made by `scripts/segment_proposals_table.py`; everything between the markers below is rewritten by it.

{generated}
"""


def write_doc(path: str, generated: str) -> None:
    """Replaces the text between the markers in ``path`` (or writes a new document)."""
    write_between_markers(path, generated, BEGIN, END, DOC_TEMPLATE)


def draw_chart(results: dict, path: str, width: int = 900, height: int = 420) -> None:
    """Pillow bars: AR and AR_s per row, this run (blue) beside the paper (grey)."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=12)
    panels = [("AR@1000", "AR@1000", 0), ("AR_s@1000", "ARs@1000", 1)]
    margin, gap, top, bottom = 40, 30, 50, height - 60
    panel_w = (width - 2 * margin - gap) / 2
    for p, (title, metric, index) in enumerate(panels):
        x0 = margin + p * (panel_w + gap)
        draw.text((x0, 15), f"{title}: this run (blue) vs paper (grey)", fill=(0, 0, 0), font=font)
        draw.line([(x0, bottom), (x0 + panel_w, bottom)], fill=(0, 0, 0))
        slot = panel_w / len(ROWS)
        for i, row in enumerate(ROWS):
            rec = results.get(row.key)
            run = rec["metrics"].get(metric) if rec else None
            values = ((None if run is None or run < 0 else 100 * run), row.paper[index])
            cx = x0 + slot * (i + 0.5)
            for value, left, fill in (
                (values[0], cx - slot * 0.35, (31, 90, 160)),
                (values[1], cx, (190,) * 3),
            ):
                if value is None:
                    continue
                y = bottom - (bottom - top) * value / 100.0
                draw.rectangle([left, y, left + slot * 0.35 - 1, bottom], fill=fill)
                draw.text((left, y - 14), f"{value:.0f}", fill=(0, 0, 0), font=font)
            draw.text((cx - slot * 0.45, bottom + 8), row.key, fill=(0, 0, 0), font=font)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.save(path, format="PNG")


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/segment_proposals_cpu.yaml")
    parser.add_argument("--out_dir", default="runs/segment_proposals")
    parser.add_argument("--rows", default="", help="only these row keys, e.g. dual,pyramid")
    parser.add_argument("--override", action="append", default=[], help="config key.path=value")
    parser.add_argument("--tiny", action="store_true", help="a few steps on a few images (tests)")
    parser.add_argument("--doc", default="docs/segment_proposals.md")
    parser.add_argument("--chart", default="docs/segment_proposals.png")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    from absl import logging

    logging.set_verbosity(logging.INFO)
    overrides = list(TINY_OVERRIDES) if args.tiny else []
    data_root = os.path.join(args.out_dir, "data")
    overrides += [f"data.train_dir={data_root}/train", f"data.eval_dir={data_root}/eval"]
    base = load_config(args.config, overrides + list(args.override))
    os.makedirs(args.out_dir, exist_ok=True)
    results_path = os.path.join(args.out_dir, "results.json")
    results = {}
    if os.path.isfile(results_path):
        with open(results_path, encoding="utf-8") as f:
            results = json.load(f)
    started = time.perf_counter()
    wanted = set(filter(None, args.rows.split(",")))
    for row in ROWS:
        if wanted and row.key not in wanted:
            continue
        config = row_config(base, row)
        done = results.get(row.key)
        if done and done.get("config_digest") == config_digest(config):
            print(f"[segtable] {row.key}: done before, skipped", flush=True)
            continue
        print(f"[segtable] {row.key}: training", flush=True)
        results[row.key] = run_row(config, os.path.join(args.out_dir, row.key))
        print(f"[segtable] {row.key}: {results[row.key]['metrics']}", flush=True)
        with open(results_path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2, sort_keys=True)
        os.replace(results_path + ".tmp", results_path)
    run_path = os.path.join(args.out_dir, "run.json")
    run = {
        "command": "python scripts/segment_proposals_table.py " + shlex.join(argv),
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "minutes": (time.perf_counter() - started) / 60.0,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
    }
    if os.path.isfile(run_path) and run["minutes"] < 0.5:  # nothing trained: keep the original run's
        with open(run_path, encoding="utf-8") as f:
            run = json.load(f)
    else:
        with open(run_path, "w", encoding="utf-8") as f:
            json.dump(run, f, indent=2)
    chart = os.path.basename(args.chart) if args.chart else ""
    if args.chart:
        draw_chart(results, args.chart)
    if args.doc:
        write_doc(args.doc, results_markdown(results, base, run, chart))
    print(table_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
