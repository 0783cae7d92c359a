"""`seechat serve --engine-process`: the engine and its scheduler in a child process, the HTTP side in this one.

Python runs one thread of a process at a time (the GIL), so in one process the event loop's HTTP work and the
engine's decoding take turns on what is in effect one core: measured with the toy model at 8 clients, the engine
thread used 0.79 of a core, the event loop 0.19, and the second core idled. Here the child process loads the model
and runs the same Scheduler (continuous batching, prefix cache); this process keeps admission (the queue bound,
429s), image decoding and HTTP, as vLLM splits its API server from its engine core.

    engine = EngineProcess(load_args, max_queue=16, max_batch=8)   # starts the child, waits until it has loaded
    app = create_app(engine, args)                                   # it stands where a Scheduler would

One pipe each way: requests and cancels go down; each decoding step's events come up in one message (text pieces,
the reply at the end, the error of a failed turn), with the child's counters when a turn ended. If the child dies,
every turn in flight gets an error and new requests are refused with one; the HTTP side stays up.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import pickle
import signal
import threading

from ..chat.engine import Reply
from ..errors import SeeChatError
from .scheduler import Admission, Job, Scheduler, Slot, _deliver_all

log = logging.getLogger("seechat")


class EngineGone(RuntimeError):
    """The engine process is not running (it failed to start or exited)."""


class EngineProcess(Admission):
    """The Scheduler's interface (admit, submit, status, close) over a Scheduler in a child process."""

    def __init__(self, load_args, *, max_queue: int = 16, max_batch: int = 1, wait_steps: int | None = None,
                 prefix_cache_mb: float = 0.0, start_timeout: float = 900.0):
        super().__init__(max_queue, max_batch)
        self._running = 0
        self._send_lock = threading.Lock()
        self._jobs: dict[int, RemoteJob] = {}
        self._ids = itertools.count()
        self._gone: str | None = None
        self._closing = False
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch threads or event loop
        self._conn, child = ctx.Pipe()
        kwargs = {"max_batch": max_batch, "wait_steps": wait_steps, "prefix_cache_mb": prefix_cache_mb}
        self._proc = ctx.Process(target=_child, args=(child, load_args, kwargs), name="seechat-engine", daemon=True)
        self._proc.start()
        child.close()
        if not self._conn.poll(start_timeout):
            self._proc.kill()
            raise EngineGone(f"the engine process did not load the model in {start_timeout:.0f} s")
        try:
            kind, info = self._conn.recv()
        except EOFError:
            raise EngineGone("the engine process exited while loading the model (see the log above)") from None
        if kind != "ready":
            self._proc.join(10)
            raise SeeChatError(info) if kind == "user-error" else EngineGone(info)
        self.max_context, self.min_side = info["max_context"], info["min_side"]
        self._reader = threading.Thread(target=self._read, name="seechat-engine-reader", daemon=True)
        self._reader.start()

    # -- the request side (event loop) ------------------------------------------------------------------
    def submit(self, slot: Slot, state, settings, stream: bool = True) -> "RemoteJob":
        job = RemoteJob(self, slot, next(self._ids), stream)
        with self._lock:
            gone = self._gone
            if gone is None:
                self._jobs[job.key] = job
        if gone is not None:
            slot.release()
            raise EngineGone(gone)
        try:
            self._send(("submit", job.key, state, settings, stream))
        except (OSError, EOFError, pickle.PicklingError) as exc:
            with self._lock:
                self._jobs.pop(job.key, None)
            slot.release()
            raise EngineGone(f"the request could not reach the engine process ({exc.__class__.__name__})") from None
        return job

    def status(self) -> dict:
        with self._lock:
            return {"in_queue": self._in, "running": self._running, "max_queue": self.max_queue,
                    "max_batch": self.max_batch, **self.stats}

    def close(self) -> None:
        """Stop the child (its turns are cancelled) and wait for it."""
        self._closing = True
        try:
            self._send(("close",))
        except (OSError, EOFError):
            pass
        self._proc.join(30)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        self._conn.close()

    def _send(self, message) -> None:
        with self._send_lock:
            self._conn.send(message)

    # -- the reader thread --------------------------------------------------------------------------------
    def _read(self) -> None:
        while True:
            try:
                events, stats = self._conn.recv()
            except (EOFError, OSError):
                break
            mine = []
            for key, kind, value in events:
                job = self._jobs.get(key)
                if job is None:
                    continue
                if kind in ("done", "error"):
                    self._end(job, kind, value)
                mine.append((job, kind, None if kind == "done" else value))
            if stats is not None:
                with self._lock:
                    self._running = stats.pop("running", self._running)
                    for name in ("batches", "batched"):
                        self.stats[name] = stats[name]
            _deliver_all(mine)
        self._fail_all(f"the engine process exited (exit code {self._proc.exitcode}); restart the server")

    def _end(self, job: "RemoteJob", kind: str, value) -> None:
        if kind == "done":
            job.reply.__dict__.update(value.__dict__)
        with self._lock:
            self._jobs.pop(job.key, None)
            self._count_end(kind == "error", job.reply, job.reply.seconds if kind == "done" else None)
        job.slot.release()

    def _fail_all(self, message: str) -> None:
        with self._lock:
            self._gone = message
            jobs, self._jobs = list(self._jobs.values()), {}
            self.stats["failed"] += len(jobs)
        if jobs or not self._closing:
            log.error("%s", message)
        for job in jobs:
            job.slot.release()
        _deliver_all([(job, "error", EngineGone(message)) for job in jobs])


class RemoteJob(Job):
    """A turn running in the engine process: the same pieces() / result() / cancel() as a local Job."""

    def __init__(self, owner: EngineProcess, slot: Slot, key: int, stream: bool):
        self.slot, self.key, self.stream, self.reply = slot, key, stream, Reply()
        self.cancelled = threading.Event()
        self._owner = owner
        self._loop = asyncio.get_running_loop()
        self._events = asyncio.Queue()

    def cancel(self) -> None:
        if self.cancelled.is_set():
            return
        self.cancelled.set()
        try:
            self._owner._send(("cancel", self.key))
        except (OSError, EOFError):
            pass  # the engine is gone: the reader ends every turn


# -- the child process ----------------------------------------------------------------------------------------
class _Outlet:
    """Where the child's jobs send their events: up the pipe, one message per decoding step (Scheduler._flush)."""

    def __init__(self, conn, scheduler: Scheduler):
        self.conn, self.scheduler = conn, scheduler
        self.lock = threading.Lock()

    def deliver(self, events: list) -> None:
        out, ended = [], False
        for job, kind, value in events:
            if kind == "done":
                value, ended = job.reply, True
            elif kind == "error":
                value, ended = _portable(value), True
            out.append((job.key, kind, value))
        stats = self.scheduler.status() if ended else None
        with self.lock:
            self.conn.send((out, stats))


def _portable(exc: BaseException) -> BaseException:
    """The error as it can cross the pipe: itself when it pickles, else a SeeChatError with its message."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return SeeChatError(str(exc)) if isinstance(exc, SeeChatError) else RuntimeError(repr(exc))


def _child(conn, load_args, kwargs: dict) -> None:
    from ..chat.engine import ChatEngine
    from ..cli_helpers import load_model, setup_logging
    from ..data.images import needed_side

    # Ctrl+C reaches the whole process group: the server handles it and then closes the pipe, which ends this loop
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    setup_logging()
    try:
        engine = ChatEngine(load_model(load_args))
    except SeeChatError as exc:
        conn.send(("user-error", str(exc)))
        return
    except Exception as exc:
        conn.send(("failed", f"the engine process could not load the model: {exc!r}"))
        return
    wait = {} if kwargs["wait_steps"] is None else {"wait_steps": kwargs["wait_steps"]}
    scheduler = Scheduler(engine, max_queue=2**31, max_batch=kwargs["max_batch"],  # the parent bounds the queue
                          prefix_cache_mb=kwargs["prefix_cache_mb"], **wait)
    outlet = _Outlet(conn, scheduler)
    model = engine.model
    conn.send(("ready", {"max_context": model.max_context, "min_side": needed_side(model.processor.image_processor)}))
    jobs: dict[int, Job] = {}
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            break
        if message[0] == "submit":
            _, key, state, settings, stream = message
            job = Job(scheduler, scheduler.admit(), state, settings, loop=outlet, stream=stream)
            job.key = key
            jobs = {k: j for k, j in jobs.items() if j.status in ("waiting", "running")}
            jobs[key] = job
            scheduler._jobs.put(job)
        elif message[0] == "cancel" and message[1] in jobs:
            jobs[message[1]].cancel()
        elif message[0] == "close":
            break
    scheduler.close()
