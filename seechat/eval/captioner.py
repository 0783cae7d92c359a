"""Batch captioning: one caption per image of a folder, as JSON lines.

    seechat caption --model runs/toyworld/model --images photos/ --out captions.jsonl
    seechat caption --model DIR --images DIR --out FILE.jsonl --prompt "详细描述这张图片" --batch-size 16

Each line is {"image": "<path relative to --images>", "caption": "..."}. Images are found recursively
(hidden folders skipped) and taken in path order. Lines are appended as each batch finishes, so an
interrupted run loses at most one batch, and a rerun skips images already in the file. An unreadable image
is listed on stderr and left out of the file (a rerun tries it again); it never stops the run.
The default prompt is the model's default prompt (详细描述这张图片, "describe this image in detail");
generation is greedy unless --temperature is set.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..chat.batch import generate_batch
from ..chat.engine import GenerationSettings
from ..cli_helpers import LoadArgs, load_model, parse, setup_logging
from ..data.images import load_image
from ..errors import ConfigError, DataError, ImageError
from .files import find_images, image_key

log = logging.getLogger("seechat")


@dataclass
class CaptionArgs:
    """What to caption and where the captions go."""

    images: str = field(default="", metadata={"help": "A folder of images (searched recursively)."})
    out: str = field(default="", metadata={"help": "The captions file to write (JSON lines); appended to on rerun."})
    prompt: str | None = field(default=None, metadata={"help": "The question asked about each image (default: the "
                                                               "model's default prompt, 详细描述这张图片)."})
    batch_size: int = field(default=8, metadata={"help": "Images captioned together in one generate call."})

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError("batch_size must be >= 1")


@dataclass
class CaptionRun:
    """What one captioning run did."""

    written: int = 0
    skipped: int = 0
    """Images already in the output file."""
    failed: dict[str, str] = field(default_factory=dict)
    """Unreadable images: key -> the reason."""


def main(argv: list[str]) -> int:
    load_args, args, settings = parse(
        "seechat caption", argv, LoadArgs, CaptionArgs, GenerationSettings, description=__doc__.split("\n")[0]
    )
    setup_logging()
    if not args.images or not args.out:
        raise ConfigError("give the images folder and the output file: --images DIR --out FILE.jsonl")
    names = find_images(args.images)
    if not names:
        raise DataError(f"the folder '{args.images}' has no images (.jpg, .png, .webp, ...): give a folder with images")
    _check_out(args.out)
    model = load_model(load_args)
    run = caption_images(model, args.images, names, args.out, prompt=args.prompt, batch_size=args.batch_size,
                         settings=settings)
    report(run, args.out)
    return 0


def caption_images(
    model,
    root: str | os.PathLike,
    names: list[str],
    out: str | os.PathLike,
    *,
    prompt: str | None = None,
    batch_size: int = 8,
    settings: GenerationSettings | None = None,
    progress: bool = True,
) -> CaptionRun:
    """Caption the images `names` (keys relative to `root`) into `out`, skipping those already there."""
    root, out = Path(root), Path(out)
    settings = settings or GenerationSettings()
    if settings.seed is not None:  # seed once for the run, not once per batch (batches would repeat their noise)
        torch.manual_seed(settings.seed)
        settings = dataclasses.replace(settings, seed=None)
    prompt = prompt or model.config.default_prompt
    done = _existing(out)
    todo = [n for n in names if image_key(n) not in done]
    run = CaptionRun(skipped=len(names) - len(todo))
    out.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(todo), unit="image", desc="caption", disable=not progress or None, leave=False)
    with out.open("a", encoding="utf-8") as fh:
        for start in range(0, len(todo), batch_size):
            chunk, images = [], []
            for name in todo[start : start + batch_size]:
                try:
                    images.append(load_image(root / name, name=f"'{name}'"))
                    chunk.append(image_key(name))
                except ImageError as exc:
                    run.failed[image_key(name)] = str(exc)
                    log.warning("skipped: %s", exc)
            if chunk:
                for name, reply in zip(chunk, generate_batch(model, images, prompt, settings)):
                    fh.write(json.dumps({"image": name, "caption": reply.text}, ensure_ascii=False) + "\n")
                fh.flush()
                run.written += len(chunk)
            bar.update(len(todo[start : start + batch_size]))
    bar.close()
    return run


def report(run: CaptionRun, out) -> None:
    log.info("wrote %d caption(s) to %s; %d already there", run.written, out, run.skipped)
    if run.failed:
        log.warning("%d image(s) could not be read and have no caption (a rerun tries them again):", len(run.failed))
        for name, why in run.failed.items():
            log.warning("  %s: %s", name, why)


# -- helpers ------------------------------------------------------------------------------------------
def _check_out(out: str) -> None:
    """Refuse a folder, or a file that is not a captions file, before the model is loaded."""
    p = Path(out)
    if p.is_dir():
        raise ConfigError(f"--out '{p}' is a folder: give a file such as {p / 'captions.jsonl'}")
    _existing(p)


def _existing(out: Path) -> set[str]:
    """Images already captioned in `out`. A last line cut off by an interrupted run is removed first."""
    if not out.is_file():
        return set()
    text = out.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        log.warning("%s ends with an incomplete line (an interrupted run); it is removed and redone", out)
        out.write_text("".join(lines[:-1]), encoding="utf-8")
        lines = lines[:-1]
    done = set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            obj = exc
        if not isinstance(obj, dict) or not isinstance(obj.get("image"), str):
            raise DataError(
                f"{out}:{number} is not a caption line (no \"image\" field): this is not a file seechat caption "
                "wrote; give another --out or fix that line"
            )
        done.add(image_key(obj["image"]))
    return done
