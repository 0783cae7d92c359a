"""Run every benchmark under bench/ and write bench/results/*.json plus bench/results/summary.md.

    make bench          # or: python bench/run.py [NAME ...]

Benchmarks report ratios against a peer run side by side in the same process; they never run in `make test`.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from common import RESULTS, machine, write  # noqa: E402


def main(names: list[str]) -> int:
    found = sorted(p.stem[len("bench_"):] for p in HERE.glob("bench_*.py"))
    chosen = names or found
    unknown = sorted(set(chosen) - set(found))
    if unknown:
        print(f"unknown benchmark(s) {unknown}; available: {found}", file=sys.stderr)
        return 2
    for name in chosen:
        module = importlib.import_module(f"bench_{name}")
        if getattr(module, "NEEDS_CUDA", False) and not torch.cuda.is_available():
            print(f"== {name}: skipped, needs a CUDA GPU (its last result stays in {RESULTS})", flush=True)
            continue
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        result = module.run()
        result["bench_seconds"] = round(time.perf_counter() - start, 1)
        write(name, result)
        print(module.summary(result), flush=True)
    sections = [f"# seechat benchmarks\n\nMachine: {json.dumps(machine())}\n"]
    for name in found:
        path = RESULTS / f"{name}.json"
        if path.exists():
            module = importlib.import_module(f"bench_{name}")
            sections.append(f"## {name}\n\n{module.summary(json.loads(path.read_text()))}\n")
    (RESULTS / "summary.md").write_text("\n".join(sections))
    print(f"wrote {RESULTS / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
