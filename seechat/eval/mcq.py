"""Multiple-choice benchmarks in the MMBench TSV format (MMBench, MMBench-CN, CCBench), with CircularEval.

    seechat eval mcq --model runs/toyworld/model --tsv MMBench_DEV_CN.tsv --out runs/eval/mmbench_cn
    seechat eval mcq --model DIR --tsv MMBench_DEV_EN.tsv --out DIR --lang en

The TSV has a header row with the columns index, question, hint (optional), A, B, C, D (an empty option, or
'nan', is absent; E.. are read too when present), answer (a letter; absent in test splits), category,
image (base64; a short value that is another row's index means that row's image, as in MMBench),
and optionally l2-category, split, source. The file is read into memory; images are decoded per batch.

CircularEval: a question with k options is asked k times, the options rotated one place each time
(pass r shows original option (j + r) mod k as letter j); it counts as correct only when every pass is
answered correctly. `vanilla` accuracy (pass 0 only) is reported beside it. Answers are generated greedily.

The answer letter is read from the model's reply, in this order: the whole reply is one letter (optionally
in brackets or followed by . ) : 、); the reply equals one option's text (after the normalization of
`eval vqa`); the first standalone letter among the shown ones (not inside a Latin word). A reply with none
of these is unparsed and counts as wrong.

Prompt (zh, default):  提示：{hint}\\n问题：{question}\\n选项：\\nA. ...\\nB. ...\\n请直接回答选项字母。
Prompt (en):           Hint: {hint}\\nQuestion: {question}\\nOptions:\\nA. ...\\nAnswer with the option's letter
                       from the given choices directly.
Writes OUT/results.jsonl (one line per question and pass) and OUT/metrics.json / metrics.md.
"""

from __future__ import annotations

import base64
import binascii
import csv
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..chat.batch import ImageCache, generate_batch
from ..chat.engine import GenerationSettings
from ..cli_helpers import LoadArgs, load_model, parse, setup_logging
from ..data.images import load_image
from ..errors import ConfigError, DataError, ImageError
from .files import pct
from .files import out_dir, write_json, write_jsonl
from .vqa import normalize

log = logging.getLogger("seechat")

LETTERS = "ABCDEFGHI"
PROMPTS = {
    "zh": {"hint": "提示：{}\n", "question": "问题：{}\n", "options": "选项：\n", "ask": "请直接回答选项字母。"},
    "en": {"hint": "Hint: {}\n", "question": "Question: {}\n", "options": "Options:\n",
           "ask": "Answer with the option's letter from the given choices directly."},
}
NO_CATEGORY = "(none)"


@dataclass
class MCQArgs:
    """Which benchmark file, and how to ask."""

    tsv: str = field(default="", metadata={"help": "An MMBench-format TSV (MMBench, MMBench-CN, CCBench)."})
    out: str = field(default="", metadata={"help": "Output folder for results.jsonl and metrics.json."})
    lang: str = field(default="zh", metadata={"help": "Prompt language: zh (请直接回答选项字母。) or en."})
    circular: bool = field(default=True, metadata={"help": "CircularEval (every rotation of the options)."})
    batch_size: int = field(default=8, metadata={"help": "Prompts answered together in one generate call."})
    max_new_tokens: int = field(default=16, metadata={"help": "Most tokens in one answer."})
    limit: int = field(default=0, metadata={"help": "Only the first N questions (0: all)."})

    def __post_init__(self) -> None:
        if self.lang not in PROMPTS:
            raise ConfigError(f"--lang must be one of {list(PROMPTS)}, got {self.lang!r}")
        if self.batch_size < 1 or self.max_new_tokens < 1 or self.limit < 0:
            raise ConfigError("--batch-size and --max-new-tokens must be >= 1, --limit >= 0")


@dataclass
class Question:
    index: str
    question: str
    hint: str
    options: list[str]
    answer: int | None
    """Index into options of the right one; None when the file has no answer (a test split)."""
    category: str
    l2_category: str | None
    image: str
    """base64 of the image."""


def main(argv: list[str]) -> int:
    load_args, args = parse("seechat eval mcq", argv, LoadArgs, MCQArgs, description=__doc__.split("\n")[0])
    setup_logging()
    if not args.tsv:
        raise ConfigError("give the benchmark with --tsv FILE")
    questions = read_tsv(args.tsv)
    if args.limit:
        questions = questions[: args.limit]
    out = out_dir(args.out)
    model = load_model(load_args)
    metrics = run_mcq(model, questions, out, lang=args.lang, circular=args.circular, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens)
    metrics["tsv"] = args.tsv
    write_json(out / "metrics.json", metrics)
    log.info("%s", summary_line(metrics))
    return 0


# -- reading ------------------------------------------------------------------------------------------
def read_tsv(path: str) -> list[Question]:
    """The questions of an MMBench-format TSV, image references resolved."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"the benchmark file '{p}' does not exist: check --tsv")
    csv.field_size_limit(2**31 - 1)  # base64 images make long fields
    with p.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        columns = reader.fieldnames or []
        need = [c for c in ("index", "question", "image", "A", "B") if c not in columns]
        if need:
            raise DataError(f"{p} lacks the column(s) {need}: an MMBench TSV has index, question, A, B, C, D, answer, "
                            "category, image")
        rows = list(reader)
    images = {r["index"]: r["image"] for r in rows}
    if len(images) != len(rows):
        seen: set[str] = set()
        twice = next(r["index"] for r in rows if r["index"] in seen or seen.add(r["index"]))
        raise DataError(f"{p} has the index {twice!r} on more than one row: every question needs its own index")
    letters = [c for c in LETTERS if c in columns]
    questions = []
    for line, r in enumerate(rows, 2):
        options = [_cell(r.get(c)) for c in letters]
        shown = [c for c, o in zip(letters, options) if o]
        options = [o for o in options if o]
        if len(options) < 2:
            raise DataError(f"{p}:{line} (index {r['index']}) has fewer than two options")
        answer = _cell(r.get("answer"))
        if answer and answer not in shown:
            raise DataError(f"{p}:{line} (index {r['index']}) answers {answer!r}, not one of its options {shown}")
        image = r["image"] or ""
        if len(image) <= 64 and image in images and image != r["index"]:
            image = images[image]  # MMBench stores a repeated image once and refers to its row
        questions.append(Question(
            index=r["index"], question=_cell(r.get("question")), hint=_cell(r.get("hint")), options=options,
            answer=shown.index(answer) if answer else None, category=_cell(r.get("category")) or NO_CATEGORY,
            l2_category=_cell(r.get("l2-category")) or None, image=image,
        ))
    if not questions:
        raise DataError(f"{p} has no questions")
    return questions


def _cell(value) -> str:
    text = (value or "").strip()
    return "" if text.lower() == "nan" else text


# -- asking -------------------------------------------------------------------------------------------
def rotate(options: list[str], r: int) -> list[str]:
    """Pass r of CircularEval: shown letter j carries original option (j + r) mod k."""
    k = len(options)
    return [options[(j + r) % k] for j in range(k)]


def prompt(q: Question, options: list[str], lang: str = "zh") -> str:
    t = PROMPTS[lang]
    text = t["hint"].format(q.hint) if q.hint else ""
    text += t["question"].format(q.question) + t["options"]
    text += "".join(f"{LETTERS[j]}. {o}\n" for j, o in enumerate(options))
    return text + t["ask"]


_ONLY_LETTER = re.compile(r"^[(（\[]?\s*([A-Ia-i])\s*[)）\]]?\s*[.．。:：、)]?$")


def parse_answer(reply: str, options: list[str]) -> int | None:
    """The option index a reply chooses (see the module docstring), or None."""
    text = reply.strip()
    k = len(options)
    m = _ONLY_LETTER.match(text)
    if m:
        j = LETTERS.index(m.group(1).upper())
        return j if j < k else None
    norm = normalize(text)
    same = [j for j, o in enumerate(options) if normalize(o) == norm]
    if len(same) == 1:
        return same[0]
    for m in re.finditer(r"(?<![A-Za-z])([A-I])(?![A-Za-z])", text):
        j = LETTERS.index(m.group(1))
        if j < k:
            return j
    return None


def run_mcq(model, questions: list[Question], out: Path, *, lang: str = "zh", circular: bool = True,
            batch_size: int = 8, max_new_tokens: int = 16, progress: bool = True) -> dict:
    """Ask every question (every rotation with circular), write results.jsonl and metrics.md; return metrics."""
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    jobs = [(q, r) for q in questions for r in (range(len(q.options)) if circular else [0])]
    rows: list[dict | None] = [None] * len(jobs)
    bar = tqdm(total=len(jobs), unit="prompt", desc="mcq", disable=not progress or None, leave=False)
    embeddings = ImageCache()  # the rotations of a question share its picture: encoded once
    for start in range(0, len(jobs), batch_size):
        ready, images, texts = [], [], []
        for k in range(start, min(start + batch_size, len(jobs))):
            q, r = jobs[k]
            shown = rotate(q.options, r)
            try:
                image = _decode(q)
            except ImageError as exc:
                rows[k] = _row(q, r, shown, None, error=str(exc))
                continue
            ready.append((k, shown))
            images.append(image)
            texts.append(prompt(q, shown, lang))
        if ready:
            for (k, shown), reply in zip(ready, generate_batch(model, images, texts, settings,
                                                                         image_cache=embeddings)):
                rows[k] = _row(*jobs[k], shown, reply.text)
        bar.update(min(batch_size, len(jobs) - start))
    bar.close()
    write_jsonl(out / "results.jsonl", rows)
    metrics = score(rows, circular=circular)
    metrics["lang"] = lang
    (out / "metrics.md").write_text(markdown(metrics), encoding="utf-8")
    return metrics


def score(rows: list[dict], *, circular: bool = True) -> dict:
    """Circular and vanilla accuracy, overall and per category, from result rows."""
    by_q: dict[str, list[dict]] = {}
    for row in rows:
        by_q.setdefault(row["index"], []).append(row)
    unreadable = {i: rs[0]["error"] for i, rs in by_q.items() if any("error" in r for r in rs)}
    unanswered = [i for i, rs in by_q.items() if i not in unreadable and rs[0]["answer"] is None]
    graded = {i: rs for i, rs in by_q.items() if i not in unreadable and i not in unanswered}

    def acc(ids):
        n = len(ids)
        circ = sum(all(r["correct"] for r in graded[i]) for i in ids)
        van = sum(next(r for r in graded[i] if r["pass"] == 0)["correct"] for i in ids)
        return {"n": n, "circular": circ / n if n and circular else None, "vanilla": van / n if n else None}

    def groups(key):
        out: dict[str, list[str]] = {}
        for i, rs in graded.items():
            if rs[0].get(key) is not None:
                out.setdefault(rs[0][key], []).append(i)
        return {g: acc(ids) for g, ids in sorted(out.items())}

    overall = acc(list(graded))
    return {
        "n_questions": len(by_q),
        "n_graded": len(graded),
        "accuracy": overall["circular"] if circular else overall["vanilla"],
        "circular_accuracy": overall["circular"],
        "vanilla_accuracy": overall["vanilla"],
        "per_category": groups("category"),
        "per_l2_category": groups("l2_category"),
        "n_unparsed": sum(1 for r in rows if "error" not in r and r["parsed"] is None),
        "n_passes": sum(1 for r in rows if "error" not in r),
        "circular": circular,
        "n_unreadable": len(unreadable),
        "unreadable": unreadable,
        "n_without_answer": len(unanswered),
    }


def markdown(m: dict) -> str:
    lines = ["# Multiple choice", "",
             f"{m['n_graded']} of {m['n_questions']} questions graded ({m['n_unreadable']} unreadable image, "
             f"{m['n_without_answer']} without answer); {m['n_unparsed']} of {m['n_passes']} replies unparsed.", "",
             "| category | n | circular | vanilla |", "|---|---:|---:|---:|",
             f"| **all** | {m['n_graded']} | {pct(m['circular_accuracy'])} | {pct(m['vanilla_accuracy'])} |"]
    for g, a in m["per_category"].items():
        lines.append(f"| {g} | {a['n']} | {pct(a['circular'])} | {pct(a['vanilla'])} |")
    return "\n".join(lines) + "\n"


def summary_line(m: dict) -> str:
    return (f"{m['n_graded']} questions: circular {pct(m['circular_accuracy'])}, vanilla {pct(m['vanilla_accuracy'])}"
            f" ({m['n_unparsed']} unparsed replies)")


# -- helpers ------------------------------------------------------------------------------------------
def _decode(q: Question):
    try:
        data = base64.b64decode(q.image, validate=False)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"the image of question {q.index} is not valid base64 ({exc})") from exc
    if not data:
        raise ImageError(f"question {q.index} has no image")
    return load_image(data, name=f"the image of question {q.index}")


def _row(q: Question, r: int, shown: list[str], reply: str | None, error: str | None = None) -> dict:
    gt = None if q.answer is None else (q.answer - r) % len(q.options)
    row = {"index": q.index, "pass": r, "category": q.category, "l2_category": q.l2_category,
           "options": shown, "answer": None if gt is None else LETTERS[gt], "prediction": reply}
    if error is not None:
        row["error"] = error
    else:
        parsed = parse_answer(reply, shown)
        row["parsed"] = None if parsed is None else LETTERS[parsed]
        row["correct"] = gt is not None and parsed == gt
    return row
