"""Boxes through dialogue: referring-expression grounding (Acc@0.5, mean IoU) and detect-all (P/R, COCO mAP).

    seechat eval grounding --model DIR --data runs/refcoco/refs_val.jsonl --out runs/eval/ground
    seechat eval detect    --model DIR --data dets.jsonl --out runs/eval/detect

Grounding records (RefCOCO-style, what `seechat data refcoco` writes), one JSON object per line:

    {"image": "<path relative to the file's folder>", "expression": "红色的圆形",
     "bbox": [x, y, w, h] (pixels), "type": "<optional group>", "id": "<optional>"}

The model is asked `--prompt` (default 请框出{}。, {} = the expression) about the picture; the first box of its
answer (`<box>(x1,y1),(x2,y2)</box>`, 0..1000, see seechat.boxes) is compared with the true box: a hit when
IoU >= 0.5. Writes OUT/results.jsonl, OUT/metrics.json (acc50, mean IoU, per type) and OUT/grid.png (pictures
with the true box in green and the predicted one in red).

Detection records, one per picture and label:

    {"image": "...", "label": "三角形", "boxes": [[x, y, w, h], ...] (pixels; [] when there is none)}

The model is asked `--prompt` (default 找出所有的{}。); every box of its answer is a detection with score 1
(answers carry no confidence). Precision and recall at IoU 0.5 (greedy one-to-one matching), F1, and COCO
mAP@[.5:.95] and AP50 from pycocotools over the same detections.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..boxes import draw_boxes, iou, match, parse_boxes, xywh_to_xyxy
from ..chat.engine import GenerationSettings
from ..cli_helpers import LoadArgs, load_model, parse, setup_logging
from ..data.images import load_image
from ..errors import ConfigError, DataError, ImageError
from .files import field as get_field
from .files import out_dir, pct, read_jsonl, write_json, write_jsonl

log = logging.getLogger("seechat")


@dataclass
class GroundingArgs:
    """Which records, which question, where the results go."""

    data: str = field(default="", metadata={"help": "Records as JSON lines (see the module docstring)."})
    out: str = field(default="", metadata={"help": "Output folder for results.jsonl, metrics.json and grid.png."})
    prompt: str = field(default="", metadata={"help": "The question, {} standing for the expression or label "
                                                      "(default 请框出{}。 / 找出所有的{}。)."})
    batch_size: int = field(default=16, metadata={"help": "Questions answered together in one generate call."})
    max_new_tokens: int = field(default=96, metadata={"help": "Most tokens in one answer."})
    limit: int = field(default=0, metadata={"help": "Only the first N records (0: all)."})

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_new_tokens < 1 or self.limit < 0:
            raise ConfigError("--batch-size and --max-new-tokens must be >= 1, --limit >= 0")
        if self.prompt and "{}" not in self.prompt:
            raise ConfigError("--prompt needs {} where the expression goes, e.g. 请框出{}。")


# -- scoring ----------------------------------------------------------------------------------------------
def score_grounding(rows: list[dict]) -> dict:
    """Acc@0.5 and mean IoU overall and per type, from rows with 'iou' (rows with an 'error' are left out)."""
    scored = [r for r in rows if "error" not in r]

    def acc(rs):
        n = len(rs)
        return {"n": n, "acc50": sum(r["iou"] >= 0.5 for r in rs) / n if n else None,
                "mean_iou": sum(r["iou"] for r in rs) / n if n else None,
                "no_box": sum(r["predicted"] is None for r in rs)}

    types = sorted({r.get("type", "") for r in scored})
    return {**acc(scored), "n_unreadable": len(rows) - len(scored),
            "per_type": {t: acc([r for r in scored if r.get("type", "") == t]) for t in types if t}}


def grounding_row(record: dict, answer: str, width: int, height: int) -> dict:
    """One result: the first predicted box in pixels, and its IoU with the true (x0, y0, x1, y1) box."""
    boxes = parse_boxes(answer)
    truth = record["box"]
    predicted = list(boxes[0].to_pixels(width, height)) if boxes else None
    return {"id": record.get("id"), "image": record["image"], "type": record.get("type", ""),
            "expression": record.get("expression"), "answer": answer, "truth": list(truth),
            "predicted": predicted, "iou": iou(predicted, truth) if predicted else 0.0}


def score_detection(rows: list[dict]) -> dict:
    """Precision / recall / F1 at IoU 0.5 and COCO mAP (pycocotools) from rows with 'truth' and 'predicted'
    pixel boxes (x0, y0, x1, y1) per picture and label."""
    scored = [r for r in rows if "error" not in r]
    n_pred = sum(len(r["predicted"]) for r in scored)
    n_true = sum(len(r["truth"]) for r in scored)
    hits = sum(match(r["predicted"], r["truth"]) for r in scored)
    precision = hits / n_pred if n_pred else (1.0 if not n_true else 0.0)
    recall = hits / n_true if n_true else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    exact = sum(len(r["predicted"]) == len(r["truth"]) == match(r["predicted"], r["truth"]) for r in scored)
    return {"n": len(scored), "n_true_boxes": n_true, "n_predicted_boxes": n_pred, "precision": precision,
            "recall": recall, "f1": f1, "all_found_exactly": exact / len(scored) if scored else None,
            **coco_map(scored), "n_unreadable": len(rows) - len(scored)}


def coco_map(rows: list[dict]) -> dict:
    """COCO mAP@[.5:.95] and AP50 through pycocotools (one category per label, one image per row)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    labels = sorted({r.get("label", "") for r in rows})
    cat = {name: k + 1 for k, name in enumerate(labels)}
    images, anns, dets = [], [], []
    for k, r in enumerate(rows, 1):
        images.append({"id": k, "width": r.get("width", 1000), "height": r.get("height", 1000)})
        for box in r["truth"]:
            x0, y0, x1, y1 = box
            anns.append({"id": len(anns) + 1, "image_id": k, "category_id": cat[r.get("label", "")],
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
        for box in r["predicted"]:
            x0, y0, x1, y1 = box
            dets.append({"image_id": k, "category_id": cat[r.get("label", "")], "bbox": [x0, y0, x1 - x0, y1 - y0],
                         "score": 1.0})
    if not anns or not dets:
        return {"map": 0.0 if anns else None, "ap50": 0.0 if anns else None}
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):  # pycocotools prints its tables
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": v, "name": n} for n, v in cat.items()]}
        gt.createIndex()
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"map": max(0.0, float(ev.stats[0])), "ap50": max(0.0, float(ev.stats[1]))}


# -- reading ----------------------------------------------------------------------------------------------
def read_refs(path: str) -> list[dict]:
    """Grounding records with image paths resolved and boxes as pixel (x0, y0, x1, y1)."""
    base = Path(path).parent
    items = []
    for number, obj in read_jsonl(path, "grounding file"):
        image = get_field(obj, "image", path, number)
        items.append({"id": str(obj.get("id", number)), "image": image, "path": base / image,
                      "expression": get_field(obj, "expression", path, number),
                      "box": xywh_to_xyxy(_bbox(obj.get("bbox"), path, number)), "type": str(obj.get("type") or "")})
    if not items:
        raise DataError(f"the grounding file '{path}' has no records: each line needs image, expression, bbox")
    return items


def read_detections(path: str) -> list[dict]:
    base = Path(path).parent
    items = []
    for number, obj in read_jsonl(path, "detection file"):
        image = get_field(obj, "image", path, number)
        boxes = get_field(obj, "boxes", path, number, kind=list)
        items.append({"id": str(obj.get("id", number)), "image": image, "path": base / image,
                      "label": get_field(obj, "label", path, number),
                      "truth": [xywh_to_xyxy(_bbox(b, path, number)) for b in boxes]})
    if not items:
        raise DataError(f"the detection file '{path}' has no records: each line needs image, label, boxes")
    return items


def _bbox(value, path, number) -> list[float]:
    if (not isinstance(value, list) or len(value) != 4 or not all(isinstance(v, (int, float)) for v in value)
            or value[2] <= 0 or value[3] <= 0):
        raise DataError(f"{path}:{number}: a box must be [x, y, w, h] in pixels with w, h > 0, got {value!r:.80}")
    return value


# -- running ----------------------------------------------------------------------------------------------
def ask(model, items: list[dict], questions: list[str], batch_size: int, max_new_tokens: int) -> list:
    """(answer, width, height) per item, or the reason its image cannot be read (a string)."""
    from tqdm.auto import tqdm

    from ..chat.batch import generate_batch

    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    out: list = [None] * len(items)
    for start in tqdm(range(0, len(items), batch_size), desc="boxes", unit="batch", leave=False):
        ready, images = [], []
        for k in range(start, min(start + batch_size, len(items))):
            try:
                images.append(load_image(items[k]["path"], name=f"'{items[k]['image']}'"))
                ready.append(k)
            except ImageError as exc:
                log.warning("left out (unreadable): %s", exc)
                out[k] = str(exc)
        if ready:
            replies = generate_batch(model, images, [questions[k] for k in ready], settings)
            for k, im, reply in zip(ready, images, replies):
                out[k] = (reply.text, im.width, im.height)
    return out


def run_grounding(model, items: list[dict], out: Path, *, prompt: str = "", batch_size: int = 16,
                  max_new_tokens: int = 96) -> dict:
    prompt = prompt or "请框出{}。"
    answers = ask(model, items, [prompt.format(it["expression"]) for it in items], batch_size, max_new_tokens)
    rows = [{"id": it["id"], "image": it["image"], "error": a} if isinstance(a, str) else grounding_row(it, *a)
            for it, a in zip(items, answers)]
    write_jsonl(out / "results.jsonl", rows)
    metrics = score_grounding(rows)
    write_json(out / "metrics.json", metrics)
    grid(items, rows, out / "grid.png")
    return metrics


def run_detect(model, items: list[dict], out: Path, *, prompt: str = "", batch_size: int = 16,
               max_new_tokens: int = 160) -> dict:
    prompt = prompt or "找出所有的{}。"
    answers = ask(model, items, [prompt.format(it["label"]) for it in items], batch_size, max_new_tokens)
    rows = []
    for it, a in zip(items, answers):
        if isinstance(a, str):
            rows.append({"id": it["id"], "image": it["image"], "error": a})
            continue
        text, w, h = a
        rows.append({"id": it["id"], "image": it["image"], "label": it["label"], "answer": text, "width": w,
                     "height": h, "truth": [list(b) for b in it["truth"]],
                     "predicted": [list(b.to_pixels(w, h)) for b in parse_boxes(text)]})
    write_jsonl(out / "results.jsonl", rows)
    metrics = score_detection(rows)
    write_json(out / "metrics.json", metrics)
    grid(items, rows, out / "grid.png")
    return metrics


def grid(items: list[dict], rows: list[dict], path: Path, n: int = 16) -> Path | None:
    """Up to n pictures with the true boxes (green) and the predicted ones (red)."""
    from PIL import Image

    shown = [(it, r) for it, r in zip(items, rows) if "error" not in r][:n]
    if not shown:
        return None
    side, cols = 192, 4
    sheet = Image.new("RGB", (side * cols, side * ((len(shown) + cols - 1) // cols)), "white")
    for k, (it, r) in enumerate(shown):
        img = load_image(it["path"])
        truth, predicted = _box_list(r["truth"]), _box_list(r.get("predicted"))
        factor = side / max(img.size)
        scaled = [[v * factor for v in b] for b in truth + predicted]
        drawn = draw_boxes(img.resize((round(img.width * factor), round(img.height * factor))), scaled,
                           colours=[(40, 170, 60)] * len(truth) + [(220, 30, 30)] * len(predicted), width=2)
        sheet.paste(drawn, (side * (k % cols), side * (k // cols)))
    sheet.save(path)
    return path


def _box_list(value) -> list:
    """One box or a list of boxes (or None) as a list of boxes."""
    if not value:
        return []
    return [value] if isinstance(value[0], (int, float)) else list(value)


def main_grounding(argv: list[str]) -> int:
    load_args, args = parse("seechat eval grounding", argv, LoadArgs, GroundingArgs,
                            description="referring-expression grounding: Acc@0.5 and mean IoU")
    setup_logging()
    if not args.data:
        raise ConfigError("give the records with --data refs.jsonl")
    items = read_refs(args.data)[: args.limit or None]
    out = out_dir(args.out)
    metrics = run_grounding(load_model(load_args), items, out, prompt=args.prompt, batch_size=args.batch_size,
                            max_new_tokens=args.max_new_tokens)
    log.info("%d expressions: Acc@0.5 %s, mean IoU %.3f (%s)", metrics["n"], pct(metrics["acc50"]),
             metrics["mean_iou"] or 0, out)
    return 0


def main_detect(argv: list[str]) -> int:
    load_args, args = parse("seechat eval detect", argv, LoadArgs, GroundingArgs,
                            description="detect-all answers: precision/recall at IoU 0.5, COCO mAP")
    setup_logging()
    if not args.data:
        raise ConfigError("give the records with --data dets.jsonl")
    items = read_detections(args.data)[: args.limit or None]
    out = out_dir(args.out)
    metrics = run_detect(load_model(load_args), items, out, prompt=args.prompt, batch_size=args.batch_size,
                         max_new_tokens=args.max_new_tokens)
    log.info("%d questions: precision %s, recall %s, F1 %s, mAP %.3f (%s)", metrics["n"], pct(metrics["precision"]),
             pct(metrics["recall"]), pct(metrics["f1"]), metrics["map"] or 0, out)
    return 0
