"""Accuracy on the toy world's question sets: the `seechat eval vqa` benchmark (batched), boxes judged by IoU.

A text answer is right when it equals the expected one, except that an answer which works its way to a
decision (existence, counting, yes/no, region, several-picture comparison: what is there, each checked, then
所以有。 / 共两个。 / 所以是一个红色的圆形。 / 所以是第二张。) is right when its decision, the clause after its last
comma, is: the question asked for the decision, as a counting benchmark reads the number. A description of
several shapes (图中有三个图形：…、…和…。) is right when it says how many there are and lists the same shapes,
in any order: the order it is taught (rows of 16-pixel cells, then left to right) turns on which side of a
cell's edge a centre lies, which a picture need not show. `per_type_exact` keeps the whole-answer rates. A
refer-to-box answer is right when its first box has IoU >= 0.5 with the shape's box; a detect-all answer when
it gives exactly as many boxes as there are shapes of that kind and each matches a distinct one at IoU >= 0.5
(or says there is none, when there is none).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

from ...boxes import iou, match, parse_boxes
from ...eval.grounding import score_detection
from ...eval.vqa import read_questions, run_vqa
from . import world

log = logging.getLogger("seechat")


DECIDED = ("counting", "exist", "yesno", "compare", "region")
"""Types whose answers work their way to a decision in their last clause."""
LISTED = ("description", "later")
"""Types whose answers describe a picture: several shapes are judged as a listing in any order (`listing`)."""


def interval95(right: int, n: int) -> list[float]:
    """Wilson's 95% score interval of an accuracy of `right` in `n` (a few lines; scipy is no dependency)."""
    z = 1.959964
    p, z2 = right / n, z * z / n
    centre, half = (p + z2 / 2) / (1 + z2), z * ((p * (1 - p) + z2 / 4) / n) ** 0.5 / (1 + z2)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def decision(answer: str) -> str:
    """The clause after an answer's last comma, without the full stop: 所以有 / 共两个 / 一个也没有."""
    return answer.strip().rstrip("。").rsplit("，", 1)[-1]


def listing(answer: str) -> tuple[str, list[str]] | None:
    """A description of several shapes as (how many it says there are, the shapes it lists, sorted); None for
    any other answer."""
    head, colon, listed = answer.strip().rstrip("。").partition("：")
    if not colon or not head.startswith("图中有"):
        return None
    return head, sorted(re.split("[、和]", listed))


def judge(record: dict, prediction: str) -> tuple[bool, float | None]:
    """(right?, IoU of a refer answer's first box or None)."""
    if record["type"] == "refer":
        boxes = parse_boxes(prediction)
        value = iou(boxes[0].to_pixels(world.IMAGE_SIZE, world.IMAGE_SIZE), record["boxes"][0]) if boxes else 0.0
        return value >= 0.5, value
    if record["type"] == "detect":
        predicted = [b.to_pixels(world.IMAGE_SIZE, world.IMAGE_SIZE) for b in parse_boxes(prediction)]
        truth = record["boxes"]
        if not truth:  # 图中是…（不是），没有三角形。: no box, and the same decision
            return not predicted and decision(prediction) == decision(record["answer"]), None
        return len(predicted) == len(truth) == match(predicted, truth), None
    if record["type"] in DECIDED:
        return decision(prediction) == decision(record["answer"]), None
    if record["type"] in LISTED and listing(record["answer"]) is not None:
        return listing(prediction) == listing(record["answer"]), None
    return prediction.strip() == record["answer"].strip(), None


def evaluate_splits(model_dir: Path, data: Path, out: Path, splits: list[str], *, max_new_tokens: int = 96,
                    processes: int | None = None) -> dict[str, dict]:
    """`evaluate_split` of data/SPLIT into out/SPLIT for each split, the model loaded from model_dir (CPU, fp32).

    `processes` (None: 2 where there are 2 cores or more and 1,000 questions or more) processes share the splits,
    largest first, and the cores: answering with this small model is mostly the per-token work of each step, which
    threads hardly share (on 2 cores the six splits of a build, 3,810 questions, took 22.5-25.6 s in two one-thread
    processes, their start included, against 28.9-33.0 s in one of two threads, runs interleaved, with the same
    answers). The workers are fresh interpreters (`python -m` this module), so a caller's script is never imported
    again; a split a worker did not finish is answered here."""
    import os
    import subprocess
    import time

    from tqdm.auto import tqdm

    cores = os.cpu_count() or 1
    size = {s: sum(1 for _ in open(data / s / "qa.jsonl", encoding="utf-8")) for s in splits}
    if processes is None:  # a worker's start (importing torch and transformers) costs about 5 s
        processes = 2 if cores >= 2 and sum(size.values()) >= 1000 else 1
    processes = min(processes, len(splits))
    groups: list[list[str]] = [[] for _ in range(processes)]
    for split in sorted(splits, key=lambda s: -size[s]):  # each to the least loaded worker
        min(groups, key=lambda g: sum(size[s] for s in g)).append(split)
    for split in splits:
        (out / split / SUMMARY).unlink(missing_ok=True)
    bar = tqdm(total=len(splits), desc="evaluate", unit="split", leave=False)
    if processes > 1:
        root = str(Path(__file__).resolve().parents[3])  # the folder holding this seechat package
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
               "OMP_NUM_THREADS": str(max(1, cores // processes))}
        out.mkdir(parents=True, exist_ok=True)
        logs = [out / f"worker{i}.log" for i in range(processes)]
        workers = []
        for g, log_file in zip(groups, logs):
            with open(log_file, "w") as fh:  # a file, not a pipe: a pipe nobody reads would stall a chatty worker
                workers.append(subprocess.Popen([sys.executable, "-m", __name__, str(model_dir), str(data), str(out),
                                                 ",".join(g), str(max_new_tokens)], env=env,
                                                stdout=subprocess.DEVNULL, stderr=fh))
        while any(w.poll() is None for w in workers):
            time.sleep(0.5)
            bar.n = sum((out / s / SUMMARY).is_file() for s in splits)
            bar.refresh()
        for w, log_file in zip(workers, logs):
            if w.returncode:
                log.warning("toy world: an evaluation worker stopped (exit %s; %s): answering its splits here",
                            w.returncode, log_file.read_text(errors="replace").strip()[-500:])
            else:
                log_file.unlink(missing_ok=True)
    results = {}
    model = None
    for split in splits:
        f = out / split / SUMMARY
        if f.is_file():
            results[split] = json.loads(f.read_text())
        else:
            if model is None:
                from ... import load

                model = load(model_dir, device="cpu", dtype="fp32")
            results[split] = evaluate_split(model, data / split, out / split, max_new_tokens=max_new_tokens,
                                            progress=False)
        bar.n = len(results)
        bar.refresh()
    bar.close()
    return results


SUMMARY = "summary.json"
"""What `evaluate_split` returned, beside its results.jsonl, when a worker process answered the split."""


def evaluate_split(model, split_dir: Path, out: Path, *, batch_size: int = 48, max_new_tokens: int = 96,
                   progress: bool = True) -> dict:
    """Answer every question of split_dir/qa.jsonl (follow-ups after their history); write out/results.jsonl."""
    out.mkdir(parents=True, exist_ok=True)
    run_vqa(model, read_questions(str(split_dir)), out, batch_size=batch_size, max_new_tokens=max_new_tokens,
            progress=progress)
    truth = {}
    for line in open(split_dir / "qa.jsonl", encoding="utf-8"):
        rec = json.loads(line)
        truth[rec["id"]] = rec
    rows = [json.loads(line) for line in open(out / "results.jsonl", encoding="utf-8")]
    by_type: dict[str, list[bool]] = {}
    exact: dict[str, list[bool]] = {}
    ious, detections = [], []
    for row in rows:
        rec = truth[row["id"]]
        right, value = judge(rec, row["prediction"] or "")
        row["right"] = right
        by_type.setdefault(rec["type"], []).append(right)
        exact.setdefault(rec["type"], []).append((row["prediction"] or "").strip() == rec["answer"].strip())
        if value is not None:
            ious.append(value)
        if rec["type"] == "detect":
            detections.append({"label": rec["label"], "truth": rec["boxes"], "width": world.IMAGE_SIZE,
                               "height": world.IMAGE_SIZE,
                               "predicted": [list(b.to_pixels(world.IMAGE_SIZE, world.IMAGE_SIZE))
                                             for b in parse_boxes(row["prediction"] or "")]})
    with open(out / "results.jsonl", "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    order = [t for t in dict.fromkeys((*world.QUESTION_TYPES, *world.MULTI_KINDS)) if t in by_type]
    everything = [r for t in order for r in by_type[t]]
    return {
        "accuracy": round(sum(everything) / len(everything), 4),
        "per_type": {t: round(sum(by_type[t]) / len(by_type[t]), 4) for t in order},
        "per_type_interval95": {t: interval95(sum(by_type[t]), len(by_type[t])) for t in order},
        "per_type_n": {t: len(by_type[t]) for t in order},
        "per_type_exact": {t: round(sum(exact[t]) / len(exact[t]), 4) for t in order},
        "grounding_acc50": round(sum(v >= 0.5 for v in ious) / len(ious), 4) if ious else None,
        "grounding_miou": round(sum(ious) / len(ious), 4) if ious else None,
        "detect": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in score_detection(detections).items()}
        if detections else {"f1": None, "precision": None, "recall": None},
        "n_questions": len(rows),
    }


def main(argv: list[str]) -> int:
    """A worker of `evaluate_splits`: MODEL_DIR DATA OUT SPLIT[,SPLIT...] MAX_NEW_TOKENS."""
    if len(argv) != 5 or not argv[4].isdigit():
        print("usage: python -m seechat.toyworld.v2.evaluate MODEL_DIR DATA OUT SPLIT[,SPLIT...] MAX_NEW_TOKENS "
              "(a worker of the toy world v2's evaluation; `seechat toyworld build --world v2` runs it)",
              file=sys.stderr)
        return 2
    model_dir, data, out, splits, max_new_tokens = argv
    from ... import load

    model = load(Path(model_dir), device="cpu", dtype="fp32")
    for split in splits.split(","):
        result = evaluate_split(model, Path(data) / split, Path(out) / split, max_new_tokens=int(max_new_tokens),
                                progress=False)
        (Path(out) / split / SUMMARY).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
