"""`seechat eval SUBCOMMAND`: one table of evaluation subcommands, each a function taking its own arguments.

    seechat eval winrate --images DIR --captions a=A.jsonl b=B.jsonl --scorer CLIP_DIR --out DIR
    seechat eval --help
"""

from __future__ import annotations

from ..cli_helpers import run_subcommand

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
    return run_subcommand(SUBCOMMANDS, argv, command="eval", noun="evaluation")
