"""Memory of `seechat serve` under huge images: 4 concurrent requests, each with 8 PNGs of 7000x7000.

Each PNG is one colour, so it is small on the wire (under 1 MB) but 49 MP (196 MB in PIL) once decoded: the
attack of issue 11, which drove the server to 8.6 GB RSS before images were decoded toward the vision size
under a pixel budget. The server runs as a subprocess over the toy-world model (runs/toyworld/model) or, when
that is absent, a tiny random model built here. Two runs: the default budget (128 MP a request: each request
is refused at its third image, before decoding it) and --max-decoded-mpixels 400 (every image decodes and
every request is answered). The server's peak RSS (VmHWM) is read from /proc.

    python bench/bench_serve_memory.py [MODEL_DIR]      # or: python bench/run.py serve_memory
"""

from __future__ import annotations

import base64
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import httpx  # noqa: E402
from bench_serve_load import _rss_mb, _server, server_model  # noqa: E402
from seechat.tiny import flat_png  # noqa: E402

REQUESTS, IMAGES, SIDE = 4, 8, 7000


def run(model_dir: str | os.PathLike | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        model, kind = server_model(model_dir, Path(tmp))
        url_image = "data:image/png;base64," + base64.b64encode(flat_png(SIDE, SIDE)).decode()
        body = {"max_tokens": 4, "messages": [{"role": "user", "content": [
            *({"type": "image_url", "image_url": {"url": url_image}} for _ in range(IMAGES)),
            {"type": "text", "text": "这是什么颜色？"}]}]}
        runs = {}
        for label, extra in (("default budget (128 MP)", []), ("--max-decoded-mpixels 400", ["400"])):
            flags = ["--max-images", str(IMAGES)] + (["--max-decoded-mpixels", *extra] if extra else [])
            with _server(model, Path(tmp) / "server.log", flags) as (url, pid):
                started = _rss_mb(pid)
                statuses, seconds = _burst(url, body)
                runs[label] = {"statuses": statuses, "seconds": round(seconds, 2), "rss_started_mb": started,
                               "rss_peak_mb": _rss_mb(pid, "VmHWM"), "rss_after_mb": _rss_mb(pid),
                               "health_after": httpx.get(f"{url}/health").json()}
    return {"model": {"dir": str(model), "which": kind},
            "setup": {"concurrent_requests": REQUESTS, "images_per_request": IMAGES,
                      "image": f"{SIDE}x{SIDE} one-colour PNG, {len(url_image) / 2**20:.2f} MB as a data: URL"},
            "runs": runs}


def _burst(url: str, body: dict) -> tuple[list[int], float]:
    statuses = [0] * REQUESTS

    def send(i: int) -> None:
        statuses[i] = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600).status_code

    threads = [threading.Thread(target=send, args=(i,)) for i in range(REQUESTS)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses, time.perf_counter() - start




def summary(result: dict) -> str:
    rows = [f"Model: {result['model']['which']}; {result['setup']['concurrent_requests']} concurrent requests x "
            f"{result['setup']['images_per_request']} images ({result['setup']['image']}).", "",
            "| run | statuses | seconds | server RSS at start (MB) | peak RSS (MB) | RSS after (MB) |",
            "|---|---|---|---|---|---|"]
    for label, r in result["runs"].items():
        rows.append(f"| {label} | {r['statuses']} | {r['seconds']} | {r['rss_started_mb']} | {r['rss_peak_mb']} | "
                    f"{r['rss_after_mb']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    from common import write

    result = run(sys.argv[1] if len(sys.argv) > 1 else None)
    print(write("serve_memory", result))
    print(summary(result))
