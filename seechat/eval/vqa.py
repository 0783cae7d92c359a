"""Question answering about images: exact-match and normalized accuracy, overall and per question type.

    seechat eval vqa --model runs/toyworld/model --data runs/toyworld/data/test/qa.jsonl --out runs/eval/vqa_test

The data file has one JSON object per line:

    {"image": "<path relative to the data file's folder>", "question": "...", "answer": "...",
     "type": "<question type, optional>", "id": "<optional; default the line number>",
     "history": [["<an earlier question>", "<its answer>"], ...]   (optional: a follow-up question)}

A record about several pictures gives "images": [...] instead of "image", and one <image> marker per picture
in its question and history, in order (a picture brought in later has its marker in that later turn):

    {"images": ["a.png", "b.png"], "question": "<image>\n<image>\n第二张图里是什么？", "answer": "..."}

--data may also be a folder holding qa.jsonl, such as a toy-world split (runs/toyworld/data/heldout_combos).
Each question is asked about its image in a fresh conversation (after its history, if any: the image goes
with the first question and the history's answers are the given ones), greedily (batched; the answers equal
the chat engine's). A prediction is an exact match when it equals the answer after stripping surrounding
whitespace; it is a normalized match when the two are equal after `normalize` (below). Writes
OUT/results.jsonl (one line per question, with the prediction) and OUT/metrics.json (and metrics.md).
An unreadable image is listed, its questions are left out of the accuracy and counted in n_unreadable.

Normalization: Unicode NFKC (full-width letters, digits and punctuation become half-width: ＡＢＣ１２３，！？
-> ABC123,!?), lower-case, runs of whitespace become one space, then whitespace and punctuation (any Unicode
punctuation: . , ! ? 。 、 quotes, brackets ...) are stripped from both ends. Punctuation inside the answer
stays.
"""

from __future__ import annotations

import logging
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..chat.batch import ImageCache, generate_batch
from ..chat.engine import GenerationSettings
from ..cli_helpers import LoadArgs, load_model, parse, setup_logging
from ..data.images import load_image
from ..errors import ConfigError, DataError, ImageError
from .files import pct
from .files import field as get_field
from .files import out_dir, read_jsonl, write_json, write_jsonl

log = logging.getLogger("seechat")

NO_TYPE = "(none)"


@dataclass
class VQAArgs:
    """Which questions, and how to answer them."""

    data: str = field(default="", metadata={"help": "Questions as JSON lines {image, question, answer, type?, id?}, "
                                                    "or a folder holding qa.jsonl (a toy-world split)."})
    out: str = field(default="", metadata={"help": "Output folder for results.jsonl and metrics.json."})
    batch_size: int = field(default=8, metadata={"help": "Questions answered together in one generate call."})
    max_new_tokens: int = field(default=64, metadata={"help": "Most tokens in one answer."})
    limit: int = field(default=0, metadata={"help": "Only the first N questions (0: all)."})

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_new_tokens < 1 or self.limit < 0:
            raise ConfigError("--batch-size and --max-new-tokens must be >= 1, --limit >= 0")


def main(argv: list[str]) -> int:
    load_args, args = parse("seechat eval vqa", argv, LoadArgs, VQAArgs, description=__doc__.split("\n")[0])
    setup_logging()
    if not args.data:
        raise ConfigError("give the questions with --data FILE.jsonl")
    items = read_questions(args.data)
    if args.limit:
        items = items[: args.limit]
    out = out_dir(args.out)
    model = load_model(load_args)
    metrics = run_vqa(model, items, out, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    metrics["data"] = args.data
    write_json(out / "metrics.json", metrics)
    log.info("%s", summary_line(metrics))
    return 0


def normalize(text: str) -> str:
    """The normalized form used for the normalized accuracy (see the module docstring)."""
    text = " ".join(unicodedata.normalize("NFKC", text).lower().split())
    start, end = 0, len(text)
    while start < end and _strippable(text[start]):
        start += 1
    while end > start and _strippable(text[end - 1]):
        end -= 1
    return text[start:end]


def _strippable(ch: str) -> bool:
    return ch.isspace() or unicodedata.category(ch).startswith("P")


def read_questions(path: str) -> list[dict]:
    """The questions of a data file (or of DIR/qa.jsonl), with image paths resolved against the file's folder."""
    if Path(path).is_dir():
        path = str(Path(path) / "qa.jsonl")
    base = Path(path).parent
    items = []
    for number, obj in read_jsonl(path, "questions file"):
        if "images" in obj:
            items.append(_several(obj, path, number, base))
            continue
        image = get_field(obj, "image", path, number)
        items.append({
            "id": str(obj.get("id", number)),
            "image": image,
            "path": base / image,
            "question": get_field(obj, "question", path, number),
            "answer": str(get_field(obj, "answer", path, number, kind=(str, int, float))),
            "type": str(obj.get("type") or NO_TYPE),
            "history": _history(obj.get("history"), path, number),
        })
    if not items:
        raise DataError(f"the questions file '{path}' has no questions: each line needs image, question, answer")
    return items


def run_vqa(model, items: list[dict], out: Path, *, batch_size: int = 8, max_new_tokens: int = 64,
            progress: bool = True) -> dict:
    """Answer every item, write out/results.jsonl and out/metrics.md; return the metrics."""
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    results: list[dict | None] = [None] * len(items)
    cache: dict = {}
    bar = tqdm(total=len(items), unit="question", desc="vqa", disable=not progress or None, leave=False)
    embeddings = ImageCache()  # several questions about one picture: encoded once
    several = [k for k, item in enumerate(items) if "images" in item]
    for start in range(0, len(several), batch_size):
        _answer_several(model, items, several[start:start + batch_size], results, cache, settings)
        bar.update(min(batch_size, len(several) - start))
    for start in range(0, len(items), batch_size):
        ready, images = [], []
        for k in range(start, min(start + batch_size, len(items))):
            if "images" in items[k]:
                continue
            image = _image(items[k]["path"], items[k]["image"], cache)
            if isinstance(image, str):
                results[k] = _row(items[k], None, error=image)
            else:
                ready.append(k)
                images.append(image)
        if ready:
            replies = generate_batch(model, images, [items[k]["question"] for k in ready], settings,
                                     histories=[items[k].get("history") or [] for k in ready], image_cache=embeddings)
            for k, reply in zip(ready, replies):
                results[k] = _row(items[k], reply.text)
        bar.update(min(batch_size, len(items) - start) - sum("images" in it for it in items[start:start + batch_size]))
    bar.close()
    write_jsonl(out / "results.jsonl", results)
    metrics = score(results)
    (out / "metrics.md").write_text(markdown(metrics), encoding="utf-8")
    return metrics


def score(results: list[dict]) -> dict:
    """Accuracy overall and per type from result rows (rows with an error are left out and counted)."""
    scored = [r for r in results if "error" not in r]
    unreadable = {r["image"]: r["error"] for r in results if "error" in r}

    def acc(rows):
        n = len(rows)
        return {
            "n": n,
            "exact_match": sum(r["exact"] for r in rows) / n if n else None,
            "normalized_match": sum(r["normalized"] for r in rows) / n if n else None,
        }

    types = sorted({r["type"] for r in scored})
    return {
        **acc(scored),
        "n_questions": len(results),
        "n_unreadable": len(results) - len(scored),
        "per_type": {t: acc([r for r in scored if r["type"] == t]) for t in types},
        "normalization": "NFKC (full-width -> half-width), lower-case, whitespace runs -> one space, "
                         "whitespace and Unicode punctuation stripped from both ends",
        "unreadable": unreadable,
    }


def markdown(metrics: dict) -> str:
    lines = ["# VQA", "", f"{metrics['n']} questions scored, {metrics['n_unreadable']} left out (unreadable image).",
             "", "| type | n | exact match | normalized match |", "|---|---:|---:|---:|",
             f"| **all** | {metrics['n']} | {pct(metrics['exact_match'])} | {pct(metrics['normalized_match'])} |"]
    for t, m in metrics["per_type"].items():
        lines.append(f"| {t} | {m['n']} | {pct(m['exact_match'])} | {pct(m['normalized_match'])} |")
    return "\n".join(lines) + "\n"


def summary_line(metrics: dict) -> str:
    return (f"{metrics['n']} questions: exact match {pct(metrics['exact_match'])}, normalized "
            f"{pct(metrics['normalized_match'])}")


# -- helpers ------------------------------------------------------------------------------------------
def _history(value, path: str, number: int) -> list[list[str]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(
        isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn) for turn in value
    ):
        raise DataError(f"{path}:{number}: 'history' must be a list of [question, answer] string pairs")
    return value


def _several(obj: dict, path: str, number: int, base: Path) -> dict:
    """A record about several pictures: its markers must match its pictures."""
    images = obj["images"]
    if not isinstance(images, list) or not images or not all(isinstance(i, str) and i for i in images):
        raise DataError(f"{path}:{number}: 'images' must be a non-empty list of image paths")
    question = get_field(obj, "question", path, number)
    history = _history(obj.get("history"), path, number)
    markers = question.count("<image>") + sum(q.count("<image>") + a.count("<image>") for q, a in history)
    if markers != len(images):
        raise DataError(f"{path}:{number}: {markers} <image> marker(s) for {len(images)} image(s): put one "
                        "<image> marker in the question (or history) per picture, in order")
    return {"id": str(obj.get("id", number)), "image": " | ".join(images), "images": images,
            "paths": [base / i for i in images], "question": question,
            "answer": str(get_field(obj, "answer", path, number, kind=(str, int, float))),
            "type": str(obj.get("type") or NO_TYPE), "history": history}


def _answer_several(model, items: list[dict], ks: list[int], results: list, cache: dict, settings) -> None:
    """Answer the several-picture items `ks` in one batch (their markers in the text, pictures in order)."""
    from ..chat.multi import generate_conversations

    rows, ready = [], []
    for k in ks:
        item = items[k]
        pictures = [_image(p, n, cache) for p, n in zip(item["paths"], item["images"])]
        bad = next((p for p in pictures if isinstance(p, str)), None)
        if bad is not None:
            results[k] = _row(item, None, error=bad)
            continue
        messages = []
        for question, answer in item["history"]:
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        messages.append({"role": "user", "content": item["question"]})
        rows.append((messages, pictures))
        ready.append(k)
    for k, reply in zip(ready, generate_conversations(model, rows, settings)):
        results[k] = _row(items[k], reply.text)


def _image(path: Path, name: str, cache: dict, keep: int = 64):
    """The image, or the reason it cannot be read; the last `keep` images stay decoded (questions about one
    image usually come together)."""
    if path not in cache:
        try:
            cache[path] = load_image(path, name=f"'{name}'")
        except ImageError as exc:
            log.warning("left out (unreadable): %s", exc)
            cache[path] = str(exc)
        if len(cache) > keep:
            cache.pop(next(iter(cache)))
    return cache[path]


def _row(item: dict, prediction: str | None, error: str | None = None) -> dict:
    row = {"id": item["id"], "image": item["image"], "type": item["type"], "question": item["question"],
           "answer": item["answer"], "prediction": prediction}
    if error is not None:
        row["error"] = error
    else:
        row["exact"] = prediction.strip() == item["answer"].strip()
        row["normalized"] = normalize(prediction) == normalize(item["answer"])
    return row
