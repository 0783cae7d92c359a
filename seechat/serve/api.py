"""An OpenAI-compatible HTTP API over one chat engine (FastAPI + uvicorn).

    seechat serve --model runs/toyworld/model                       # http://127.0.0.1:8000/v1
    seechat serve --model DIR --port 8000 --api-key KEY --max-queue 16 --max-image-mb 20

    SEECHAT_API_KEY=KEY seechat serve --model DIR      # or --api-key-file PATH (a key on the command line shows in ps)

Routes: POST /v1/chat/completions (OpenAI format, `stream: true` for server-sent events ending with
`data: [DONE]`), GET /v1/models, GET /health (no key needed). With a key (--api-key-file, SEECHAT_API_KEY or
--api-key) every other route needs `Authorization: Bearer KEY`. Cross-site requests are refused (guard.py:
Host, Origin, JSON bodies only). Requests share one loaded model and decode together, up to --max-batch at
once, a new request joining the running batch between two steps (scheduler.py); at most --max-queue are in
(running or waiting),
more get 429 with Retry-After; a request takes its place only once its body has
been read (within --body-timeout) and parsed. A request the server cannot serve gets an OpenAI-style error
object with a 4xx status, never a crash.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import math
import os
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..chat.engine import ChatEngine, ChatState, GenerationSettings
from ..cli_helpers import LoadArgs, load_model, parse, setup_logging
from ..errors import ConfigError, ContextOverflowError, ImageError, SeeChatError
from ..data.images import MAX_PIXELS, needed_side
from . import protocol
from .guard import CrossSiteGuard
from .messages import ImagePolicy, to_engine
from .protocol import APIError, ChatCompletionRequest, ImagePart
from .engine_process import EngineGone, EngineProcess
from .scheduler import WAIT_STEPS, QueueFull, Scheduler

log = logging.getLogger("seechat")

TEXT_CHARS_PER_TOKEN = 64
"""Requests with more characters of text than this many per token of the model's context are refused: the
engine would drop most of it anyway, and tokenizing megabytes would hold the model for everyone."""
MIN_TEMPERATURE = 1e-5
"""Temperatures below this are taken as 0 (greedy): dividing logits by ~1e-300 overflows."""


@dataclass
class ServeArgs:
    """Where to listen and what requests may do."""

    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on (loopback by default)."})
    port: int = field(default=8000, metadata={"help": "Port to listen on."})
    api_key: str | None = field(
        default=None,
        metadata={"help": "Require 'Authorization: Bearer KEY' on every route but /health. Prefer --api-key-file or "
                          "SEECHAT_API_KEY: a key on the command line shows in ps."},
    )
    api_key_file: str | None = field(
        default=None, metadata={"help": "Read the API key from this file (its first line)."}
    )
    served_model_name: str | None = field(
        default=None, metadata={"help": "The model name clients send and /v1/models lists (default: --model)."}
    )
    max_queue: int = field(default=16, metadata={"help": "Most requests in at once, running or waiting; more get 429."})
    max_batch: int = field(
        default=8,
        metadata={"help": "Most answers decoded together; new requests join the running batch between steps "
                          "(1: one at a time)."},
    )
    batch_wait_steps: int = field(
        default=WAIT_STEPS,
        metadata={"help": "Most decoding steps a new request waits for others before it joins a running batch (they "
                          "join at once when they are as many as the running answers; 0: always at once)."},
    )
    engine_process: bool = field(
        default=False,
        metadata={"help": "Run the model in a child process and the HTTP side in this one, so each gets a core "
                          "(Python runs one thread of a process at a time)."},
    )
    max_image_mb: float = field(default=20.0, metadata={"help": "Largest image accepted, in MB (larger: 413)."})
    max_images: int = field(default=8, metadata={"help": "Most images in one request."})
    image_dir: str | None = field(
        default=None, metadata={"help": "Allow file:// image URLs, for files under this folder only."}
    )
    allow_remote_images: bool = field(
        default=False, metadata={"help": "Allow http(s):// image URLs, which the server then fetches."}
    )
    allow_private_images: bool = field(
        default=False, metadata={"help": "Let remote image URLs name loopback, private or link-local addresses."}
    )
    remote_timeout: float = field(default=10.0, metadata={"help": "Seconds for a whole remote image fetch."})
    max_decoded_mpixels: float = field(
        default=2 * MAX_PIXELS / 1e6,
        metadata={"help": "Most megapixels one request's images may decode to, all together."},
    )
    body_timeout: float = field(
        default=60.0, metadata={"help": "Seconds a client has to send a request body (slower: 408)."}
    )
    allow_origin: list[str] = field(
        default_factory=list,
        metadata={"help": "Web origins (https://app.example) whose pages may call this server; '*' for any. "
                          "Default: none (a request with an Origin header gets 403)."},
    )
    allow_host: list[str] = field(
        default_factory=list,
        metadata={"help": "Host names besides the listening address and localhost that clients may use to reach "
                          "this server; '*' for any (turns off the DNS-rebinding check)."},
    )
    prefix_cache_mb: float = field(
        default=512.0, metadata={"help": "Memory for the KV caches of earlier requests, reused when a request "
                                         "re-sends their history (0: off)."}
    )

    def __post_init__(self) -> None:
        checks = [
            (0 <= self.port <= 65535, "port must be in 0..65535"),
            (self.max_queue >= 1, "max_queue must be >= 1"),
            (self.max_batch >= 1, "max_batch must be >= 1"),
            (self.batch_wait_steps >= 0, "batch_wait_steps must be >= 0"),
            (self.max_image_mb > 0, "max_image_mb must be > 0"),
            (self.max_images >= 0, "max_images must be >= 0"),
            (self.max_decoded_mpixels > 0, "max_decoded_mpixels must be > 0"),
            (self.body_timeout > 0 and self.remote_timeout > 0, "body_timeout and remote_timeout must be > 0"),
            (not (self.api_key and self.api_key_file), "give --api-key or --api-key-file, not both"),
            (self.prefix_cache_mb >= 0, "prefix_cache_mb must be >= 0"),
            (self.image_dir is None or Path(self.image_dir).is_dir(), f"image_dir {self.image_dir!r} is not a folder"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if self.api_key_file:
            self.api_key = read_key_file(self.api_key_file)

    def policy(self) -> ImagePolicy:
        return ImagePolicy(
            max_image_bytes=int(self.max_image_mb * 2**20), max_images=self.max_images,
            image_dir=Path(self.image_dir) if self.image_dir else None, allow_remote=self.allow_remote_images,
            allow_private=self.allow_private_images, remote_timeout=self.remote_timeout,
            max_decoded_pixels=int(self.max_decoded_mpixels * 1e6),
        )


def read_key_file(path: str) -> str:
    """The API key in the first line of `path` (surrounding spaces dropped); ConfigError when there is none."""
    try:
        with open(path, encoding="utf-8") as fh:
            key = fh.readline().strip()
    except (OSError, UnicodeError) as exc:
        raise ConfigError(f"cannot read the API key file {path!r} ({exc.__class__.__name__}): check the path") from None
    if not key:
        raise ConfigError(f"the API key file {path!r} is empty: put the key on its first line")
    return key


def create_app(engine: ChatEngine | EngineProcess, args: ServeArgs | None = None,
               defaults: GenerationSettings | None = None) -> FastAPI:
    """The API app over an already-built engine (or an engine process). `defaults` fill in what a request leaves
    out (temperature 0, greedy, unless the server was started otherwise)."""
    args = args or ServeArgs()
    defaults = defaults or GenerationSettings()
    name = args.served_model_name or "seechat"
    policy = args.policy()
    if isinstance(engine, EngineProcess):  # the engine runs in a child process (--engine-process)
        scheduler, max_context, min_side = engine, engine.max_context, engine.min_side
    else:
        scheduler = Scheduler(engine, args.max_queue, args.max_batch, args.batch_wait_steps, args.prefix_cache_mb)
        max_context, min_side = engine.model.max_context, needed_side(engine.model.processor.image_processor)
    policy.max_text_chars = TEXT_CHARS_PER_TOKEN * max_context
    policy.min_side = min_side
    body_limit = body_limit_for(policy)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(scheduler.close)

    app = FastAPI(title="seechat", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler = scheduler
    if args.api_key:
        app.add_middleware(BearerAuth, key=args.api_key)
    if args.allow_origin:  # CORS answers for the origins let through; outside the key check: preflights carry no key
        app.add_middleware(CORSMiddleware, allow_origins=args.allow_origin, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(CrossSiteGuard, bound_host=args.host, allow_hosts=args.allow_host,
                       allow_origins=args.allow_origin)  # outermost: refused before anything else runs

    # -- errors: every one an OpenAI-style object -------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(QueueFull)
    async def _queue_full(request, exc: QueueFull):
        body = protocol.error_body(f"the server is busy ({args.max_queue} requests in); retry after "
                                   f"{exc.retry_after}s", type="rate_limit_error", code="queue_full")
        return JSONResponse(body, status_code=429, headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(EngineGone)
    async def _engine_gone(request, exc: EngineGone):
        return JSONResponse(protocol.error_body(str(exc), type="server_error", code="engine_gone"), status_code=503)

    @app.exception_handler(SeeChatError)
    async def _seechat_error(request, exc: SeeChatError):
        return JSONResponse(_user_error(exc).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):
        message = {404: f"no route {request.method} {request.url.path}; see /v1/chat/completions, /v1/models, /health",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return JSONResponse(protocol.error_body(message, code=str(exc.status_code)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse(protocol.error_body("internal server error (logged on the server)", type="server_error"),
                            status_code=500)

    # -- routes ---------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, **scheduler.status()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [protocol.model_card(name, created)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != name:
            raise _unknown_model(model_id, name)
        return protocol.model_card(name, created)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        # the body is read and parsed before a queue place is taken: a slow upload holds no place
        req = ChatCompletionRequest.parse(await _read_json(request, body_limit, args.body_timeout))
        if req.model is not None and req.model != name:
            raise _unknown_model(req.model, name)
        settings = _settings(req, defaults)
        slot = scheduler.admit()  # before decoding: the queue bounds how many requests decode images at once
        try:
            if _small_inline(req.messages):  # a few small data: images decode faster than a thread hand-off
                messages, images = to_engine(req.messages, policy)
            else:  # large images, or files and URLs to read: off the event loop
                messages, images = await run_in_threadpool(to_engine, req.messages, policy)
            job = scheduler.submit(slot, ChatState.of(messages, images), settings, stream=req.stream)
        except BaseException:
            slot.release()
            raise
        cid = protocol.completion_id()
        pieces = job.pieces()
        watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
        try:  # wait for the first piece (or the whole answer) before answering, so an error still gets its 4xx status
            first = await anext(pieces, None)
        except BaseException:
            job.cancel()
            raise
        finally:
            watcher.cancel()
        if not req.stream:  # no pieces were sent: the answer is whole in the reply
            reply = job.reply
            _log(cid, reply)
            return protocol.completion(cid, name, reply.text, _finish(reply.finish_reason), reply.prompt_tokens,
                                       reply.completion_tokens, reply.cached_tokens)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        # background: runs after the stream ends or the client goes away, so a disconnect stops the generation
        return StreamingResponse(_sse(cid, name, job, first, pieces, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                 background=BackgroundTask(_cancel, job))

    return app


class BearerAuth:
    """ASGI middleware: every HTTP route but /health needs `Authorization: Bearer KEY` (401 otherwise)."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.strip().partition(b" ")
            if not (scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)):
                message = ("this server needs an API key: send 'Authorization: Bearer KEY'" if not given
                           else "the API key is not valid")
                response = JSONResponse(protocol.error_body(message, code="invalid_api_key"), status_code=401,
                                        headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


# -- helpers ------------------------------------------------------------------------------------------------
def body_limit_for(policy: ImagePolicy) -> int:
    """The largest request body: every image at the size limit in base64, the text at its limit with every
    character JSON-escaped (\\uXXXX), and 64 KB for the rest of the JSON."""
    images = policy.max_images * math.ceil(policy.max_image_bytes * 4 / 3)
    text = 6 * (policy.max_text_chars if policy.max_text_chars is not None else 2**20)
    return images + text + 2**16


def _small_inline(messages) -> bool:
    """Whether every image of the request is a data: URL and all of them together are under 256 KB of base64."""
    urls = [p.url for m in messages if isinstance(m.content, list) for p in m.content if isinstance(p, ImagePart)]
    return all(u.startswith("data:") for u in urls) and sum(len(u) for u in urls) < 2**18


async def _read_json(request: Request, limit: int, timeout: float):
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise _body_too_large(int(length), limit)
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise _body_too_large(len(body), limit)
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout:g}s: send it at once "
                            "(this server gives a body --body-timeout seconds)", code="request_timeout",
                       headers={"Connection": "close"}) from None
    if not body:
        raise APIError(400, "the request has no body: send a JSON object with 'messages'")
    try:
        if len(body) > 2**20:  # a large body (inline images) is decoded off the event loop, without a copy
            return await run_in_threadpool(_loads, body)
        return _loads(body)
    except (ValueError, RecursionError) as exc:
        raise APIError(400, f"the request body is not valid JSON ({str(exc)[:120]})") from None


def _loads(body: bytes | bytearray):
    def no_constants(name):
        raise ValueError(f"{name} is not a JSON number")

    return json.loads(body, parse_constant=no_constants)


def _body_too_large(size: int, limit: int) -> APIError:
    return APIError(413, f"the request body is {size / 2**20:.1f} MB, over this server's limit of "
                         f"{limit / 2**20:.1f} MB: send fewer or smaller images", code="request_too_large")


def _unknown_model(asked: str, name: str) -> APIError:
    return APIError(404, f"the model {asked!r} does not exist here; this server serves {name!r} (see /v1/models)",
                    param="model", code="model_not_found")


def _settings(req: ChatCompletionRequest, defaults: GenerationSettings) -> GenerationSettings:
    def pick(value, default):
        return default if value is None else value

    return GenerationSettings(
        max_new_tokens=req.max_completion_tokens or req.max_tokens or defaults.max_new_tokens,
        temperature=_temperature(pick(req.temperature, defaults.temperature)),
        top_p=pick(req.top_p, defaults.top_p),
        top_k=pick(req.top_k, defaults.top_k),
        repetition_penalty=pick(req.repetition_penalty, defaults.repetition_penalty),
        seed=pick(req.seed, defaults.seed),
        stop=req.stop_list() if req.stop is not None else list(defaults.stop),
    )


def _temperature(value: float) -> float:
    return 0.0 if value < MIN_TEMPERATURE else value


def _user_error(exc: SeeChatError) -> APIError:
    code = ("invalid_image" if isinstance(exc, ImageError) else
            "context_length_exceeded" if isinstance(exc, ContextOverflowError) else None)
    return APIError(400, str(exc), code=code)


async def _cancel_on_disconnect(request: Request, job) -> None:
    """Cancel the job when the client goes away (the body has been read, so the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


async def _sse(cid: str, name: str, job, first: str | None, pieces, include_usage: bool):
    """The OpenAI chunk stream: the role, the text pieces, the finish reason, optionally usage, then [DONE].
    A client that goes away cancels the generation (Starlette stops this generator)."""
    created = int(time.time())

    def event(data: dict) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"

    try:
        yield event(protocol.chunk(cid, name, created, {"role": "assistant", "content": ""}))
        if first is not None:
            yield event(protocol.chunk(cid, name, created, {"content": first}))
            async for piece in pieces:
                yield event(protocol.chunk(cid, name, created, {"content": piece}))
        reply = job.reply
        yield event(protocol.chunk(cid, name, created, finish_reason=_finish(reply.finish_reason)))
        if include_usage:
            yield event(protocol.chunk(cid, name, created, usage_=protocol.usage(
                reply.prompt_tokens, reply.completion_tokens, reply.cached_tokens)))
        _log(cid, reply)
    except SeeChatError as exc:  # after the headers went out, an error travels as an event
        yield event(_user_error(exc).body())
    except Exception:
        log.exception("internal error while streaming %s", cid)
        yield event(protocol.error_body("internal server error (logged on the server)", type="server_error"))
    finally:
        job.cancel()  # no-op when the job is done
    yield "data: [DONE]\n\n"


async def _cancel(job) -> None:
    """job.cancel on the event loop: a plain function given to BackgroundTask would run on a worker thread (one
    thread hand-off per streamed answer; a lock taken for microseconds needs none)."""
    job.cancel()


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _log(cid: str, reply) -> None:
    log.info("%s: %d prompt + %d completion tokens, %s, %.2fs", cid, reply.prompt_tokens, reply.completion_tokens,
             reply.finish_reason, reply.seconds)


# -- the command --------------------------------------------------------------------------------------------
def main(argv: list[str]) -> int:
    import uvicorn

    load_args, args, defaults = parse(
        "seechat serve", argv, LoadArgs, ServeArgs, GenerationSettings, description=__doc__.split("\n")[0]
    )
    setup_logging()
    if args.api_key and not args.api_key_file:
        log.warning("the API key was given on the command line, where other users of this machine can see it "
                    "(ps): prefer --api-key-file PATH or SEECHAT_API_KEY")
    args.api_key = args.api_key or os.environ.get("SEECHAT_API_KEY") or None
    args.served_model_name = args.served_model_name or load_args.model
    if not _is_loopback(args.host) and not args.api_key:
        log.warning("listening on %s without an API key: anyone who can reach this address can use the model",
                    args.host)
    if args.engine_process:
        engine = EngineProcess(load_args, max_queue=args.max_queue, max_batch=args.max_batch,
                               wait_steps=args.batch_wait_steps, prefix_cache_mb=args.prefix_cache_mb)
    else:
        engine = ChatEngine(load_model(load_args))
    app = create_app(engine, args, defaults)
    log.info("serving %r at http://%s:%d/v1 (API key %s)", args.served_model_name, args.host, args.port,
             "required" if args.api_key else "off")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
