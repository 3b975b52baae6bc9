"""The server's decode loop: one thread owns the model's :class:`~edgepeft.runtime.batching.Batcher`;
requests (:class:`Job`) wait in a queue, join the running batch at the next step when they fit
(a free row, an adapter that can share the call), and leave at their end, at a stop string, or
when their client goes. Each job's text comes out through :class:`~edgepeft.runtime.text.TextStream`
as events its request handler reads from an asyncio queue. No web framework here.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from edgepeft.errors import EdgepeftError
from edgepeft.runtime.adapters import AdapterChoice
from edgepeft.runtime.decode import Sampling
from edgepeft.runtime.text import TextStream


@dataclass(frozen=True)
class Event:
    """What a job hands its handler: a piece of text, then one last event with ``finish``
    (``stop`` / ``length``) and the usage counts, or ``error``."""

    text: str = ""
    finish: str | None = None
    completion_tokens: int = 0
    error: str | None = None
    status: int = 400  # of an error: 400 the request's fault, 500 the model's


@dataclass(eq=False)
class Job:
    """One request's generation."""

    prompt: list[int]
    adapter: AdapterChoice
    max_tokens: int
    sampling: Sampling
    stop: Sequence[str]
    stop_token_ids: Sequence[int]
    stop_at_eos: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        """The client went: the engine drops the row at its next step."""
        self.cancelled = True

    def _send(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled = True


class Engine:
    """The decode thread (see the module doc).

    Args:
        model: a causal-LM :class:`~edgepeft.runtime.Model`.
        max_batch: rows decoded together (the Batcher's capacity; 1 on merged / fixed-shape
            artifacts).
        context: KV slots per row (prompt + max_tokens), see the Batcher.
    """

    def __init__(self, model, max_batch: int = 8, context: int | None = None):
        self.model = model
        self.batcher = model.batcher(max_batch, context)
        self._waiting: deque[Job] = deque()
        self._running: dict[int, tuple[Job, TextStream, int]] = {}  # slot -> (job, text, tokens sent)
        self._wake = threading.Condition()
        self._closing = False
        self.stats = {"served": 0, "cancelled": 0}  # jobs that ended, and those dropped for their client
        self._thread = threading.Thread(target=self._loop, name="edgepeft-engine", daemon=True)
        self._thread.start()

    @property
    def context(self) -> int:
        return self.batcher.context

    def submit(self, job: Job) -> None:
        """Queue ``job``; its events follow on ``job.events``."""
        with self._wake:
            if self._closing:
                raise EdgepeftError("the server is shutting down.")
            self._waiting.append(job)
            self._wake.notify()

    def close(self, timeout: float) -> bool:
        """Take no more jobs, let the queued and running ones finish (up to ``timeout`` s);
        True when all finished."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def busy(self) -> int:
        return len(self._running) + len(self._waiting)

    # ---------------------------------------------------------------- the thread
    def _loop(self) -> None:
        b = self.batcher
        while True:
            with self._wake:
                while not self._waiting and not b.rows and not self._closing:
                    self._wake.wait()
                if self._closing and not self._waiting and not b.rows:
                    return
            self._admit()
            for slot, (job, _, _) in list(self._running.items()):
                if job.cancelled:
                    self._end(slot, None)
            try:
                rows = b.step()
            except Exception as e:  # a failed run must not leave clients waiting forever
                for slot in list(self._running):
                    self._end(slot, None, f"the model failed: {e}", 500)
                continue
            for row in rows:
                self._emit(row)

    def _admit(self) -> None:
        """Join waiting jobs in order while the head fits (first come, first served)."""
        b = self.batcher
        while True:
            with self._wake:
                if not self._waiting:
                    return
                job = self._waiting[0]
                if job.cancelled:
                    self._waiting.popleft()
                    continue
                try:
                    if not b.fits(job.adapter):
                        return
                except EdgepeftError as e:
                    self._waiting.popleft()
                    job._send(Event(finish="error", error=str(e)))
                    continue
                self._waiting.popleft()
            try:
                row = b.join(job.prompt, job.adapter, job.max_tokens, job.sampling, job.stop_token_ids,
                             job.stop_at_eos)
            except EdgepeftError as e:
                job._send(Event(finish="error", error=str(e)))
                continue
            except Exception as e:  # a failed run must not stop the engine thread
                job._send(Event(finish="error", error=f"the model failed: {e}", status=500))
                continue
            self._running[row.slot] = (job, TextStream(self.model.tokenizer, job.stop), 0)
            self._emit(row)

    def _emit(self, row) -> None:
        """Send ``row``'s new text; end its job when the row ended or a stop string matched."""
        job, text, sent = self._running[row.slot]
        pieces = [text.push(t) for t in row.tokens[sent:]]
        self._running[row.slot] = (job, text, len(row.tokens))
        piece = "".join(pieces)
        if piece:
            job._send(Event(text=piece))
        if text.stopped:
            self.batcher.leave(row)
            self._end(row.slot, "stop")
        elif row.finish:
            self._end(row.slot, row.finish)

    def _end(self, slot: int, finish: str | None, error: str | None = None, status: int = 400) -> None:
        job, text, sent = self._running.pop(slot)
        row = self.batcher.rows.get(slot)
        if row is not None:
            self.batcher.leave(row)
        if finish is None and error is None:
            self.stats["cancelled"] += 1
            return  # cancelled: nobody to tell
        self.stats["served"] += 1
        rest = "" if error else text.flush()
        job._send(Event(text=rest, finish=finish or "error", completion_tokens=sent, error=error, status=status))
