"""Load on `seechat serve`: 32 concurrent clients x 20 requests, then requests per second at 1, 8 and 32 clients.

The server runs as a subprocess (`python -m seechat serve`, default --max-queue 16) over the toy-world model
(runs/toyworld/model) or, when that is absent, a tiny random model built here; the result says which. Each
request carries one image (a data: URL) and asks for 16 greedy tokens; half of them stream. A client that gets
429 waits the Retry-After the server sent and sends the same request again, so every request is answered
in the end. Everything else that is not a complete answer counts as an error (there should be none).

    python bench/bench_serve_load.py [MODEL_DIR]      # or: python bench/run.py serve_load

The clients run on the same 2 cores as the server, so the numbers are a floor for the server alone.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import httpx  # noqa: E402

from common import write  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOYWORLD = ROOT / "runs" / "toyworld" / "model"
CLIENTS, REQUESTS = 32, 20
SWEEP = {1: 40, 8: 10, 32: 20}  # clients -> requests per client (the 32-client point is the main run)
MAX_TOKENS = 16
MAX_QUEUE = 16
QUESTIONS = ["这是什么颜色？", "详细描述这张图片", "它在图片的哪个位置？", "图中有几个物体？"]


def server_model(model_dir, tmp: Path) -> tuple[Path, str]:
    """The model the serving benchmarks load: the one given, else the built toy world, else a tiny random one."""
    if model_dir:
        return Path(model_dir), "given"
    if (TOYWORLD / "seechat.json").exists():
        return TOYWORLD, "toy world"
    from seechat.cli_helpers import quiet_hf
    from seechat.tiny import build_tiny_model

    quiet_hf()
    return build_tiny_model(tmp / "tiny"), "tiny random (runs/toyworld/model is absent)"


def run(model_dir: str | os.PathLike | None = None) -> dict:
    model_dir = model_dir or os.environ.get("SEECHAT_BENCH_MODEL")
    with tempfile.TemporaryDirectory() as tmp:
        model, kind = server_model(model_dir, Path(tmp))
        with _server(model, Path(tmp) / "server.log") as (url, pid):
            load_before = os.getloadavg()
            rss = {"started": _rss_mb(pid)}
            sweep = {}
            for clients in sorted(SWEEP, key=lambda c: c == CLIENTS):  # the main 32-client run last
                if clients == CLIENTS:
                    rss["before"] = _rss_mb(pid)
                sweep[clients] = asyncio.run(_load(url, clients, SWEEP[clients]))
            rss["after"] = _rss_mb(pid)
            rss["peak"] = _rss_mb(pid, "VmHWM")
            status = httpx.get(f"{url}/health").json()
    main = sweep[CLIENTS]
    return {
        "model": {"dir": str(model), "which": kind},
        "setup": {"clients": CLIENTS, "requests_per_client": REQUESTS, "max_tokens": MAX_TOKENS,
                  "max_queue": MAX_QUEUE, "streaming": "every other request", "image": "64x64 PNG, data: URL",
                  "on_429": "wait Retry-After, send again"},
        "main": main,
        "requests_per_second": {str(c): sweep[c]["requests_per_second"] for c in sorted(sweep)},
        "sweep": {str(c): sweep[c] for c in sorted(sweep)},
        "server_rss_mb": rss,
        "server_health_after": status,
        "machine_load_average": {"before": [round(x, 2) for x in load_before],
                                 "after": [round(x, 2) for x in os.getloadavg()]},
    }


@contextlib.contextmanager
def _server(model: Path, log: Path, extra: list[str] = (), max_queue: int = MAX_QUEUE):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "seechat", "serve", "--model", str(model), "--port", str(port),
           "--max-queue", str(max_queue), "--max-new-tokens", str(MAX_TOKENS), "--served-model-name", "bench", *extra]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"seechat serve exited:\n{log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("seechat serve did not come up in 120 s")
            time.sleep(0.2)
        yield url, proc.pid
        if proc.poll() is not None:
            raise RuntimeError(f"seechat serve died under load:\n{log.read_text()[-2000:]}")
    finally:
        proc.terminate()
        proc.wait(60)


def _rss_mb(pid: int, field: str = "VmRSS") -> float:
    """The process's resident memory, its child processes' added (`seechat serve --engine-process`)."""
    total = None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            total = int(line.split()[1]) / 1024
    if total is None:
        raise RuntimeError(f"no {field} for process {pid}")
    children = Path(f"/proc/{pid}/task/{pid}/children")
    for child in (children.read_text().split() if children.is_file() else []):
        try:
            total += _rss_mb(int(child), field)
        except (OSError, RuntimeError):  # gone meanwhile
            pass
    return round(total, 1)


def _image_url() -> str:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(img).ellipse((16, 16, 48, 48), fill=(220, 40, 40))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def _load(url: str, clients: int, per_client: int) -> dict:
    image = _image_url()
    accepted, total, errors = [], [], []
    rejected = 0

    async def one(http: httpx.AsyncClient, body: dict) -> tuple[str, float | None]:
        start = time.perf_counter()
        try:
            if body["stream"]:
                async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                    if r.status_code != 200:
                        await r.aread()
                        return _classify(r), None
                    lines = [line async for line in r.aiter_lines() if line]
                ok = lines and lines[-1] == "data: [DONE]" and all(
                    "error" not in json.loads(line[6:]) for line in lines[:-1])
                return ("ok" if ok else f"bad stream: {lines[-2:]!r}"[:200]), time.perf_counter() - start
            r = await http.post("/v1/chat/completions", json=body)
            if r.status_code != 200:
                return _classify(r), None
            ok = r.json()["usage"]["completion_tokens"] >= 1
            return ("ok" if ok else "no tokens"), time.perf_counter() - start
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            return f"{type(exc).__name__}: {exc}"[:200], None

    async def client(k: int) -> None:
        nonlocal rejected
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            for i in range(per_client):
                question = QUESTIONS[(k + i) % len(QUESTIONS)]
                body = {"model": "bench", "max_tokens": MAX_TOKENS, "stream": (k + i) % 2 == 1,
                        "messages": [{"role": "user", "content": [
                            {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": question}]}]}
                first = time.perf_counter()
                while True:
                    outcome, seconds = await one(http, body)
                    if not outcome.startswith("429 "):
                        break
                    rejected += 1
                    await asyncio.sleep(float(outcome.split()[1]))
                if outcome == "ok":
                    accepted.append(seconds)
                    total.append(time.perf_counter() - first)
                else:
                    errors.append(outcome)

    start = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(clients)))
    wall = time.perf_counter() - start
    return {
        "clients": clients, "requests": clients * per_client, "answered": len(accepted), "errors": len(errors),
        "error_examples": sorted(set(errors))[:5], "deliberate_429s": rejected,
        "latency_s": _percentiles(accepted), "latency_with_retries_s": _percentiles(total),
        "seconds": round(wall, 2), "requests_per_second": round(len(accepted) / wall, 2),
    }


def _classify(response: httpx.Response) -> str:
    if response.status_code == 429 and response.headers.get("retry-after", "").isdigit():
        return f"429 {response.headers['retry-after']}"
    return f"HTTP {response.status_code}: {response.text[:150]}"


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]  # noqa: E731
    return {"p50": round(statistics.median(ordered), 3), "p99": round(pick(0.99), 3), "max": round(ordered[-1], 3)}


def summary(result: dict) -> str:
    m, rss = result["main"], result["server_rss_mb"]
    rows = [
        f"Model: {result['model']['which']} ({result['model']['dir']}); {m['clients']} clients x "
        f"{result['setup']['requests_per_client']} requests, {result['setup']['max_tokens']} tokens each, "
        f"--max-queue {result['setup']['max_queue']}.",
        "",
        "| clients | answered | errors | deliberate 429s | p50 (s) | p99 (s) | p50 / p99 with retries (s) | req/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c, r in result["sweep"].items():
        rows.append(f"| {c} | {r['answered']}/{r['requests']} | {r['errors']} | {r['deliberate_429s']} | "
                    f"{r['latency_s'].get('p50', '-')} | {r['latency_s'].get('p99', '-')} | "
                    f"{r['latency_with_retries_s'].get('p50', '-')} / {r['latency_with_retries_s'].get('p99', '-')} | "
                    f"{r['requests_per_second']} |")
    rows.append(f"\nServer RSS: {rss['started']} MB after start, {rss['before']} MB before the {m['clients']}-client run, "
                f"{rss['after']} MB after it (peak {rss['peak']} MB).")
    load = result.get("machine_load_average")
    if load:
        rows.append(f"Machine load average (1/5/15 min) before: {load['before']}, after: {load['after']} "
                    "(other work on the same cores slows every number).")
    if m["errors"]:
        rows.append(f"Errors: {m['error_examples']}")
    return "\n".join(rows)


if __name__ == "__main__":
    result = run(sys.argv[1] if len(sys.argv) > 1 else None)
    print(write("serve_load", result))
    print(summary(result))
