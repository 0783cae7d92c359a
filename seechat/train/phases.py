"""A build made of phases (the toy world's, the real-experts demo's): each phase is reused on a rerun while
its stamp matches the build's settings, and everything after a rebuilt phase is rebuilt too.

    metrics = run_phases(out, key, [("data", make_data), ("align", align), ...], label="toy world",
                         report=write_report)

Each phase writes what it makes under `out`; the last one writes `out/metrics.json`. Phases that train log
their losses to `out/losses/NAME.json` (`{"step": [...], "loss": [...]}`), which `plot_phase_losses` draws.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

log = logging.getLogger("seechat")


def run_phases(out: Path, key: str, phases: list[tuple[str, Callable[[dict], None]]], *, label: str,
               report: Callable[[Path, dict], object], bar: bool = False) -> dict:
    """Run (or reuse) each `(name, fn)` in order; fn receives the dict of phase seconds so far. Returns
    out/metrics.json with `build_seconds`, `phase_seconds` and `this_run_seconds` added; `report(out, metrics)`
    runs when any phase was rebuilt."""
    stamps = out / ".stamps"
    stamps.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    stale = False
    for name, fn in (tqdm(phases, desc=label, unit="phase", leave=True) if bar else phases):
        stamp = stamps / f"{name}.json"
        if not stale and stamp.is_file() and json.loads(stamp.read_text()).get("key") == key:
            timings[name] = json.loads(stamp.read_text())["seconds"]
            log.info("%s: %s already built (%.0fs), reused", label, name, timings[name])
            continue
        stale = True  # everything after a rebuilt phase is rebuilt too
        log.info("%s: %s ...", label, name)
        t = time.perf_counter()
        fn(timings)
        timings[name] = round(time.perf_counter() - t, 1)
        stamp.write_text(json.dumps({"key": key, "seconds": timings[name]}))
        log.info("%s: %s done in %.0fs", label, name, timings[name])
    metrics = json.loads((out / "metrics.json").read_text())
    if stale:
        metrics["build_seconds"] = round(sum(timings.values()), 1)
        metrics["phase_seconds"] = timings
        (out / "metrics.json").write_text(json.dumps(metrics, ensure_ascii=False, indent=2))
        report(out, metrics)
    metrics["this_run_seconds"] = round(time.perf_counter() - start, 1)
    return metrics


def run_seeded_phases(out: Path, plan, seed: int, salt, phases: list[tuple[str, Callable]], *, label: str,
                      report: Callable[[Path, dict], object]) -> dict:
    """`run_phases` for a build made from a plan dataclass and a seed (the toy worlds): each phase is called as
    fn(out, plan, seed, timings) after torch.manual_seed(seed), and the build key is the plan, the seed and
    `salt` (which tells builds of different worlds apart)."""
    import dataclasses
    import hashlib

    import torch

    out.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(json.dumps([dataclasses.asdict(plan), seed, salt]).encode()).hexdigest()[:16]

    def seeded(fn):
        def phase(timings: dict) -> None:
            torch.manual_seed(seed)
            fn(out, plan, seed, timings)
        return phase

    return run_phases(out, key, [(name, seeded(fn)) for name, fn in phases], label=label, report=report, bar=True)


def plot_phase_losses(out: Path, names: list[tuple[str, str]]) -> Path:
    """out/report_losses.png: one panel per `(phase, title)` from out/losses/PHASE.json (empty when missing)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(names), figsize=(3.5 * len(names) + 0.5, 3), dpi=100, squeeze=False)
    for ax, (name, title) in zip(axes[0], names):
        f = out / "losses" / f"{name}.json"
        if f.is_file():
            data = json.loads(f.read_text())
            ax.plot(data["step"], data["loss"])
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("loss")
    fig.tight_layout()
    path = out / "report_losses.png"
    fig.savefig(path)
    plt.close(fig)
    return path
