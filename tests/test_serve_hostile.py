"""`seechat serve` against hostile input and hostile neighbours (issue 11, items 2-7).

Cross-site requests (Host, Origin, content type), slow uploads, images that decode to gigabytes, remote image
URLs that lead to loopback, private or link-local addresses or redirect, file:// links out of the image folder,
and the API key from a file. Every case gets a 4xx JSON error and leaves a healthy server; no 5xx. Network
traffic stays on 127.0.0.1: the test servers here are bounded and stop themselves.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import threading
import time

import httpx
import openai
import pytest
from test_serve_api import WAIT, _until, ask, data_url, live, png

import seechat
from seechat.chat.engine import ChatEngine, GenerationSettings
from seechat.serve.api import ServeArgs, create_app
from seechat.serve.guard import CrossSiteGuard
from seechat.tiny import flat_png

QUESTION = "这是什么颜色？"


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return ChatEngine(seechat.load(tiny_model_dir, device="cpu"))


def serve(engine, **kwargs):
    args = {"served_model_name": "tiny", **kwargs}
    return live(create_app(engine, ServeArgs(**args), GenerationSettings(max_new_tokens=4)))


def post(url: str, body, headers: dict | None = None, **kwargs) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", content=json.dumps(body), trust_env=False,
                      headers={"Content-Type": "application/json", **(headers or {})}, timeout=WAIT, **kwargs)


def refused(response: httpx.Response, status: int, code: str) -> dict:
    """The response is an OpenAI-style error with this status and code; its error object."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"], error
    return error


def health(url: str) -> dict:
    return httpx.get(f"{url}/health", trust_env=False).json()  # one test sets proxy variables for the server


def healthy(url: str) -> None:
    """The server answers, nothing is left in its queue, and no request failed inside it."""
    _until(lambda: health(url)["in_queue"] == 0, "a request kept its queue place")
    status = health(url)
    assert status["status"] == "ok" and status["failed"] == 0, status


# -- 2. cross-site requests ----------------------------------------------------------------------------------
def test_cross_site_requests_are_refused(engine, red):
    body = {"messages": ask(QUESTION, data_url(png(red))), "max_tokens": 2}
    with serve(engine, allow_origin=["http://app.example"], allow_host=["seechat.lan"]) as url:
        for media in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            refused(post(url, body, {"Content-Type": media}), 415, "unsupported_media_type")
        refused(post(url, body, {"Origin": "http://evil.example"}), 403, "origin_not_allowed")
        refused(post(url, body, {"Origin": "null"}), 403, "origin_not_allowed")
        for host in ("evil.example", "evil.example:80", "127.0.0.1.evil.example"):
            refused(post(url, body, {"Host": host}), 403, "host_not_allowed")
            refused(httpx.get(f"{url}/v1/models", headers={"Host": host}), 403, "host_not_allowed")
        # what is allowed still works: the listening address, localhost, --allow-host, --allow-origin (with CORS)
        port = url.rsplit(":", 1)[1]
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "seechat.lan"):
            assert post(url, body, {"Host": host}).status_code == 200, host
        friend = {"Origin": "http://app.example"}
        preflight = httpx.options(f"{url}/v1/chat/completions", headers={
            **friend, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "http://app.example"
        answer = post(url, body, friend)
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "http://app.example"
        assert openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0).models.list().data[0].id == "tiny"
        healthy(url)


def test_a_server_on_every_address_takes_ip_hosts_but_not_names():
    guard = CrossSiteGuard(None, bound_host="0.0.0.0")
    json_post = {b"content-type": "application/json"}
    for host in ("192.0.2.7:8000", "[2001:db8::1]:8000", "localhost"):
        assert guard._refusal("POST", {**json_post, b"host": host}) is None, host
    assert guard._refusal("POST", {**json_post, b"host": "rebind.evil.example:8000"})[0] == 403
    assert guard._refusal("POST", json_post)[0] == 403  # no Host at all
    loopback = CrossSiteGuard(None, bound_host="127.0.0.1")
    assert loopback._refusal("GET", {b"host": "192.0.2.7:8000"})[0] == 403


# -- 3. slow uploads -----------------------------------------------------------------------------------------
def test_slow_uploads_hold_no_queue_place_and_time_out(engine, red):
    with serve(engine, max_queue=2, max_image_mb=2, body_timeout=3) as url:
        port = int(url.rsplit(":", 1)[1])
        slow = []
        for _ in range(20):  # each announces 5 MB and sends 14 bytes of it
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                         "Content-Type: application/json\r\nContent-Length: 5000000\r\n\r\n".encode()
                         + b'{"messages": [')
            slow.append(sock)
        try:
            started = time.monotonic()
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=WAIT)
            answer = client.chat.completions.create(model="tiny", messages=ask(QUESTION, data_url(png(red))))
            assert answer.choices[0].message.content is not None
            assert time.monotonic() - started < 3, "the normal request waited for the slow uploads"
            assert health(url)["rejected"] == 0  # nobody was turned away: the uploads held no place
            for sock in slow:  # each upload is cut at the deadline with a 408 JSON error
                sock.settimeout(WAIT)
                received = b""
                while b"}}" not in received:
                    chunk = sock.recv(4096)
                    assert chunk, received
                    received += chunk
                head, _, rest = received.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 408"), head
                assert json.loads(rest)["error"]["code"] == "request_timeout"
        finally:
            for sock in slow:
                sock.close()
        healthy(url)


# -- 4. decoded pixels ---------------------------------------------------------------------------------------


def _peak_kb() -> int:
    with open("/proc/self/status") as fh:
        return int(next(line for line in fh if line.startswith("VmHWM:")).split()[1])


def _rss_kb() -> int:
    with open("/proc/self/status") as fh:
        return int(next(line for line in fh if line.startswith("VmRSS:")).split()[1])


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's peak-RSS reset")
def test_huge_images_stay_under_the_decoded_pixel_budget_and_memory_stays_bounded(engine, red):
    """4 concurrent requests of 8 PNGs of 7000x7000 (49 MP each, 196 MB decoded): the default budget (128 MP a
    request) refuses each at its third image before decoding it, at most ~2 full-size images decode at once
    process-wide, and each decoded one is shrunk at once. Peak RSS of this process (server included) grows by
    well under 1 GB; decoding them all at full size, as before, would take 6 GB."""
    url_image = data_url(flat_png(7000, 7000))
    body = {"messages": ask(QUESTION, *[url_image] * 8), "max_tokens": 2}
    with serve(engine, max_images=8) as url:
        before = _rss_kb()
        with open("/proc/self/clear_refs", "w") as fh:  # reset the peak (VmHWM) to the present RSS
            fh.write("5")
        answers = [None] * 4

        def send(i):
            answers[i] = post(url, body)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        grown_mb = (_peak_kb() - before) / 1024
        for answer in answers:
            error = refused(answer, 400, "invalid_image")
            assert "messages.0.content.2" in error["message"] and "budget" in error["message"], error
        assert grown_mb < 1024, f"peak RSS grew by {grown_mb:.0f} MB"
        ok = post(url, {"messages": ask(QUESTION, url_image, data_url(png(red))), "max_tokens": 2})
        assert ok.status_code == 200  # two of them fit the budget, and are answered
        healthy(url)


def test_big_images_are_decoded_toward_the_vision_size():
    import io

    from PIL import Image

    from seechat.data.images import PixelBudget, load_image

    photo = io.BytesIO()
    Image.new("RGB", (4000, 3000), (30, 200, 30)).save(photo, "JPEG")
    budget = PixelBudget(2_000_000)
    small = load_image(photo.getvalue(), min_side=224, budget=budget)
    assert small.mode == "RGB" and small.size == (500, 375)  # JPEG draft: decoded at 1/8, never at 12 MP
    assert budget.left == 2_000_000 - 500 * 375
    flat = load_image(flat_png(3000, 1000), min_side=64)
    assert flat.size == (384, 128) and flat.getpixel((10, 10)) == (200, 40, 40)  # aspect kept, short side 2x64
    palette = io.BytesIO()
    Image.new("P", (1000, 1000), 3).save(palette, "PNG")
    assert load_image(palette.getvalue(), min_side=100).size == (200, 200)


# -- 5. remote images ----------------------------------------------------------------------------------------
class _Images(http.server.BaseHTTPRequestHandler):
    """/red.png, /redirect (302 to /red.png) and /drip (announces 100 kB, sends a byte every 0.1 s, for at most
    10 s). Every request path is recorded in `seen`."""

    image = b""
    seen: list[str] = []

    def do_GET(self):
        self.seen.append(self.path)
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/red.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/drip":
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.1)
        else:
            body = self.image if self.path == "/red.png" else b""
            self.send_response(200 if body else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def image_host(red):
    _Images.image, _Images.seen = png(red), []
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    files.daemon_threads = True
    threading.Thread(target=files.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{files.server_address[1]}"
    finally:
        files.shutdown()
        files.server_close()


def test_remote_images_to_loopback_private_and_link_local_addresses_are_refused(engine, image_host):
    port = image_host.rsplit(":", 1)[1]
    targets = [f"{image_host}/red.png", f"http://localhost:{port}/red.png", f"http://[::1]:{port}/red.png",
               "http://10.0.0.1/cat.png", "http://192.168.1.1/cat.png", "http://172.16.0.1/cat.png",
               "http://169.254.169.254/latest/meta-data/", "http://[fe80::1]/cat.png", "http://0.0.0.0/cat.png",
               "http://224.0.0.1/cat.png", "http://[::ffff:127.0.0.1]:80/cat.png",
               "http://[2002:7f00:1::1]/cat.png"]  # 6to4 around 127.0.0.1
    with serve(engine, allow_remote_images=True) as url:
        for target in targets:  # refused on the address alone: nothing is sent anywhere
            refused(post(url, {"messages": ask("x", target)}), 400, "image_url_not_allowed")
        assert _Images.seen == []
        for target in ("gopher://127.0.0.1/x", "http:///nohost.png"):
            assert post(url, {"messages": ask("x", target)}).status_code == 400
        healthy(url)


def test_remote_fetches_follow_no_redirect_use_no_proxy_and_keep_one_deadline(engine, image_host, red,
                                                                               monkeypatch):
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # a proxy that is not there: honouring it would fail
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    expected = engine.ask(red, QUESTION, max_new_tokens=4)
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        closed_port = closed.getsockname()[1]
    with serve(engine, allow_remote_images=True, allow_private_images=True, remote_timeout=1.5) as url:
        good = post(url, {"messages": ask(QUESTION, f"{image_host}/red.png")})
        assert good.status_code == 200 and good.json()["choices"][0]["message"]["content"] == expected
        refused(post(url, {"messages": ask("x", f"{image_host}/redirect")}), 400, "image_url_redirects")
        assert _Images.seen == ["/red.png", "/redirect"]  # the redirect's target was never asked for
        started = time.monotonic()
        refused(post(url, {"messages": ask("x", f"{image_host}/drip")}), 400, "image_fetch_failed")
        assert time.monotonic() - started < 6, "a dripping server held the request past its deadline"
        error = refused(post(url, {"messages": ask("x", f"http://127.0.0.1:{closed_port}/x.png")}), 400,
                        "image_fetch_failed")
        assert "refused" not in error["message"].lower() and "errno" not in error["message"].lower()
        healthy(url)


# -- 6. file:// links ----------------------------------------------------------------------------------------
def test_file_urls_open_once_and_refuse_links_out_of_the_image_dir(engine, red, tmp_path):
    folder, outside = tmp_path / "images", tmp_path / "secret.png"
    folder.mkdir()
    (folder / "red.png").write_bytes(png(red))
    outside.write_bytes(png(red))
    (folder / "escape.png").symlink_to(outside)
    (folder / "sub").symlink_to(tmp_path)  # a folder link out: sub/secret.png is outside too
    (folder / "alias.png").symlink_to(folder / "red.png")  # a link that stays inside is fine
    os.mkfifo(folder / "pipe.png")  # opening a FIFO for reading would block without O_NONBLOCK
    with serve(engine, image_dir=str(folder)) as url:
        for name in ("escape.png", "sub/secret.png"):
            refused(post(url, {"messages": ask("x", (folder / name).as_uri())}), 400, "file_url_outside_image_dir")
        refused(post(url, {"messages": ask("x", (folder / "pipe.png").as_uri())}), 400, "image_not_found")
        refused(post(url, {"messages": ask("x", (folder / "sub").as_uri())}), 400, "file_url_outside_image_dir")
        refused(post(url, {"messages": ask("x", folder.as_uri())}), 400, "image_not_found")
        assert post(url, {"messages": ask(QUESTION, (folder / "alias.png").as_uri())}).status_code == 200
        healthy(url)


# -- 7. the API key from a file ----------------------------------------------------------------------------------
def test_the_api_key_comes_from_a_file(engine, tmp_path, capsys):
    from seechat.__main__ import main

    key_file = tmp_path / "key"
    key_file.write_text("  s3cret-from-file \n")
    with serve(engine, api_key_file=str(key_file)) as url:
        refused(httpx.get(f"{url}/v1/models"), 401, "invalid_api_key")
        refused(httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key_file}"}), 401,
                "invalid_api_key")
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer s3cret-from-file"}).status_code == 200
        healthy(url)
    (tmp_path / "empty").write_text("\n")
    for args, needle in ((["--api-key-file", str(tmp_path / "nope")], "cannot read the API key file"),
                         (["--api-key-file", str(tmp_path / "empty")], "is empty"),
                         (["--api-key", "k", "--api-key-file", str(key_file)], "not both")):
        assert main(["serve", "--model", str(tmp_path), *args]) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err
    assert main(["serve", "--model", str(tmp_path / "missing"), "--api-key", "k"]) == 2  # works, with a warning
    assert "prefer --api-key-file PATH or SEECHAT_API_KEY" in capsys.readouterr().err
