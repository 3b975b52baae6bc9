"""The server's decode loop: one thread owns the model's :class:`~edgepeft.runtime.batching.Batcher`;
requests (:class:`Job`) wait in a queue, join the running batch at the next step when they fit
(a free row, an adapter that can share the call), and leave at their end, at a stop string, or
when their client goes. Each job's text comes out through :class:`~edgepeft.runtime.text.TextStream`
as events its request handler reads from an asyncio queue. No web framework here.

Adapters change while jobs run (:meth:`Engine.change`, :meth:`Engine.remove_adapter`): the
Batcher looks a row's adapter up by name at every step, so a change to a name waits until the
jobs submitted before it that use the name have ended, and the jobs submitted meanwhile that use
it wait until it is done. Every job runs one version of its adapters from its first token to
its last.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TypeVar

from edgepeft.errors import EdgepeftError
from edgepeft.runtime.adapters import AdapterChoice
from edgepeft.runtime.decode import Sampling
from edgepeft.runtime.text import TextStream

T = TypeVar("T")


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
    seq: int = 0  # its place in submission order (set by Engine.submit)
    ended: threading.Event = field(default_factory=threading.Event)  # set once the engine is done with it

    @property
    def uses(self) -> frozenset[str]:
        """The adapter names it runs: none (base), one, or a mix's."""
        a = self.adapter
        return frozenset([a] if isinstance(a, str) else a if isinstance(a, Mapping) else ())

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
        self._wake = threading.Condition()  # guards _waiting, _live, _held, _calls, _seq, _stopped
        self._closing = False
        self._stopped = False  # the thread has left its loop
        self._seq = 0  # jobs submitted so far
        self._live: set[Job] = set()  # submitted, not ended
        self._held: dict[str, int] = {}  # adapter name being changed -> the last job that may use it now
        self._calls: deque[tuple[Callable, Future]] = deque()  # run on the thread between two steps
        self._changing = threading.Lock()  # one adapter change at a time
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
            self._seq += 1
            job.seq = self._seq
            self._live.add(job)
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

    # ---------------------------------------------------------------- adapter changes
    def change(self, names: set[str] | frozenset[str], fn: Callable[[], T], between_steps: bool = False) -> T:
        """``fn()`` (a change to the adapters ``names``), run when no job uses them: the jobs
        submitted before it that use one of ``names`` finish first, with the adapters as they
        were; jobs submitted meanwhile that use one wait (in their place in the queue; the others
        go on) and start after it, with the adapters as ``fn`` left them. Changes run one at a
        time.

        Blocks until done (call it from a worker thread, not the event loop); returns what ``fn``
        returns and raises what it raises.

        Args:
            between_steps: run ``fn`` on the decode thread between two steps (a change the
                running batch must not meet mid-step); else on the calling thread.
        """
        names = frozenset(names)
        with self._changing:
            with self._wake:
                for n in names:
                    self._held[n] = self._seq
                users = [j for j in self._live if j.uses & names]  # all submitted before the hold
            try:
                for job in users:
                    job.ended.wait()
                return self._between_steps(fn) if between_steps else fn()
            finally:
                with self._wake:
                    for n in names:
                        self._held.pop(n, None)
                    self._wake.notify()

    def remove_adapter(self, name: str) -> None:
        """``model.remove_adapter(name)`` once the jobs using it have ended (:meth:`change`).

        Raises:
            EdgepeftError: no adapter of that name.
        """
        def remove() -> None:
            self.model.remove_adapter(name)
            # The Batcher keeps the names its busy spell's rows used, to concatenate their feeds
            # for steps whose rows differ; a removed name must leave that set, or the next such
            # step would look it up (and fail every row).
            self.batcher.forget(name)

        self.change({name}, remove, between_steps=True)

    def _between_steps(self, fn: Callable[[], T]) -> T:
        future: Future = Future()
        with self._wake:
            stopped = self._stopped or not self._thread.is_alive()
            if not stopped:
                self._calls.append((fn, future))
                self._wake.notify()
        return fn() if stopped else future.result()  # stopped: no thread, no step to meet

    def _run_calls(self) -> None:
        with self._wake:
            calls = list(self._calls)
            self._calls.clear()
        for fn, future in calls:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except Exception as e:  # the caller raises it
                    future.set_exception(e)

    def _held_back(self, job: Job) -> bool:
        """Whether ``job`` uses an adapter that is being changed and came after the change began."""
        return any(job.seq > self._held.get(n, job.seq) for n in job.uses)

    def _next(self) -> Job | None:
        """The first waiting job not held back by a change (cancelled ones are dropped on the
        way); None when there is none. Call with the lock held."""
        for job in list(self._waiting):
            if job.cancelled:
                self._waiting.remove(job)
                self._finished(job)
            elif not self._held_back(job):
                return job
        return None

    def _finished(self, job: Job) -> None:
        with self._wake:
            self._live.discard(job)
        job.ended.set()

    # ---------------------------------------------------------------- the thread
    def _loop(self) -> None:
        b = self.batcher
        while True:
            with self._wake:
                while not b.rows and not self._calls and not (self._closing and not self._waiting) and not any(
                        j.cancelled or not self._held_back(j) for j in self._waiting):
                    self._wake.wait()
                if self._closing and not self._waiting and not b.rows:
                    self._stopped = True
                    break
            self._run_calls()
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
        self._run_calls()  # a change that came as the loop ended

    def _admit(self) -> None:
        """Join waiting jobs in order while the first one fits (first come, first served; jobs
        held back by an adapter change keep their place and are passed)."""
        b = self.batcher
        while True:
            with self._wake:
                job = self._next()
                if job is None:
                    return
                try:
                    if not b.fits(job.adapter):
                        return
                except EdgepeftError as e:
                    self._waiting.remove(job)
                    job._send(Event(finish="error", error=str(e)))
                    self._finished(job)
                    continue
                self._waiting.remove(job)
            try:
                row = b.join(job.prompt, job.adapter, job.max_tokens, job.sampling, job.stop_token_ids,
                             job.stop_at_eos)
            except EdgepeftError as e:
                job._send(Event(finish="error", error=str(e)))
                self._finished(job)
                continue
            except Exception as e:  # a failed run must not stop the engine thread
                job._send(Event(finish="error", error=f"the model failed: {e}", status=500))
                self._finished(job)
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
            self._finished(job)
            return  # cancelled: nobody to tell
        self.stats["served"] += 1
        rest = "" if error else text.flush()
        job._send(Event(text=rest, finish=finish or "error", completion_tokens=sent, error=error, status=status))
        self._finished(job)
