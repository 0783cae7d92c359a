"""One worker thread runs the engine; requests wait for it in a bounded queue.

    scheduler = Scheduler(engine, max_queue=16)
    slot = scheduler.admit()                 # QueueFull when 16 requests are already in (429 + Retry-After)
    job = scheduler.submit(slot, state, settings)   # the job owns the slot from here on
    async for piece in job.pieces(): ...     # job.reply holds the usage and finish reason afterwards
    job.cancel()                             # the client went away: stop generating, give the slot back

A slot counts a request from its admission (before its images are decoded) until the engine is done with
it. A job cancelled while it waits gives its slot back at once and never runs; one cancelled while it runs
stops at its next token. The event loop that submitted the jobs stays free (health checks answer during a
generation).

Batching (`max_batch` > 1): when the worker becomes free it takes every waiting job, up to max_batch, and runs
those that may share a batch (greedy fresh questions: see `batch_key`) as one batched generation
(`ChatEngine.chat_together`); the others, and those whose prompt the prefix cache holds
(`ChatEngine.cache_hit`), run one at a time after it, in arrival order. A job that arrives
while a batch runs waits for the next one (requests are gathered when the worker is free, not joined into a
running batch). Each batched job streams, stops and cancels on its own, and a job that finished gets its end
and its slot back at once, while the rest of its batch goes on. max_batch 1 runs every request alone.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections.abc import AsyncIterator

from ..chat.engine import ChatEngine, ChatState, GenerationSettings, Reply, Turn, batch_key

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
    """Runs jobs on one engine, up to `max_batch` at once, with at most `max_queue` requests in (running or waiting)."""

    def __init__(self, engine: ChatEngine, max_queue: int = 16, max_batch: int = 1):
        if max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.engine, self.max_queue, self.max_batch = engine, max_queue, max_batch
        self.stats = {"completed": 0, "cancelled": 0, "failed": 0, "rejected": 0, "batches": 0, "batched": 0}
        self._lock = threading.Lock()
        self._in = 0
        self._held: list[Job] = []  # taken from the queue by the worker, running or about to
        self._seconds = 1.0  # a running average of seconds per request, for Retry-After
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="seechat-engine", daemon=True)
        self._thread.start()

    # -- the request side (event loop) ------------------------------------------------------------------
    def admit(self) -> Slot:
        with self._lock:
            if self._in >= self.max_queue:
                self.stats["rejected"] += 1
                per = self._seconds / max(1, min(self.max_batch, self._in))  # a batch answers several at once
                raise QueueFull(max(1, min(60, math.ceil(per * self._in))))
            self._in += 1
        return Slot(self)

    def submit(self, slot: Slot, state: ChatState, settings: GenerationSettings) -> Job:
        job = Job(self, slot, state, settings)
        self._jobs.put(job)
        return job

    def status(self) -> dict:
        with self._lock:
            # taken by the worker, generating or about to (the rest of its draw, or checked against the prefix cache)
            running = sum(1 for job in self._held if job.status in ("waiting", "running"))
            return {"in_queue": self._in, "running": running, "max_queue": self.max_queue,
                    "max_batch": self.max_batch, **self.stats}

    def close(self) -> None:
        """Cancel what is running or waiting and stop the worker."""
        with self._lock:
            held = list(self._held)
        for job in held:
            job.cancel()
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
            taken, stop = [job], False
            while len(taken) < self.max_batch:
                try:
                    more = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                taken.append(more)
            with self._lock:
                self._held = taken
            groups: dict = {}
            alone = []
            for job in taken:
                key = batch_key(job.state, job.settings) if self.max_batch > 1 else None
                if key is not None and self.engine.cache_hit(job.state, job.settings):
                    key = None  # the prefix cache holds this prompt: the single-request path reuses it
                if key is None:
                    alone.append([job])
                else:
                    groups.setdefault(key, []).append(job)
            for group in [*groups.values(), *alone]:
                started = self._start(group)
                if len(started) == 1:
                    self._run_one(started[0])
                elif started:
                    self._run_batch(started)
            with self._lock:
                self._held = []
            if stop:
                return

    def _start(self, jobs: list[Job]) -> list[Job]:
        """The jobs not cancelled meanwhile, marked running."""
        with self._lock:
            started = [job for job in jobs if job.status == "waiting"]
            for job in started:
                job.status = "running"
        return started

    def _run_one(self, job: Job) -> None:
        start, last = time.perf_counter(), None
        try:
            for piece in self.engine.stream_chat(job.state, job.settings, reply=job.reply, cancel=job.cancelled):
                job._send("piece", piece)
        except Exception as exc:  # the request's own problem, or a bug: either way the server goes on
            last = exc
        finally:
            self._end(job, last, time.perf_counter() - start)

    def _run_batch(self, jobs: list[Job]) -> None:
        start, ended = time.perf_counter(), set()
        with self._lock:
            self.stats["batches"] += 1
            self.stats["batched"] += len(jobs)

        def finish(i: int, error: Exception | None) -> None:
            ended.add(i)
            self._end(jobs[i], error, time.perf_counter() - start)

        turns = [Turn(job.state, job.settings, job.reply, job.cancelled) for job in jobs]
        try:
            self.engine.chat_together(turns, lambda i, piece: jobs[i]._send("piece", piece), finish)
        except Exception as exc:  # a bug: every job still waiting for its end gets the error
            log.exception("a batch of %d requests failed", len(jobs))
            for i in range(len(jobs)):
                if i not in ended:
                    finish(i, exc)
        for i in range(len(jobs)):
            if i not in ended:
                finish(i, RuntimeError("generation stopped unexpectedly"))

    def _end(self, job: Job, error: Exception | None, seconds: float) -> None:
        outcome = "failed" if error is not None else "cancelled" if job.reply.finish_reason == "cancelled" else "completed"
        with self._lock:
            job.status = "done"
            self.stats[outcome] += 1
            self._seconds = 0.8 * self._seconds + 0.2 * seconds
        job.slot.release()  # before the last event, so a client that saw its answer end finds its slot free
        job._send(*(("error", error) if error is not None else ("done", None)))
