"""One worker thread runs the engine; requests wait for it in a bounded queue.

    scheduler = Scheduler(engine, max_queue=16)
    slot = scheduler.admit()                 # QueueFull when 16 requests are already in (429 + Retry-After)
    job = scheduler.submit(slot, state, settings)   # the job owns the slot from here on
    async for piece in job.pieces(): ...     # job.reply holds the usage and finish reason afterwards
    job.cancel()                             # the client went away: stop generating, give the slot back

A slot counts a request from its admission (before its images are decoded) until the engine is done with
it. A job cancelled while it waits gives its slot back at once and never runs; one cancelled while it runs
stops at its next token. Requests run one at a time, in arrival order, while the event loop that
submitted them stays free (health checks answer during a generation).
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections.abc import AsyncIterator

from ..chat.engine import ChatEngine, ChatState, GenerationSettings, Reply

log = logging.getLogger("seechat")


class QueueFull(Exception):
    """Every slot is taken; try again after `retry_after` seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy; retry after {retry_after}s")
        self.retry_after = retry_after


class Slot:
    """A place in the queue; released exactly once."""

    def __init__(self, scheduler: "Scheduler"):
        self._scheduler = scheduler
        self._held = True

    def release(self) -> None:
        with self._scheduler._lock:
            if self._held:
                self._held = False
                self._scheduler._in -= 1


class Job:
    """One request's turn on the engine, and the events it sends back to the event loop."""

    def __init__(self, scheduler: "Scheduler", slot: Slot, state: ChatState, settings: GenerationSettings):
        self.state, self.settings, self.slot = state, settings, slot
        self.reply = Reply()
        self.cancelled = threading.Event()
        self.status = "waiting"  # -> running -> done, or waiting -> abandoned
        self._scheduler = scheduler
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue = asyncio.Queue()

    def cancel(self) -> None:
        """Stop this job: a waiting one never runs, a running one stops at its next token."""
        with self._scheduler._lock:
            self.cancelled.set()
            if self.status != "waiting":
                return
            self.status = "abandoned"
            self._scheduler.stats["cancelled"] += 1
        self.slot.release()
        self.reply.finish_reason = "cancelled"
        self._send("done", None)

    async def pieces(self) -> AsyncIterator[str]:
        """The answer's text pieces as the engine makes them; raises what the engine raised."""
        while True:
            kind, value = await self._events.get()
            if kind == "piece":
                yield value
            elif kind == "error":
                raise value
            else:
                return

    async def result(self) -> Reply:
        async for _ in self.pieces():
            pass
        return self.reply

    def _send(self, kind: str, value) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone (server shutting down): nobody listens any more
            self.cancelled.set()


class Scheduler:
    """Runs jobs on one engine, one at a time, with at most `max_queue` requests in (running or waiting)."""

    def __init__(self, engine: ChatEngine, max_queue: int = 16):
        if max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        self.engine, self.max_queue = engine, max_queue
        self.stats = {"completed": 0, "cancelled": 0, "failed": 0, "rejected": 0}
        self._lock = threading.Lock()
        self._in = 0
        self._running: Job | None = None
        self._seconds = 1.0  # a running average of seconds per request, for Retry-After
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="seechat-engine", daemon=True)
        self._thread.start()

    # -- the request side (event loop) ------------------------------------------------------------------
    def admit(self) -> Slot:
        with self._lock:
            if self._in >= self.max_queue:
                self.stats["rejected"] += 1
                raise QueueFull(max(1, min(60, math.ceil(self._seconds * self._in))))
            self._in += 1
        return Slot(self)

    def submit(self, slot: Slot, state: ChatState, settings: GenerationSettings) -> Job:
        job = Job(self, slot, state, settings)
        self._jobs.put(job)
        return job

    def status(self) -> dict:
        with self._lock:
            return {"in_queue": self._in, "running": int(self._running is not None), "max_queue": self.max_queue,
                    **self.stats}

    def close(self) -> None:
        """Cancel what is running or waiting and stop the worker."""
        with self._lock:
            running = self._running
        if running is not None:
            running.cancelled.set()
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
        self._jobs.put(None)
        self._thread.join(timeout=30)

    # -- the worker thread ------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            with self._lock:
                if job.status != "waiting":
                    continue
                job.status, self._running = "running", job
            start, outcome, last = time.perf_counter(), "failed", None
            try:
                for piece in self.engine.stream_chat(job.state, job.settings, reply=job.reply, cancel=job.cancelled):
                    job._send("piece", piece)
                outcome = "cancelled" if job.reply.finish_reason == "cancelled" else "completed"
                last = ("done", None)
            except Exception as exc:  # the request's own problem, or a bug: either way the server goes on
                last = ("error", exc)
            finally:
                seconds = time.perf_counter() - start
                with self._lock:
                    job.status, self._running = "done", None
                    self.stats[outcome] += 1
                    self._seconds = 0.8 * self._seconds + 0.2 * seconds
                job.slot.release()  # before the last event, so a client that saw its answer end finds its slot free
                job._send(*(last or ("error", RuntimeError("generation stopped unexpectedly"))))
