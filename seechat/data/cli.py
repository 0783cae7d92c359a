"""`seechat data SUBCOMMAND`: converters that turn public datasets into seechat's data formats.

    seechat data refcoco --refs 'refs(unc).p' --instances instances.json --images coco/train2014 --out runs/refcoco
    seechat data --help
"""

from __future__ import annotations

from ..cli_helpers import run_subcommand

# name -> (module:function, one-line summary)
SUBCOMMANDS = {
    "refcoco": ("seechat.data.refcoco:main", "RefCOCO/+/g (refs(unc).p + instances.json) -> conversations + grounding records"),
}


def main(argv: list[str]) -> int:
    return run_subcommand(SUBCOMMANDS, argv, command="data", noun="converter")
