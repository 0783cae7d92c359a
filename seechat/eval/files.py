"""The evaluation file formats: JSON lines in, JSON / CSV / Markdown out, image folders.

A captions file (what `seechat caption` writes, what `eval winrate` and `eval caption` read) has one JSON
object per line:

    {"image": "<path relative to the images folder>", "caption": "..."}

A reference file for `eval caption` may repeat an image (one line per reference caption) or give
`"captions": ["...", "..."]`. Image keys are compared as POSIX paths with any leading "./" removed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from ..data.images import IMAGE_SUFFIXES
from ..errors import DataError


def image_key(name: str) -> str:
    """The canonical form of an image path inside a data file: POSIX separators, no leading './'."""
    text = str(name).replace("\\", "/").strip()
    key = str(PurePosixPath(text))
    return "" if key == "." else key


def read_jsonl(path: str | os.PathLike, what: str = "data file") -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a line that is not a JSON object is an error."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"the {what} '{path}' does not exist: check the path")
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number} is not valid JSON ({exc.msg}): fix or remove that line") from exc
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{number} is not a JSON object: each line must be {{...}}")
            yield number, obj


def field(obj: dict, name: str, path, number: int, *, kind=str, required: bool = True):
    """obj[name], checked to be of `kind`; a missing or mistyped field is an error naming the line."""
    value = obj.get(name)
    if value is None:
        if required:
            raise DataError(f"{path}:{number} has no {name!r} field: every line needs one")
        return None
    if not isinstance(value, kind):
        raise DataError(f"{path}:{number}: {name!r} must be a {getattr(kind, '__name__', kind)}, got {value!r:.80}")
    return value


def read_captions(path: str | os.PathLike, what: str = "captions file") -> dict[str, str]:
    """{image key: caption} of a captions file; two different captions for one image are an error."""
    captions: dict[str, str] = {}
    lines: dict[str, int] = {}
    for number, obj in read_jsonl(path, what):
        key = image_key(field(obj, "image", path, number))
        caption = field(obj, "caption", path, number)
        if key in captions and captions[key] != caption:
            raise DataError(
                f"{path} has two different captions for {key!r} (lines {lines[key]} and {number}): keep one"
            )
        captions[key], lines[key] = caption, number
    return captions


def read_references(path: str | os.PathLike) -> dict[str, list[str]]:
    """{image key: [reference captions]}: lines may repeat an image, or carry "captions": [...]."""
    refs: dict[str, list[str]] = {}
    for number, obj in read_jsonl(path, "reference file"):
        key = image_key(field(obj, "image", path, number))
        if "captions" in obj:
            many = field(obj, "captions", path, number, kind=list)
            if not all(isinstance(c, str) for c in many):
                raise DataError(f"{path}:{number}: 'captions' must be a list of strings")
        else:
            many = [field(obj, "caption", path, number)]
        refs.setdefault(key, []).extend(many)
    return refs


def find_images(root: str | os.PathLike) -> list[str]:
    """Image keys (paths relative to `root`) of every image file under `root`, sorted; hidden folders skipped."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"the images folder '{root}' does not exist or is not a folder: check --images")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if Path(name).suffix.lower() in IMAGE_SUFFIXES and not name.startswith("."):
                found.append(image_key(os.path.relpath(os.path.join(dirpath, name), root)))
    return sorted(found)


def write_json(path: str | os.PathLike, obj) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: str | os.PathLike, rows) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def out_dir(path: str) -> Path:
    """The --out folder, created; a file in its place is an error."""
    if not path:
        raise DataError("give an output folder with --out DIR")
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise DataError(f"--out '{p}' is a file: give a folder (it is created if missing)")
    p.mkdir(parents=True, exist_ok=True)
    return p


def pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"
