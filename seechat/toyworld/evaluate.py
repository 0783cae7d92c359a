"""Exact-answer evaluation of a model on the toy world's question sets, through the chat engine."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from tqdm.auto import tqdm

from ..chat.engine import ChatEngine, GenerationSettings
from ..data.images import load_image


def read_qa(split_dir: Path) -> list[dict]:
    with open(split_dir / "qa.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def evaluate_split(engine: ChatEngine, split_dir: Path, *, limit_images: int | None = None,
                   desc: str = "evaluating") -> dict:
    """Ask every question of qa.jsonl (follow-ups after their history, answered by the model itself)."""
    items = read_qa(split_dir)
    if limit_images is not None:
        keep = sorted({it["image"] for it in items})[:limit_images]
        items = [it for it in items if it["image"] in set(keep)]
    settings = GenerationSettings(max_new_tokens=24)
    images: dict[str, object] = {}
    results = []
    for it in tqdm(items, desc=desc, unit="q", leave=False):
        image = images.get(it["image"]) or images.setdefault(it["image"], load_image(split_dir / it["image"]))
        conv = engine.conversation()
        first = True
        for question, _ in it.get("history", []):
            conv.ask(question, image=image if first else None, settings=settings)
            first = False
        predicted = conv.ask(it["question"], image=image if first else None, settings=settings)
        results.append({**it, "prediction": predicted, "correct": predicted.strip() == it["answer"]})
    per_type = defaultdict(list)
    for r in results:
        per_type[r["type"]].append(r["correct"])
    return {
        "accuracy": sum(r["correct"] for r in results) / max(1, len(results)),
        "per_type": {t: sum(v) / len(v) for t, v in sorted(per_type.items())},
        "n_questions": len(results),
        "results": results,
    }
