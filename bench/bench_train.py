"""Training throughput: seechat's Stage I / Stage II versus transformers' LlavaForConditionalGeneration.

Same tiny composition (CLIP 128x4 at 64 px -> 64 image tokens, 2-layer GELU projector, Qwen2 256x4), same
initial weights (the LLaVA model is converted from the seechat one, so the first losses agree), same frozen
parts (Stage I: projector only; Stage II: projector + LoRA r=8 on q_proj/v_proj), same data pipeline and
the same HF Trainer settings. Runs alternate and repeat; the median samples/second is reported. Run it on an otherwise idle machine.

    python bench/bench_train.py            # or: make bench
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
import yaml  # noqa: E402

from common import median, write  # noqa: E402
from seechat.cli_helpers import quiet_hf  # noqa: E402
from seechat.tiny import sample_image, tiny_config, tiny_llm, tiny_vision  # noqa: E402

STEPS, BATCH, REPEATS = 12, 8, 2
COLOURS = {"红色": (220, 40, 40), "蓝色": (40, 40, 220), "绿色": (40, 180, 40), "黄色": (230, 210, 40)}


def _data(root: Path) -> None:
    (root / "img").mkdir(parents=True)
    caps, convs = [], []
    for i in range(96):
        name = list(COLOURS)[i % 4]
        sample_image(COLOURS[name]).save(root / "img" / f"{i}.png")
        caps.append({"image": f"img/{i}.png", "caption": f"一个{name}的圆形在图片中间，背景是白色的。"})
        convs.append({"image": f"img/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\n这是什么颜色？"}, {"from": "gpt", "value": f"这是{name}。"},
            {"from": "human", "value": "是什么形状？"}, {"from": "gpt", "value": "是一个圆形。"}]})
    (root / "captions.jsonl").write_text("\n".join(json.dumps(c, ensure_ascii=False) for c in caps))
    (root / "llava.json").write_text(json.dumps(convs, ensure_ascii=False))


def _training(out: Path) -> dict:
    return dict(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=BATCH, logging_steps=4,
                learning_rate=1e-3, report_to="none", save_strategy="no", use_cpu=True, seed=0,
                dataloader_num_workers=0, remove_unused_columns=False, lr_scheduler_type="constant")


def _seechat(stage, root, init, out) -> tuple[float, float]:
    from seechat.train.config import load_config
    from seechat.train.run import train

    training = {k: v for k, v in _training(out).items() if k != "output_dir"}
    cfg = {"output_dir": str(out), "data": {"train": [{"path": str(root / ("captions.jsonl" if stage == "align"
                                                                                  else "llava.json"))}]},
           "training": training, "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}}
    cfg["init_from"] = str(init)
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    result = train(stage, load_config(str(path), []))
    logs = result.trainer.state.log_history
    return logs[-1]["train_samples_per_second"], next(h["loss"] for h in logs if "loss" in h)


def _llava(stage, root, model_dir, out) -> tuple[float, float]:
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments, set_seed

    import seechat
    from seechat.data.datasets import Collator, IndexedDataset
    from seechat.data.sources import DataSource, DEFAULT_CAPTION_PROMPTS
    from seechat.export.llava import to_llava

    set_seed(0)
    model = seechat.load(model_dir, device="cpu", dtype="fp32")
    llava = to_llava(model)
    for p in llava.parameters():
        p.requires_grad_(False)
    if stage == "instruct":
        llava = get_peft_model(llava, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=r".*language_model.*\.(q_proj|v_proj)"))
    for name, p in llava.named_parameters():
        p.requires_grad_("multi_modal_projector" in name or "lora_" in name)
    source = DataSource(str(root / ("captions.jsonl" if stage == "align" else "llava.json")))
    dataset = IndexedDataset([source], model.processor, prompts=DEFAULT_CAPTION_PROMPTS, max_length=2048, seed=0)
    collate = Collator(model.tokenizer.pad_token_id)

    def collator(samples):
        batch = collate(samples)
        batch.pop("bad_samples"), batch.pop("sample_index", None)
        return batch

    trainer = Trainer(model=llava, args=TrainingArguments(**_training(out)), train_dataset=dataset,
                      data_collator=collator)
    trainer.train()
    logs = trainer.state.log_history
    return logs[-1]["train_samples_per_second"], next(h["loss"] for h in logs if "loss" in h)


def run() -> dict:
    import seechat

    quiet_hf()
    torch.manual_seed(0)
    results = {"align": {"seechat": [], "llava": []}, "instruct": {"seechat": [], "llava": []}}
    first_loss = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _data(root / "data")
        vision = tiny_vision(root / "vision", "clip", hidden=128, layers=4, heads=4, image_size=64, patch_size=8)
        llm = tiny_llm(root / "llm", "qwen2", hidden=256, layers=4, heads=4)
        init = root / "init"  # one starting point for every run of both stages
        seechat.build(tiny_config(vision, llm), device="cpu", dtype="fp32").save(init)
        for rep in range(REPEATS):
            for stage in ("align", "instruct"):
                for who in (("seechat", "llava") if rep % 2 == 0 else ("llava", "seechat")):
                    out = root / f"{stage}-{who}-{rep}"
                    if who == "seechat":
                        sps, loss = _seechat(stage, root / "data", init, out)
                    else:
                        sps, loss = _llava(stage, root / "data", init, out)
                    results[stage][who].append(sps)
                    first_loss.setdefault(f"{stage}_{who}", loss)
    summary = {}
    for stage, runs in results.items():
        s, l = median(runs["seechat"]), median(runs["llava"])
        summary[stage] = {"seechat_samples_per_s": round(s, 2), "llava_samples_per_s": round(l, 2),
                          "seechat_over_llava": round(s / l, 3), "runs": runs}
    return {
        "setup": {"vision": "CLIP 128x4, 64 px, patch 8 -> 64 image tokens", "bridge": "mlp depth 2 (GELU)",
                  "llm": "Qwen2 256x4", "batch": BATCH, "steps": STEPS, "repeats": REPEATS,
                  "stage2_lora": "r=8 on q_proj, v_proj", "device": "cpu fp32"},
        "stages": summary,
        "first_logged_loss": {k: round(v, 4) for k, v in first_loss.items()},
    }


def summary(result: dict) -> str:
    rows = ["| stage | seechat (samples/s) | LlavaForConditionalGeneration (samples/s) | seechat / LLaVA |",
            "|---|---|---|---|"]
    for stage, r in result["stages"].items():
        rows.append(f"| {stage} | {r['seechat_samples_per_s']:.1f} | {r['llava_samples_per_s']:.1f} | "
                    f"{r['seechat_over_llava']:.2f}x |")
    rows.append(f"\nFirst logged losses (same weights, same data): {result['first_logged_loss']}")
    return "\n".join(rows)


if __name__ == "__main__":
    result = run()
    print(write("train", result))
    print(summary(result))
