"""Training data sources: where records come from, turned into conversations with image references.

Formats (DataSource.format; 'auto' picks by file name):
  captions   JSONL lines {"image": "rel/path.jpg", "caption": "..."}          (indexed: random access)
  csv        CSV with columns image, caption                                   (streamed)
  webdataset tar shards as img2dataset writes them (jpg/png + txt or json),
             a brace pattern or glob: "shards/{00000..00099}.tar"              (streamed)
  llava      LLaVA JSON: [{"image": "x.jpg", "conversations": [{"from": "human", "value": "<image>\\n..."}, ...]}]
  messages   JSONL lines {"messages": [{"role": "user", "content": "..."}, ...], "images": ["a.jpg", ...]}

A caption becomes a one-turn conversation: the user asks a prompt drawn from a list, the caption is the answer.
Image paths are relative to the source's image_root (default: the data file's folder).
"""

from __future__ import annotations

import csv
import glob
import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .processor import IMAGE, IMAGE_MARKER, content

DEFAULT_CAPTION_PROMPTS = [
    "详细描述这张图片",
    "请描述这张图片。",
    "这张图片里有什么？",
    "用一句话描述这张图片。",
    "简要说明图片的内容。",
]
FORMATS = ("captions", "csv", "webdataset", "llava", "messages")
UNREADABLE_SHARD = "unreadable shard"
"""How a shard that cannot be read (not a tar, truncated, unreadable member) is reported as a bad sample."""
ROLE_OF = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class BadSample(Exception):
    """A record that cannot be used; training skips and counts it."""


@dataclass
class Record:
    """One training example before tokenisation."""

    messages: list[dict]
    images: list  # paths (str) or raw bytes
    where: str
    """Where it came from (file:line or shard/key), for error messages."""


@dataclass
class DataSource:
    """One file (or set of shards) of training data."""

    path: str = ""
    """A JSONL/JSON/CSV file, or for webdataset a brace pattern or glob of .tar shards."""
    format: str = "auto"
    """captions, csv, webdataset, llava, messages, or auto (by file name)."""
    image_root: str | None = None
    """Folder the image paths are relative to (default: the data file's folder)."""

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError("a data source needs a path")
        if self.format == "auto":
            self.format = _guess_format(self.path)
        if self.format not in FORMATS:
            raise ConfigError(f"data format must be one of {list(FORMATS)} or auto, got {self.format!r}")

    @property
    def streamed(self) -> bool:
        return self.format in ("csv", "webdataset")

    @property
    def root(self) -> Path:
        return Path(self.image_root) if self.image_root else Path(self.path).parent


def _guess_format(path: str) -> str:
    p = path.lower()
    if p.endswith(".tar") or "{" in p or p.endswith(".tar}"):
        return "webdataset"
    if p.endswith(".csv"):
        return "csv"
    if p.endswith(".json"):
        return "llava"
    if p.endswith(".jsonl"):
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    return "messages" if '"messages"' in line else "captions"
        return "captions"
    raise ConfigError(f"cannot tell the format of {path!r} from its name: set format to one of {list(FORMATS)}")


# -- turning raw records into conversations -----------------------------------------------------------------
def caption_record(caption, image, where: str, prompts: list[str], rng: random.Random) -> Record:
    if not isinstance(caption, str) or not caption.strip():
        raise BadSample("empty caption")
    if not image:
        raise BadSample("no image")
    prompt = prompts[rng.randrange(len(prompts))]
    messages = [
        {"role": "user", "content": content([IMAGE, prompt])},
        {"role": "assistant", "content": caption.strip()},
    ]
    return Record(messages, [image], where)


def conversation_record(messages: list[dict], images: list, where: str) -> Record:
    """Check a multi-turn conversation and apply the marker rule.

    Marker rule: markers in user messages stand for the images in order and must match their number.
    A record with images but no marker at all gets one '<image>\\n' per image at the start of its first
    user message (LLaVA's convention).
    """
    if not messages:
        raise BadSample("no messages")
    for m in messages:
        if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            raise BadSample(f"bad message {str(m)[:60]!r}")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise BadSample("no assistant answer to learn from")
    markers = sum(m["content"].count(IMAGE_MARKER) for m in messages if m["role"] == "user")
    if any(IMAGE_MARKER in m["content"] for m in messages if m["role"] != "user"):
        raise BadSample("<image> marker outside a user message")
    if markers == 0 and images:
        first = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
        if first is None:
            raise BadSample("images but no user message")
        messages = [dict(m) for m in messages]
        messages[first]["content"] = content([IMAGE] * len(images) + [messages[first]["content"]])
    elif markers != len(images):
        raise BadSample(f"{markers} <image> marker(s) but {len(images)} image(s)")
    return Record(messages, list(images), where)


def llava_record(item, where: str) -> Record:
    if not isinstance(item, dict) or not isinstance(item.get("conversations"), list):
        raise BadSample("not a LLaVA item (needs 'conversations')")
    messages = []
    for turn in item["conversations"]:
        role = ROLE_OF.get(turn.get("from")) if isinstance(turn, dict) else None
        if role is None or not isinstance(turn.get("value"), str):
            raise BadSample(f"bad turn {str(turn)[:60]!r}")
        messages.append({"role": role, "content": turn["value"]})
    image = item.get("image")
    images = [] if image is None else (image if isinstance(image, list) else [image])
    return conversation_record(messages, images, where)


def messages_record(item, where: str) -> Record:
    if not isinstance(item, dict) or not isinstance(item.get("messages"), list):
        raise BadSample("not a messages item (needs 'messages')")
    images = item.get("images") or []
    if not isinstance(images, list):
        raise BadSample("'images' must be a list")
    return conversation_record(item["messages"], images, where)


# -- indexed sources (random access) -------------------------------------------------------------------------
class IndexedSource:
    """Random access to the records of a JSONL or LLaVA JSON file, through byte offsets found once.

    Only the offsets (8 bytes per record) are held in memory and copied into dataloader workers; each record is
    read from disk and parsed when it is used. A LLaVA JSON array is scanned once for where each item starts and
    ends (the items are parsed one at a time and dropped).
    """

    def __init__(self, source: DataSource, prompts: list[str], seed: int = 0):
        self.source, self.prompts, self.seed = source, prompts, seed
        path = Path(source.path)
        if not path.is_file():
            raise ConfigError(f"data file {source.path!r} does not exist")
        if source.format == "llava":
            self.offsets, self.ends = _json_array_offsets(path)
        else:
            self.offsets = _line_offsets(path)
            self.ends = np.append(self.offsets[1:], path.stat().st_size).astype(np.int64)

    def __len__(self) -> int:
        return len(self.offsets)

    def record(self, i: int) -> Record:
        llava = self.source.format == "llava"
        where = f"{self.source.path}[{i}]" if llava else f"{self.source.path}:{i + 1}"
        with open(self.source.path, "rb") as fh:
            fh.seek(int(self.offsets[i]))
            raw = fh.read(int(self.ends[i] - self.offsets[i])) if llava else fh.readline()
        try:
            item = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadSample(f"not valid JSON ({exc.__class__.__name__})") from exc
        if llava:
            return llava_record(item, where)
        if self.source.format == "messages":
            return messages_record(item, where)
        if not isinstance(item, dict):
            raise BadSample("not a JSON object")
        rng = random.Random(f"{self.seed}:{Path(self.source.path).name}:{i}")  # not the full path: a moved dataset draws the same prompts
        return caption_record(item.get("caption"), item.get("image"), where, self.prompts, rng)

    def text_length(self, i: int) -> int:
        """A cheap size estimate (bytes of the record) for length-grouped batching."""
        return int(self.ends[i] - self.offsets[i])


def _json_array_offsets(path: Path, block: int = 1 << 24) -> tuple[np.ndarray, np.ndarray]:
    """Byte ranges of the items of a JSON array file, read in 16 MB blocks.

    The bytes are decoded as Latin-1 (one character per byte), so the decoder's character positions are byte
    offsets; JSON's structure is ASCII, so item boundaries come out right whatever the text's encoding. The
    items decoded on the way are dropped (each is parsed again, as UTF-8, when used). The standard library has
    no incremental JSON reader that reports positions, hence this loop.
    """
    decoder = json.JSONDecoder()
    starts: list[int] = []
    ends: list[int] = []
    with open(path, "rb") as fh:
        buf, base, pos, eof = "", 0, 0, False

        def more() -> bool:
            nonlocal buf, base, pos, eof
            chunk = fh.read(block)
            eof = not chunk
            buf, base, pos = buf[pos:] + chunk.decode("latin-1"), base + pos, 0
            return not eof

        def skip(chars: str) -> str:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in chars:
                    pos += 1
                if pos < len(buf) or not more():
                    return buf[pos] if pos < len(buf) else ""

        if skip(" \t\r\n\ufeff\xef\xbb\xbf") != "[":
            raise ConfigError(f"{path}: LLaVA data must be a JSON list of items (the file does not start with '[')")
        pos += 1
        while True:
            c = skip(" \t\r\n,")
            if c == "]":
                break
            if c == "":
                raise ConfigError(f"{path} is not valid JSON: the list is not closed (a truncated file?)")
            try:
                _, end = decoder.raw_decode(buf, pos)
                if end == len(buf) and not eof:  # a number cut by the block edge would decode short
                    raise json.JSONDecodeError("needs more", buf, end)
            except json.JSONDecodeError as exc:
                if more():
                    continue
                raise ConfigError(f"{path} is not valid JSON near byte {base + exc.pos} ({exc.msg})") from exc
            starts.append(base + pos)
            ends.append(base + end)
            pos = end
    return np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)


def _line_offsets(path: Path) -> np.ndarray:
    """Byte offsets of the non-blank lines of a file, found in 16 MB blocks (the lines are not kept)."""
    data = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
    block = 1 << 24
    newlines = [np.flatnonzero(data[i : i + block] == 10) + i for i in range(0, len(data), block)]
    nl = np.concatenate(newlines) if newlines else np.zeros(0, np.int64)
    starts = np.concatenate([[0], nl + 1]).astype(np.int64)
    ends = np.concatenate([nl, [len(data)]]).astype(np.int64)
    length = ends - starts
    keep = length > 0
    single = np.flatnonzero(length == 1)
    keep[single] = data[starts[single]] != 13  # a lone "\r" (a blank line of a CRLF file)
    return starts[keep]


# -- streamed sources -----------------------------------------------------------------------------------------
def stream_records(source: DataSource, prompts: list[str], seed: int, epoch: int, rank: int, world: int,
                   worker: int = 0, workers: int = 1) -> Iterator[Record | BadSample]:
    """Records of a CSV file or webdataset shards, for this rank and worker; bad ones come out as BadSample."""
    rng = random.Random(f"{seed}:{epoch}:{rank}:{worker}")
    if source.format == "csv":
        yield from _csv_records(source, prompts, rng, rank * workers + worker, world * workers)
    else:
        yield from _shard_records(source, prompts, rng, seed, epoch, rank * workers + worker, world * workers)


def _csv_records(source, prompts, rng, part, parts):
    try:
        fh = open(source.path, newline="", encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {source.path}: {exc}") from exc
    with fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"image", "caption"} <= set(reader.fieldnames):
            raise ConfigError(f"{source.path} needs a header with columns image and caption")
        for i, row in enumerate(reader):
            if i % parts != part:
                continue
            where = f"{source.path}:row {i + 1}"
            try:
                yield caption_record(row.get("caption"), row.get("image"), where, prompts, rng)
            except BadSample as exc:
                exc.where = where
                yield exc


def shard_list(pattern: str) -> list[str]:
    import braceexpand

    shards = sorted({p for part in braceexpand.braceexpand(pattern) for p in (glob.glob(part) or [part])})
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        raise ConfigError(f"webdataset shard(s) not found: {missing[:3]} (from {pattern!r})")
    return shards


def _shard_records(source, prompts, rng, seed, epoch, part, parts):
    import webdataset as wds

    shards = shard_list(source.path)
    order = random.Random(f"{seed}:{epoch}").sample(shards, len(shards))
    mine = order[part::parts] if len(order) >= parts else order
    errors: list[Exception] = []

    def keep_going(exc: Exception) -> bool:  # an unreadable shard or tar member: count it, go on
        errors.append(exc)
        return True

    def unreadable():
        while errors:
            exc = errors.pop(0)
            url = next((a for a in reversed(exc.args) if isinstance(a, str) and a != str(exc.args[0])), "?")
            if len(order) < parts and url in order and order.index(url) % parts != part:
                continue  # every reader reads this shard; one of them counts it
            bad = BadSample(f"{UNREADABLE_SHARD} ({exc.__class__.__name__}: {str(exc.args[0])[:80] if exc.args else ''})")
            bad.where, bad.shard = url, url
            yield bad

    samples = wds.WebDataset(mine, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False,
                             handler=keep_going)
    for i, sample in enumerate(samples):
        yield from unreadable()
        if len(order) < parts and i % parts != part:  # fewer shards than readers: split samples instead
            continue
        where = f"{sample.get('__url__', '?')}/{sample.get('__key__', '?')}"
        try:
            image = next((sample[k] for k in ("jpg", "jpeg", "png", "webp") if k in sample), None)
            caption = sample["txt"].decode("utf-8") if "txt" in sample else None
            if caption is None and "json" in sample:
                caption = json.loads(sample["json"]).get("caption")
            yield caption_record(caption, image, where, prompts, rng)
        except (BadSample, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
            bad = exc if isinstance(exc, BadSample) else BadSample(f"unreadable caption ({exc.__class__.__name__})")
            bad.where = where
            yield bad
    yield from unreadable()


__all__ = ["UNREADABLE_SHARD", "DataSource", "Record", "BadSample", "IndexedSource", "stream_records", "DEFAULT_CAPTION_PROMPTS",
           "caption_record", "conversation_record"]
