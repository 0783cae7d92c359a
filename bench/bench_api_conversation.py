"""An 8-turn conversation through the API, history re-sent each turn (as every OpenAI client does): time to first
token per turn and the share of prompt tokens served from the prefix cache, versus the same server with the prefix
cache off (--prefix-cache-mb 0), side by side in one process.

    python bench/bench_api_conversation.py       # or: python bench/run.py api_conversation

The composition has 256 image tokens (CLIP 64 px / patch 4) and a 512-wide, 6-layer Qwen2 text expert (random
weights); answers are 32 greedy tokens, through the official openai client; the client runs on the same cores as
the server. Cached tokens are those of the 1-token request, whose cache hits come from the turn before.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import socket
import sys
import tempfile
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import openai  # noqa: E402
import torch  # noqa: E402
import uvicorn  # noqa: E402

from common import median, write  # noqa: E402
from seechat import build  # noqa: E402
from seechat.chat.engine import ChatEngine, GenerationSettings  # noqa: E402
from seechat.cli_helpers import quiet_hf  # noqa: E402
from seechat.serve.api import ServeArgs, create_app  # noqa: E402
from seechat.tiny import sample_image, tiny_config, tiny_llm, tiny_vision  # noqa: E402

QUESTIONS = ["详细描述这张图片", "这是什么颜色？", "它在图片的哪个位置？", "图中有几个物体？",
             "背景是什么颜色？", "这个形状叫什么？", "它大还是小？", "请再总结一下。"]
REPEATS = 3
ANSWER_TOKENS = 32


@contextlib.contextmanager
def _live(app):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def _conversation(client, image_url: str) -> list[dict]:
    messages, turns = [], []
    for i, question in enumerate(QUESTIONS):
        content = [{"type": "image_url", "image_url": {"url": image_url}}] if i == 0 else []
        messages.append({"role": "user", "content": [*content, {"type": "text", "text": question}]})
        # time to first token: a 1-token request on the same history (the prompt's prefill plus one step)
        start = time.perf_counter()
        probe = client.chat.completions.create(model="seechat", messages=messages, max_tokens=1)
        first = time.perf_counter() - start
        answer = client.chat.completions.create(model="seechat", messages=messages, max_tokens=ANSWER_TOKENS)
        text, usage = answer.choices[0].message.content, answer.usage
        messages.append({"role": "assistant", "content": text})
        turns.append({"ttft": first, "prompt": usage.prompt_tokens, "text": text,
                      "cached": (probe.usage.prompt_tokens_details.cached_tokens
                                 if probe.usage.prompt_tokens_details else 0)})
    return turns


def run() -> dict:
    quiet_hf()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        vision = tiny_vision(f"{tmp}/vision", "clip", hidden=64, image_size=64, patch_size=4)
        llm = tiny_llm(f"{tmp}/llm", "qwen2", hidden=512, layers=6, heads=8, max_positions=4096)
        model = build(tiny_config(vision, llm), device="cpu", dtype="fp32")
    model.stop_token_ids = []  # every answer runs its full length in both modes
    urls = []  # a new picture per repeat, so a repeat never finds an earlier repeat's conversation in the cache
    for colour in [(220, 40, 40), (40, 40, 220), (40, 180, 40)][:REPEATS]:
        buf = io.BytesIO()
        sample_image(colour).save(buf, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    defaults = GenerationSettings(max_new_tokens=ANSWER_TOKENS)
    runs = {"prefix_cache": [], "no_cache": []}
    with (_live(create_app(ChatEngine(model), ServeArgs(prefix_cache_mb=512), defaults)) as cached_url,
          _live(create_app(ChatEngine(model), ServeArgs(prefix_cache_mb=0), defaults)) as plain_url):
        clients = {"prefix_cache": openai.OpenAI(base_url=cached_url, api_key="x", max_retries=0, timeout=600),
                   "no_cache": openai.OpenAI(base_url=plain_url, api_key="x", max_retries=0, timeout=600)}
        for image_url in urls:  # interleaved, so both modes share the machine's ups and downs
            for mode, client in clients.items():
                runs[mode].append(_conversation(client, image_url))
    same = [[t["text"] for t in r] for r in runs["prefix_cache"]] == [[t["text"] for t in r] for r in runs["no_cache"]]
    result = {"repeats": REPEATS, "answer_tokens": ANSWER_TOKENS, "image_tokens": model.num_image_tokens,
              "answers_equal": same, "turns": []}
    for t in range(len(QUESTIONS)):
        row = {"turn": t + 1, "prompt_tokens": runs["prefix_cache"][-1][t]["prompt"]}
        for mode in runs:
            row[f"{mode}_ttft_s"] = round(median(r[t]["ttft"] for r in runs[mode]), 4)
            row[f"{mode}_cached_tokens"] = min(r[t]["cached"] for r in runs[mode])
        row["cached_share"] = round(row["prefix_cache_cached_tokens"] / row["prompt_tokens"], 3)
        result["turns"].append(row)
    first, last = result["turns"][0], result["turns"][-1]
    result["turn8_over_turn1_ttft"] = round(last["prefix_cache_ttft_s"] / first["prefix_cache_ttft_s"], 2)
    result["turn8_speedup_vs_no_cache"] = round(last["no_cache_ttft_s"] / last["prefix_cache_ttft_s"], 2)
    result["note"] = "2 CPU cores shared with other jobs; medians of interleaved runs"
    return result


def summary(r: dict) -> str:
    lines = ["| turn | prompt tokens | cached tokens (share) | TTFT, prefix cache | TTFT, no cache |",
             "|---|---|---|---|---|"]
    for t in r["turns"]:
        lines.append(f"| {t['turn']} | {t['prompt_tokens']} | {t['prefix_cache_cached_tokens']} "
                     f"({t['cached_share']:.0%}) | {t['prefix_cache_ttft_s']:.3f} s | {t['no_cache_ttft_s']:.3f} s |")
    lines.append(f"\nTurn-8 TTFT with the prefix cache is {r['turn8_over_turn1_ttft']}x turn 1's and "
                 f"{r['turn8_speedup_vs_no_cache']}x faster than without the cache; answers equal: "
                 f"{r['answers_equal']}. {r['note']}.")
    return "\n".join(lines)


if __name__ == "__main__":
    res = run()
    write("api_conversation", res)
    print(summary(res))
