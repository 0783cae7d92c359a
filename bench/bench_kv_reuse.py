"""Per-turn latency of an 8-turn conversation: KV reuse versus re-prefilling the whole history each turn.

The original SEEChat re-encodes the whole history every turn; seechat keeps the KV cache, so a turn
prefills only its new text. Both modes run side by side on the same model, same images, same greedy
answers (checked), and the ratio is taken per turn.

    python bench/bench_kv_reuse.py            # or: make bench
"""

from __future__ import annotations

import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

from common import median, write  # noqa: E402
from seechat import build  # noqa: E402
from seechat.chat.engine import ChatEngine, GenerationSettings  # noqa: E402
from seechat.cli_helpers import quiet_hf  # noqa: E402
from seechat.tiny import sample_image, tiny_config, tiny_llm, tiny_vision  # noqa: E402

QUESTIONS = ["详细描述这张图片", "这是什么颜色？", "它在图片的哪个位置？", "图中有几个物体？",
             "背景是什么颜色？", "这个形状叫什么？", "它大还是小？", "请再总结一下。"]
REPEATS = 3
ANSWER_TOKENS = 48


def run() -> dict:
    quiet_hf()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        # 256 image tokens per image, as CLIP ViT-L/14 at 224 px gives; a 6-layer, 512-wide text expert
        vision = tiny_vision(f"{tmp}/vision", "clip", hidden=64, image_size=64, patch_size=4)
        llm = tiny_llm(f"{tmp}/llm", "qwen2", hidden=512, layers=6, heads=8, max_positions=4096)
        model = build(tiny_config(vision, llm), device="cpu", dtype="fp32")
    model.stop_token_ids = []  # every answer runs its full length, so both modes see the same history growth
    image = sample_image()
    settings = GenerationSettings(max_new_tokens=ANSWER_TOKENS)
    times = {"reuse": [[] for _ in QUESTIONS], "reprefill": [[] for _ in QUESTIONS]}
    prefill, answers = {}, {}
    for _ in range(REPEATS):
        for mode in ("reuse", "reprefill"):
            conv = ChatEngine(model, reuse_cache=(mode == "reuse")).conversation()
            got = []
            for turn, question in enumerate(QUESTIONS):
                conv.ask(question, image=image if turn == 0 else None, settings=settings)
                times[mode][turn].append(conv.last_reply.seconds)
                got.append(conv.last_reply.token_ids)
                prefill.setdefault(mode, []).append(conv.last_reply.prefill_tokens)
            answers[mode] = got
    assert answers["reuse"] == answers["reprefill"], "the two modes must produce the same greedy tokens"
    per_turn = {mode: [median(t) for t in ts] for mode, ts in times.items()}
    turns = {}
    for t in (1, 4, 8):
        reuse, full = per_turn["reuse"][t - 1], per_turn["reprefill"][t - 1]
        turns[f"turn_{t}"] = {"reuse_s": round(reuse, 4), "reprefill_s": round(full, 4),
                              "reprefill_over_reuse": round(full / reuse, 2),
                              "prefill_tokens_reuse": prefill["reuse"][t - 1],
                              "prefill_tokens_reprefill": prefill["reprefill"][t - 1]}
    return {
        "setup": {"image_tokens": model.num_image_tokens, "llm": "qwen2 512x6", "answer_tokens": ANSWER_TOKENS,
                  "turns": len(QUESTIONS), "repeats": REPEATS, "statistic": "median seconds per turn"},
        "turns": turns,
        "reuse_turn8_over_turn1": round(per_turn["reuse"][7] / per_turn["reuse"][0], 2),
        "reprefill_turn8_over_turn1": round(per_turn["reprefill"][7] / per_turn["reprefill"][0], 2),
        "per_turn_s": {m: [round(x, 4) for x in v] for m, v in per_turn.items()},
    }


def summary(result: dict) -> str:
    rows = ["| turn | KV reuse (s) | re-prefill (s) | re-prefill / reuse | prefill tokens (reuse / re-prefill) |",
            "|---|---|---|---|---|"]
    for name, r in result["turns"].items():
        rows.append(f"| {name[5:]} | {r['reuse_s']:.3f} | {r['reprefill_s']:.3f} | {r['reprefill_over_reuse']:.2f}x | "
                    f"{r['prefill_tokens_reuse']} / {r['prefill_tokens_reprefill']} |")
    rows.append(f"\nKV reuse: turn 8 costs {result['reuse_turn8_over_turn1']:.2f}x turn 1; "
                f"re-prefill: {result['reprefill_turn8_over_turn1']:.2f}x.")
    return "\n".join(rows)


if __name__ == "__main__":
    result = run()
    print(write("kv_reuse", result))
    print(summary(result))
