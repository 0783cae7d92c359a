"""`seechat serve --max-batch`: requests per second at 1, 8 and 32 clients, batched (--max-batch 8) and not (1).

Three servers run as subprocesses over the same model (runs/toyworld/model, or a tiny random model built here
when that is absent; the result says which): one with --max-batch 8, one with --max-batch 1 (one request at
a time, the behaviour before batching), and one with --max-batch 8 --engine-process (the model in a child
process, HTTP in the server's own; its RSS counts both). The client counts are run in interleaved rounds, alternating the two
servers, so load from other work on the machine hits both alike; the ratios are the result. Every request asks
one of four questions about an image of its own (a 64x64 PNG data: URL whose colours encode the request, so
the prefix cache cannot answer a repeated request; made before the clock starts) for 16 greedy tokens, half of
them streamed. Each answer of
the --max-batch 8 server is compared with the answer the --max-batch 1 server gave the same request (there it
ran alone). A client that gets 429 waits the Retry-After and sends again (deliberate 429s are counted, not
errors).

    python bench/bench_serve_batch.py [MODEL_DIR]      # or: python bench/run.py serve_batch

The clients run on the same cores as the server, so the numbers are a floor for the server alone.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import httpx  # noqa: E402

from bench_serve_load import MAX_TOKENS, QUESTIONS, _rss_mb, _server, server_model  # noqa: E402

ROUNDS = 3
CLIENTS = {1: 32, 8: 12, 32: 4}  # clients -> requests per client, per round (a round of 8 clients: ~1 s)
MAX_QUEUE = 32
THREADS = 1  # the servers' --threads: their clients share the 2 cores (two torch threads burnt twice the CPU per request)


def run(model_dir: str | os.PathLike | None = None) -> dict:
    model_dir = model_dir or os.environ.get("SEECHAT_BENCH_MODEL")
    with tempfile.TemporaryDirectory() as tmp:
        model, kind = server_model(model_dir, Path(tmp))
        servers = {}
        extra = ["--threads", str(THREADS), *os.environ.get("SEECHAT_BENCH_SERVE_ARGS", "").split()]
        with _server(model, Path(tmp) / "b8.log", ["--max-batch", "8", *extra], MAX_QUEUE) as (url8, pid8), \
                _server(model, Path(tmp) / "b1.log", ["--max-batch", "1", *extra], MAX_QUEUE) as (url1, pid1), \
                _server(model, Path(tmp) / "p8.log", ["--max-batch", "8", "--engine-process", *extra],
                        MAX_QUEUE) as (urlp, pidp):
            servers, pids = {8: url8, 1: url1, "p8": urlp}, {8: pid8, 1: pid1, "p8": pidp}
            for url in servers.values():  # warm-up, not timed: a server's first requests are slower
                asyncio.run(_load(url, 2, 4, -1))
            rss = {b: {"before": _rss_mb(pid)} for b, pid in pids.items()}
            runs: dict = {b: {c: [] for c in CLIENTS} for b in servers}
            load_before = os.getloadavg()
            for n in range(ROUNDS):
                for clients, per_client in CLIENTS.items():
                    answers = {}
                    for batch, url in servers.items():
                        run_, answers[batch] = asyncio.run(_load(url, clients, per_client, n))
                        runs[batch][clients].append(run_)
                    for b in (8, "p8"):
                        same = [k for k in answers[b] if k in answers[1]]
                        runs[b][clients][-1]["answers_unlike_single"] = sum(answers[b][k] != answers[1][k] for k in same)
                        runs[b][clients][-1]["answers_compared"] = len(same)
            health = {b: httpx.get(f"{u}/health").json() for b, u in servers.items()}
            for b, pid in pids.items():
                rss[b].update(after=_rss_mb(pid), peak=_rss_mb(pid, "VmHWM"))
    table = {b: {c: _merge(r) for c, r in per.items()} for b, per in runs.items()}
    return {
        "model": {"dir": str(model), "which": kind},
        "setup": {"rounds": ROUNDS, "requests_per_client_per_round": CLIENTS, "max_tokens": MAX_TOKENS,
                  "max_queue": MAX_QUEUE, "server_threads": THREADS,
                  "server_args": os.environ.get("SEECHAT_BENCH_SERVE_ARGS", ""), "client": "aiohttp", "streaming": "every other request", "image": "64x64 PNG, data: URL, one per request",
                  "on_429": "wait Retry-After, send again", "order": "a warm-up of 8 requests on each server, then rounds "
                  "of 1, 8, 32 clients, each on --max-batch 8, --max-batch 1, then --max-batch 8 --engine-process"},
        "requests_per_second": {f"max_batch_{b}": {str(c): t["requests_per_second"] for c, t in per.items()}
                                for b, per in table.items()},
        "ratios": {
            "batch8_8_clients_over_1_client": round(table[8][8]["requests_per_second"]
                                                    / table[8][1]["requests_per_second"], 2),
            "batch8_32_clients_over_1_client": round(table[8][32]["requests_per_second"]
                                                     / table[8][1]["requests_per_second"], 2),
            "batch8_over_batch1_at_8_clients": round(table[8][8]["requests_per_second"]
                                                     / table[1][8]["requests_per_second"], 2),
            "engine_process_8_clients_over_its_1_client": round(table["p8"][8]["requests_per_second"]
                                                                / table["p8"][1]["requests_per_second"], 2),
            "engine_process_8_clients_over_best_1_client": round(
                table["p8"][8]["requests_per_second"]
                / max(table[b][1]["requests_per_second"] for b in table), 2),
        },
        "runs": {f"max_batch_{b}": {str(c): t for c, t in per.items()} for b, per in table.items()},
        "server_health_after": {f"max_batch_{b}": h for b, h in health.items()},
        "server_rss_mb": {f"max_batch_{b}": r for b, r in rss.items()},
        "machine_load_average": {"before": [round(x, 2) for x in load_before],
                                 "after": [round(x, 2) for x in os.getloadavg()]},
        "note": "clients and servers on the same 2 cores: absolute numbers are noisy, the interleaved ratios less so",
    }


def _body(question: str, image: str, stream: bool) -> dict:
    return {"model": "bench", "max_tokens": MAX_TOKENS, "stream": stream, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": question}]}]}


async def _load(url: str, clients: int, per_client: int, round_: int) -> tuple[dict, dict]:
    """`clients` clients, each sending its requests one after another; aiohttp is the load generator (clients
    and server share the cores here, and aiohttp spent a sixth of the CPU per request that httpx did (1.0 against 6.2 ms))."""
    import aiohttp

    answered, errors, rejected, answers = 0, [], 0, {}

    async def one(http: aiohttp.ClientSession, body: dict) -> tuple[str, str | None]:
        try:
            async with http.post(url + "/v1/chat/completions", json=body) as r:
                if r.status != 200:
                    return await _status(r), None
                if not body["stream"]:
                    return "ok", (await r.json())["choices"][0]["message"]["content"]
                lines = [line.decode().strip() async for line in r.content]
            lines = [line for line in lines if line]
            if not lines or lines[-1] != "data: [DONE]":
                return f"bad stream end {lines[-1:]!r}", None
            events = [json.loads(line[6:]) for line in lines[:-1]]
            if any("error" in e for e in events):
                return f"error event {events[-1]!r}"[:200], None
            return "ok", "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
        except (aiohttp.ClientError, ValueError, KeyError) as exc:
            return f"{type(exc).__name__}: {exc}"[:200], None

    # the request bodies are made before the clock starts: drawing and PNG-encoding a picture is the client's
    # work, and it would take the server's cores
    bodies = {(k, i): _body(QUESTIONS[(k + i) % len(QUESTIONS)], _image_url((round_, clients, k, i)), (k + i) % 2 == 1)
              for k in range(clients) for i in range(per_client)}

    async def client(k: int) -> None:
        nonlocal answered, rejected
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
            for i in range(per_client):
                body = bodies[k, i]
                while True:
                    outcome, text = await one(http, body)
                    if not outcome.startswith("429 "):
                        break
                    rejected += 1
                    await asyncio.sleep(float(outcome.split()[1]))
                if outcome == "ok":
                    answered += 1
                    answers[k, i] = text
                else:
                    errors.append(outcome)

    start = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(clients)))
    wall = time.perf_counter() - start
    return {"requests": clients * per_client, "answered": answered, "errors": errors, "deliberate_429s": rejected,
            "answers_unlike_single": 0, "answers_compared": 0, "seconds": wall}, answers


def _image_url(key: tuple) -> str:
    """A 64x64 PNG data: URL of a disc on a background whose colours encode `key` (one image per request)."""
    from PIL import Image, ImageDraw

    n = zlib.crc32(repr(key).encode()) % 2**24
    colour, background = (n % 256, n // 256 % 256, n // 65536), (255 - n % 97, 255 - n % 89, 255 - n % 83)
    img = Image.new("RGB", (64, 64), background)
    ImageDraw.Draw(img).ellipse((16, 16, 48, 48), fill=colour)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def _status(response) -> str:
    retry = response.headers.get("retry-after", "")
    if response.status == 429 and retry.isdigit():
        return f"429 {retry}"
    return f"HTTP {response.status}: {(await response.text())[:150]}"


def _merge(rounds: list[dict]) -> dict:
    seconds = sum(r["seconds"] for r in rounds)
    answered = sum(r["answered"] for r in rounds)
    errors = [e for r in rounds for e in r["errors"]]
    return {"requests": sum(r["requests"] for r in rounds), "answered": answered, "errors": len(errors),
            "error_examples": sorted(set(errors))[:5], "deliberate_429s": sum(r["deliberate_429s"] for r in rounds),
            "answers_unlike_single": sum(r["answers_unlike_single"] for r in rounds),
            "answers_compared": sum(r["answers_compared"] for r in rounds), "seconds": round(seconds, 2),
            "requests_per_second": round(answered / seconds, 2),
            "requests_per_second_by_round": [round(r["answered"] / r["seconds"], 2) for r in rounds],
            "round_spread": round(statistics.pstdev([r["answered"] / r["seconds"] for r in rounds]), 2)}


def summary(result: dict) -> str:
    rows = [
        f"Model: {result['model']['which']}; {result['setup']['max_tokens']} greedy tokens per request, "
        f"--max-queue {result['setup']['max_queue']}, {result['setup']['rounds']} interleaved rounds. "
        f"{result['note']}.",
        "",
        "| --max-batch | clients | answered | errors | deliberate 429s | answers unlike --max-batch 1 | req/s (per round) |",
        "|---|---|---|---|---|---|---|",
    ]
    for b, per in result["runs"].items():
        for c, r in per.items():
            label = "8, --engine-process" if b == "max_batch_p8" else b.removeprefix("max_batch_")
            rows.append(f"| {label} | {c} | {r['answered']}/{r['requests']} | {r['errors']} | "
                        f"{r['deliberate_429s']} | {r['answers_unlike_single']}/{r['answers_compared']} | {r['requests_per_second']} "
                        f"({', '.join(map(str, r['requests_per_second_by_round']))}) |")
    ratios = result["ratios"]
    rows.append(f"\n--max-batch 8: 8 clients get {ratios['batch8_8_clients_over_1_client']}x the requests/s of 1 "
                f"client, 32 clients {ratios['batch8_32_clients_over_1_client']}x; at 8 clients --max-batch 8 gets "
                f"{ratios['batch8_over_batch1_at_8_clients']}x the requests/s of --max-batch 1. With --engine-process: "
                f"8 clients get {ratios['engine_process_8_clients_over_its_1_client']}x its own 1-client rate and "
                f"{ratios['engine_process_8_clients_over_best_1_client']}x the best 1-client rate of the three servers.")
    for b, r in result.get("server_rss_mb", {}).items():
        rows.append(f"Server RSS ({b.replace('_', ' ')}): {r['before']} MB before the runs, {r['after']} MB after "
                    f"(peak {r['peak']} MB).")
    return "\n".join(rows)


if __name__ == "__main__":
    from common import write

    result = run(sys.argv[1] if len(sys.argv) > 1 else None)
    print(write("serve_batch", result))
    print(summary(result))
