"""Reproduces the FPN paper's ablations at CPU scale: Table 1 (RPN) and Table 3 (Faster R-CNN).

    python scripts/ablate.py --config configs/ablation.yaml --out_dir runs/ablation
    python scripts/ablate.py --tiny --out_dir /tmp/ablate_tiny --doc /tmp/a.md --chart /tmp/a.png

Every row trains from the same config, data, step budget and seed; only what the
paper's row changes differs (``ROWS``):

* Table 1 (``model.type: rpn``): (a) C4 and (b) C5 single-scale RPNs (all anchor
  sizes on the one map, the raw C4/C5 channels), (c) FPN, (d) bottom-up pyramid
  (no top-down), (e) top-down pyramid without lateral connections, (f) P2 only.
  Reports AR@100, AR@1000 and AR_s/m/l@1000 and the anchor count per image.
* Table 3 (Faster R-CNN, RPN and head on the same features): (a) C4 with the
  conv5 head (RoIAlign 14×14 from C4, res5 with stride 2, global average pool),
  (b) C5 with the 2-fc head, (c) FPN. Reports AP, AP50, AP_s/m/l.

Each row trains into ``<out_dir>/<row key>`` and its result is kept in
``<out_dir>/results.json``: running the same command again skips finished rows
(and a half-trained row resumes from its checkpoint). At the end the tables (with
the paper's numbers beside them), the command, date and run time are written into
``--doc`` between the markers ``<!-- ablate:begin -->`` / ``<!-- ablate:end -->``
(text outside them is kept), and a Pillow bar chart of AR_s / AP_s to ``--chart``.

Running a finished command again trains nothing and rewrites the report from
``results.json`` with the original run's command, date and time (``run.json``).

``--tiny`` shrinks everything (a 128-px dataset of a few images, a quarter-width
ResNet-18, 2 steps per row) so the whole script runs in a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # doc_markers, also when loaded by path

from doc_markers import write_between_markers  # noqa: E402

from fpn_tf.config import ExperimentConfig, ModelConfig, load_config, to_dict  # noqa: E402

BEGIN, END = "<!-- ablate:begin -->", "<!-- ablate:end -->"
CONV5_POOLER_RESOLUTION = 14  # He et al.'s C4 baseline pools 14×14 RoIs (FPN §5.2.1)
# The image size at which the paper's anchor counts come out (47k, 12k, 200k, 750k).
PAPER_IMAGE_HW = (800, 1000)
TINY_OVERRIDES = (
    "model.backbone.width_multiplier=0.25",
    "model.fpn.num_channels=16",
    "model.anchors.sizes=[8,16,32,64,128]",
    "model.rpn.batch_size_per_image=32",
    "model.rpn.pre_nms_topk_train=200",
    "model.rpn.post_nms_topk_train=100",
    "model.rpn.pre_nms_topk_test=200",
    "model.rpn.post_nms_topk_test=100",
    "model.roi_head.batch_size_per_image=16",
    "model.roi_head.fc_dim=32",
    "model.roi_head.detections_per_image=20",
    "model.roi_head.canonical_size=56",
    "model.input.min_size=128",
    "model.input.max_size=128",
    "data.synthetic_num_train=6",
    "data.synthetic_num_eval=4",
    "data.synthetic_image_size=128",
    "train.batch_size=2",
    "train.train_steps=2",
    "train.warmup_steps=1",
    "train.log_every=1",
    "train.checkpoint_every=100",
    "eval.batch_size=2",
)


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the paper's Table 1 or 3 and the settings that make it."""

    table: int  # 1 (RPN) or 3 (Faster R-CNN)
    row: str  # "a".."f", the paper's row letter
    name: str  # the paper's row label
    feature: str  # the maps the heads sit on, as the paper prints them
    variant: str  # FPNConfig.variant
    lateral: bool
    top_down: bool
    short: str  # label in the chart
    head: str = ""  # Table 3: RoIHeadConfig.head

    @property
    def key(self) -> str:
        return f"t{self.table}{self.row}_{self.variant}" + (f"_{self.head}" if self.head else "")


ROWS = (
    Row(1, "a", "baseline on conv4", "C4", "c4", False, False, "C4"),
    Row(1, "b", "baseline on conv5", "C5", "c5", False, False, "C5"),
    Row(1, "c", "FPN", "{P_k}", "fpn", True, True, "FPN"),
    Row(1, "d", "bottom-up pyramid", "{P_k}", "bottom_up", True, False, "bottom-up"),
    Row(1, "e", "top-down pyramid, w/o lateral", "{P_k}", "no_lateral", False, True, "no lateral"),
    Row(1, "f", "only finest level", "P2", "p2_only", True, True, "P2 only"),
    Row(3, "a", "baseline on conv4", "C4", "c4", False, False, "C4 conv5", head="conv5"),
    Row(3, "b", "baseline on conv5", "C5", "c5", False, False, "C5 2fc", head="2fc"),
    Row(3, "c", "FPN", "{P_k}", "fpn", True, True, "FPN 2fc", head="2fc"),
)

# The paper's numbers (ResNet-50, COCO minival; Lin et al. 2017, Tables 1 and 3).
TABLE1_METRICS = ("AR@100", "AR@1000", "ARs@1000", "ARm@1000", "ARl@1000")
TABLE1_HEADERS = ("AR^100", "AR^1k", "AR^1k_s", "AR^1k_m", "AR^1k_l")
PAPER_TABLE1 = {
    "a": ("47k", (36.1, 48.3, 32.0, 58.7, 62.2)),
    "b": ("12k", (36.3, 44.9, 25.3, 55.5, 64.2)),
    "c": ("200k", (44.0, 56.3, 44.9, 63.4, 66.2)),
    "d": ("200k", (37.4, 49.5, 30.5, 59.9, 68.0)),
    "e": ("200k", (34.5, 46.1, 26.5, 57.4, 64.7)),
    "f": ("750k", (38.4, 51.3, 35.1, 59.7, 67.6)),
}
TABLE3_METRICS = ("AP50", "AP", "APs", "APm", "APl")
TABLE3_HEADERS = ("AP@0.5", "AP", "AP_s", "AP_m", "AP_l")
PAPER_TABLE3 = {
    "a": (53.1, 31.6, 13.2, 35.6, 47.1),
    "b": (51.7, 28.0, 9.6, 31.9, 43.1),
    "c": (56.9, 33.9, 17.8, 37.7, 45.8),
}


def select_rows(tables: str = "1,3", only: str = "") -> list[Row]:
    """Rows of the tables in ``tables`` ("1", "3" or "1,3"), or just the keys in ``only``."""
    wanted = {int(t) for t in tables.split(",") if t.strip()}
    if not wanted <= {1, 3}:
        raise ValueError(f"--tables must list 1 and/or 3, got {tables!r}")
    rows = [r for r in ROWS if r.table in wanted]
    if only:
        keys = [k.strip() for k in only.split(",") if k.strip()]
        known = {r.key: r for r in ROWS}
        unknown = [k for k in keys if k not in known]
        if unknown:
            raise ValueError(f"unknown row key(s) {unknown}; valid keys: {', '.join(known)}")
        rows = [r for r in rows if r.key in keys]
    return rows


def row_config(base: ExperimentConfig, row: Row) -> ExperimentConfig:
    """``base`` with what ``row`` changes: the pyramid variant, the RPN alone (type rpn), the RoI head."""
    model = base.model
    fpn = dataclasses.replace(model.fpn, variant=row.variant)
    roi_head = model.roi_head
    if row.table == 3:
        roi_head = dataclasses.replace(roi_head, head=row.head)
        if row.head == "conv5":
            roi_head = dataclasses.replace(roi_head, pooler_resolution=CONV5_POOLER_RESOLUTION)
    model_type = "rpn" if row.table == 1 else model.type
    model = dataclasses.replace(model, type=model_type, fpn=fpn, roi_head=roi_head)
    return dataclasses.replace(base, model=model)


def anchor_count(model: ModelConfig, image_hw: tuple[int, int], pad: bool = True) -> int:
    """Anchors per image of ``image_hw`` over all RPN levels.

    The image is padded to ``input.size_divisibility`` first if ``pad``. Level k
    of stride s has ceil(H / s) × ceil(W / s) locations, each with
    ``len(sizes on the level) × len(aspect_ratios)`` anchors; single-scale maps
    carry all sizes (``rpn.anchor_sizes_per_level``). An unpadded 800×1000 image
    gives Table 1's 47k (C4), 12k (C5), 200k (FPN) and 750k (P2).
    """
    from fpn_tf.models.fpn_backbone import fpn_output_specs
    from fpn_tf.models.rpn import anchor_sizes_per_level

    div = model.input.size_divisibility if pad else 1
    h, w = (int(math.ceil(v / div) * div) for v in image_hw)
    specs = fpn_output_specs(model.backbone, model.fpn)
    sizes = anchor_sizes_per_level(list(specs), model.anchors)
    total = 0
    for level, (_, stride) in specs.items():
        per_location = len(sizes[level]) * len(model.anchors.aspect_ratios)
        total += math.ceil(h / stride) * math.ceil(w / stride) * per_location
    return total


def format_count(n: int) -> str:
    """12000 -> "12k", 1234 -> "1.2k", 750000 -> "750k" (the paper's style)."""
    if n >= 10000:
        return f"{round(n / 1000):d}k"
    if n >= 1000:
        return f"{n / 1000:.1f}k"
    return str(n)


def config_digest(config: ExperimentConfig) -> str:
    """A short hash of a config: results of another config are never reused."""
    text = json.dumps(to_dict(config), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


# ----------------------------------------------------------------------------- running
def run_row(config: ExperimentConfig, row: Row, model_dir: str) -> dict:
    """Trains ``row`` into ``model_dir`` and evaluates it; returns its result record."""
    import keras

    from fpn_tf.evaluation.evaluate import evaluate
    from fpn_tf.models.build import build_model
    from fpn_tf.training.experiment import train

    keras.backend.clear_session()
    start = time.perf_counter()
    result = train(config, model_dir, xla=False)
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    metrics = evaluate(config, model_dir=model_dir, proposals=row.table == 1)
    eval_seconds = time.perf_counter() - start
    params = build_model(config.model).trainable_weight_count()
    keras.backend.clear_session()
    hw = (config.model.input.min_size, config.model.input.max_size)
    return {
        "row": dataclasses.asdict(row),
        "config_digest": config_digest(config),
        "metrics": {k: float(v) for k, v in metrics.items()},
        "anchors": anchor_count(config.model, (hw[0], hw[0])),
        "paper_scale_anchors": anchor_count(config.model, PAPER_IMAGE_HW, pad=False),
        "parameters": int(params),
        "steps": int(result.step),
        "final_losses": result.losses,
        "steps_per_second": float(result.steps_per_second),
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
    }


def load_results(path: str) -> dict:
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    return {}


def save_results(path: str, results: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the document
def _pct(value: float | None) -> str:
    if value is None:
        return "–"
    if value < 0:
        return "n/a"
    return f"{100.0 * value:.1f}"


def _check(flag: bool) -> str:
    return "✓" if flag else ""


def table1_markdown(results: dict) -> str:
    """Table 1 in the paper's layout; each metric as "this run | paper"."""
    head = ["RPN", "feature", "# anchors (run / paper)", "lateral?", "top-down?"]
    for h in TABLE1_HEADERS:
        head += [f"{h} run", "paper"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in (r for r in ROWS if r.table == 1):
        rec = results.get(row.key)
        paper_anchors, paper = PAPER_TABLE1[row.row]
        anchors = format_count(rec["anchors"]) if rec else "–"
        cells = [f"({row.row}) {row.name}", row.feature, f"{anchors} / {paper_anchors}"]
        cells += [_check(row.lateral), _check(row.top_down)]
        for metric, p in zip(TABLE1_METRICS, paper):
            cells += [_pct(rec["metrics"].get(metric)) if rec else "–", f"{p:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table3_markdown(results: dict) -> str:
    """Table 3 in the paper's layout; each metric as "this run | paper"."""
    head = ["Faster R-CNN", "proposals", "feature", "head", "lateral?", "top-down?"]
    for h in TABLE3_HEADERS:
        head += [f"{h} run", "paper"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in (r for r in ROWS if r.table == 3):
        rec = results.get(row.key)
        proposals = f"RPN, {row.feature}"
        cells = [f"({row.row}) {row.name}", proposals, row.feature, row.head]
        cells += [_check(row.lateral), _check(row.top_down)]
        for metric, p in zip(TABLE3_METRICS, PAPER_TABLE3[row.row]):
            cells += [_pct(rec["metrics"].get(metric)) if rec else "–", f"{p:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ordering_checks(results: dict) -> list[tuple[str, bool | None]]:
    """The paper's claims on small objects, checked on this run (None: a row is missing)."""

    def metric(key: str, name: str) -> float | None:
        rec = results.get(key)
        return rec["metrics"].get(name) if rec else None

    keys = {r.key: r for r in ROWS}
    t1 = {r.row: r.key for r in ROWS if r.table == 1}
    t3 = {r.row: r.key for r in ROWS if r.table == 3}
    claims = [
        ("Table 1: FPN AR^1k_s > C4 baseline AR^1k_s", t1["c"], t1["a"], "ARs@1000"),
        ("Table 1: FPN AR^1k_s > C5 baseline AR^1k_s", t1["c"], t1["b"], "ARs@1000"),
        ("Table 1: FPN AR^1k_s > bottom-up pyramid AR^1k_s", t1["c"], t1["d"], "ARs@1000"),
        ("Table 1: FPN AR^1k_s > top-down w/o lateral AR^1k_s", t1["c"], t1["e"], "ARs@1000"),
        ("Table 1: FPN AR^1k_s > only-P2 AR^1k_s", t1["c"], t1["f"], "ARs@1000"),
        ("Table 1: FPN AR^1k > C4 baseline AR^1k", t1["c"], t1["a"], "AR@1000"),
        ("Table 3: FPN AP_s > C4 (conv5 head) AP_s", t3["c"], t3["a"], "APs"),
        ("Table 3: FPN AP_s > C5 (2fc head) AP_s", t3["c"], t3["b"], "APs"),
        ("Table 3: FPN AP > C4 (conv5 head) AP", t3["c"], t3["a"], "AP"),
    ]
    out = []
    for text, better, worse, name in claims:
        a, b = metric(better, name), metric(worse, name)
        ok = None if a is None or b is None else a > b
        if a is not None and b is not None:
            text += f" ({_pct(a)} vs {_pct(b)})"
        assert better in keys and worse in keys
        out.append((text, ok))
    return out


def settings_markdown(config: ExperimentConfig) -> str:
    m, d, t = config.model, config.data, config.train
    return "\n".join(
        [
            f"- data: synthetic shapes (`fpn_tf/data/synthetic.py`), {d.synthetic_num_train} train / "
            f"{d.synthetic_num_eval} eval images of {d.synthetic_image_size}×{d.synthetic_image_size} px, "
            f"{d.synthetic_num_classes} classes, seed {d.synthetic_seed}",
            f"- input: {m.input.min_size} px (paper: shorter side 800)",
            f"- backbone: {m.backbone.name} × {m.backbone.width_multiplier:g} width, norm {m.backbone.norm}, "
            f"from scratch (paper: ImageNet-pretrained ResNet-50)",
            f"- pyramid: d = {m.fpn.num_channels} (paper: 256); anchors "
            f"{', '.join(f'{s:g}' for s in m.anchors.sizes)} px (paper: 32…512)",
            f"- RPN: {m.rpn.batch_size_per_image} anchors per image; test: {m.rpn.pre_nms_topk_test} "
            f"per level before NMS, {m.rpn.post_nms_topk_test} proposals per image",
            f"- Fast R-CNN head: {m.roi_head.batch_size_per_image} RoIs per image, 2-fc of "
            f"{m.roi_head.fc_dim} (paper: 512 RoIs, 1024), conv5 head on "
            f"{CONV5_POOLER_RESOLUTION}×{CONV5_POOLER_RESOLUTION} RoIAlign from C4, eq. (1) canonical "
            f"size {m.roi_head.canonical_size:g} (paper: 224)",
            f"- training: {t.train_steps} steps of {t.batch_size} images, LR {t.base_learning_rate:g} "
            f"(warm-up {t.warmup_steps}, ×{t.lr_decay_factor:g} at "
            f"{', '.join(f'{f:g}' for f in t.lr_decay_fractions)} of the run), seed {t.seed} "
            f"(paper: 80k steps of 16 images)",
        ]
    )


def results_markdown(results: dict, config: ExperimentConfig, run: dict, chart_name: str) -> str:
    """The generated part of docs/ablations.md."""
    rows_done = [r for r in ROWS if r.key in results]
    timing = [
        "| row | train s | steps/s | eval s | parameters |",
        "|---|---|---|---|---|",
    ]
    for r in rows_done:
        rec = results[r.key]
        timing.append(
            f"| T{r.table}({r.row}) {r.name}{' [' + r.head + ']' if r.head else ''} | "
            f"{rec['train_seconds']:.0f} | {rec['steps_per_second']:.2f} | {rec['eval_seconds']:.0f} | "
            f"{rec['parameters'] / 1e6:.2f} M |"
        )
    row_minutes = (
        sum(results[r.key]["train_seconds"] + results[r.key]["eval_seconds"] for r in rows_done) / 60
    )
    checks = []
    for text, ok in ordering_checks(results):
        mark = "–" if ok is None else ("yes" if ok else "**no**")
        checks.append(f"- {text}: {mark}")
    return "\n".join(
        [
            BEGIN,
            "<!-- Generated by scripts/ablate.py; edit outside the markers only. -->",
            "",
            "### Command",
            "",
            "```",
            run["command"],
            "```",
            "",
            f"Run on {run['date']} ({run['machine']}): {run['wall_time']} wall time for the rows "
            f"this command ran; training + evaluation of all rows shown: {row_minutes:.1f} min.",
            "",
            "### Settings (reduced scale)",
            "",
            settings_markdown(config),
            "",
            "### Table 1: RPN (bounding-box proposals), this run beside the paper",
            "",
            'Percent. "# anchors": per image — this run at '
            f"{config.model.input.min_size}×{config.model.input.min_size}, the paper at ~800×1000.",
            "",
            table1_markdown(results),
            "",
            "### Table 3: Faster R-CNN, this run beside the paper",
            "",
            "Percent; the paper's numbers are ResNet-50 on COCO minival.",
            "",
            table3_markdown(results),
            "",
            f"![AR_s and AP_s per row]({chart_name})",
            "",
            "### The paper's ordering, checked on this run",
            "",
            *checks,
            "",
            "### Time per row",
            "",
            *timing,
            "",
            END,
        ]
    )


DOC_TEMPLATE = """# FPN ablations (paper Tables 1 and 3) at CPU scale

Made by `scripts/ablate.py`; everything between the markers below is rewritten by it.

{generated}
"""


def write_doc(path: str, generated: str) -> None:
    """Replaces the text between the markers in ``path`` (or writes a new document)."""
    write_between_markers(path, generated, BEGIN, END, DOC_TEMPLATE)


# ----------------------------------------------------------------------------- the chart
RUN_COLOUR = (31, 90, 160)
PAPER_COLOUR = (190, 190, 190)
FPN_COLOUR = (200, 80, 40)


def draw_chart(results: dict, path: str, width: int = 1100, height: int = 460) -> None:
    """Bar chart (Pillow) of AR^1k_s per Table 1 row and AP_s per Table 3 row.

    Each row gets two bars: this run (blue; the FPN row in orange) and the paper
    (grey), in percent, with the value printed above each bar.
    """
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)
    title_font = ImageFont.load_default(size=16)
    panels = [
        ("Table 1 (RPN): AR^1k_s", [r for r in ROWS if r.table == 1], "ARs@1000", PAPER_TABLE1, 2),
        ("Table 3 (Faster R-CNN): AP_s", [r for r in ROWS if r.table == 3], "APs", PAPER_TABLE3, 2),
    ]
    margin, gap = 50, 40
    widths = [len(rows) for _, rows, *_ in panels]
    usable = width - 2 * margin - gap
    x0 = margin
    for (title, rows, metric, paper, index), n in zip(panels, widths):
        panel_w = usable * n / sum(widths)
        top, bottom = 60, height - 70
        values = []
        for r in rows:
            rec = results.get(r.key)
            run = rec["metrics"].get(metric) if rec else None
            p = paper[r.row][1][index] if r.table == 1 else paper[r.row][index]
            values.append((None if run is None or run < 0 else 100.0 * run, p))
        vmax = max([v for pair in values for v in pair if v is not None] + [1.0])
        vmax = 10.0 * math.ceil(vmax / 10.0)
        draw.text((x0, 15), title, fill=(0, 0, 0), font=title_font)
        for tick in range(0, int(vmax) + 1, 10):  # grid lines every 10 points
            y = bottom - (bottom - top) * tick / vmax
            draw.line([(x0, y), (x0 + panel_w, y)], fill=(225, 225, 225))
            draw.text((x0 - 25, y - 7), f"{tick}", fill=(90, 90, 90), font=font)
        draw.line([(x0, bottom), (x0 + panel_w, bottom)], fill=(0, 0, 0))
        slot = panel_w / n
        bar = slot * 0.32
        for i, (r, (run, p)) in enumerate(zip(rows, values)):
            cx = x0 + slot * (i + 0.5)
            colour = FPN_COLOUR if r.variant == "fpn" else RUN_COLOUR
            for value, left, fill in ((run, cx - bar, colour), (p, cx, PAPER_COLOUR)):
                if value is None:
                    continue
                y = bottom - (bottom - top) * value / vmax
                draw.rectangle([left, y, left + bar - 1, bottom], fill=fill)
                draw.text((left, y - 16), f"{value:.1f}", fill=(0, 0, 0), font=font)
            label = f"({r.row}) {r.short}"
            tw = draw.textlength(label, font=font)
            draw.text((cx - tw / 2, bottom + 8), label, fill=(0, 0, 0), font=font)
        x0 += panel_w + gap
    legend_y = height - 30
    for i, (text, fill) in enumerate(
        (("this run", RUN_COLOUR), ("this run, FPN", FPN_COLOUR), ("paper (R-50, COCO)", PAPER_COLOUR))
    ):
        lx = margin + i * 200
        draw.rectangle([lx, legend_y, lx + 14, legend_y + 14], fill=fill)
        draw.text((lx + 20, legend_y), text, fill=(0, 0, 0), font=font)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.save(path, format="PNG")


# ----------------------------------------------------------------------------- main
def build_config(config_path: str | None, overrides: list[str], tiny: bool, out_dir: str) -> ExperimentConfig:
    """The base experiment: ``config_path`` (+ ``TINY_OVERRIDES`` with --tiny) + overrides."""
    all_overrides = list(TINY_OVERRIDES) if tiny else []
    if tiny:
        data_root = os.path.join(out_dir, "data")
        all_overrides += [f"data.train_dir={data_root}/train", f"data.eval_dir={data_root}/eval"]
    return load_config(config_path, all_overrides + list(overrides))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/ablation.yaml", help="base experiment YAML")
    parser.add_argument("--out_dir", default="runs/ablation", help="one training dir per row + results.json")
    parser.add_argument("--tables", default="1,3", help="which tables to run: 1, 3 or 1,3")
    parser.add_argument("--rows", default="", help="only these row keys, e.g. t1c_fpn,t3a_c4_conv5")
    parser.add_argument("--override", action="append", default=[], help="config key.path=value")
    parser.add_argument("--tiny", action="store_true", help="a few steps on a few tiny images (tests)")
    parser.add_argument("--force", action="store_true", help="rerun rows that already have a result")
    parser.add_argument("--doc", default="docs/ablations.md", help="markdown to write ('' for none)")
    parser.add_argument("--chart", default="docs/ablations.png", help="bar chart PNG ('' for none)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    from absl import logging

    logging.set_verbosity(logging.INFO)  # the trainer's step / loss / ETA lines
    base = build_config(args.config, args.override, args.tiny, args.out_dir)
    rows = select_rows(args.tables, args.rows)
    os.makedirs(args.out_dir, exist_ok=True)
    results_path = os.path.join(args.out_dir, "results.json")
    results = load_results(results_path)
    started = time.perf_counter()
    trained = 0
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    for row in rows:
        config = row_config(base, row)
        digest = config_digest(config)
        done = results.get(row.key)
        if done and done.get("config_digest") == digest and not args.force:
            print(f"[ablate] {row.key}: done before, skipped", flush=True)
            continue
        model_dir = os.path.join(args.out_dir, row.key)
        if args.force and os.path.isdir(model_dir):
            import shutil

            shutil.rmtree(model_dir)
        print(f"[ablate] {row.key}: training {config.train.train_steps} steps", flush=True)
        results[row.key] = run_row(config, row, model_dir)
        trained += 1
        save_results(results_path, results)
        m = results[row.key]["metrics"]
        shown = TABLE1_METRICS if row.table == 1 else TABLE3_METRICS
        print(
            f"[ablate] {row.key}: "
            + "  ".join(f"{k} {_pct(m.get(k))}" for k in shown)
            + f"  (train {results[row.key]['train_seconds']:.0f} s)",
            flush=True,
        )
    wall = time.perf_counter() - started
    # Only rows of this config count; stale rows of another config are left out.
    current = {
        r.key: results[r.key]
        for r in ROWS
        if r.key in results and results[r.key]["config_digest"] == config_digest(row_config(base, r))
    }
    run_path = os.path.join(args.out_dir, "run.json")
    if trained == 0 and os.path.isfile(run_path):
        # Nothing trained: the report keeps the command, date and time of the run that did.
        with open(run_path, encoding="utf-8") as f:
            run = json.load(f)
    else:
        run = {
            "command": "python scripts/ablate.py " + shlex.join(argv),
            "date": date,
            "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, {platform.system()}",
            "wall_time": f"{wall / 60:.1f} min",
        }
    chart_name = os.path.basename(args.chart) if args.chart else "ablations.png"
    if args.chart:
        draw_chart(current, args.chart)
    if args.doc:
        write_doc(args.doc, results_markdown(current, base, run, chart_name))
    with open(run_path, "w", encoding="utf-8") as f:
        json.dump(run, f, indent=2)
    for text, ok in ordering_checks(current):
        print(f"[ablate] {text}: {'-' if ok is None else ok}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
