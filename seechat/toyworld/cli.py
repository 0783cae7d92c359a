"""`seechat toyworld build [--world v1|v2] [--out DIR] [--seed 0] [--quick]`: see seechat.toyworld.build
(v1, the default) and seechat.toyworld.v2.build (several shapes, counting, boxes, several pictures)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..cli_helpers import parse, setup_logging
from ..errors import SeeChatError

WORLDS = {"v1": "runs/toyworld", "v2": "runs/toyworld_v2"}  # world -> default --out
USAGE = ("usage: seechat toyworld build [--world v1|v2] [--out runs/toyworld] [--seed 0] [--quick] "
         "[--llm PATH --chat-template NAME --image-token TOKEN]")


@dataclass
class BuildArgs:
    world: str = field(default="v1", metadata={
        "help": "v1: one shape per picture (the default); v2: 1-4 shapes, counting, boxes, 2-3 pictures per "
                "conversation, a shifted renderer; stitches the pretrained toy experts seechat ships "
                "(`make demo` builds it; below its targets: see the README)."})
    out: str = field(default="", metadata={"help": "Where everything goes (default runs/toyworld, or "
                                                   "runs/toyworld_v2 for --world v2)."})
    seed: int = field(default=0, metadata={"help": "Same seed, same world, same model, same metrics."})
    quick: bool = field(default=False, metadata={"help": "A smaller world and fewer steps (about a minute)."})
    llm: str = field(default="", metadata={
        "help": "v1: stitch this pretrained text expert (a folder, hub id or .gguf file) instead of training the "
                "toy LM; Stage II trains LoRA on it (e.g. Gemma-3-270M: see the README)."})
    align_steps: int = field(default=0, metadata={"help": "v1: Stage I steps instead of the plan's (0: the plan's)."})
    instruct_steps: int = field(default=0, metadata={"help": "v1: Stage II steps instead of the plan's (0: the plan's)."})
    chat_template: str = field(default="", metadata={
        "help": "The built-in chat template for --llm when its tokenizer has none (gemma for Gemma's base GGUF)."})
    image_token: str = field(default="", metadata={
        "help": "v1 with --llm: a reserved token of the text expert to hold image positions instead of a new "
                "<image> token (<unused0> for Gemma: its 262k-row embedding table then stays as it is)."})

    def __post_init__(self) -> None:
        if self.world not in WORLDS:
            raise SeeChatError(f"--world must be one of {', '.join(WORLDS)}, got {self.world!r}")
        if (self.llm or self.chat_template or self.image_token or self.align_steps or self.instruct_steps) \
                and self.world != "v1":
            raise SeeChatError("--llm, --chat-template, --image-token, --align-steps and --instruct-steps work with "
                               "--world v1 only")
        if self.align_steps < 0 or self.instruct_steps < 0:
            raise SeeChatError("--align-steps and --instruct-steps must be >= 0 (0: the plan's)")


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "build":
        print(USAGE, file=sys.stderr if argv[:1] not in (["-h"], ["--help"]) else sys.stdout)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    (args,) = parse("seechat toyworld build", argv[1:], BuildArgs)
    setup_logging()
    if args.world == "v2":
        from .v2.build import build
    else:
        from .build import build

    out = Path(args.out or WORLDS[args.world])
    if out.exists() and not out.is_dir():
        raise SeeChatError(f"--out {out} is a file: give a directory")
    extra = {"llm": args.llm, "chat_template": args.chat_template, "image_token": args.image_token,
             "align_steps": args.align_steps,
             "instruct_steps": args.instruct_steps} if args.world == "v1" else {}
    metrics = build(out, seed=args.seed, quick=args.quick, **extra)
    print(summary(metrics, out))
    return 0


def summary(metrics: dict, out: Path) -> str:
    per_type = ", ".join(f"{k} {v:.1%}" for k, v in metrics["per_type"].items())
    lines = [f"toy world built in {metrics['build_seconds']:.0f}s (this run {metrics['this_run_seconds']:.0f}s)",
             f"test accuracy {metrics['test_accuracy']:.1%} ({per_type})",
             f"held-out colour x shape combinations: {metrics['heldout_combo_accuracy']:.1%}"]
    if "grounding_acc50" in metrics:  # v2
        lines += [f"grounding Acc@0.5 {_pct(metrics['grounding_acc50'])}, counting {_pct(metrics['counting_accuracy'])}, "
                  f"detect-all F1 {_pct(metrics['detect_f1'])}",
                  f"shift split {_pct(metrics['shift_accuracy'])} ("
                  + ", ".join(f"{k} {_pct(v)}" for k, v in metrics["shift_per_type"].items()) + ")",
                  f"held-out phrasings {_pct(metrics['heldout_phrasing_accuracy'])}; several pictures: "
                  + ", ".join(f"{k} {_pct(v)}" for k, v in metrics["multi_image_accuracy"].items())]
    lines.append(f"model: {out / 'model'}   report: {out / 'report.md'}")
    return "\n".join(lines)


def _pct(v) -> str:
    return "-" if v is None else f"{v:.1%}"
