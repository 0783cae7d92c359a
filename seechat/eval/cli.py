"""`seechat eval SUBCOMMAND`: one table of evaluation subcommands, each a function taking its own arguments.

    seechat eval winrate --images DIR --captions a=A.jsonl b=B.jsonl --scorer CLIP_DIR --out DIR
    seechat eval --help
"""

from __future__ import annotations

import importlib

from ..errors import SeeChatError

# name -> (module:function, one-line summary)
SUBCOMMANDS = {
    "winrate": ("seechat.eval.winrate:main", "caption win-rate judged by a CLIP model (the original's pie chart)"),
    "caption": ("seechat.eval.caption_metrics:main", "CIDEr-D, BLEU-1..4, ROUGE-L of captions against references"),
    "mcq": ("seechat.eval.mcq:main", "MMBench / MMBench-CN / CCBench TSVs with CircularEval"),
    "vqa": ("seechat.eval.vqa:main", "question/answer sets: exact-match and normalized accuracy"),
    "grounding": ("seechat.eval.grounding:main_grounding", "referring expressions -> boxes: Acc@0.5, mean IoU, per type"),
    "detect": ("seechat.eval.grounding:main_detect", "detect-all answers: precision/recall at IoU 0.5, COCO mAP"),
    "toyworld": ("seechat.eval.toyworld:main", "all of the above on a toy-world run (captions, win-rate, CIDEr, vqa)"),
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    name = argv[0]
    if name not in SUBCOMMANDS:
        raise SeeChatError(f"unknown evaluation {name!r}: choose one of {', '.join(SUBCOMMANDS)}")
    module, func = SUBCOMMANDS[name][0].split(":")
    return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)


def usage() -> str:
    width = max(len(n) for n in SUBCOMMANDS)
    rows = "\n".join(f"  {n.ljust(width)}  {summary}" for n, (_, summary) in SUBCOMMANDS.items())
    return (f"usage: seechat eval EVALUATION [options]   (seechat eval EVALUATION --help for its options)\n\n"
            f"evaluations:\n{rows}")
