"""`seechat serve --engine-process`: the model in a child process, HTTP in this one (serve/engine_process.py).

The official openai client talks to a live server whose engine runs in a spawned child; its answers must be the
ones the same requests get from an in-process engine, errors must cross the pipe with their status, a
disconnecting stream must cancel its turn in the child, and a dead child must leave the HTTP side up, answering
503 with what happened.
"""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

import seechat
from seechat.chat.engine import ChatEngine
from seechat.cli_helpers import LoadArgs
from seechat.serve.api import ServeArgs, create_app
from seechat.serve.engine_process import EngineProcess
from test_serve_api import WAIT, _until, ask, data_url, health, live, png, raw_request
from test_serve_batch import CASES, _answer, _body


def _args() -> ServeArgs:
    return ServeArgs(served_model_name="tiny", max_batch=8, max_queue=16, prefix_cache_mb=64)


def _engine_process(model_dir) -> EngineProcess:
    return EngineProcess(LoadArgs(model=str(model_dir), device="cpu", dtype="fp32"), max_queue=16, max_batch=8,
                         prefix_cache_mb=64)


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with live(create_app(_engine_process(tiny_model_dir), _args())) as url:  # the app's shutdown stops the child
        yield url


def test_concurrent_answers_from_the_engine_process_equal_an_in_process_engines(server, tiny_model_dir, red, blue):
    images = {"red": red, "blue": blue}
    bodies = [_body(case, images, stream=i % 2 == 1) for i, case in enumerate(CASES)]
    local = create_app(ChatEngine(seechat.load(tiny_model_dir, device="cpu", dtype="fp32")), _args())
    with live(local) as url:
        here = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=WAIT)
        alone = [_answer(here, body) for body in bodies]
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=WAIT)
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda body: _answer(client, body), bodies))
    assert together == alone
    # the history re-sent: the child's prefix cache answers for it, and the usage says so
    first = client.chat.completions.create(model="tiny", messages=ask("详细描述这张图片", data_url(png(red))),
                                           max_tokens=6)
    again = client.chat.completions.create(model="tiny", max_tokens=6, messages=[
        *ask("详细描述这张图片", data_url(png(red))), {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "它是什么颜色？"}])
    assert again.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1
    status = health(server)
    assert status["completed"] >= len(bodies) + 2 and status["failed"] == 0 and status["in_queue"] == 0


def test_errors_cross_the_pipe_and_a_vanished_stream_is_cancelled_in_the_child(server, red):
    long_text = "很长的问题" * 5000  # past the text expert's context: the child's engine refuses it
    response = httpx.post(f"{server}/v1/chat/completions", timeout=WAIT,
                          json={"messages": [{"role": "user", "content": long_text[:4000]}], "max_tokens": 4})
    assert response.status_code == 400 and "tokens" in response.json()["error"]["message"]
    before = health(server)["cancelled"]
    sock = raw_request(server, {"messages": ask("讲一个很长的故事", data_url(png(red))), "max_tokens": 900,
                                "stream": True})
    received = b""
    while b'"content":"' not in received.split(b'"role":"assistant"', 1)[-1]:
        chunk = sock.recv(4096)
        assert chunk, "the stream ended before its first piece"
        received += chunk
    sock.close()
    _until(lambda: health(server)["cancelled"] == before + 1 and health(server)["in_queue"] == 0,
           "the child did not stop the vanished client's answer")


def test_a_dead_engine_process_leaves_the_server_up_and_answering_503(tiny_model_dir):
    engine = _engine_process(tiny_model_dir)
    with live(create_app(engine, _args())) as url:
        ok = httpx.post(f"{url}/v1/chat/completions", timeout=WAIT,
                        json={"messages": [{"role": "user", "content": "你好"}], "max_tokens": 3})
        assert ok.status_code == 200
        os.kill(engine._proc.pid, signal.SIGKILL)
        engine._proc.join(WAIT)
        _until(lambda: engine._gone is not None, "the server did not notice the engine process died")
        gone = httpx.post(f"{url}/v1/chat/completions", timeout=WAIT,
                          json={"messages": [{"role": "user", "content": "你好"}], "max_tokens": 3})
        assert gone.status_code == 503 and "engine process exited" in gone.json()["error"]["message"]
        assert httpx.get(f"{url}/health", timeout=WAIT).status_code == 200


def test_a_model_the_engine_process_cannot_load_stops_the_server_with_the_loaders_message(tmp_path):
    from seechat.errors import SeeChatError

    with pytest.raises(SeeChatError, match="not a seechat model directory"):
        EngineProcess(LoadArgs(model=str(tmp_path / "missing"), device="cpu"), max_queue=4, max_batch=2)
