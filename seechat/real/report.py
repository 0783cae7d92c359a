"""OUT/report.md of the real-experts build: accuracy per question type, an answer grid, loss curves."""

from __future__ import annotations

import json
from pathlib import Path

from ..train.phases import plot_phase_losses


def write_report(out: Path, metrics: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    losses = _plot_losses(out)
    grid = _plot_grid(out)
    lines = [
        "# Real experts on easy-VQA",
        "",
        f"Experts: {metrics['experts']}; {metrics['image_tokens']} image tokens per picture.",
        f"Built in {metrics.get('build_seconds', '?')} s (phases: {metrics.get('phase_seconds', {})}).",
        "",
        f"- easy-VQA test exact-answer accuracy: **{metrics['test_accuracy']:.1%}** "
        f"({metrics['n_test_questions']} questions); settings {metrics.get('settings', {})}",
        "",
        "| question type | test accuracy |",
        "|---|---|",
        *[f"| {t} | {v:.1%} |" for t, v in metrics["per_type"].items()],
        "",
        "## Test pictures, questions and the model's answers", "", f"![answers]({grid.name})", "",
        "## Loss curves", "", f"![losses]({losses.name})", "",
        f"Predictions: `eval/results.jsonl`. Chat with the model: `seechat chat --model {out / 'model'}`.", "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _plot_losses(out: Path) -> Path:
    return plot_phase_losses(out, [("align", "Stage I: align (bridge)"), ("instruct", "Stage II: instruct")])


def _plot_grid(out: Path, n: int = 12, per_image: int = 3) -> Path:
    import matplotlib.pyplot as plt
    from PIL import Image

    rows = [json.loads(line) for line in open(out / "eval" / "results.jsonl", encoding="utf-8")]
    by_image: dict[str, list[dict]] = {}
    for r in rows:
        by_image.setdefault(r["image"], []).append(r)
    chosen = list(by_image.items())
    chosen = chosen[:: max(1, len(chosen) // n)][:n]
    fig, axes = plt.subplots(3, 4, figsize=(14, 11), dpi=80)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, answers) in zip(axes.flat, chosen):
        ax.imshow(Image.open(out / "data" / "test" / image))
        text = [f"{'✓' if r.get('exact') else '✗'} {r['question']} {r['prediction']}" for r in answers[:per_image]]
        ax.set_title("\n".join(text), fontsize=8)
    fig.suptitle("easy-VQA test pictures: question, then the model's answer (✓ = equals the reference)")
    fig.tight_layout()
    path = out / "report_grid.png"
    fig.savefig(path)
    plt.close(fig)
    return path
