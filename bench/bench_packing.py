"""Stage II of the toy world v2 with each batch's samples right-padded (`speed.packing` false) and first-fit into
rows as wide as the longest (`speed.packing: rows`, the build's setting): the same samples in every step, so the
same losses; tokens computed, seconds per step.

    python bench/bench_packing.py       # or: python bench/run.py packing

A small world is built first with the shipped experts (`seechat toyworld build --world v2 --quick`: its data and
Stage I, about a minute); then Stage II runs STEPS steps of the full build's batch (8 conversations, over one and
several pictures, of 60-400 tokens) from that Stage I model, the two settings alternating, REPEATS times each;
medians. The first SKIP steps (loading, the feature store) are not timed.
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

from common import median  # noqa: E402

STEPS, SKIP = 60, 10
REPEATS = int(os.environ.get("BENCH_PACKING_REPEATS", 2))
VARIANTS = {"padded": False, "rows": "rows"}


def _stage2(world: Path, out: Path, packing) -> tuple[float, list[float]]:
    """Seconds per step after SKIP, and the logged losses."""
    from transformers import TrainerCallback

    from seechat.toyworld.v2.build import FULL, MAX_LENGTH, ALIGN_PROMPT
    from seechat.train.config import load_config
    from seechat.train.run import train

    class Clock(TrainerCallback):
        start = end = 0.0

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == SKIP:
                self.start = time.perf_counter()
            if state.global_step == STEPS:
                self.end = time.perf_counter()

    cfg = {"output_dir": str(out), "init_from": str(world / "align" / "model"),
           "data": {"train": [{"path": str(world / "data/train/conversations.json")}], "prompts": [ALIGN_PROMPT],
                    "max_length": MAX_LENGTH},
           "parts": {"llm": "full", "bridge_lr": FULL.instruct_bridge_lr},
           "training": {"max_steps": STEPS, "per_device_train_batch_size": FULL.instruct_batch,
                        "learning_rate": FULL.instruct_lr, "logging_steps": 10, "save_strategy": "no",
                        "report_to": "none", "seed": 0},
           "speed": {"packing": packing, "cpu_bf16": "off", "attn_implementation": "sdpa", "vision_features": True,
                     "vision_features_dir": str(out.parent / "features")},
           "overwrite": True}
    clock = Clock()
    overrides = [f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in cfg.items()]
    result = train("instruct", load_config(None, overrides), callbacks=[clock])
    losses = [h["loss"] for h in result.trainer.state.log_history if "loss" in h]
    return (clock.end - clock.start) / (STEPS - SKIP), losses


def _tokens(world: Path, batches: int = 200) -> dict:
    """Tokens a batch of 8 computes in each setting (random batches of the training conversations)."""
    import seechat
    from seechat.data.datasets import Collator, IndexedDataset
    from seechat.data.sources import DataSource
    from seechat.toyworld.v2.build import FULL, MAX_LENGTH

    model = seechat.load(world / "align" / "model", device="cpu", dtype="fp32")
    ds = IndexedDataset([DataSource(str(world / "data/train/conversations.json"))], model.processor,
                        prompts=["x"], max_length=MAX_LENGTH)
    lengths = [len(ds[i]["input_ids"]) for i in range(len(ds))]
    rng = random.Random(0)
    fake = [{"input_ids": [1] * n, "labels": [1] * n, "pixel_values": None} for n in lengths]
    counted = {name: 0 for name in VARIANTS}
    for _ in range(batches):
        batch = rng.sample(fake, FULL.instruct_batch)
        for name, packing in VARIANTS.items():
            counted[name] += Collator(0, packing=packing)(batch)["input_ids"].numel()
    return {"real": sum(lengths) / len(lengths) * FULL.instruct_batch,
            **{name: n / batches for name, n in counted.items()}}


def run() -> dict:
    from seechat.cli_helpers import quiet_hf
    from seechat.toyworld.v2.build import build

    quiet_hf()
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp) / "world"
        build(world, seed=0, quick=True)
        tokens = _tokens(world)
        seconds = {name: [] for name in VARIANTS}
        losses = {}
        for r in range(REPEATS):
            for name, packing in VARIANTS.items():
                s, losses[name] = _stage2(world, Path(tmp) / f"{name}-{r}", packing)
                seconds[name].append(s)
    return {"steps": STEPS, "timed_steps": STEPS - SKIP, "repeats": REPEATS,
            "tokens_per_batch": {k: round(v, 1) for k, v in tokens.items()},
            "seconds_per_step": {k: [round(x, 4) for x in v] for k, v in seconds.items()},
            "speedup": round(median(seconds["padded"]) / median(seconds["rows"]), 3),
            "losses": losses}


def summary(r: dict) -> str:
    t = r["tokens_per_batch"]
    return (f"Stage II of the toy world v2, batches of 8 ({r['timed_steps']} steps timed, medians of {r['repeats']}): "
            f"rows {r['speedup']}x the speed of padded; tokens per batch padded {t['padded']}, rows {t['rows']}, "
            f"without padding {t['real']}; losses every 10 steps, padded {_losses(r['losses']['padded'])}, rows "
            f"{_losses(r['losses']['rows'])}")


def _losses(values: list[float]) -> str:
    return ", ".join(f"{v:.7g}" for v in values)


if __name__ == "__main__":
    from common import write

    result = run()
    print(write("packing", result))
    print(summary(result))
