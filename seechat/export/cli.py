"""`seechat export llava-hf --model DIR --out DIR2`: a directory transformers' LLaVA classes load.

    seechat export llava-hf --model runs/toyworld/model --out runs/toyworld/llava-hf
    # then, e.g.: vllm serve runs/toyworld/llava-hf   (or AutoModelForImageTextToText.from_pretrained)

LoRA adapters are merged. Compositions the LLaVA format cannot express (a Q-Former bridge, token pooling, a
bridge other than a 2-layer MLP, post-layernorm features, an image token outside the vocabulary) are refused
with the reason.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from ..cli_helpers import LoadArgs, load_model, parse, setup_logging
from ..errors import ConfigError


@dataclass
class ExportArgs:
    out: str = field(default="", metadata={"help": "Where the LLaVA-format directory goes."})


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "llava-hf":
        print("usage: seechat export llava-hf --model DIR --out DIR2", file=sys.stderr)
        return 2
    load_args, args = parse("seechat export llava-hf", argv[1:], LoadArgs, ExportArgs)
    if not args.out:
        raise ConfigError("--out is required")
    setup_logging()
    from .llava import check_exportable, export_llava

    model = load_model(load_args)
    check_exportable(model)
    export_llava(model, args.out)
    print(f"wrote {args.out}: load it with transformers' AutoModelForImageTextToText / AutoProcessor")
    return 0
