"""`seechat data SUBCOMMAND`: converters that turn public datasets into seechat's data formats.

    seechat data refcoco --refs 'refs(unc).p' --instances instances.json --images coco/train2014 --out runs/refcoco
    seechat data --help
"""

from __future__ import annotations

import importlib

from ..errors import SeeChatError

# name -> (module:function, one-line summary)
SUBCOMMANDS = {
    "refcoco": ("seechat.data.refcoco:main", "RefCOCO/+/g (refs(unc).p + instances.json) -> conversations + grounding records"),
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    name = argv[0]
    if name not in SUBCOMMANDS:
        raise SeeChatError(f"unknown data converter {name!r}: choose one of {', '.join(SUBCOMMANDS)}")
    module, func = SUBCOMMANDS[name][0].split(":")
    return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)


def usage() -> str:
    width = max(len(n) for n in SUBCOMMANDS)
    rows = "\n".join(f"  {n.ljust(width)}  {summary}" for n, (_, summary) in SUBCOMMANDS.items())
    return (f"usage: seechat data CONVERTER [options]   (seechat data CONVERTER --help for its options)\n\n"
            f"converters:\n{rows}")
