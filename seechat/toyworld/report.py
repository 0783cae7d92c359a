"""OUT/report.md: accuracy per question type, a grid of test pictures with the model's answers, loss curves."""

from __future__ import annotations

import json
from pathlib import Path

from ..train.phases import plot_phase_losses

from . import world

TYPE_NAMES = {"colour": "颜色 colour", "shape": "形状 shape", "position": "位置 position",
              "description": "描述 description", "yesno": "是非 yes/no", "followup": "追问 follow-up"}


def cjk_font():
    """A font with Chinese glyphs if the system has one (else figures use English glosses)."""
    from matplotlib import font_manager

    wanted = ("Noto Sans CJK", "Noto Serif CJK", "WenQuanYi", "Source Han", "SimHei", "Microsoft YaHei",
              "PingFang", "Heiti", "Droid Sans Fallback", "AR PL")
    for font in font_manager.fontManager.ttflist:
        if any(w.lower() in font.name.lower() for w in wanted):
            return font.name
    return None


def write_report(out: Path, metrics: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    losses = _plot_losses(out)
    grid = _plot_grid(out)
    lines = [
        *summary_lines(metrics),
        "",
        "| question type | test | heldout_combos |",
        "|---|---|---|",
    ]
    for qtype in world.QUESTION_TYPES:
        if qtype in metrics["per_type"]:
            held = metrics.get("heldout_per_type", {}).get(qtype)
            lines.append(f"| {TYPE_NAMES[qtype]} | {metrics['per_type'][qtype]:.1%} | "
                         f"{'' if held is None else f'{held:.1%}'} |")
    lines += ["", "## Sample test pictures and the model's answers", ""]
    return write_lines(out, lines, grid, losses)


def summary_lines(metrics: dict) -> list[str]:
    """The report's title, build time and test / held-out combination accuracy (v1 and v2 alike)."""
    return [
        "# Toy world report",
        "",
        f"Built in {metrics.get('build_seconds', '?')} s (phases: {metrics.get('phase_seconds', {})}), seed {metrics['seed']}.",
        "",
        f"- test exact-answer accuracy: **{metrics['test_accuracy']:.1%}** ({metrics['n_test_questions']} questions)",
        f"- held-out colour x shape combinations ({', '.join(metrics['heldout_combos'])}): "
        f"**{metrics['heldout_combo_accuracy']:.1%}** ({metrics['n_heldout_questions']} questions)",
    ]


def write_lines(out: Path, lines: list[str], grid: Path, losses: Path) -> Path:
    """Append the answer grid, the loss curves and where the predictions are; write OUT/report.md."""
    lines = [*lines, f"![answers]({grid.name})", "", "## Loss curves", "", f"![losses]({losses.name})", "",
             "Predictions: `eval/test/results.jsonl`, `eval/heldout_combos/results.jsonl`. "
             "Chat with the model: `seechat chat --model " + str(out / "model") + "`.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _plot_losses(out: Path) -> Path:
    return plot_phase_losses(out, [("vision", "vision expert (CLIP)"), ("llm", "text expert (GLM)"),
                                   ("align", "Stage I: align"), ("instruct", "Stage II: instruct")])


def _plot_grid(out: Path, n: int = 12) -> Path:
    import matplotlib.pyplot as plt
    from PIL import Image

    rows = [json.loads(line) for line in open(out / "eval" / "test" / "results.jsonl", encoding="utf-8")]
    by_image: dict[str, dict] = {}
    for r in rows:
        by_image.setdefault(r["image"], {})[r["type"]] = r
    font = cjk_font()
    fig, axes = plt.subplots(3, 4, figsize=(12, 10), dpi=90)
    chosen = list(by_image.items())
    chosen = chosen[:: max(1, len(chosen) // n)][:n]  # spread over the split, so every colour shows up
    for ax, (image, answers) in zip(axes.flat, chosen):
        ax.imshow(Image.open(out / "data" / "test" / image))
        ax.axis("off")
        text = []
        for qtype in ("description", "colour", "shape", "position"):
            r = answers.get(qtype)
            if r:
                mark = "✓" if r.get("exact") else "✗"
                said = r["prediction"] if font else world.gloss(r["prediction"])
                text.append(f"{mark} {said}")
        ax.set_title("\n".join(text), fontsize=9, fontfamily=font or "DejaVu Sans")
    fig.suptitle("test pictures: the model's description, colour, shape and position answers"
                 + ("" if font else " (English glosses of the Chinese answers)"))
    fig.tight_layout()
    path = out / "report_grid.png"
    fig.savefig(path)
    plt.close(fig)
    return path
