"""One worker thread runs the engine; requests wait for it in a bounded queue and decode together.

    scheduler = Scheduler(engine, max_queue=16, max_batch=8)
    slot = scheduler.admit()                 # QueueFull when 16 requests are already in (429 + Retry-After)
    job = scheduler.submit(slot, state, settings)   # the job owns the slot from here on
    async for piece in job.pieces(): ...     # job.reply holds the usage and finish reason afterwards
    reply = await scheduler.submit(slot, state, settings, stream=False).result()   # the whole answer at once
    job.cancel()                             # the client went away: stop generating, give the slot back

    for piece in scheduler.stream(state, settings):   # the same from a thread without an event loop (web page)
        ...

A slot counts a request from its admission (before its images are decoded) until the engine is done with
it. A job cancelled while it waits gives its slot back at once and never runs; one cancelled while it runs
stops at its next token. The event loop that submitted the jobs stays free (health checks answer during a
generation).

Continuous batching: the worker keeps one decode Batch (chat/decode.py) of up to max_batch answers. Between two
decoding steps it takes every waiting job there is room for; they join together (their images encoded in one
call, their prompts prefilled in one forward, each reusing the prefix cache as far as it holds its prompt) when
nothing runs, when they fill the batch or are at least as many as the running answers, or after wait_steps
steps (`_ready_to_join`: with 8 clients this took the toy model's server from ~96 to ~110 requests/s); an
answer that is done leaves at once, and its client gets its end and its slot back. Each answer keeps its own
sampling settings, seed, stop strings, token limit, stream and cancellation, and greedy answers are those of the
same request alone. max_batch 1 answers one request at a time. A newcomer's prefill holds up the others' next
token (no chunked prefill). The events of a step go to the event loop together (one wake-up per step).
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections.abc import AsyncIterator

from ..chat.decode import Batch
from ..chat.engine import ChatEngine, ChatState, GenerationSettings, PrefixCache, Reply

log = logging.getLogger("seechat")

WAIT_STEPS = 16  # the most decoding steps a newcomer waits for others before it joins a running batch


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
    """One request's turn on the engine, and the events it sends back to the event loop (or, with loop=None, to
    a plain queue that a thread reads: Scheduler.stream)."""

    def __init__(self, scheduler: "Scheduler", slot: Slot, state: ChatState, settings: GenerationSettings,
                 reply: Reply | None = None, loop="running", stream: bool = True):
        self.state, self.settings, self.slot = state, settings, slot
        self.stream = stream
        """False: no text pieces are sent, only the end (the whole text is in `reply`)."""
        self.reply = reply if reply is not None else Reply()
        self.cancelled = threading.Event()
        self.status = "waiting"  # -> running -> done, or waiting -> abandoned
        self.started = time.perf_counter()
        self.batched = False
        """Whether it decoded beside another answer (the stats' `batched`)."""
        self._scheduler = scheduler
        self._loop = asyncio.get_running_loop() if loop == "running" else loop
        self._events = asyncio.Queue() if self._loop is not None else queue.Queue()

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
        if kind == "piece" and not self.stream:
            return
        if self._loop is None:
            self._events.put((kind, value))
        elif threading.current_thread() is self._scheduler._thread:
            self._scheduler._outbox.append((self, kind, value))  # sent with the rest of this step's (_flush)
        else:
            _deliver(self._loop, [(self, kind, value)])


def _deliver(loop, events: list) -> None:
    """Hand events to their jobs' queues on `loop`, in one wake-up of the loop (or to an engine process's outlet,
    which sends them to the serving process: engine_process.py)."""
    if hasattr(loop, "deliver"):
        loop.deliver(events)
        return

    def put() -> None:
        for job, kind, value in events:
            job._events.put_nowait((kind, value))

    try:
        loop.call_soon_threadsafe(put)
    except RuntimeError:  # the event loop is gone (server shutting down): nobody listens any more
        for job, _, _ in events:
            job.cancelled.set()


def _deliver_all(events: list) -> None:
    """`_deliver` events of several jobs: one call per event loop (or outlet) they go to."""
    by_loop: dict = {}
    for event in events:
        by_loop.setdefault(event[0]._loop, []).append(event)
    for loop, some in by_loop.items():
        _deliver(loop, some)


class Admission:
    """The bounded queue's door, shared by Scheduler and EngineProcess: at most `max_queue` requests in; the rest
    get QueueFull with a Retry-After from the running average of seconds per request (`_seconds`). It also holds
    the counters /health shows."""

    def __init__(self, max_queue: int, max_batch: int):
        if max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.max_queue, self.max_batch = max_queue, max_batch
        self.stats = {"completed": 0, "cancelled": 0, "failed": 0, "rejected": 0, "batches": 0, "batched": 0}
        self._lock = threading.Lock()  # Slot takes it to count `_in`
        self._in = 0
        self._seconds = 1.0  # a running average of seconds per request, for Retry-After

    def admit(self) -> Slot:
        with self._lock:
            if self._in >= self.max_queue:
                self.stats["rejected"] += 1
                per = self._seconds / max(1, min(self.max_batch, self._in))  # a batch answers several at once
                raise QueueFull(max(1, min(60, math.ceil(per * self._in))))
            self._in += 1
        return Slot(self)

    def _count_end(self, failed: bool, reply, seconds: float | None) -> None:
        """Count how a request ended (the caller holds `_lock`); its seconds go into the running average."""
        self.stats["failed" if failed else "cancelled" if reply.finish_reason == "cancelled" else "completed"] += 1
        if seconds:
            self._seconds = 0.8 * self._seconds + 0.2 * seconds


class Scheduler(Admission):
    """Runs jobs on one engine, up to `max_batch` at once, with at most `max_queue` requests in (running or waiting)."""

    def __init__(self, engine: ChatEngine, max_queue: int = 16, max_batch: int = 1, wait_steps: int = WAIT_STEPS,
                 prefix_cache_mb: float = 0.0):
        """prefix_cache_mb > 0 gives an engine without a prefix cache one of that size (the server's)."""
        super().__init__(max_queue, max_batch)
        if wait_steps < 0:
            raise ValueError("wait_steps must be >= 0")
        if prefix_cache_mb > 0 and engine.prefix_cache is None and engine.reuse_cache:
            engine.prefix_cache = PrefixCache(int(prefix_cache_mb * 2**20))
        self.engine, self.wait_steps = engine, wait_steps
        self._held: list[Job] = []  # taken from the queue by the worker, running or about to
        self._together = False  # whether the last step decoded two or more answers
        self._jobs: queue.Queue = queue.Queue()
        self._outbox: list = []  # events the worker made since its last _flush: (job, kind, value)
        self._thread = threading.Thread(target=self._work, name="seechat-engine", daemon=True)
        self._thread.start()

    # -- the request side (event loop) ------------------------------------------------------------------
    def submit(self, slot: Slot, state: ChatState, settings: GenerationSettings, stream: bool = True) -> Job:
        """Queue a turn; with stream=False its pieces are not sent (await `job.result()` for the reply)."""
        job = Job(self, slot, state, settings, stream=stream)
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

    def stream(self, state: ChatState, settings: GenerationSettings, reply: Reply | None = None):
        """Admit and run one turn from a thread without an event loop (the web page): yields its text pieces.
        Raises QueueFull when the queue is full, and what the engine raised; closing the generator cancels it."""
        slot = self.admit()
        job = Job(self, slot, state, settings, reply=reply, loop=None)
        self._jobs.put(job)
        done = False
        try:
            while True:
                kind, value = job._events.get()
                if kind == "piece":
                    yield value
                elif kind == "error":
                    done = True
                    raise value
                else:
                    done = True
                    return
        finally:
            if not done:
                job.cancel()

    # -- the worker thread ------------------------------------------------------------------------------
    def _work(self) -> None:
        batch, stopping = Batch(self.engine.model, self.max_batch), False
        jobs: dict[int, Job] = {}  # id(row) -> its job
        pending: list[Job] = []  # taken, waiting to join
        waited = 0  # steps the oldest of them has waited
        while True:
            if not batch.rows and not pending:
                if stopping:
                    return
                job = self._jobs.get()  # idle: wait for work
                if job is None:
                    return
                pending.append(self._take(job))
            with self.engine.lock:
                while len(pending) < batch.room:  # everything waiting that fits joins before the next step
                    try:
                        more = self._jobs.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        stopping = True
                        break
                    pending.append(self._take(more))
                if pending and self._ready_to_join(batch, pending, waited, stopping):
                    taken, pending, waited = pending, [], 0
                    self._join(batch, taken, jobs)
                    self._flush()  # the newcomers' first tokens go out before the next step
                elif pending:
                    waited += 1
                if not batch.rows:
                    continue
                self._count_batched([jobs[id(r)] for r in batch.rows])
                try:
                    batch.step()
                except Exception as exc:  # a bug or out of memory: every answer in the batch gets the error
                    log.exception("a decoding step of %d answers failed", len(batch.rows))
                    for row in batch.fail_all():
                        self._end(jobs.pop(id(row)), exc)
                self._flush()

    def _ready_to_join(self, batch: Batch, pending: list[Job], waited: int, stopping: bool) -> bool:
        """Whether the waiting jobs join now. A join costs one vision call and one prefill forward, nearly alike for
        one request or eight on a small model, so newcomers to a running batch wait for company (as TGI's router
        does with waiting_served_ratio and max_waiting_tokens): they join when nothing runs, when they fill the
        batch, when they are at least as many as the running answers, or after `wait_steps` decoding steps."""
        return (not batch.rows or len(pending) >= batch.room or len(pending) >= len(batch.rows)
                or waited >= self.wait_steps or stopping)

    def _flush(self) -> None:
        """Send the events of the last step: one wake-up per event loop, not one per piece of text (on a busy
        server, waking the loop for every token of every answer cost a sixth of the worker's time)."""
        events, self._outbox = self._outbox, []
        _deliver_all(events)

    def _take(self, job: Job) -> Job:
        with self._lock:
            self._held.append(job)  # counted as running from here (it may wait for the engine's lock)
        return job

    def _join(self, batch: Batch, taken: list[Job], jobs: dict) -> None:
        """Begin the taken jobs' turns and let them join the batch together: their new images go through the
        vision expert in one call and their prompts are prefilled in one forward (what makes many clients
        cheaper per request than one). A job whose own request fails (context overflow, a bad image) gets its
        error; the others go on."""
        rows = []
        for job in taken:
            with self._lock:
                if job.status != "waiting":  # cancelled while it waited
                    self._held.remove(job)
                    continue
                job.status = "running"
            try:
                row = self.engine.begin(job.state, job.settings, reply=job.reply, cancel=job.cancelled,
                                        on_piece=self._sender(job),
                                        on_finish=lambda row: self._end(jobs.pop(id(row)), None), encode=False)
            except Exception as exc:
                self._end(job, exc)
                continue
            jobs[id(row)] = job
            job.started = time.perf_counter()
            rows.append(row)
        if not rows:
            return
        try:
            self.engine.encode(rows)
            batch.join(rows)
        except Exception as exc:  # a bug or out of memory while prefilling: these requests fail, the batch goes on
            log.exception("prefilling %d requests failed", len(rows))
            for row in rows:
                if id(row) in jobs and not row.done:
                    self._end(jobs.pop(id(row)), exc)

    @staticmethod
    def _sender(job: Job):
        """What gets a job's text pieces: none for a job that wants the whole answer (decoded once, at its end)."""
        return (lambda text: job._send("piece", text)) if job.stream else None

    def _count_batched(self, running: list[Job]) -> None:
        """Stats: `batches` counts the times two or more answers began decoding together (one count until the
        batch is down to one answer again), `batched` the answers that decoded beside another."""
        with self._lock:
            if len(running) < 2:
                self._together = False
                return
            if not self._together:
                self.stats["batches"] += 1
                self._together = True
            for job in running:
                if not job.batched:
                    job.batched = True
                    self.stats["batched"] += 1

    def _end(self, job: Job, error: Exception | None) -> None:
        seconds = time.perf_counter() - job.started
        with self._lock:
            job.status = "done"
            self._count_end(error is not None, job.reply, seconds)
            if job in self._held:
                self._held.remove(job)
        job.slot.release()  # before the last event, so a client that saw its answer end finds its slot free
        job._send(*(("error", error) if error is not None else ("done", None)))
