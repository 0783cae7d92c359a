"""`seechat serve`: the official openai client against live servers on loopback, every bad request, auth, the queue.

Servers run in this process (uvicorn on a thread, over engines built here) so answers can be compared with the
engine's own; one test runs the real command in a subprocess. Greedy answers of the tiny model are noise, but
deterministic, so "the API's answer equals the engine's answer" is an exact check.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import uvicorn

import seechat
from seechat.chat.engine import ChatEngine, GenerationSettings
from seechat.serve.api import ServeArgs, create_app
from seechat.serve.messages import ImagePolicy, to_engine
from seechat.serve.protocol import ChatCompletionRequest

QUESTION = "这是什么颜色？"
WAIT = 60  # seconds a condition may take before a test gives up (a bound, not a timing assertion)


# -- helpers ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def live(app):
    """Serve `app` with uvicorn on a free loopback port in a thread; yield its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    _until(lambda: server.started, "the server did not start")
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(WAIT)
        sock.close()


def _until(condition, message: str, seconds: float = WAIT):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(message)


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def ask(text: str, *urls: str) -> list[dict]:
    return [{"role": "user", "content": [*(image_part(u) for u in urls), {"type": "text", "text": text}]}]


def health(url: str) -> dict:
    return httpx.get(f"{url}/health").json()


def raw_request(url: str, body: dict) -> socket.socket:
    """Send a chat request on a bare socket (so the test can vanish mid-request by closing it)."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n".encode()
                 + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


# -- fixtures -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return ChatEngine(seechat.load(tiny_model_dir, device="cpu"))


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    from seechat.tiny import sample_image

    folder = tmp_path_factory.mktemp("served_images")
    sample_image((220, 40, 40)).save(folder / "red.png")
    (folder.parent / "secret.png").write_bytes(png(sample_image((0, 0, 0))))
    return folder


@pytest.fixture(scope="module")
def server(engine, image_dir):
    args = ServeArgs(served_model_name="tiny", max_image_mb=1, max_images=3, image_dir=str(image_dir))
    with live(create_app(engine, args, GenerationSettings(max_new_tokens=8))) as url:
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=WAIT)


# -- the happy paths ----------------------------------------------------------------------------------------
def test_plain_and_streaming_answers_are_the_engines(client, engine, red):
    conv = engine.conversation()
    expected = conv.ask(QUESTION, image=red, max_new_tokens=8)
    reply = conv.last_reply
    messages = ask(QUESTION, data_url(png(red)))

    done = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8)
    assert done.choices[0].message.content == expected
    assert done.choices[0].finish_reason == reply.finish_reason
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (reply.prompt_tokens, reply.completion_tokens)
    assert done.usage.total_tokens == reply.prompt_tokens + reply.completion_tokens and done.model == "tiny"

    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # it did stream, piece by piece
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [reply.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_the_stream_ends_with_done(server, red):
    body = {"messages": ask(QUESTION, data_url(png(red))), "stream": True, "max_tokens": 4}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=WAIT) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_multi_turn_keeps_the_image_of_an_earlier_turn(client, engine, red, blue):
    conv = engine.conversation()
    first = conv.ask(QUESTION, image=red, max_new_tokens=8)
    second = conv.ask("它在哪里？", max_new_tokens=8)
    third = conv.ask("这个呢？", image=blue, max_new_tokens=8)

    messages = ask(QUESTION, data_url(png(red)))
    got = []
    for text, image in [(None, None), ("它在哪里？", None), ("这个呢？", blue)]:
        if text is not None:
            messages += ask(text, data_url(png(image))) if image is not None else [{"role": "user", "content": text}]
        answer = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8)
        got.append(answer.choices[0].message.content)
        messages.append({"role": "assistant", "content": got[-1]})
    assert got == [first, second, third]
    assert answer.usage.prompt_tokens == conv.last_reply.prompt_tokens


def test_content_parts_become_markers_where_they_stand(red):
    url = data_url(png(red))
    req = ChatCompletionRequest.parse({"messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "compare"}, image_part(url),
                                     {"type": "text", "text": "with"}, {"type": "image_url", "image_url": url}]},
        {"role": "assistant", "content": [{"type": "text", "text": "they differ"}]},
        {"role": "user", "content": "why?"},
    ]})
    messages, images = to_engine(req.messages, ImagePolicy())
    assert messages == [{"role": "system", "content": "be brief"},
                        {"role": "user", "content": "compare\n<image>\nwith\n<image>"},
                        {"role": "assistant", "content": "they differ"},
                        {"role": "user", "content": "why?"}]
    assert len(images) == 2 and images[0].size == red.size


def test_models_health_and_sampling_settings(client, server, red):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    status = health(server)
    assert status["status"] == "ok" and status["model"] == "tiny" and status["in_queue"] == 0
    messages = ask(QUESTION, data_url(png(red)))
    hot = dict(model="tiny", messages=messages, max_tokens=12, temperature=1.5, top_p=0.9)
    a = client.chat.completions.create(seed=1, **hot).choices[0].message.content
    assert a == client.chat.completions.create(seed=1, **hot).choices[0].message.content
    assert a != client.chat.completions.create(seed=2, **hot).choices[0].message.content
    greedy = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12).choices[0].message.content
    stop = greedy[3:5]
    cut = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, stop=[stop])
    assert cut.choices[0].message.content == greedy[: greedy.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_file_urls_under_the_image_dir_and_remote_urls_when_allowed(client, engine, image_dir, red):
    expected = engine.ask(red, QUESTION, max_new_tokens=8)
    local = client.chat.completions.create(model="tiny", messages=ask(QUESTION, (image_dir / "red.png").as_uri()))
    assert local.choices[0].message.content == expected

    class Images(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = (image_dir / "red.png").read_bytes() if self.path == "/red.png" else b""
            self.send_response(200 if body else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Images)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{files.server_address[1]}"
    try:  # the same engine behind a second server, one that may fetch images
        # 127.0.0.1 is refused unless private addresses are allowed (test_serve_hostile.py)
        args = ServeArgs(served_model_name="tiny", allow_remote_images=True, allow_private_images=True)
        with live(create_app(engine, args)) as url:
            remote = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=WAIT)
            got = remote.chat.completions.create(model="tiny", messages=ask(QUESTION, f"{base}/red.png"), max_tokens=8)
            assert got.choices[0].message.content == expected
            missing = httpx.post(f"{url}/v1/chat/completions", json={"messages": ask("x", f"{base}/nope.png")})
            assert missing.status_code == 400 and missing.json()["error"]["code"] == "image_fetch_failed"
    finally:
        files.shutdown()


# -- bad requests: an OpenAI-style error with a 4xx status, never a 500, never a crash -------------------------
def _bomb_png(width: int, height: int) -> bytes:
    """A PNG header that claims width x height pixels (a decompression bomb needs no more to be refused)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _bad_requests(red, image_dir):
    good = png(red)
    user = [{"role": "user", "content": "hi"}]
    return {
        "invalid base64": (ask("x", "data:image/png;base64,@@not base64@@"), 400, "invalid_base64"),
        "not an image": (ask("x", data_url(b"plain text, not a picture")), 400, "invalid_image"),
        "truncated image": (ask("x", data_url(good[: len(good) // 2])), 400, "invalid_image"),
        "decompression bomb": (ask("x", data_url(_bomb_png(12_000, 12_000))), 400, "invalid_image"),
        "image over the size limit": (ask("x", data_url(os.urandom(1_200_000))), 413, "image_too_large"),
        "too many images": (ask("x", *[data_url(good)] * 4), 400, "too_many_images"),
        "prompt over the context": ([{"role": "user", "content": "红色" * 1200}], 400, "context_length_exceeded"),
        "remote image url": (ask("x", "https://example.com/cat.png"), 400, "remote_images_disabled"),
        "file url outside the image dir": (ask("x", (image_dir.parent / "secret.png").as_uri()), 400,
                                           "file_url_outside_image_dir"),
        "file url escaping with ..": (ask("x", f"file://{image_dir}/../secret.png"), 400, "file_url_outside_image_dir"),
        "missing file": (ask("x", (image_dir / "nope.png").as_uri()), 400, "image_not_found"),
        "unsupported url scheme": (ask("x", "ftp://example.com/cat.png"), 400, "invalid_image_url"),
        "data url that is not an image": (ask("x", "data:text/plain;base64,aGVsbG8="), 400, "invalid_image"),
        "image in an assistant message": (user + [{"role": "assistant", "content": [image_part(data_url(good))]}]
                                          + user, 400, None),
        "marker typed as text": ([{"role": "user", "content": "look <image> here"}], 400, None),
        "last message is not the user's": (user + [{"role": "assistant", "content": "hello"}], 400, None),
    }


def test_bad_images_and_messages_get_4xx_errors(server, red, image_dir):
    for name, (messages, status, code) in _bad_requests(red, image_dir).items():
        response = httpx.post(f"{server}/v1/chat/completions", json={"model": "tiny", "messages": messages},
                              timeout=WAIT)
        assert response.status_code == status, (name, response.text)
        error = response.json()["error"]
        assert error["message"] and error["type"] == "invalid_request_error", name
        if code:
            assert error["code"] == code, (name, error)
    assert health(server)["status"] == "ok"


@pytest.mark.parametrize("body, status, param", [
    ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ({"model": "tiny"}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
    ({"messages": [{"role": "user"}]}, 400, "messages.0.content"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]}, 400, "messages.0.content.0"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]}, 400, "messages.0.content.0.text"),
    ({"messages": [{"role": "user", "content": [image_part(7)]}]}, 400, "messages.0.content.0.image_url.url"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 3}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1.5}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, "stream"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": [1]}, 400, "stop.0"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "seed": "1"}, 400, "seed"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    (["not", "an", "object"], 400, None),
])
def test_wrong_json_types_get_400_naming_the_field(server, body, status, param):
    response = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=WAIT)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"]


@pytest.mark.parametrize("extra, status", [
    ({"temperature": 1e-300}, 200),  # as good as greedy (dividing logits by it would overflow)
    ({"top_p": 1e-300, "temperature": 2, "top_k": 10**30, "repetition_penalty": 1e300}, 200),
    ({"max_tokens": 10**30}, 200),  # the answer stops at the context
    ({"seed": 2**70}, 400),
    ({"messages": [{"role": "user", "content": "lone \ud800 surrogate"}]}, 400),
    ({"stop": "\udfff"}, 400),
    ({"messages": [{"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}] * 1500
      + [{"role": "user", "content": "最后"}]}, 200),  # 3,001 messages: old turns are dropped, quickly
    ({"messages": [{"role": "user", "content": "长" * 70_000}]}, 400),  # over 64 characters per context token
])
def test_strange_values_are_answered_or_refused_never_500(server, extra, status):
    body = {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 3, **extra}
    response = httpx.post(f"{server}/v1/chat/completions", content=json.dumps(body),
                          headers={"Content-Type": "application/json"}, timeout=WAIT)
    assert response.status_code == status, response.text
    if status == 200:
        assert response.json()["usage"]["prompt_tokens"] <= 1024
    else:
        assert response.json()["error"]["param"] in ("seed", "messages", "messages.0.content", "stop")


@pytest.mark.parametrize("content", [
    b"{not json",
    b"",
    b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
    b"[" * 100_000 + b"]" * 100_000,
    b"\xff\xfe garbage",
])
def test_bodies_that_are_not_json_get_400(server, content):
    response = httpx.post(f"{server}/v1/chat/completions", content=content,
                          headers={"Content-Type": "application/json"}, timeout=WAIT)
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
    typeless = httpx.post(f"{server}/v1/chat/completions", content=content, timeout=WAIT)  # no Content-Type: 415
    assert typeless.status_code == 415 and typeless.json()["error"]["code"] == "unsupported_media_type"


def test_unknown_routes_and_methods_get_openai_style_errors(client, server):
    assert httpx.get(f"{server}/v1/nope").status_code == 404
    wrong = httpx.get(f"{server}/v1/chat/completions")
    assert wrong.status_code == 405 and "error" in wrong.json()
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=ask("x", "data:image/png;base64,####"))
    assert "base64" in str(info.value)
    with pytest.raises(openai.BadRequestError) as info:  # a stream that cannot start still gets its 4xx status
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "红色" * 1200}], stream=True)
    assert info.value.code == "context_length_exceeded"


# -- auth ----------------------------------------------------------------------------------------------------
def test_api_key_guards_every_route_but_health(engine, red):
    app = create_app(engine, ServeArgs(served_model_name="tiny", api_key="sekrit"), GenerationSettings(max_new_tokens=4))
    with live(app) as url:
        assert httpx.get(f"{url}/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}):
            for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/v1/nope")):
                response = httpx.request(method, f"{url}{path}", headers=headers, json={})
                assert response.status_code == 401, (headers, path)
                assert response.json()["error"]["code"] == "invalid_api_key"
                assert response.headers["www-authenticate"] == "Bearer"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="sekrit", max_retries=0, timeout=WAIT)
        assert good.models.list().data[0].id == "tiny"
        answer = good.chat.completions.create(model="tiny", messages=ask(QUESTION, data_url(png(red))))
        assert answer.choices[0].message.content


# -- the queue -----------------------------------------------------------------------------------------------
def test_a_full_queue_answers_429_and_a_vanished_client_frees_its_place(engine, red):
    body = {"messages": ask(QUESTION, data_url(png(red))), "max_tokens": 4}
    expected = engine.ask(red, QUESTION, max_new_tokens=4)
    app = create_app(engine, ServeArgs(served_model_name="tiny", max_queue=2))
    with live(app) as url:
        results = {}

        def post(key):
            results[key] = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=WAIT)

        with engine.lock:  # the model is busy (as if a long answer were being generated)
            first = threading.Thread(target=post, args=("first",))
            first.start()
            _until(lambda: health(url)["running"] == 1, "the first request did not start")
            waiting = raw_request(url, {**body, "stream": True})
            _until(lambda: health(url)["in_queue"] == 2, "the second request did not queue")

            full = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=WAIT)
            assert full.status_code == 429
            assert int(full.headers["retry-after"]) >= 1
            assert full.json()["error"]["type"] == "rate_limit_error"
            status = health(url)  # the event loop answers while the model is busy
            assert status["rejected"] == 1 and status["running"] == 1

            waiting.close()  # the waiting client goes away: its place is free before the model gets to it
            _until(lambda: health(url)["in_queue"] == 1, "the vanished client kept its place")
            assert health(url)["cancelled"] == 1
            third = threading.Thread(target=post, args=("third",))
            third.start()
            _until(lambda: health(url)["in_queue"] == 2, "the third request was not admitted")
        first.join(WAIT)
        third.join(WAIT)
        assert results["first"].status_code == results["third"].status_code == 200
        assert results["first"].json()["choices"][0]["message"]["content"] == expected
        status = health(url)
        assert (status["completed"], status["cancelled"], status["in_queue"]) == (2, 1, 0)


def test_a_client_that_disconnects_mid_stream_stops_its_generation(tiny_model_dir, red):
    model = seechat.load(tiny_model_dir, device="cpu")
    model.stop_token_ids = []  # no end token: an answer runs to max_tokens unless it is cancelled
    app = create_app(ChatEngine(model), ServeArgs(served_model_name="tiny", max_queue=1))
    body = {"messages": ask(QUESTION, data_url(png(red))), "max_tokens": 700, "stream": True}
    with live(app) as url:
        sock = raw_request(url, body)
        received = b""
        while b'"content":"' not in received.split(b'"role":"assistant"', 1)[-1]:
            chunk = sock.recv(4096)
            assert chunk, "the stream ended before its first piece"
            received += chunk
        assert received.startswith(b"HTTP/1.1 200")
        sock.close()
        _until(lambda: health(url)["in_queue"] == 0, "the vanished client kept its place")
        status = health(url)
        assert (status["cancelled"], status["completed"]) == (1, 0)  # stopped, not run to its 700 tokens
        after = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": False, "max_tokens": 3}, timeout=WAIT)
        assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 3


# -- the command -----------------------------------------------------------------------------------------------
def test_serve_command_survives_garbage_and_stops_cleanly(tiny_model_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SEECHAT_API_KEY": "k1"}
    cmd = [sys.executable, "-m", "seechat", "serve", "--model", str(tiny_model_dir), "--port", str(port),
           "--served-model-name", "tiny", "--max-new-tokens", "4"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def up():
            assert proc.poll() is None, proc.stdout.read()
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"{url}/health").status_code == 200

        _until(up, "seechat serve did not come up")
        assert httpx.get(f"{url}/v1/models").status_code == 401  # the key came from SEECHAT_API_KEY
        auth = {"Authorization": "Bearer k1"}
        for junk in (b"GARBAGE\r\n\r\n", b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n{",
                     os.urandom(3000)):
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(junk)
        assert httpx.post(f"{url}/v1/chat/completions", headers={**auth, "Content-Type": "application/json"},
                          content=os.urandom(5000)).status_code == 400
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k1", max_retries=0, timeout=WAIT)
        answer = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "你好"}])
        assert answer.usage.completion_tokens <= 4 and answer.choices[0].finish_reason in ("stop", "length")
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0, out
    assert "Traceback" not in out and "serving 'tiny'" in out and "API key required" in out


@pytest.mark.parametrize("args, needle", [
    (["--model", "{d}/missing"], "does not exist"),
    (["--model", "{m}", "--image-dir", "{d}/nope"], "is not a folder"),
    (["--model", "{m}", "--max-queue", "0"], "max_queue must be >= 1"),
])
def test_serve_command_bad_arguments_exit_2_with_one_line(tiny_model_dir, tmp_path, capsys, args, needle):
    from seechat.__main__ import main

    code = main(["serve", *(a.format(d=tmp_path, m=tiny_model_dir) for a in args)])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and err.startswith("seechat serve: error:") and err.count("\n") == 1
