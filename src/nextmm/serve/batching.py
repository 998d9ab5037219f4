"""Dynamic batching: one worker thread owns the model and decodes together whatever requests are waiting.

The server's handlers (asyncio) turn each request into a `Job` and `submit` it. The worker takes the first job
waiting and, for up to `wait_s` more, the others that arrive, up to `max_batch` of one kind: chat replies are
decoded in one `NextMM.replies(..., stream=True, stop=...)` call, drawings in one `NextMM.draw` call. Each event
of the batched decode goes to its own job's asyncio queue (`loop.call_soon_threadsafe`). A job whose client went
away, or whose time ran out, has its row put in `stop`, so it ends at once and the others go on. An exception ends
the jobs it touched, never the worker: the jobs of a failed batch that had no output yet are decoded again one by
one, so that one bad request fails alone.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from typing import Any, Literal

from nextmm.api import noise_numbers
from nextmm.errors import UserError

log = logging.getLogger("nextmm.serve")


class Job:
    """One request's work and the queue its results come back on, as (kind, value) items: ("event", chat.Event)
    as the reply is decoded, then one closing item: the "end" event itself, ("stopped", why) when the worker cut
    it short ("time"), ("images", [PIL images]) for a drawing job, or ("error", exception)."""

    def __init__(self, kind: Literal["chat", "draw"], work: Any, deadline: float, loop: asyncio.AbstractEventLoop,
                 max_new_tokens: int = 0):
        self.kind, self.work, self.deadline, self.loop, self.max_new_tokens = kind, work, deadline, loop, max_new_tokens
        self.items: asyncio.Queue = asyncio.Queue()
        self.cancelled = False  # set by the handler when its client went away; read by the worker
        self.sent = False  # worker side: something reached the client, so the job cannot be started again
        self.over = False  # worker side: its closing item was sent

    def event(self, event) -> None:
        self.sent = True
        self.over = event.kind == "end"
        self._put(("event", event))

    def close(self, kind: str, value: Any = None) -> None:
        if not self.over:
            self.over = True
            self._put((kind, value))

    def _put(self, item: tuple[str, Any]) -> None:
        try:
            self.loop.call_soon_threadsafe(self.items.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server stopped, and nobody waits for this job
            pass


class QueueTimeout(Exception):
    """A job that waited for the model longer than its request may take."""


class Batcher:
    def __init__(self, model, max_batch: int = 16, wait_s: float = 0.01):
        self.model, self.max_batch, self.wait_s = model, max_batch, wait_s
        self._jobs: queue.Queue = queue.Queue()
        self._pending: collections.deque = collections.deque()  # taken from the queue, not yet in a batch (the other kind)
        self._thread = threading.Thread(target=self._serve, name="nextmm-batcher", daemon=True)
        # what /health reports; the tests read largest_batch to see that concurrent requests were decoded together
        self.batches = self.requests = self.largest_batch = 0
        self.stopped = 0  # replies stopped before their end (a client gone, the time limit)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._jobs.put(None)
        self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        self._jobs.put(job)

    @property
    def queued(self) -> int:
        return self._jobs.qsize() + len(self._pending)

    def _take(self) -> list[Job] | None:
        """The next batch: the oldest job and the others of its kind that are waiting or arrive within wait_s."""
        if not self._pending:
            self._pending.append(self._jobs.get())
        first = self._pending[0]
        if first is None:
            return None
        ends = time.monotonic() + self.wait_s
        while sum(j is not None and j.kind == first.kind for j in self._pending) < self.max_batch:
            try:
                job = self._jobs.get(timeout=max(0.0, ends - time.monotonic()))
            except queue.Empty:
                break
            self._pending.append(job)
            if job is None:  # stopping: this batch is the last
                break
        batch = [j for j in self._pending if j is not None and j.kind == first.kind][: self.max_batch]
        for job in batch:
            self._pending.remove(job)
        return batch

    def _serve(self) -> None:
        while (batch := self._take()) is not None:
            now, live = time.monotonic(), []
            for job in batch:
                if job.cancelled:
                    job.close("stopped", "client")
                elif now > job.deadline:
                    job.close("error", QueueTimeout())
                else:
                    live.append(job)
            if live:
                self.batches += 1
                self.requests += len(live)
                self.largest_batch = max(self.largest_batch, len(live))
                self._run(live)

    def _run(self, jobs: list[Job]) -> None:
        try:
            (self._chat if jobs[0].kind == "chat" else self._draw)(jobs)
        except Exception as err:
            if len(jobs) == 1:
                if not isinstance(err, UserError):  # a UserError is the request's fault, anything else a bug
                    log.exception("a request failed in the model")
                jobs[0].close("error", err)
                return
            for job in jobs:
                if job.sent:
                    job.close("error", err)
                elif job.cancelled:
                    job.close("stopped", "client")
                elif not job.over:
                    self._run([job])

    def _chat(self, jobs: list[Job]) -> None:
        stop: set[int] = set()
        events = self.model.replies([j.work for j in jobs], max_new_tokens=[j.max_new_tokens for j in jobs], stream=True, stop=stop)
        for event in events:
            if event.row not in stop:
                jobs[event.row].event(event)
            self._cut(jobs, stop)
        for job in jobs:  # a stopped row may end without an "end" event
            job.close("stopped", "client")

    def _cut(self, jobs: list[Job], stop: set[int]) -> None:
        """Stop the rows whose client went away or whose time ran out. The worker alone touches `stop`, between the
        events, so the decode never sees it change under it."""
        now = time.monotonic()
        for row, job in enumerate(jobs):
            if row in stop or job.over:
                continue
            if job.cancelled or now > job.deadline:
                stop.add(row)
                self.stopped += 1
                job.close("stopped", "client" if job.cancelled else "time")

    def _draw(self, jobs: list[Job]) -> None:
        # each job's pictures from the noises of a call of its own, whoever it shares the batch with
        noises = [n for job in jobs for n in noise_numbers(0, len(job.work))]
        images = self.model.draw([prompt for job in jobs for prompt in job.work], noises=noises)
        start = 0
        for job in jobs:
            job.close("images", images[start : start + len(job.work)])
            start += len(job.work)
