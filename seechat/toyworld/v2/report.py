"""OUT/report.md of the toy world v2: accuracy per question type and split, several pictures, a grid of test
pictures with the model's answers and boxes, loss curves."""

from __future__ import annotations

import json
from pathlib import Path

from ..report import TYPE_NAMES as _TYPE_NAMES_V1
from ..report import _plot_losses, cjk_font, summary_lines, write_lines
from . import world

TYPE_NAMES = {**_TYPE_NAMES_V1, "counting": "计数 counting", "exist": "存在 existence", "refer": "框出 refer-to-box (IoU>=0.5)",
              "detect": "找出所有 detect-all", "region": "区域描述 region"}
MULTI_NAMES = {"which": "哪一张 which picture", "compare": "比较 comparison", "later": "后来的图 later picture",
               "followup": "追问新图 follow-up"}


def write_report(out: Path, metrics: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    losses = _plot_losses(out)
    grid = _plot_grid(out)
    lines = [
        *summary_lines(metrics),
        f"- grounding Acc@0.5 **{_pct(metrics.get('grounding_acc50'))}** (mean IoU {metrics.get('grounding_miou')}), "
        f"counting **{_pct(metrics.get('counting_accuracy'))}**, detect-all F1 **{_pct(metrics.get('detect_f1'))}**",
        f"- `shift` split (rendered outside the training ranges): **{_pct(metrics.get('shift_accuracy'))}**; "
        f"held-out phrasings: **{_pct(metrics.get('heldout_phrasing_accuracy'))}**",
        "",
        "| question type | test | shift | held-out phrasings | heldout_combos |",
        "|---|---|---|---|---|",
    ]
    for qtype in world.QUESTION_TYPES:
        if qtype in metrics["per_type"]:
            cells = [_pct(metrics["per_type"][qtype], (metrics.get("per_type_interval95") or {}).get(qtype)),
                     _pct(metrics.get("shift_per_type", {}).get(qtype),
                          (metrics.get("shift_per_type_interval95") or {}).get(qtype))]
            cells += [_pct(metrics.get(k, {}).get(qtype)) for k in ("heldout_phrasing_per_type", "heldout_per_type")]
            lines.append(f"| {TYPE_NAMES[qtype]} | " + " | ".join(cells) + " |")
    lines += ["", "In brackets: Wilson 95% intervals (questions per type: "
              + ", ".join(f"{split} {max(n.values())}" for split, n in (metrics.get("n_per_type") or {}).items()
                          if split in ("test", "shift", "multi") and n) + ")."]
    multi = metrics.get("multi_image_accuracy") or {}
    if multi:
        ci = metrics.get("multi_image_interval95") or {}
        lines += ["", "Several pictures in one conversation (`multi` split):", "", "| kind | accuracy |", "|---|---|"]
        lines += [f"| {MULTI_NAMES.get(k, k)} | {_pct(v, ci.get(k))} |" for k, v in multi.items()]
    lines += ["", "## Sample test pictures and the model's answers", "",
              "Red boxes: the model's answers to refer-to-box and detect-all questions; green: the true boxes.", ""]
    return write_lines(out, lines, grid, losses)


def _pct(v, interval=None) -> str:
    if v is None:
        return "-"
    return f"{v:.1%}" + (f" ({interval[0]:.1%}-{interval[1]:.1%})" if interval else "")


def _plot_grid(out: Path, n: int = 12) -> Path:
    import matplotlib.pyplot as plt
    from PIL import Image

    from ...boxes import draw_boxes, parse_boxes

    rows = [json.loads(line) for line in open(out / "eval" / "test" / "results.jsonl", encoding="utf-8")]
    truth = {json.loads(line)["id"]: json.loads(line) for line in open(out / "data" / "test" / "qa.jsonl", encoding="utf-8")}
    by_image: dict[str, dict] = {}
    for r in rows:
        by_image.setdefault(r["image"], {})[r["type"]] = r
    font = cjk_font()
    fig, axes = plt.subplots(3, 4, figsize=(13, 11), dpi=90)
    ones = [kv for kv in by_image.items() if "colour" in kv[1]]
    several = [kv for kv in by_image.items() if "colour" not in kv[1]]
    chosen = ones[:: max(1, len(ones) // (n // 2))][: n // 2] + several[:: max(1, len(several) // (n // 2))][: n // 2]
    for ax, (image, answers) in zip(axes.flat, chosen):
        img = Image.open(out / "data" / "test" / image)
        boxes, true_boxes = [], []
        for qtype in ("refer", "detect"):
            r = answers.get(qtype)
            if r:
                boxes += parse_boxes(r["prediction"] or "")
                true_boxes += truth[r["id"]]["boxes"]
        scaled = [[v * 4 for v in b] for b in true_boxes]
        drawn = draw_boxes(img.resize((img.width * 4, img.height * 4), 0), scaled + boxes,
                           colours=[(40, 170, 60)] * len(scaled) + [(220, 30, 30)] * len(boxes), width=3)
        ax.imshow(drawn)
        ax.axis("off")
        text = []
        for qtype in ("description", "colour", "shape", "counting", "refer", "detect"):
            r = answers.get(qtype)
            if r:
                mark = "✓" if r.get("right", r.get("exact")) else "✗"
                said = r["prediction"] or ""
                if qtype in ("refer", "detect"):
                    said = f"{qtype}: {len(parse_boxes(said))} box(es)"
                elif not font:
                    said = world.gloss(said)
                text.append(f"{mark} {said}")
        ax.set_title("\n".join(text), fontsize=8, fontfamily=font or "DejaVu Sans")
    fig.suptitle("test pictures: the model's answers; boxes drawn from its refer-to-box and detect-all answers "
                 "(red) over the true boxes (green)" + ("" if font else "\n(English glosses of the Chinese answers)"))
    fig.tight_layout()
    path = out / "report_grid.png"
    fig.savefig(path)
    plt.close(fig)
    return path
