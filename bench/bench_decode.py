"""Decoding speed of seechat versus transformers' LlavaForConditionalGeneration on the same weights.

The seechat model is exported with seechat's own LLaVA exporter (`seechat export llava-hf`) and loaded back
with transformers, so both sides hold the same weights and see the same prompt ids and pixel values. Both sides
start from the picture and the question: the LLaVA side's timed part renders the prompt and preprocesses the
pixels with the same calls seechat makes (until November 2026 it was given them ready, untimed). Two
workloads, each run interleaved (seechat, llava, seechat, llava ...) in one process, fp32 on CPU, greedy:
one 64-token answer to one question about one image (seechat's chat engine, as the terminal and the API use
it), and a batch of 8 questions about 8 images, 32 tokens each (seechat.chat.batch.generate_batch against
llava.generate on the same left-padded batch). Every answer runs its full length on both sides (no end
token stops either), and the greedy tokens of both sides are checked equal. The ratio is
llava seconds / seechat seconds (above 1: seechat is faster).

    python bench/run.py decode            # or: python bench/bench_decode.py
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

from common import RESULTS, median, write  # noqa: E402
from seechat import build  # noqa: E402
from seechat.chat.batch import generate_batch  # noqa: E402
from seechat.chat.decode import Batch, left_padded, pad_id  # noqa: E402
from seechat.chat.engine import ChatEngine, ChatState, GenerationSettings  # noqa: E402
from seechat.cli_helpers import quiet_hf  # noqa: E402
from seechat.export.llava import export_llava  # noqa: E402
from seechat.tiny import sample_image, tiny_config, tiny_llm, tiny_vision  # noqa: E402

REPEATS = 5
SINGLE_TOKENS = 64
BATCH = 8
BATCH_TOKENS = 32
QUESTION = "详细描述这张图片"
QUESTIONS = ["详细描述这张图片", "这是什么颜色？", "它在图片的哪个位置？", "图中有几个物体？",
             "背景是什么颜色？", "这个形状叫什么？", "它大还是小？", "请描述一下这个形状。"]
COLORS = [(220, 40, 40), (40, 160, 60), (40, 80, 220), (230, 200, 30),
          (160, 60, 200), (30, 190, 200), (240, 130, 20), (90, 90, 90)]


def _prompt_ids(model, question: str) -> list[int]:
    """The prompt as seechat's engine renders a fresh conversation (what the exported LLaVA processor builds too)."""
    return model.processor.render([{"role": "user", "content": "<image>\n" + question}], num_images=1,
                                  add_generation_prompt=True).input_ids


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def compose(tmp: str, device: str = "cpu", dtype: str = "fp32", hidden: int = 512, layers: int = 6,
            heads: int = 8):
    """A random composition (CLIP 64 px / patch 4 -> 256 image tokens, as ViT-L/14 at 224 px gives; a Qwen2 text
    expert of the given shape) and its LLaVA export loaded by transformers on the same device and dtype."""
    from transformers import LlavaForConditionalGeneration

    vision = tiny_vision(f"{tmp}/vision", "clip", hidden=64, image_size=64, patch_size=4)
    llm = tiny_llm(f"{tmp}/llm", "qwen2", hidden=hidden, layers=layers, heads=heads, max_positions=4096)
    model = build(tiny_config(vision, llm), device=device, dtype=dtype)
    export_llava(model, f"{tmp}/llava")
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    llava = LlavaForConditionalGeneration.from_pretrained(f"{tmp}/llava", dtype=torch_dtype).to(device).eval()
    return model, llava


def run() -> dict:
    quiet_hf()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model, llava = compose(tmp)
    model.stop_token_ids = []  # seechat runs every answer to its full length
    llava.generation_config.eos_token_id = None  # and so does LLaVA: the same work on both sides
    # seechat never generates the image token (chat/decode.py masks it); LLaVA gets the same rule,
    # so greedy tokens can be compared
    llava_greedy = {"do_sample": False, "suppress_tokens": [model.image_token_id],
                    "pad_token_id": model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0}
    engine = ChatEngine(model)  # reuse_cache as default

    # -- 1. one 64-token answer to one question about one image ----------------------------------------------
    image = sample_image()
    settings = GenerationSettings(max_new_tokens=SINGLE_TOKENS)

    def seechat_single():
        conv = engine.conversation()
        conv.ask(QUESTION, image=image, settings=settings)
        return conv.last_reply.token_ids

    def llava_single():
        # from the picture and the question, as seechat starts: the same prompt rendering and pixel preprocessing
        ids = torch.tensor([_prompt_ids(model, QUESTION)])
        pixels = model.processor.pixel_values([image])
        with torch.no_grad():
            out = llava.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=SINGLE_TOKENS, **llava_greedy)
        return out[0, ids.shape[1]:].tolist()

    # -- 2. a batch of 8 questions about 8 images, 32 tokens each --------------------------------------------
    images = [sample_image(c) for c in COLORS[:BATCH]]
    rows = [_prompt_ids(model, q) for q in QUESTIONS[:BATCH]]
    pad = pad_id(model)  # as generate_batch pads
    width = max(len(r) for r in rows)
    batch_settings = GenerationSettings(max_new_tokens=BATCH_TOKENS)

    def seechat_batch():
        return [r.token_ids for r in generate_batch(model, images, QUESTIONS[:BATCH], batch_settings)]

    def llava_batch():
        batch_ids, batch_mask = left_padded([_prompt_ids(model, q) for q in QUESTIONS[:BATCH]], pad)
        batch_pixels = model.processor.pixel_values(images)
        with torch.no_grad():
            out = llava.generate(input_ids=batch_ids, pixel_values=batch_pixels, attention_mask=batch_mask,
                                 max_new_tokens=BATCH_TOKENS, **{**llava_greedy, "pad_token_id": pad})
        return out[:, width:].tolist()

    workloads = {"single": (seechat_single, llava_single, SINGLE_TOKENS),
                 "batch8": (seechat_batch, llava_batch, BATCH_TOKENS)}
    results = {"load_average_before": [round(x, 2) for x in os.getloadavg()]}
    for name, (ours, theirs, length) in workloads.items():
        ours(), theirs()  # warm-up, not timed
        times = {"seechat": [], "llava": []}
        tokens = {}
        for _ in range(REPEATS):
            for side, fn in (("seechat", ours), ("llava", theirs)):
                seconds, got = _timed(fn)
                times[side].append(seconds)
                tokens[side] = got
        rows_s = tokens["seechat"] if name == "batch8" else [tokens["seechat"]]
        rows_l = tokens["llava"] if name == "batch8" else [tokens["llava"]]
        lengths = sorted({len(r) for r in rows_s + rows_l})
        same = rows_s == rows_l
        s, lv = median(times["seechat"]), median(times["llava"])
        results[name] = {
            "seechat_s": round(s, 4), "llava_s": round(lv, 4), "llava_over_seechat": round(lv / s, 2),
            "rows": len(rows_s), "new_tokens_each": lengths, "same_greedy_tokens": same,
            # the ratio of each interleaved pair: a run slowed by another job on the machine shows up here
            "pair_ratios": [round(lo / so, 2) for so, lo in zip(times["seechat"], times["llava"])],
            "seechat_runs_s": [round(x, 4) for x in times["seechat"]],
            "llava_runs_s": [round(x, 4) for x in times["llava"]],
        }
        if not same or lengths != [length]:
            raise AssertionError(f"{name}: both sides must give the same {length} greedy tokens per row; "
                                 f"got lengths {lengths}, equal={same}")

    results["turn8_ttft"] = turn8_ttft(model)
    results["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    kv = RESULTS / "kv_reuse.json"
    turn8 = json.loads(kv.read_text())["turns"]["turn_8"] if kv.exists() else None
    return {
        "setup": {"image_tokens": model.num_image_tokens, "vision": "clip 64 wide, 64 px, patch 4", "llm": "qwen2 512x6",
                  "dtype": "fp32", "device": "cpu", "decoding": "greedy, full length on both sides",
                  "repeats": REPEATS, "order": "interleaved seechat, llava", "statistic": "median seconds",
                  "peer": "transformers LlavaForConditionalGeneration on seechat's export (same weights)"},
        **results,
        "kv_reuse_turn8": turn8,
    }


def turn8_ttft(model) -> dict:
    """Time to the first piece of turn 8 of a conversation about one image: with the conversation's KV cache
    (what the terminal and web page keep) against the same engine re-prefilling the whole history, interleaved."""
    reuse, again = ChatEngine(model), ChatEngine(model, reuse_cache=False)
    conv = reuse.conversation()
    conv.ask(QUESTIONS[0], image=sample_image(), max_new_tokens=32)
    for q in QUESTIONS[1:7]:
        conv.ask(q, max_new_tokens=32)
    settings = GenerationSettings(max_new_tokens=32)

    def first_token(engine) -> float:
        """Seconds from the question to its first generated token: the prompt's prefill (all of it, or the part
        past the cache), whose last position's logits give that token (Batch.join chooses it and streams it). The
        conversation's state is not changed (the turn never ends)."""
        state = ChatState([*conv.state.messages, {"role": "user", "content": QUESTIONS[7]}], list(conv.state.images),
                          conv.state.kv)
        with engine.lock:
            start = time.perf_counter()
            row = engine.begin(state, settings)
            Batch(model).join([row])
            seconds = time.perf_counter() - start
            assert len(row.tokens) == 1
            return seconds

    first_token(reuse), first_token(again)  # warm-up
    times = {"reuse": [], "reprefill": []}
    for _ in range(REPEATS):
        times["reuse"].append(first_token(reuse))
        times["reprefill"].append(first_token(again))
    r, p = median(times["reuse"]), median(times["reprefill"])
    prompt = len(model.processor.render([*conv.state.messages, {"role": "user", "content": QUESTIONS[7]}],
                                        num_images=1, add_generation_prompt=True).input_ids)
    return {"prompt_tokens": prompt, "reuse_s": round(r, 4), "reprefill_s": round(p, 4),
            "reprefill_over_reuse": round(p / r, 2)}


def summary(result: dict) -> str:
    rows = ["| workload | seechat (s) | LLaVA (s) | LLaVA / seechat | same greedy tokens |", "|---|---|---|---|---|"]
    labels = {"single": f"1 answer, {SINGLE_TOKENS} tokens", "batch8": f"batch of {BATCH}, {BATCH_TOKENS} tokens each"}
    for name, label in labels.items():
        r = result[name]
        rows.append(f"| {label} | {r['seechat_s']:.3f} | {r['llava_s']:.3f} | {r['llava_over_seechat']:.2f}x | "
                    f"{'yes' if r['same_greedy_tokens'] else 'NO'} |")
    if "load_average_before" in result:
        rows.append(f"\nLoad average (1, 5, 15 min) before {result['load_average_before']}, after "
                    f"{result['load_average_after']} on {result.get('machine', {}).get('cpu_cores', os.cpu_count())} cores; "
                    f"per-pair ratios: single {result['single']['pair_ratios']}, batch {result['batch8']['pair_ratios']}.")
    ttft = result.get("turn8_ttft")
    if ttft:
        rows.append(f"\nTurn-8 time to first token ({ttft['prompt_tokens']} prompt tokens): KV reuse "
                    f"{ttft['reuse_s']:.3f} s, re-prefill {ttft['reprefill_s']:.3f} s "
                    f"({ttft['reprefill_over_reuse']:.2f}x faster with reuse).")
    turn8 = result.get("kv_reuse_turn8")
    if turn8:
        rows.append(f"\nTurn-8 time (bench kv_reuse): KV reuse {turn8['reuse_s']:.3f} s, re-prefill "
                    f"{turn8['reprefill_s']:.3f} s ({turn8['reprefill_over_reuse']:.2f}x).")
    return "\n".join(rows)


if __name__ == "__main__":
    result = run()
    print(write("decode", result))
    print(summary(result))
