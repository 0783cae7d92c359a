"""`seechat toyworld build [--out runs/toyworld] [--seed 0] [--quick]`: see seechat.toyworld.build."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..cli import parse, setup_logging
from ..errors import SeeChatError


@dataclass
class BuildArgs:
    out: str = field(default="runs/toyworld", metadata={"help": "Where everything goes."})
    seed: int = field(default=0, metadata={"help": "Same seed, same world, same model, same metrics."})
    quick: bool = field(default=False, metadata={"help": "A smaller world and fewer steps (under a minute)."})


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "build":
        print("usage: seechat toyworld build [--out runs/toyworld] [--seed 0] [--quick]",
              file=sys.stderr if argv[:1] not in (["-h"], ["--help"]) else sys.stdout)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    (args,) = parse("seechat toyworld build", argv[1:], BuildArgs)
    setup_logging()
    from .build import build

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SeeChatError(f"--out {out} is a file: give a directory")
    metrics = build(out, seed=args.seed, quick=args.quick)
    print(summary(metrics, out))
    return 0


def summary(metrics: dict, out: Path) -> str:
    per_type = ", ".join(f"{k} {v:.1%}" for k, v in metrics["per_type"].items())
    return (f"toy world built in {metrics['build_seconds']:.0f}s (this run {metrics['this_run_seconds']:.0f}s)\n"
            f"test accuracy {metrics['test_accuracy']:.1%} ({per_type})\n"
            f"held-out colour x shape combinations: {metrics['heldout_combo_accuracy']:.1%}\n"
            f"model: {out / 'model'}   report: {out / 'report.md'}")
