"""RefCOCO / RefCOCO+ / RefCOCOg -> seechat training conversations and `eval grounding` records.

    seechat data refcoco --refs refcoco/refs(unc).p --instances refcoco/instances.json \
        --images coco/train2014 --out runs/refcoco [--splits train val testA testB] [--prompt 请框出{}。]

Reads the layout the datasets ship in (refer's `refs(unc).p`, `refs(umd).p` or `refs(google).p`: a pickled list
of refs {ref_id, ann_id, image_id, split, sentences: [{sent, raw, ...}], ...}; and `instances.json`: COCO
images and annotations with [x, y, w, h] pixel boxes). The pickle is read with a restricted unpickler that
builds plain containers only (lists, dicts, strings, numbers; sets): a file that asks for any other class is
refused, so a crafted file cannot run code.

Writes into OUT:
  <split>.json          LLaVA-format conversations, one per picture: "请框出{expression}。" ->
                        "<ref>{expression}</ref><box>(x1,y1),(x2,y2)</box>" (seechat.boxes, 0..1000), one turn
                        per referring expression (train them with `seechat train instruct`)
  refs_<split>.jsonl    `seechat eval grounding` records {image, expression, bbox [x, y, w, h], type, id}
                        (type: the COCO category name)
Image paths are written relative to OUT, pointing into --images.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

from ..boxes import box_text
from ..cli_helpers import parse, setup_logging
from ..errors import ConfigError, DataError

log = logging.getLogger("seechat")

_ALLOWED = {("builtins", "set"), ("builtins", "frozenset"), ("__builtin__", "set"), ("__builtin__", "frozenset")}


class PlainUnpickler(pickle.Unpickler):
    """Unpickles plain containers only: any class or function the file names is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return set if name == "set" else frozenset
        raise DataError(f"the pickle asks for {module}.{name}; only plain lists, dicts, strings and numbers are "
                        "accepted (is this really a RefCOCO refs file?)")


def load_refs(path: str | os.PathLike) -> list[dict]:
    """The refs of a `refs(*).p` file, read with PlainUnpickler (Python 2 pickles included)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"the refs file '{path}' does not exist: give refs(unc).p (or umd/google) with --refs")
    try:
        refs = PlainUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - any malformed pickle is a data problem
        raise DataError(f"'{path}' is not a readable refs pickle ({exc})") from exc
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise DataError(f"'{path}' does not hold a list of refs (dicts)")
    return refs


@dataclass
class RefcocoArgs:
    refs: str = field(default="", metadata={"help": "refs(unc).p (RefCOCO, RefCOCO+), refs(umd).p or refs(google).p."})
    instances: str = field(default="", metadata={"help": "The matching instances.json (COCO images and boxes)."})
    images: str = field(default="", metadata={"help": "Folder of the COCO pictures (e.g. coco/train2014)."})
    out: str = field(default="", metadata={"help": "Output folder."})
    splits: list[str] = field(default_factory=list, metadata={"help": "Splits to write (default: every split found)."})
    prompt: str = field(default="请框出{}。", metadata={"help": "The question, {} standing for the expression."})

    def __post_init__(self) -> None:
        if "{}" not in self.prompt:
            raise ConfigError("--prompt needs {} where the expression goes, e.g. 请框出{}。")


def convert(refs: list[dict], instances: dict, images: Path, out: Path, *, splits: list[str] | None = None,
            prompt: str = "请框出{}。") -> dict[str, dict]:
    """Write OUT/<split>.json and OUT/refs_<split>.jsonl; return counts per split."""
    try:
        pictures = {im["id"]: im for im in instances["images"]}
        anns = {a["id"]: a for a in instances["annotations"]}
        cats = {c["id"]: c["name"] for c in instances.get("categories", [])}
    except (KeyError, TypeError) as exc:
        raise DataError(f"instances.json needs images [{{id, file_name, width, height}}] and annotations "
                        f"[{{id, image_id, bbox}}] ({exc!r})") from exc
    out.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(images, out)
    by_split: dict[str, dict[int, list]] = {}
    skipped = 0
    for ref in refs:
        split = str(ref.get("split", ""))
        if splits and split not in splits:
            continue
        ann = anns.get(ref.get("ann_id"))
        picture = pictures.get(ref.get("image_id"))
        if ann is None or picture is None or not ref.get("sentences"):
            skipped += 1
            continue
        by_split.setdefault(split, {}).setdefault(picture["id"], []).append((ref, ann))
    counts = {}
    for split, per_picture in sorted(by_split.items()):
        convs, records = [], []
        for image_id, items in per_picture.items():
            picture = pictures[image_id]
            name = f"{rel}/{picture['file_name']}"
            w, h = picture["width"], picture["height"]
            turns = []
            for ref, ann in items:
                x, y, bw, bh = ann["bbox"]
                for sentence in ref["sentences"]:
                    text = str(sentence.get("sent") or sentence.get("raw") or "").strip()
                    if not text:
                        continue
                    question = prompt.format(text)
                    turns += [{"from": "human", "value": ("<image>\n" if not turns else "") + question},
                              {"from": "gpt", "value": box_text((x, y, x + bw, y + bh), w, h, text)}]
                    records.append({"id": f"{ref.get('ref_id')}-{sentence.get('sent_id', len(records))}",
                                    "image": name, "expression": text, "bbox": [x, y, bw, bh],
                                    "type": cats.get(ann.get("category_id"), str(ann.get("category_id", "")))})
            if turns:
                convs.append({"id": f"{split}-{image_id}", "image": name, "conversations": turns})
        (out / f"{split}.json").write_text(json.dumps(convs, ensure_ascii=False), encoding="utf-8")
        with open(out / f"refs_{split}.jsonl", "w", encoding="utf-8") as fh:
            for r in records:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        counts[split] = {"pictures": len(convs), "expressions": len(records)}
    if skipped:
        log.warning("%d refs skipped: their annotation or picture is missing from instances.json", skipped)
    return counts


def main(argv: list[str]) -> int:
    (args,) = parse("seechat data refcoco", argv, RefcocoArgs, description=__doc__.split("\n")[0])
    setup_logging()
    if not (args.refs and args.instances and args.images and args.out):
        raise ConfigError("give --refs refs(unc).p --instances instances.json --images DIR --out DIR")
    path = Path(args.instances)
    if not path.is_file():
        raise DataError(f"the instances file '{path}' does not exist: give instances.json with --instances")
    try:
        instances = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"'{path}' is not valid JSON ({exc})") from exc
    counts = convert(load_refs(args.refs), instances, Path(args.images), Path(args.out), splits=args.splits or None,
                     prompt=args.prompt)
    for split, c in counts.items():
        log.info("%s: %d pictures, %d expressions -> %s/%s.json, refs_%s.jsonl", split, c["pictures"],
                 c["expressions"], args.out, split, split)
    if not counts:
        raise DataError("no refs matched: check --splits and that the refs file belongs to these instances")
    return 0
