"""Shared pieces of the command-line front ends: argument groups, quiet loading, error reporting."""

from __future__ import annotations

import importlib
import logging
import os
import sys
import time
from dataclasses import dataclass, field

from .errors import SeeChatError

log = logging.getLogger("seechat")
TOY_MODEL = "runs/toyworld/model"


@dataclass
class LoadArgs:
    """Where the model is and how to place it."""

    model: str = field(default="", metadata={"help": f"A seechat model directory (default: the toy model, {TOY_MODEL})."})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N or auto (cuda when present)."})
    dtype: str = field(default="auto", metadata={"help": "fp32, bf16, fp16 or auto (bf16 on GPU, fp32 on CPU)."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow code shipped with the text expert to run (only if you trust it)."}
    )
    load_in_8bit: bool = field(default=False, metadata={"help": "Load the text expert in 8 bits (bitsandbytes, CUDA)."})
    load_in_4bit: bool = field(default=False, metadata={"help": "Load the text expert in 4 bits, NF4 (bitsandbytes, CUDA)."})
    threads: int = field(
        default=0,
        metadata={"help": "CPU threads for the model's math (0: torch's default, one per core). A small model on a "
                          "CPU shared with other work (a server's own clients) often runs best on 1."},
    )

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise SeeChatError("--threads must be >= 0 (0: torch's default)")

    @property
    def quantize(self) -> str | None:
        if self.load_in_8bit and self.load_in_4bit:
            raise SeeChatError("choose one of --load-in-8bit and --load-in-4bit")
        return "8bit" if self.load_in_8bit else "4bit" if self.load_in_4bit else None


def parse(prog: str, argv: list[str], *groups, description: str | None = None):
    """Parse argv into one instance per dataclass in `groups` (flags come from the fields)."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(groups, prog=prog, description=description)
    try:
        return parser.parse_args_into_dataclasses(args=argv)
    except SeeChatError:
        raise
    except ValueError as exc:  # a dataclass __post_init__ check
        raise SeeChatError(str(exc)) from exc


def run_subcommand(table: dict[str, tuple[str, str]], argv: list[str], *, command: str, noun: str) -> int:
    """`seechat COMMAND NAME ...`: run table[NAME]'s "module:function" on the rest of argv; no name or --help
    prints the table (exit 2 when nothing was given); an unknown name is an error listing the valid ones."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        width = max(len(n) for n in table)
        rows = "\n".join(f"  {n.ljust(width)}  {summary}" for n, (_, summary) in table.items())
        print(f"usage: seechat {command} {noun.upper()} [options]   (seechat {command} {noun.upper()} --help for its "
              f"options)\n\n{noun}s:\n{rows}")
        return 0 if argv else 2
    if argv[0] not in table:
        raise SeeChatError(f"unknown {noun} {argv[0]!r}: choose one of {', '.join(table)}")
    module, func = table[argv[0]][0].split(":")
    return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)


def quiet_hf() -> None:
    """Keep Hugging Face's per-file progress bars and notices off the terminal; errors still show."""
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    for module in ("transformers", "peft", "accelerate", "torch"):  # deprecation notices meant for library authors
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
    warnings.filterwarnings("ignore", message=".*pin_memory.*")

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (so redirections made later are honoured)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging() -> None:
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def load_model(args: LoadArgs):
    """Load args.model with a one-line note on stderr."""
    from . import load

    if not args.model:
        if not os.path.isfile(os.path.join(TOY_MODEL, "seechat.json")):
            raise SeeChatError(f"no --model given and the toy model ({TOY_MODEL}) is not built yet: build it with "
                               "`seechat toyworld build` (or `make demo-v1`), or give --model DIR")
        args.model = TOY_MODEL
    quiet_hf()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = load(args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                 quantize=args.quantize)
    log.info("loaded %s in %.1fs (%s, %s)", args.model, time.perf_counter() - start, model.device, model.dtype)
    return model
