"""Terminal chat, the original SEEChat demo's loop over one engine.

    seechat chat --model runs/toyworld/model --image photos/            # interactive, every image in turn
    seechat chat --model DIR --image cat.jpg --prompt "图中有什么？"     # one answer on stdout, then exit

For each image the model first answers the default prompt (详细描述这张图片), then asks `question: `.
`break` ends this image's round and moves to the next image; `/image PATH` brings another image into
the conversation; `/reset` clears the history; `exit` or Ctrl-D quits. Seconds per turn are shown.
With `--save-boxes DIR`, an answer with boxes (`<ref>..</ref><box>(x1,y1),(x2,y2)</box>`, seechat.boxes) saves
the newest picture with those boxes drawn into DIR and says where.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..cli_helpers import LoadArgs, load_model, parse, setup_logging
from ..data.images import list_images, load_image
from ..errors import ImageError, SeeChatError
from .engine import ChatEngine, Conversation, GenerationSettings

HELP = "commands: break (next image), /image PATH (add an image), /reset (clear history), exit (quit)"


@dataclass
class ChatArgs:
    """What to chat about."""

    image: str | None = field(default=None, metadata={"help": "An image file, or a folder whose images are taken in turn."})
    prompt: str | None = field(
        default=None, metadata={"help": "Ask this once per image, print only the answer on stdout, and exit."}
    )
    save_boxes: str | None = field(
        default=None, metadata={"help": "Save each picture with the answer's boxes drawn into this folder."}
    )


def main(argv: list[str]) -> int:
    load_args, args, settings = parse(
        "seechat chat", argv, LoadArgs, ChatArgs, GenerationSettings, description=__doc__.split("\n")[0]
    )
    setup_logging()
    images = _images(args.image)  # check the images before spending time on the model
    engine = ChatEngine(load_model(load_args))
    boxes = _BoxSaver(Path(args.save_boxes)) if args.save_boxes else None
    if args.prompt is not None:
        return _answer_each(engine, images, args.prompt, settings, boxes)
    return _interactive(engine, images, settings, boxes)


def _images(path: str | None) -> list[Path | None]:
    if path is None:
        return [None]
    p = Path(path)
    if p.is_dir():
        found = list_images(p)
        if not found:
            raise ImageError(f"the folder '{p}' has no images (.jpg, .png, .webp, ...): give a folder with images")
        return found
    load_image(p)  # raises ImageError with a clear message
    return [p]


def _answer_each(engine: ChatEngine, images, prompt: str, settings: GenerationSettings, boxes=None) -> int:
    failed = 0
    for path in images:
        try:
            image = load_image(path) if path is not None else None
            answer = engine.conversation().ask(prompt, image=image, settings=settings)
        except ImageError as exc:
            print(f"seechat chat: error: {exc}", file=sys.stderr)
            failed += 1
            continue
        if path is not None and len(images) > 1:
            print(f"{path.name}:", file=sys.stderr)
        print(answer, flush=True)
        if boxes is not None and image is not None:
            boxes.save(image, answer, path)
    return 2 if failed else 0


def _interactive(engine: ChatEngine, images, settings: GenerationSettings, boxes=None) -> int:
    out = sys.stdout
    print(HELP, file=sys.stderr)
    for path in images:
        conv = engine.conversation()
        current = pending = None  # the newest image; the one to attach to the next question
        if path is not None:
            print(path, file=out, flush=True)
            try:
                current = load_image(path)
            except ImageError as exc:
                print(f"error: {exc}", file=sys.stderr)
                continue
            _turn(conv, engine.model.config.default_prompt, current, settings, out, boxes, current)
        while True:
            try:
                line = input("question: ")
            except EOFError:
                print(file=out)
                return 0
            text = line.strip()
            if not text:
                continue
            if text == "break":
                break
            if text in ("exit", "quit"):
                return 0
            if text in ("/help", "help"):
                print(HELP, file=out)
                continue
            if text == "/reset":
                conv.reset()
                pending = current
                print("(history cleared)", file=out, flush=True)
                continue
            if text.startswith("/image"):
                try:
                    current = load_image(text[len("/image"):].strip())
                except ImageError as exc:
                    print(f"error: {exc}", file=sys.stderr)
                    continue
                pending = None
                _turn(conv, engine.model.config.default_prompt, current, settings, out, boxes, current)
                continue
            _turn(conv, text, pending, settings, out, boxes, current)
            pending = None
    return 0


def _turn(conv: Conversation, text: str, image, settings: GenerationSettings, out, boxes=None, newest=None) -> None:
    """Stream one answer; a bad request or Ctrl-C ends the turn, not the chat."""
    start = time.perf_counter()
    print("answer: ", end="", file=out, flush=True)
    try:
        for piece in conv.stream(text, image=image, settings=settings):
            print(piece, end="", file=out, flush=True)
    except SeeChatError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return
    except KeyboardInterrupt:
        print("\n(interrupted)", file=out, flush=True)
        return
    print(f"\n{time.perf_counter() - start:.2f}s", file=out, flush=True)
    if boxes is not None and newest is not None and conv.last_reply is not None:
        boxes.save(newest, conv.last_reply.text)


class _BoxSaver:
    """Saves a picture with an answer's boxes drawn (numbered files, so no answer overwrites another)."""

    def __init__(self, folder: Path):
        if folder.exists() and not folder.is_dir():
            raise SeeChatError(f"--save-boxes {folder} is a file: give a folder")
        self.folder, self.count = folder, 0

    def save(self, image, answer: str, path: Path | None = None) -> Path | None:
        from ..boxes import draw_boxes, parse_boxes

        found = parse_boxes(answer)
        if not found:
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        self.count += 1
        stem = path.stem if path is not None else "picture"
        target = self.folder / f"{self.count:04d}_{stem}_boxes.png"
        labels = [b.ref if b.ref and b.ref.isascii() else str(k + 1) for k, b in enumerate(found)]
        draw_boxes(image, found, labels, scale_to=512).save(target)
        print(f"(boxes drawn: {target})", file=sys.stderr, flush=True)
        return target
