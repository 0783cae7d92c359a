"""`seechat serve --max-batch`: concurrent requests decoded in one batch give the single-request answers.

The official openai client sends the requests from threads against a live server (uvicorn on a thread). The
engine's lock is held while they arrive, so they wait together and join the worker's batch at once (with the
request that holds the worker); the server's /health counters say how many requests decoded beside another, so
a test cannot pass by running them one at a time. Another test sends a request while a long answer is being
made: it joins the running batch and ends first (continuous batching).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from unittest.mock import patch

import httpx
import openai
import pytest
import torch

import seechat
from seechat.chat.decode import Batch
from seechat.chat.engine import ChatEngine
from seechat.errors import ConfigError
from seechat.serve.api import ServeArgs, create_app
from test_serve_api import WAIT, _until, ask, data_url, health, live, png, raw_request

# prompts of different lengths (with and without an image), different max_tokens and one stop string
CASES = [
    ("这是什么颜色？", "red", 12, None),
    ("详细描述这张图片", "blue", 6, None),
    ("你好", None, 10, None),
    ("它在图片的哪个位置？请仔细看看再回答。", "red", 16, None),
    ("图中有几个物体？", "blue", 3, None),
    ("这是什么颜色？", "blue", 12, "x"),
    ("讲一个很长很长的故事", None, 14, None),
    ("这是什么形状？", "red", 8, None),
]


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif("not torch.cuda.is_available()",
                                                                    reason="needs CUDA")])


@pytest.fixture(scope="module", params=["cpu", CUDA])
def model(tiny_model_dir, request):
    return seechat.load(tiny_model_dir, device=request.param)


@pytest.fixture
def engine(model):
    return ChatEngine(model)


def _args(**kwargs) -> ServeArgs:
    """Without the prefix cache: the requests sent one at a time first would otherwise answer the repeats."""
    return ServeArgs(served_model_name="tiny", max_batch=8, prefix_cache_mb=0, **kwargs)


def _body(case, images, stream=False) -> dict:
    text, image, max_tokens, stop = case
    messages = ask(text, data_url(png(images[image]))) if image else [{"role": "user", "content": text}]
    body = {"model": "tiny", "messages": messages, "max_tokens": max_tokens, "stream": stream}
    if stop:
        body["stop"] = [stop]
    return body


def _answer(client: openai.OpenAI, body: dict) -> tuple:
    if body["stream"]:
        chunks = list(client.chat.completions.create(**body, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        return text, finish[0], chunks[-1].usage.completion_tokens
    done = client.chat.completions.create(**body)
    return done.choices[0].message.content, done.choices[0].finish_reason, done.usage.completion_tokens


def _occupy(app, url: str, pool: ThreadPoolExecutor):
    """Under the engine's lock: send a request that takes the worker and waits on the lock, so the requests sent
    next wait together and the worker takes them in one draw when the lock is let go."""
    blocker = pool.submit(httpx.post, f"{url}/v1/chat/completions", timeout=WAIT,
                          json={"messages": [{"role": "user", "content": "先占住"}], "max_tokens": 2})
    _until(lambda: health(url)["in_queue"] == 1 and app.state.scheduler._jobs.empty(), "the worker did not take it")
    return blocker


def _together(app, url: str, bodies: list[dict], sends) -> list:
    """Send every body at once while the worker is busy, so they run in one draw; return what `sends` returned."""
    with ThreadPoolExecutor(len(bodies) + 1) as pool:
        with app.state.scheduler.engine.lock:
            blocker = _occupy(app, url, pool)
            futures = [pool.submit(sends, body) for body in bodies]
            _until(lambda: health(url)["in_queue"] == len(bodies) + 1, "the requests did not all arrive")
        assert blocker.result(WAIT).status_code == 200
        return [f.result(WAIT) for f in futures]


def test_eight_concurrent_greedy_requests_equal_the_same_requests_one_at_a_time(engine, red, blue):
    images = {"red": red, "blue": blue}
    app = create_app(engine, _args())
    with live(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=WAIT)
        bodies = [_body(case, images, stream=i % 2 == 1) for i, case in enumerate(CASES)]
        alone = [_answer(client, body) for body in bodies]
        assert health(url)["batched"] == 0  # one at a time: nothing to batch
        together = _together(app, url, bodies, lambda body: _answer(client, body))
        status = health(url)
    assert together == alone
    # the eight and the request that held the worker, in one batch
    assert status["batched"] == 9 and status["batches"] == 1 and status["failed"] == 0 and status["in_queue"] == 0


def test_a_stream_cancelled_in_a_batch_leaves_the_others_alone(tiny_model_dir, red, blue):
    model = seechat.load(tiny_model_dir, device="cpu")
    model.stop_token_ids = []  # no end token: every answer runs to its max_tokens unless it is cancelled
    engine = ChatEngine(model)
    images = {"red": red, "blue": blue}
    bodies = [_body(case, images) for case in CASES[:4]]
    app = create_app(engine, _args())
    with live(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=WAIT)
        alone = [_answer(client, body) for body in bodies]
        long = {"messages": ask("讲一个很长的故事", data_url(png(red))), "max_tokens": 700, "stream": True}
        with ThreadPoolExecutor(len(bodies) + 1) as pool:
            with engine.lock:
                blocker = _occupy(app, url, pool)
                sock = raw_request(url, long)
                _until(lambda: health(url)["in_queue"] == 2, "the long request did not arrive")
                futures = [pool.submit(_answer, client, body) for body in bodies]
                _until(lambda: health(url)["in_queue"] == 2 + len(bodies), "the requests did not all arrive")
            received = b""
            while b'"content":"' not in received.split(b'"role":"assistant"', 1)[-1]:
                chunk = sock.recv(4096)
                assert chunk, "the long stream ended before its first piece"
                received += chunk
            sock.close()  # the long answer's client goes away mid-batch
            together = [f.result(WAIT) for f in futures]
            assert blocker.result(WAIT).status_code == 200
        _until(lambda: health(url)["in_queue"] == 0, "the vanished client kept its place")
        status = health(url)
    assert together == alone
    assert status["cancelled"] == 1 and status["failed"] == 0
    assert status["batches"] == 1 and status["batched"] == 2 + len(bodies)  # the long one was in the batch


def test_a_request_the_prefix_cache_holds_reuses_it_inside_the_batch(engine, red, blue):
    images = {"red": red, "blue": blue}
    app = create_app(engine, ServeArgs(served_model_name="tiny", max_batch=8))
    with live(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=WAIT)
        first = _body(CASES[0], images)
        before = client.chat.completions.create(**first)  # its KV is in the prefix cache now
        bodies = [first, *(_body(case, images) for case in CASES[1:4])]
        got = _together(app, url, bodies, lambda body: client.chat.completions.create(**body))
        status = health(url)
    assert got[0].choices[0].message.content == before.choices[0].message.content
    assert got[0].usage.prompt_tokens_details.cached_tokens >= got[0].usage.prompt_tokens // 2
    assert status["batched"] == 5 and status["failed"] == 0  # the cached one decoded beside the others


def test_sampled_requests_with_a_seed_repeat_when_others_run_beside_them(engine, red, blue):
    images = {"red": red, "blue": blue}
    seeded = {**_body(CASES[0], images), "temperature": 1.0, "seed": 7}
    app = create_app(engine, _args())
    with live(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=WAIT)
        alone = _answer(client, seeded)
        got = _together(app, url, [seeded, *(_body(case, images) for case in CASES[1:4])],
                        lambda body: _answer(client, body))
    assert got[0] == alone


def test_a_request_joins_a_running_batch_and_leaves_it_first(tiny_model_dir, red):
    model = seechat.load(tiny_model_dir, device="cpu")
    model.stop_token_ids = []  # no end token: each answer runs to its max_tokens
    app = create_app(ChatEngine(model), _args())
    short = {"model": "tiny", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 5}
    with live(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=WAIT)
        alone = client.chat.completions.create(**short).choices[0].message.content
        stream = client.chat.completions.create(model="tiny", messages=ask("讲一个很长的故事", data_url(png(red))),
                                                max_tokens=400, stream=True)
        chunks = iter(stream)
        while not next(chunks).choices[0].delta.content:  # the long answer is being made
            pass
        joined = client.chat.completions.create(**short)  # answered while the long one goes on
        mid = health(url)
        rest = [c for c in chunks]
    assert joined.choices[0].message.content == alone and joined.usage.completion_tokens == 5
    assert mid["running"] == 1 and mid["batches"] == 1 and mid["batched"] == 2  # it decoded beside the long one
    assert rest[-1].choices[0].finish_reason == "length"


def test_bad_settings_still_get_4xx_with_batching(engine):
    app = create_app(engine, _args())
    with live(app) as url:
        for extra in [{"temperature": -1}, {"top_p": 2}, {"max_tokens": 0}, {"top_k": -3}, {"stop": [""]}]:
            response = httpx.post(f"{url}/v1/chat/completions", timeout=WAIT,
                                  json={"messages": [{"role": "user", "content": "你好"}], "max_tokens": 4, **extra})
            assert 400 <= response.status_code < 500 and "error" in response.json(), extra
        assert health(url)["in_queue"] == 0


def test_max_batch_must_be_positive():
    with pytest.raises(ConfigError, match="max_batch"):
        ServeArgs(max_batch=0)


def test_newcomers_wait_for_company_at_most_wait_steps_and_join_at_once_when_as_many_as_the_running(tiny_model_dir):
    # Two long answers run; one newcomer waits `wait_steps` decoding steps before it joins (a join costs one vision
    # call and one prefill forward, whether one request joins or several); two newcomers (as many as the running
    # answers) join at the first step boundary. Every answer is still its greedy answer alone.
    from seechat.chat.engine import ChatState, GenerationSettings
    from seechat.serve.scheduler import Scheduler

    model = seechat.load(tiny_model_dir, device="cpu")
    model.stop_token_ids = []  # no end token: each answer runs to its max_new_tokens
    engine = ChatEngine(model)
    questions = ["讲一个很长的故事", "再讲一个", "你好", "这是什么？", "几个？"]
    alone = [engine.conversation().ask(q, max_new_tokens=n) for q, n in zip(questions, [200, 200, 3, 3, 3])]
    scheduler = Scheduler(engine, max_queue=8, max_batch=8, wait_steps=5)
    steps, log = [0], []
    step, take, join = Batch.step, scheduler._take, scheduler._join
    hold, held, release = threading.Event(), threading.Event(), threading.Event()

    def counted(self):
        steps[0] += 1
        if hold.is_set() and not held.is_set():  # one step waits inside (holding the engine's lock) until released
            held.set()
            release.wait(WAIT)
        return step(self)

    scheduler._take = lambda job: (log.append(("taken", steps[0])), take(job))[1]
    scheduler._join = lambda batch, taken, jobs: (log.append(("joined", steps[0], len(taken))), join(batch, taken, jobs))[1]

    def ask_(question, n):
        return "".join(scheduler.stream(ChatState.of([{"role": "user", "content": question}], []),
                                        GenerationSettings(max_new_tokens=n)))

    with patch.object(Batch, "step", counted), ThreadPoolExecutor(5) as pool:
        with engine.lock:
            long = [pool.submit(ask_, q, 200) for q in questions[:2]]
            _until(lambda: scheduler.status()["in_queue"] == 2, "the long questions did not arrive")
        _until(lambda: steps[0] >= 3, "the long answers did not start")
        one = pool.submit(ask_, questions[2], 3).result(WAIT)
        # The two arrive between the same two steps. Not by taking the engine's lock here: threading.Lock is not
        # fair, and the worker, letting it go and taking it again each step, could run the long answers to their
        # end before this thread got it (it did on a slow CI machine).
        hold.set()
        assert held.wait(WAIT), "the long answers stopped"
        two = [pool.submit(ask_, q, 3) for q in questions[3:]]
        _until(lambda: scheduler.status()["in_queue"] == 4, "the two questions did not arrive")
        at = steps[0]
        release.set()
        answers = [f.result(WAIT) for f in [*long, *two]]
    scheduler.close()
    assert [one, *answers[2:]] == alone[2:] and answers[:2] == alone[:2]
    joins = [entry for entry in log if entry[0] == "joined"]
    assert [j[2] for j in joins] == [2, 1, 2]  # the long pair, the lone newcomer, the pair of newcomers
    lone_taken = [entry[1] for entry in log if entry[0] == "taken"][2]
    assert joins[1][1] == lone_taken + 5  # it waited 5 steps for company, then joined alone
    assert joins[2][1] == at  # as many as the running answers: no waiting
