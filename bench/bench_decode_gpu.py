"""Decoding on a CUDA GPU in bf16: tokens/s at batch 1, 8 and 32 for a ~0.9B random composition, next to
transformers' LlavaForConditionalGeneration on the same exported weights, and batch 1 as a fraction of the
memory-bandwidth roofline (every decoding step reads all of the text expert's weights once).

    python bench/bench_decode_gpu.py          # needs CUDA; writes bench/results/decode_gpu.json

The composition: CLIP 64 px / patch 4 (256 image tokens) -> MLP -> Qwen2 2048 wide x 24 layers (16 heads,
8 KV heads, MLP 4096; ~0.9B parameters, a 1B-class shape with a small trained vocabulary). Every answer runs
its full length (no end token), greedy, and the greedy tokens of both sides are compared. Bandwidth is measured
here with a device-to-device copy (bytes read + written per second), the roofline is that bandwidth divided by
the bytes one step must read (weights + the KV cache at mid-answer).
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

from bench_decode import COLORS, QUESTIONS, _prompt_ids, compose  # noqa: E402
from common import median, write  # noqa: E402
from seechat.chat.batch import generate_batch  # noqa: E402
from seechat.chat.decode import left_padded, pad_id  # noqa: E402
from seechat.chat.engine import ChatEngine, GenerationSettings  # noqa: E402
from seechat.cli_helpers import quiet_hf  # noqa: E402
from seechat.tiny import sample_image  # noqa: E402

NEEDS_CUDA = True  # bench/run.py skips it without one
TOKENS = {1: 128, 8: 64, 32: 64}
REPEATS = 3


def _sync_timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, out


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 2 GiB device-to-device copy (median of 10)."""
    src = torch.empty(2**30, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        seconds, _ = _sync_timed(lambda: dst.copy_(src))
        times.append(seconds)
    return 2 * src.numel() * src.element_size() / median(times[2:])


def run() -> dict:
    quiet_hf()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model, llava = compose(tmp, device="cuda", dtype="bf16", hidden=2048, layers=24, heads=16)
    model.stop_token_ids = []
    llava.generation_config.eos_token_id = None
    pad = pad_id(model)  # as generate_batch pads
    greedy = {"do_sample": False, "suppress_tokens": [model.image_token_id], "pad_token_id": pad}
    engine = ChatEngine(model)
    params = sum(p.numel() for p in model.llm.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.llm.parameters())
    results: dict = {"text_expert_parameters": params, "weight_bytes": weight_bytes}

    for batch, length in TOKENS.items():
        questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(batch)]
        images = [sample_image(COLORS[i % len(COLORS)]) for i in range(batch)]
        rows = [_prompt_ids(model, q) for q in questions]
        ids, mask = left_padded(rows, pad, "cuda")
        width = ids.shape[1]
        pixels = model.processor.pixel_values(images).to("cuda", torch.bfloat16)
        settings = GenerationSettings(max_new_tokens=length)

        if batch == 1:
            def ours():
                conv = engine.conversation()
                conv.ask(questions[0], image=images[0], settings=settings)
                return [conv.last_reply.token_ids]
        else:
            def ours():
                return [r.token_ids for r in generate_batch(model, images, questions, settings)]

        def theirs():
            with torch.no_grad():
                out = llava.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=length,
                                     **greedy)
            return out[:, width:].tolist()

        ours(), theirs()  # warm-up
        times = {"seechat": [], "llava": []}
        for _ in range(REPEATS):
            for side, fn in (("seechat", ours), ("llava", theirs)):
                seconds, got = _sync_timed(fn)
                times[side].append(seconds)
                if side == "seechat":
                    mine = got
                else:
                    peer = got
        s, lv = median(times["seechat"]), median(times["llava"])
        same = sum(a == b for a, b in zip(mine, peer))
        results[f"batch{batch}"] = {
            "new_tokens_each": length, "seechat_s": round(s, 4), "llava_s": round(lv, 4),
            "seechat_tokens_per_s": round(batch * length / s, 1), "llava_tokens_per_s": round(batch * length / lv, 1),
            "llava_over_seechat": round(lv / s, 2), "rows_with_same_greedy_tokens": f"{same}/{batch}",
        }

    bandwidth = copy_bandwidth()
    cfg = model.llm.config
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 2
    prompt = len(_prompt_ids(model, QUESTIONS[0]))
    step_bytes = weight_bytes + kv_per_token * (prompt + TOKENS[1] // 2)
    roofline = bandwidth / step_bytes
    b1 = results["batch1"]["seechat_tokens_per_s"]
    results.update({
        "copy_bandwidth_GBps": round(bandwidth / 1e9, 1),
        "bytes_per_step_batch1": step_bytes,
        "roofline_tokens_per_s_batch1": round(roofline, 1),
        "batch1_fraction_of_roofline": round(b1 / roofline, 3),
        "llava_batch1_fraction_of_roofline": round(results["batch1"]["llava_tokens_per_s"] / roofline, 3),
    })
    return {"setup": {"device": torch.cuda.get_device_name(0), "dtype": "bf16", "llm": "qwen2 2048x24 (16 heads, 8 kv)",
                      "image_tokens": model.num_image_tokens, "repeats": REPEATS, "statistic": "median seconds",
                      "peer": "transformers LlavaForConditionalGeneration on seechat's export (same weights)"},
            **results}


def summary(result: dict) -> str:
    rows = [f"Card: {result['setup']['device']}, bf16, {result['text_expert_parameters'] / 1e9:.2f}B-parameter text expert.",
            "", "| batch | tokens each | seechat tok/s | LLaVA tok/s | LLaVA / seechat time | same greedy rows |",
            "|---|---|---|---|---|---|"]
    for batch in TOKENS:
        r = result[f"batch{batch}"]
        rows.append(f"| {batch} | {r['new_tokens_each']} | {r['seechat_tokens_per_s']} | {r['llava_tokens_per_s']} | "
                    f"{r['llava_over_seechat']}x | {r['rows_with_same_greedy_tokens']} |")
    rows.append(f"\nBatch 1 reaches {result['batch1_fraction_of_roofline']:.1%} of the bandwidth roofline "
                f"({result['roofline_tokens_per_s_batch1']} tok/s at {result['copy_bandwidth_GBps']} GB/s measured "
                f"copy bandwidth); LLaVA {result['llava_batch1_fraction_of_roofline']:.1%}.")
    return "\n".join(rows)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("bench_decode_gpu needs a CUDA GPU")
    result = run()
    path = write("decode_gpu", result)
    print(summary(result))
    print(json.dumps(result, indent=2))
    print(f"wrote {path}")
