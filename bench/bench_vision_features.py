"""Stage I then Stage II over the same pictures, with and without `speed.vision_features` (the frozen vision
expert's features encoded once into a store that both stages read), wall time of both stages together.

    python bench/bench_vision_features.py       # or: python bench/run.py vision_features

Two compositions: the toy world v2's shape (CLIP 64 px, patch 8, 2x2-pooled to 16 image tokens; a Qwen2-shaped
text expert 128 wide, 4 layers, a 2,000-token vocabulary) and bench_train.py's (CLIP 128 px, 256 image tokens;
Qwen2's 151,936-token vocabulary), where the text expert's share of a step is larger. Each stage runs EPOCHS
epochs over the pictures, so each is seen 2 x EPOCHS times; the store's time (reading the records, encoding every
picture once) counts in its runs. Runs alternate and repeat; medians. Without the store a step decodes, resizes
and encodes its pictures; with it, it reads their features.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
import yaml  # noqa: E402

import bench_train  # noqa: E402
from common import median  # noqa: E402
from seechat.cli_helpers import quiet_hf  # noqa: E402
from seechat.tiny import tiny_config, tiny_vision  # noqa: E402

EPOCHS, BATCH = 2, 8
COMPOSITIONS = {
    "toy world v2 shape": {"pictures": 256, "size": 64, "vocab": 2_000, "pool": "2x2"},
    "bench_train's": {"pictures": 64, "size": 128, "vocab": 151_936, "pool": "none"},
}
REPEATS = int(os.environ.get("BENCH_FEATURES_REPEATS", 2))
VARIANTS = {"pixels every step": {}, "vision_features": {"vision_features": True}}


def _stages(root: Path, init: Path, out: Path, speed: dict) -> tuple[float, list[float]]:
    from seechat.train.config import load_config
    from seechat.train.run import train

    start, last = time.perf_counter(), []
    model = init
    for stage, data in (("align", "captions.jsonl"), ("instruct", "llava.json")):
        cfg = {"output_dir": str(out / stage), "init_from": str(model),
               "data": {"train": [{"path": str(root / "data" / data)}]},
               "speed": {**speed, "cpu_bf16": "off", "vision_features_dir": str(out / "features")},
               "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
               "training": {"num_train_epochs": EPOCHS, "per_device_train_batch_size": BATCH, "logging_steps": 1,
                            "learning_rate": 1e-3, "report_to": "none", "save_strategy": "no", "seed": 0,
                            "lr_scheduler_type": "constant"}}
        path = out / f"{stage}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
        result = train(stage, load_config(str(path), []))
        model = result.model_dir
        last.append(round(next(h["loss"] for h in reversed(result.trainer.state.log_history) if "loss" in h), 4))
    return time.perf_counter() - start, last


def _data(root: Path, pictures: int, size: int) -> None:
    """bench_train's captions and conversations, over `pictures` pictures of `size` pixels."""
    import json

    bench_train._data(root)
    caps = [json.loads(line) for line in (root / "captions.jsonl").read_text().splitlines()]
    convs = json.loads((root / "llava.json").read_text())
    for i in range(pictures):
        bench_train.sample_image(list(bench_train.COLOURS.values())[i % 4], size=size).save(root / "img" / f"{i}.png")
    caps = [{**caps[i % 64], "image": f"img/{i}.png"} for i in range(pictures)]
    convs = [{**convs[i % 64], "image": f"img/{i}.png"} for i in range(pictures)]
    (root / "captions.jsonl").write_text("\n".join(json.dumps(c, ensure_ascii=False) for c in caps))
    (root / "llava.json").write_text(json.dumps(convs, ensure_ascii=False))


def run() -> dict:
    import seechat

    quiet_hf()
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, c in COMPOSITIONS.items():
            torch.manual_seed(0)
            root = Path(tmp) / str(len(result))
            _data(root / "data", c["pictures"], c["size"])
            vision = tiny_vision(root / "vision", "clip", hidden=128, layers=4, heads=4, image_size=c["size"],
                                 patch_size=8)
            bench_train.VOCAB = c["vocab"]
            init = root / "init"
            seechat.build(tiny_config(vision, bench_train._llm(root / "llm"), vision={"pool": c["pool"]}),
                          device="cpu", dtype="fp32").save(init)
            seconds, losses = {v: [] for v in VARIANTS}, {}
            order = list(VARIANTS)
            for rep in range(REPEATS):
                for who in (order if rep % 2 == 0 else order[::-1]):
                    s, last = _stages(root, init, root / f"run-{rep}-{order.index(who)}", VARIANTS[who])
                    seconds[who].append(round(s, 2))
                    losses.setdefault(who, last)
                    print(f"  {name:20s} {who:20s} {s:6.1f} s  last losses (Stage I, II) {last}", flush=True)
            base = median(seconds["pixels every step"])
            tokens = (c["size"] // 8) ** 2 // (4 if c["pool"] == "2x2" else 1)
            result[name] = {
                "setup": {"vision": f"CLIP 128x4, {c['size']} px, patch 8 -> {tokens} image tokens, feature layer -2",
                          "llm": f"Qwen2 128x4 (MLP 512), vocabulary {c['vocab']:,}", "pictures": c["pictures"]},
                "variants": {v: {"seconds": median(seconds[v]), "speedup": round(base / median(seconds[v]), 3),
                                 "runs": seconds[v], "last_losses": losses[v]} for v in VARIANTS},
            }
    return {"setup": {"epochs_per_stage": EPOCHS, "batch": BATCH, "repeats": REPEATS,
                      "threads": torch.get_num_threads(), "device": "cpu fp32", "stage2": "LoRA r=8 on q_proj, v_proj",
                      "note": "wall time of Stage I + Stage II, store included; ratios of interleaved runs"},
            "compositions": result}


def summary(result: dict) -> str:
    s = result["setup"]
    rows = [f"Stage I + Stage II, {s['epochs_per_stage']} epochs each, {s['threads']} threads, the store's time "
            "included:", "", "| composition | run | seconds (median) | speed-up | last losses (I, II) |",
            "|---|---|---|---|---|"]
    for comp, r in result["compositions"].items():
        c = r["setup"]
        for name, v in r["variants"].items():
            rows.append(f"| {comp} ({c['pictures']} pictures; {c['vision']}; {c['llm']}) | {name} | "
                        f"{v['seconds']:.1f} | {v['speedup']:.2f}x | {v['last_losses']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    from common import write

    result = run()
    write("vision_features", result)
    print(summary(result))
