"""Training throughput: seechat's Stage I / Stage II versus transformers' LlavaForConditionalGeneration, and what
each of seechat's speed switches (`speed:` in a training config) gives.

    python bench/bench_train.py            # or: make bench, or: python bench/run.py train
    BENCH_TRAIN_REPEATS=1 python bench/bench_train.py     # a quicker, noisier pass

The composition has the shape that makes training cost what it costs with real experts: a text expert with a
real vocabulary (Qwen2's 151,936 tokens; 128 wide, MLP 512, 4 layers), a CLIP vision expert (128 px, patch 8 -> 256
image tokens, feature layer -2 of 4) and a 2-layer GELU projector. Stage I samples are an image and a
~30-character Chinese caption (~30 supervised tokens of ~300); Stage II samples are 1-3-turn LLaVA conversations.

LLaVA runs as its users run it: LlavaForConditionalGeneration converted from the seechat model (same weights, so
the first losses agree), the same data pipeline, frozen parts (Stage I: projector only; Stage II: projector + LoRA
r=8 on q_proj/v_proj) and the same HF Trainer settings, fp32 on the CPU. The runs of all variants are
interleaved and repeated (the order alternates); medians of samples/s are reported with the peak growth of the
process's resident memory during each run. The machine these numbers come from may be shared: compare ratios.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
import yaml  # noqa: E402

from common import median, write  # noqa: E402
from seechat.cli_helpers import quiet_hf  # noqa: E402
from seechat.tiny import sample_image, sample_texts, tiny_config, tiny_vision, train_tokenizer  # noqa: E402

STEPS, BATCH = 5, 2
REPEATS = int(os.environ.get("BENCH_TRAIN_REPEATS", 2))
VOCAB = 151_936  # Qwen2's
COLOURS = {"红色": (220, 40, 40), "蓝色": (40, 40, 220), "绿色": (40, 180, 40), "黄色": (230, 210, 40)}
PLACES = ["左上角", "右上角", "中间", "左下角", "右下角"]
# Each variant is a `speed:` section; "off" has every switch off (seechat computing what LLaVA computes).
OFF = {"supervised_head": False, "packing": False, "vision_only_needed_layers": False, "cpu_bf16": "off"}
VARIANTS = {
    "llava": None,
    "seechat, switches off": OFF,
    "+ supervised_head": {**OFF, "supervised_head": True},
    "+ vision_only_needed_layers": {**OFF, "vision_only_needed_layers": True},
    "+ packing": {**OFF, "packing": True},
    "+ cpu_bf16 on": {**OFF, "cpu_bf16": "on"},
    "seechat (defaults)": {},
}


def _data(root: Path) -> None:
    (root / "img").mkdir(parents=True)
    caps, convs = [], []
    for i in range(64):
        name, place = list(COLOURS)[i % 4], PLACES[i % 5]
        sample_image(COLOURS[name], size=128).save(root / "img" / f"{i}.png")
        caps.append({"image": f"img/{i}.png",
                     "caption": f"一个{name}的圆形在图片的{place}，背景是白色的，没有别的东西。"})
        turns = [("<image>\n这个圆形是什么颜色的？请说明理由。", f"这个圆形是{name}的，因为它的颜色和{name}的东西一样，很容易看出来。"),
                 ("它在图片的哪个位置？", f"它在图片的{place}，离边缘有一点距离。"),
                 ("图片里还有别的东西吗？", "没有别的东西了，只有一个圆形和白色的背景。")][: 1 + i % 3]
        convs.append({"image": f"img/{i}.png", "conversations": [
            m for q, a in turns for m in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]})
    (root / "captions.jsonl").write_text("\n".join(json.dumps(c, ensure_ascii=False) for c in caps))
    (root / "llava.json").write_text(json.dumps(convs, ensure_ascii=False))


def _llm(out: Path) -> Path:
    """A Qwen2-shaped text expert with Qwen2's vocabulary size (the tokenizer uses only its first rows)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    texts = sample_texts() + [json.dumps(PLACES, ensure_ascii=False) + "图片里有一个圆形它在的背景是白色没有别东西这个是什么颜色请说明理由因为和一样很容易看出来位置离边缘点距离还吗了只"]
    tok = train_tokenizer(texts)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _training(out: Path) -> dict:
    return dict(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=BATCH, logging_steps=1,
                learning_rate=1e-3, report_to="none", save_strategy="no", use_cpu=True, seed=0,
                dataloader_num_workers=0, remove_unused_columns=False, lr_scheduler_type="constant")


class PeakRSS:
    """Samples the process's resident memory every 10 ms; `growth` is the peak above the level at the start."""

    def __enter__(self):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed memory of earlier runs back first
        except OSError:
            pass
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.growth_mb = (self.peak - self.start) / 2**20

    def _watch(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _seechat(stage, data, init, out, speed) -> tuple[float, float]:
    from seechat.train.config import load_config
    from seechat.train.run import train

    training = {k: v for k, v in _training(out).items() if k != "output_dir"}
    cfg = {"output_dir": str(out), "init_from": str(init), "training": training, "speed": speed,
           "data": {"train": [{"path": str(data / ("captions.jsonl" if stage == "align" else "llava.json"))}]},
           "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}}
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    logs = train(stage, load_config(str(path), [])).trainer.state.log_history
    return logs[-1]["train_samples_per_second"], next(h["loss"] for h in logs if "loss" in h)


def _llava(stage, data, model_dir, out) -> tuple[float, float]:
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments, set_seed

    import seechat
    from seechat.data.datasets import Collator, IndexedDataset
    from seechat.data.sources import DEFAULT_CAPTION_PROMPTS, DataSource
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
    source = DataSource(str(data / ("captions.jsonl" if stage == "align" else "llava.json")))
    dataset = IndexedDataset([source], model.processor, prompts=DEFAULT_CAPTION_PROMPTS, max_length=2048, seed=0)
    collate = Collator(model.tokenizer.pad_token_id)

    def collator(samples):
        batch = collate(samples)
        for key in ("bad_samples", "sample_index", "sample_where"):
            batch.pop(key, None)
        return batch

    trainer = Trainer(model=llava, args=TrainingArguments(**_training(out)), train_dataset=dataset,
                      data_collator=collator)
    trainer.train()
    logs = trainer.state.log_history
    return logs[-1]["train_samples_per_second"], next(h["loss"] for h in logs if "loss" in h)


def _lengths(init: Path, data: Path) -> dict:
    """Tokens per sample and supervised tokens per sample, per stage (what the switches act on)."""
    import seechat
    from seechat.data.datasets import IndexedDataset
    from seechat.data.sources import DEFAULT_CAPTION_PROMPTS, DataSource

    model = seechat.load(init, device="cpu", dtype="fp32")
    found = {}
    for stage, name in (("align", "captions.jsonl"), ("instruct", "llava.json")):
        ds = IndexedDataset([DataSource(str(data / name))], model.processor, prompts=DEFAULT_CAPTION_PROMPTS,
                            max_length=2048, seed=0)
        samples = [ds[i] for i in range(len(ds))]
        found[stage] = {"tokens_per_sample": round(sum(len(s["input_ids"]) for s in samples) / len(samples), 1),
                        "supervised_per_sample": round(sum(sum(t != -100 for t in s["labels"]) for s in samples)
                                                       / len(samples), 1),
                        "image_tokens": model.num_image_tokens}
    return found


def run() -> dict:
    import seechat
    from seechat.train.config import cpu_has_bf16

    quiet_hf()
    torch.manual_seed(0)
    stages = ("align", "instruct")
    speed = {s: {v: [] for v in VARIANTS} for s in stages}
    memory = {s: {v: [] for v in VARIANTS} for s in stages}
    first_loss = {s: {} for s in stages}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _data(root / "data")
        vision = tiny_vision(root / "vision", "clip", hidden=128, layers=4, heads=4, image_size=128, patch_size=8)
        llm = _llm(root / "llm")
        init = root / "init"  # one starting point for every run of both stages
        seechat.build(tiny_config(vision, llm), device="cpu", dtype="fp32").save(init)
        lengths = _lengths(init, root / "data")
        order = list(VARIANTS)
        for rep in range(REPEATS):
            for stage in stages:
                for who in (order if rep % 2 == 0 else order[::-1]):
                    out = root / f"{stage}-{len(speed[stage][who])}-{order.index(who)}"
                    with PeakRSS() as mem:
                        if VARIANTS[who] is None:
                            sps, loss = _llava(stage, root / "data", init, out)
                        else:
                            sps, loss = _seechat(stage, root / "data", init, out, VARIANTS[who])
                    speed[stage][who].append(round(sps, 3))
                    memory[stage][who].append(round(mem.growth_mb))
                    first_loss[stage].setdefault(who, round(loss, 4))
                    print(f"  {stage:8s} {who:30s} {sps:6.2f} samples/s  peak +{mem.growth_mb:.0f} MB  "
                          f"first loss {loss:.4f}", flush=True)
    summary = {}
    for stage in stages:
        base = median(speed[stage]["llava"])
        off = median(speed[stage]["seechat, switches off"])
        rows = {v: {"samples_per_s": round(median(speed[stage][v]), 3),
                    "over_llava": round(median(speed[stage][v]) / base, 3),
                    "over_switches_off": round(median(speed[stage][v]) / off, 3),
                    "peak_rss_growth_mb": round(median(memory[stage][v])),
                    "first_loss": first_loss[stage][v], "runs": speed[stage][v]} for v in VARIANTS}
        best = rows["seechat (defaults)"]
        summary[stage] = {"seechat_samples_per_s": best["samples_per_s"], "llava_samples_per_s": rows["llava"]["samples_per_s"],
                          "seechat_over_llava": best["over_llava"], "variants": rows, **lengths[stage]}
    return {
        "setup": {"vision": "CLIP 128x4, 128 px, patch 8 -> 256 image tokens, feature layer -2",
                  "bridge": "mlp depth 2 (GELU)", "llm": f"Qwen2 128x4 (MLP 512), vocabulary {VOCAB:,}",
                  "batch": BATCH, "steps": STEPS, "repeats": REPEATS, "stage2_lora": "r=8 on q_proj, v_proj",
                  "device": "cpu fp32 (LLaVA and seechat), bf16 only in the cpu_bf16 row",
                  "cpu_has_native_bf16": cpu_has_bf16(), "threads": torch.get_num_threads(),
                  "defaults": "supervised_head, vision_only_needed_layers on; packing off; cpu_bf16 auto",
                  "note": "2 CPU cores shared with other jobs: ratios of interleaved runs, not absolute speeds"},
        "stages": summary,
    }


def summary(result: dict) -> str:
    rows = ["| stage | run | samples/s | vs LLaVA | vs switches off | peak RSS growth | first loss |",
            "|---|---|---|---|---|---|---|"]
    for stage, r in result["stages"].items():
        for name, v in r["variants"].items():
            rows.append(f"| {stage} | {name} | {v['samples_per_s']:.2f} | {v['over_llava']:.2f}x | "
                        f"{v['over_switches_off']:.2f}x | {v['peak_rss_growth_mb']} MB | {v['first_loss']} |")
    lens = "; ".join(f"{s}: {r['tokens_per_sample']} tokens/sample, {r['supervised_per_sample']} supervised"
                     for s, r in result["stages"].items())
    rows.append(f"\n{lens}. Headline: Stage I {result['stages']['align']['seechat_over_llava']:.2f}x, Stage II "
                f"{result['stages']['instruct']['seechat_over_llava']:.2f}x of LLaVA.")
    return "\n".join(rows)


if __name__ == "__main__":
    start = time.perf_counter()
    result = run()
    result["bench_seconds"] = round(time.perf_counter() - start, 1)
    print(write("train", result))
    print(summary(result))
