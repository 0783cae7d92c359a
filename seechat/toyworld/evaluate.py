"""Exact-answer evaluation on the toy world's question sets: the `seechat eval vqa` benchmark, batched."""

from __future__ import annotations

from pathlib import Path

from ..eval.vqa import read_questions, run_vqa


def evaluate_split(model, split_dir: Path, out: Path, *, batch_size: int = 32) -> dict:
    """Answer every question of split_dir/qa.jsonl (follow-ups after their history); write out/results.jsonl."""
    out.mkdir(parents=True, exist_ok=True)
    metrics = run_vqa(model, read_questions(str(split_dir)), out, batch_size=batch_size, max_new_tokens=24)
    return {
        "accuracy": metrics["exact_match"],
        "per_type": {t: m["exact_match"] for t, m in metrics["per_type"].items()},
        "n_questions": metrics["n"],
    }
