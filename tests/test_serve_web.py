"""`seechat web`: the page's handlers over the engine, and the real page driven in headless Chromium.

The browser test needs Debian's chromium (`.ci/run` installs it); it skips, saying why, only when no chromium
can be found. It also checks that the page asks nothing of any host but the local server (no CDN, no analytics).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import unicodedata
import warnings

import httpx
import pytest

import seechat
from seechat.chat.engine import ChatEngine
from seechat.data.images import load_image
from seechat.serve.web import Sessions, WebChat

QUESTION = "这是什么颜色？"
SETTINGS = (8, 0.0, 1.0, 0, 1.0, -1)  # max new tokens, temperature (greedy), top-p, top-k, repetition, seed
WAIT = 90


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return ChatEngine(seechat.load(tiny_model_dir, device="cpu"))


@pytest.fixture
def images(tmp_path, red, blue):
    red.save(tmp_path / "red.png")
    blue.save(tmp_path / "blue.png")
    (tmp_path / "broken.png").write_bytes(b"not a picture")
    return {name: str(tmp_path / f"{name}.png") for name in ("red", "blue", "broken")}


def test_answers_stream_into_the_chat_and_each_image_is_sent_once(engine, images):
    conv = engine.conversation()
    expected = [conv.ask(QUESTION, image=load_image(images["red"]), max_new_tokens=8),
                conv.ask("它在哪里？", max_new_tokens=8),
                conv.ask("这个呢？", image=load_image(images["blue"]), max_new_tokens=8)]
    chat = WebChat(engine)

    updates = list(chat.respond(QUESTION, [], None, images["red"], *SETTINGS))
    history, box, session, stats = updates[-1]
    partial = [u[0][-1]["content"] for u in updates[:-1]]
    assert len(partial) > 1 and all(expected[0].startswith(p) for p in partial)  # it streamed, piece by piece
    assert history == [{"role": "user", "content": {"path": images["red"]}}, {"role": "user", "content": QUESTION},
                       {"role": "assistant", "content": expected[0]}]
    assert box == "" and "8 词元 tokens" in stats

    history, _, session, _ = list(chat.respond("它在哪里？", history, session, images["red"], *SETTINGS))[-1]
    assert history[-2:] == [{"role": "user", "content": "它在哪里？"}, {"role": "assistant", "content": expected[1]}]
    history, _, session, _ = list(chat.respond("这个呢？", history, session, images["blue"], *SETTINGS))[-1]
    assert history[-3]["content"] == {"path": images["blue"]} and history[-1]["content"] == expected[2]
    assert len(history) == 8

    history, session, stats = chat.clear_chat(session)  # the image in the box goes with the next question again
    again = list(chat.respond(QUESTION, history, session, images["red"], *SETTINGS))[-1][0]
    assert again[0] == {"role": "user", "content": {"path": images["red"]}} and again[-1]["content"] == expected[0]
    assert chat.new_image(session) == (None, [], None, "", "")
    assert session.closed and session.conversation.messages == []


def test_tabs_asking_at_once_decode_together_and_get_their_answers_alone(tiny_model_dir, images):
    from concurrent.futures import ThreadPoolExecutor

    from seechat.serve.scheduler import Scheduler

    engine = ChatEngine(seechat.load(tiny_model_dir, device="cpu"))
    asks = [(QUESTION, "red"), ("详细描述这张图片", "blue"), ("它在哪里？", "red"), ("这是什么形状？", "blue")]
    alone = [engine.conversation().ask(q, image=load_image(images[im]), max_new_tokens=8) for q, im in asks]
    engine.runner = Scheduler(engine, max_queue=8, max_batch=4)
    chat = WebChat(engine)
    try:
        with engine.lock:  # the tabs' questions arrive while the model is busy, so they start together
            with ThreadPoolExecutor(len(asks)) as pool:
                futures = [pool.submit(lambda a: list(chat.respond(a[0], [], None, images[a[1]], *SETTINGS))[-1], a)
                           for a in asks]
                deadline = time.monotonic() + WAIT
                while engine.runner.status()["in_queue"] < len(asks):  # all admitted: one taken, three queued
                    assert time.monotonic() < deadline, "the tabs' questions did not all arrive"
                    time.sleep(0.02)
                engine.lock.release()
                try:
                    answers = [f.result(WAIT)[0][-1]["content"] for f in futures]
                finally:
                    engine.lock.acquire()
        stats = engine.runner.status()
    finally:
        engine.runner.close()
    assert answers == alone
    assert stats["batches"] == 1 and stats["batched"] == len(asks) and stats["completed"] == len(asks)


def test_a_broken_image_leaves_the_chat_as_it_was(engine, images):
    chat = WebChat(engine)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        history, box, session, _ = list(chat.respond("hi", [], None, images["broken"], *SETTINGS))[-1]
    assert history == [] and box == "hi"
    history, _, session, _ = list(chat.respond("hi", [], session, None, *SETTINGS))[-1]
    assert [m["role"] for m in history] == ["user", "assistant"]  # text-only chat works


# -- the page in a browser --------------------------------------------------------------------------------------
def test_sessions_expire_when_idle_or_too_many_and_free_their_conversation(engine, images):
    now = [0.0]
    chat = WebChat(engine, Sessions(engine, idle_seconds=60, max_sessions=2, clock=lambda: now[0]))
    tabs = []
    for _ in range(2):
        history, _, session, _ = list(chat.respond(QUESTION, [], None, images["red"], *SETTINGS))[-1]
        tabs.append((history, session))
        now[0] += 1
    first, second = tabs[0][1], tabs[1][1]
    assert len(chat.sessions) == 2 and first.conversation.state.kv.cache is not None
    list(chat.respond(QUESTION, [], None, None, *SETTINGS))  # a third tab: the longest idle one is freed
    assert first.closed and not second.closed and len(chat.sessions) == 2
    state = first.conversation.state
    assert state.messages == [] and state.images == [] and state.kv.cache is None  # KV cache and images let go
    now[0] += 61  # everyone idle past the timeout: the next question frees them all
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        history, _, session, _ = list(chat.respond("它在哪里？", tabs[1][0], second, None, *SETTINGS))[-1]
    assert second.closed and session is not second and len(chat.sessions) == 1
    assert [m["role"] for m in history] == ["user", "assistant"]  # the expired chat started over


def test_clear_chat_and_new_image_stop_a_streaming_answer_first(tiny_model_dir, images):
    model = seechat.load(tiny_model_dir, device="cpu")
    model.stop_token_ids = []  # no end token: an answer runs to max_new_tokens unless it is stopped
    engine = ChatEngine(model)
    chat = WebChat(engine)
    long_answer = (700, *SETTINGS[1:])
    for button in ("clear", "new image"):
        updates = chat.respond(QUESTION, [], None, images["red"], *long_answer)
        for _ in range(3):  # the answer is streaming
            history, _, session, _ = next(updates)
        if button == "clear":
            assert chat.clear_chat(session)[0] == []
        else:
            assert chat.new_image(session)[2] is None
        rest = list(updates)  # the stream stops at once and ends showing the cleared chat
        assert len(rest) == 1 and rest[0][0] == [] and (rest[0][2] is None) == (button == "new image")
        assert session.conversation.messages == [] and not engine.lock.locked()
        assert len(history[-1]["content"]) < 700 // 4  # stopped, not run to its 700 tokens
    after = list(chat.respond(QUESTION, [], None, images["red"], 3, *SETTINGS[1:]))[-1]
    assert after[0][-1]["content"] and "3 词元 tokens" in after[3]  # the model is free for the next question


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _letters(text: str) -> str:
    """Letters and digits only: what survives the page's markdown rendering of a noisy answer unchanged."""
    return "".join(ch for ch in text if unicodedata.category(ch)[0] in "LN")


@pytest.fixture(scope="module")
def web_page(tiny_model_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    cmd = [sys.executable, "-m", "seechat", "web", "--model", str(tiny_model_dir), "--port", str(port),
           "--max-new-tokens", "8"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + WAIT
    try:
        while True:
            assert proc.poll() is None, proc.stdout.read()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url).status_code == 200:
                    break
            assert time.monotonic() < deadline, "seechat web did not come up"
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.communicate(timeout=WAIT)


def test_the_page_in_headless_chromium_uploads_an_image_and_streams_an_answer(web_page, engine, images):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no chromium on this machine: apt-get install chromium (.ci/run does)")
    from playwright.sync_api import sync_playwright

    expected = engine.ask(load_image(images["red"]), QUESTION, max_new_tokens=8)
    hosts = set()
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            profile, executable_path=chromium, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"],
        )
        try:
            page = browser.new_page()
            page.on("request", lambda r: hosts.add(r.url.split("/")[2] if "://" in r.url else r.url.split(":")[0]))
            page.goto(web_page, wait_until="load")
            for label in ("图片 Image", "问题 Question", "发送 Send", "新图片 New image", "清空对话 Clear chat",
                          "生成设置 Generation settings"):
                page.get_by_text(label).first.wait_for(state="visible", timeout=WAIT * 1000)
            page.locator("#image input[type=file]").set_input_files(images["red"])
            page.locator("#image img").first.wait_for(timeout=WAIT * 1000)  # the upload arrived
            page.locator("#question textarea").fill(QUESTION)
            page.locator("#send").click()
            page.wait_for_function("document.querySelector('#stats').innerText.includes('tokens')",
                                   timeout=WAIT * 1000)
            bubbles = page.locator("#chat .message-row").all_inner_texts()
            stats = page.locator("#stats").inner_text()
        finally:
            browser.close()
    assert "8 词元 tokens" in stats
    assert _letters(bubbles[-1]) == _letters(expected) and _letters(expected)
    assert QUESTION in "".join(bubbles[:-1])
    assert hosts <= {web_page.split("/")[2], "data", "blob"}, hosts  # nothing from outside this machine
