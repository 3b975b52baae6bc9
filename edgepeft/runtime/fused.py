"""Running a fused-layout graph (``edgepeft.export.fused``): right padding, one KV buffer.

The graph takes ``input_ids (B, S)``, ``seqlens_k (B,)`` (each row's total length - 1) and
``total_sequence_length`` instead of a mask and positions. Its KV cache is one buffer of M slots
per layer that is both ``past`` and ``present``: bound once with I/O binding, onnxruntime writes
each step's keys and values into it in place, so a decode step copies no cache.

:class:`FusedLayout` is the layout (:class:`~edgepeft.runtime.layout.Layout`) over such a graph.
numpy + onnxruntime only.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import onnxruntime as ort

from edgepeft.contract import past_names, present_names
from edgepeft.contract.names import row_offset_shape
from edgepeft.errors import EdgepeftError
from edgepeft.runtime.adapters import Feeding
from edgepeft.runtime.session import Opened


def right_align(ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows moved to the left edge, padding after them.

    Args:
        ids: ``(B, S)`` token ids.
        mask: ``(B, S)`` 0/1, each row's ones contiguous (left or right padding).

    Returns:
        ``(ids (B, L), lengths (B,))`` with ``L = max(lengths)``; pads are token 0.

    Raises:
        EdgepeftError: a row whose ones have a gap, or an empty row.
    """
    lengths = mask.sum(axis=1).astype(np.int64)  # (B,)
    starts = mask.argmax(axis=1)  # first 1 of each row
    for b in range(mask.shape[0]):
        if lengths[b] == 0 or not mask[b, starts[b]:starts[b] + lengths[b]].all():
            raise EdgepeftError(f"attention_mask row {b}: this artifact's fused graph needs each row's "
                                "tokens in one run (left or right padding), with at least one token.")
    width = int(lengths.max())
    out = np.zeros((ids.shape[0], width), np.int64)  # (B, L)
    for b in range(ids.shape[0]):
        out[b, :lengths[b]] = ids[b, starts[b]:starts[b] + lengths[b]]
    return out, lengths


def restore(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``(B, L, ...)`` right-padded results back to the caller's ``(B, S, ...)`` layout (padded
    positions hold copies of real ones; a causal LM's outputs there mean nothing either way)."""
    lengths, starts = mask.sum(axis=1), mask.argmax(axis=1)
    out = np.empty((mask.shape[0], mask.shape[1], *values.shape[2:]), values.dtype)
    for b in range(mask.shape[0]):
        n, s = int(lengths[b]), int(starts[b])
        out[b] = values[b, np.clip(np.arange(mask.shape[1]) - s, 0, n - 1)]
    return out


class Cache:
    """The KV buffers of one generation and the I/O binding that runs on them.

    Args:
        session: a fused-layout session.
        cache: ``[(kv_heads, head_dim)]`` per layer.
        batch: rows.
        slots: M, the buffer length (prompt + new tokens at most).
    """

    def __init__(self, session: ort.InferenceSession, cache: list[tuple[int, int]], batch: int, slots: int):
        self.session = session
        self.binding = session.io_binding()
        self.binding.bind_output("logits")  # first: get_outputs()[0]; rebinding keeps its place
        self.buffers = []  # numpy arrays the OrtValues point into: kept alive with them
        for i, (h, d) in enumerate(cache):
            for past, present in zip(past_names(i), present_names(i)):
                buf = np.zeros((batch, h, slots, d), np.float32)  # (B, H_kv, M, D)
                value = ort.OrtValue.ortvalue_from_numpy(buf)
                self.buffers.append((buf, value))
                self.binding.bind_ortvalue_input(past, value)
                self.binding.bind_ortvalue_output(present, value)
        self.slots = slots
        self._layers = len(cache)
        self._views: list[ort.OrtValue] = []  # OrtValues over the first rows (use_rows)
        self._step_ids = np.zeros((batch, 1), np.int64)  # (B, 1), rewritten in place every step
        self._seqlens = np.zeros(batch, np.int32)
        self._total = np.zeros((), np.int32)
        self._bound: Mapping | None = None
        self._step_bound = False
        self._step_logits: np.ndarray | None = None  # (B, 1, V), decode steps write here

    def use_rows(self, n: int) -> None:
        """Run on the first ``n`` rows of the buffers from now on (rows joining and leaving a
        running batch): the KV inputs and outputs are rebound to views of those rows, nothing is
        copied."""
        self._views = []
        buffers = iter(self.buffers)
        for i in range(self._layers):
            for past, present in zip(past_names(i), present_names(i)):
                view = ort.OrtValue.ortvalue_from_numpy(next(buffers)[0][:n])  # (n, H_kv, M, D), contiguous
                self._views.append(view)
                self.binding.bind_ortvalue_input(past, view)
                self.binding.bind_ortvalue_output(present, view)
        self._step_ids = np.zeros((n, 1), np.int64)
        self._seqlens = np.zeros(n, np.int32)
        self._step_logits = None
        self._step_bound = False

    def bind_adapter(self, values: Mapping[str, ort.OrtValue]) -> bool:
        """Point the adapter inputs at ``values`` (already OrtValues: nothing is copied); False
        when they already were."""
        if values is self._bound:
            return False
        for name, value in values.items():
            self.binding.bind_ortvalue_input(name, value)
        self._bound = values
        return True

    def run(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Run ``ids (B, S)`` after each row's cached tokens.

        Args:
            ids: the new tokens, right-padded.
            lengths: ``(B,)`` each row's total length once they are added.

        Returns:
            ``(B, S, V)`` logits.
        """
        if int(lengths.max()) > self.slots:
            raise EdgepeftError(f"the KV buffer holds {self.slots} tokens; this step needs {int(lengths.max())}.")
        b = self.binding
        if ids.shape[1] == 1:  # decode: inputs and logits in bound buffers, rewritten in place
            self._step_ids[:] = ids
            self._seqlens[:] = lengths - 1
            self._total[...] = int(lengths.max())
            if not self._step_bound:
                b.bind_ortvalue_input("input_ids", ort.OrtValue.ortvalue_from_numpy(self._step_ids))
                b.bind_ortvalue_input("seqlens_k", ort.OrtValue.ortvalue_from_numpy(self._seqlens))
                b.bind_ortvalue_input("total_sequence_length", ort.OrtValue.ortvalue_from_numpy(self._total))
                if self._step_logits is None:
                    self._step_logits = np.empty((ids.shape[0], 1, self._vocab()), np.float32)  # (B, 1, V)
                b.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(self._step_logits))
                self._step_bound = True
            self.session.run_with_iobinding(b)
            return self._step_logits.copy()
        b.bind_cpu_input("input_ids", np.ascontiguousarray(ids, np.int64))
        b.bind_cpu_input("seqlens_k", (lengths - 1).astype(np.int32))
        b.bind_cpu_input("total_sequence_length", np.array(int(lengths.max()), np.int32))
        b.bind_output("logits")
        self._step_bound = False
        self.session.run_with_iobinding(b)
        return b.get_outputs()[0].numpy()

    def _vocab(self) -> int:
        for out in self.session.get_outputs():
            if out.name == "logits" and isinstance(out.shape[-1], int):
                return out.shape[-1]
        raise EdgepeftError("the fused graph's logits output has no fixed vocabulary size.")


def ort_values(feeds: Mapping[str, np.ndarray]) -> dict[str, ort.OrtValue]:
    """OrtValues over ``feeds`` (CPU: they share the arrays' memory, which must stay alive)."""
    return {k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}


class FusedLayout:
    """Runs a fused-layout graph (:class:`~edgepeft.runtime.layout.Layout`; causal LMs).

    Args:
        opened: the checked session.
        cache: ``[(kv_heads, head_dim)]`` per layer.
        inputs: the manifest's adapter inputs (``{name: {shape, mix}}``); those a choice does not
            feed are bound to their rank-0 identity.
        keep: how many adapter bindings (:meth:`values`) to keep, asked on each new one.
        positions: rows of the graph's rotary tables (the manifest's ``graph.positions``): the
            longest prompt + generation it computes; None for artifacts that did not record it.
        rows: the manifest's per-row weights inputs, bound to ones ``(1, 1, 1)`` when unfed.
        row_values: the manifest's per-row offsets of the scales, bound to zeros ``(1, 1, width)``.
    """

    longest = None

    def __init__(self, opened: Opened, cache: list[tuple[int, int]], inputs: Mapping[str, dict],
                 keep: Callable[[], int], positions: int | None = None, rows: Iterable[str] = (),
                 row_values: Mapping[str, dict] | None = None):
        self.session = opened.session
        self.positions = positions
        self.cache = cache
        self.feeding = Feeding(shapes=opened.shapes, base={})
        self.identity = {k: np.zeros([d or 0 for d in v["shape"]], np.float32) for k, v in inputs.items()}
        self.identity.update({k: np.ones((1, 1, 1), np.float32) for k in rows})  # every row alike
        self.identity.update({k: np.zeros((1, *row_offset_shape(inputs[v["input"]]["shape"])), np.float32)
                              for k, v in (row_values or {}).items()})
        self._keep = keep
        self._lock = threading.Lock()
        self._values: dict[int, tuple[dict, dict]] = {}  # id(feeds) -> (feeds, OrtValues)

    def values(self, feeds: dict[str, np.ndarray]) -> dict[str, ort.OrtValue]:
        """OrtValues over ``feeds`` (an adapter's or a cached mix's arrays), made once per feeds
        object: binding them later copies nothing. Kept while the feeds object is cached."""
        with self._lock:
            hit = self._values.get(id(feeds))
            if hit is not None and hit[0] is feeds:
                return hit[1]
            # every adapter input, the unfed ones rank-0 (the identity): a reused binding keeps no
            # input of the previous choice
            values = ort_values({**self.identity, **feeds})
            self._values[id(feeds)] = (feeds, values)  # holds feeds: its id stays unique
            while len(self._values) > self._keep():
                self._values.pop(next(iter(self._values)))
            return values

    def fits(self, tokens: int, new_tokens: int = 0) -> None:
        """Refuse a call whose longest row would pass the rotary tables (onnxruntime would fail
        with a kernel error)."""
        if self.positions is not None and tokens + new_tokens > self.positions:
            what = f"{tokens} prompt tokens" + (f" + {new_tokens} new tokens" if new_tokens else "")
            raise EdgepeftError(f"{what} exceed the {self.positions} positions this fused graph computes "
                                "(the model's max_position_embeddings); shorten the prompt"
                                + (" or ask for fewer new tokens." if new_tokens else "."))

    def logits(self, feeds: dict, prefix, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        right, lengths = right_align(ids, mask)
        self.fits(int(lengths.max()))
        kv = Cache(self.session, self.cache, ids.shape[0], right.shape[1])
        kv.bind_adapter(self.values(feeds))
        return restore(kv.run(right, lengths), mask)

    def decodings(self, feeds: dict, prefix, ids: np.ndarray, mask: np.ndarray, new_tokens: int) -> list:
        return [_Decoding(self, feeds, ids, mask, new_tokens)]

    def slots(self, capacity: int, context: int) -> Slots:
        """KV slots for rows that join and leave a running batch (:class:`Slots`)."""
        return Slots(self, capacity, context)

    def classify(self, feeds: dict, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        raise EdgepeftError("fused graphs are causal LMs; classification artifacts have a traced graph.")


class _Decoding:
    """A generation on one KV buffer of prompt + new tokens, written in place."""

    def __init__(self, layout: FusedLayout, feeds: dict, ids: np.ndarray, mask: np.ndarray, new_tokens: int):
        self.rows = ids.shape[0]
        self._right, self._lengths = right_align(ids, mask)
        layout.fits(int(self._lengths.max()), new_tokens)
        self._kv = Cache(layout.session, layout.cache, ids.shape[0], self._right.shape[1] + new_tokens)
        self._kv.bind_adapter(layout.values(feeds))

    def prefill(self) -> np.ndarray:
        logits = self._kv.run(self._right, self._lengths)
        return logits[np.arange(self.rows), self._lengths - 1]  # (B, V)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        self._lengths = self._lengths + 1
        return self._kv.run(tokens[:, None], self._lengths)[:, 0]  # (B, V)


class Slots:
    """Rows that join and leave a running batch (:class:`edgepeft.runtime.batching.Batcher`): one
    KV buffer of ``capacity`` rows x ``context`` slots; the live rows are its first rows, in
    ``order``, each at its own length.

    A joining row's prompt runs alone on a KV buffer of its own length, then its keys and values
    are copied into the next row of the batch buffer; each decode step runs the live rows in one
    call. A leaving row's place is taken by the last row (one row's keys and values copied).
    """

    def __init__(self, layout: FusedLayout, capacity: int, context: int):
        layout.fits(context)
        self._layout, self.capacity, self.context = layout, capacity, context
        self._kv = Cache(layout.session, layout.cache, capacity, context)
        self.order: list[int] = []  # slot of each buffer row
        self._lengths = np.zeros(capacity, np.int64)  # (capacity,) each buffer row's tokens
        self._rows = -1  # rows the binding runs
        self._fixed: dict | None = None  # the adapter feeds bound now (their OrtValues held by the binding)
        self._weights: dict[str, np.ndarray] = {}  # per-row weights inputs, bound, rewritten in place

    def prefill(self, slot: int, feeds: dict, prefix, ids: np.ndarray, new_tokens: int) -> np.ndarray:
        """Run ``ids (S,)`` into the next buffer row, ``slot``'s from now on; the ``(V,)`` logits of
        its next token."""
        one = Cache(self._layout.session, self._layout.cache, 1, len(ids))
        one.bind_adapter(self._layout.values(feeds))
        logits = one.run(ids[None], np.array([len(ids)], np.int64))  # (1, S, V)
        row = len(self.order)
        for (big, _), (small, _) in zip(self._kv.buffers, one.buffers):
            big[row, :, :len(ids)] = small[0]  # (H_kv, S, D)
        self._lengths[row] = len(ids)
        self.order.append(slot)
        return logits[0, -1]

    def step(self, fixed: dict, weights: dict, live: list[int], tokens: np.ndarray) -> np.ndarray:
        """Append ``tokens`` to the live rows (``order``) in one call; their ``(n, V)`` logits.
        ``fixed``: the adapter feeds (bound once per object); ``weights``: per-row weights of the
        live rows (copied into bound buffers)."""
        n = len(self.order)
        if n != self._rows:
            self._kv.use_rows(n)
            self._rows = n
        self._lengths[:n] += 1
        if fixed is not self._fixed:  # bound here, not through the layout's cache: only the
            # current feeds stay alive (a busy batch's concatenations are large)
            self._kv.bind_adapter(ort_values({**self._layout.identity, **fixed}))
            self._fixed = fixed
            self._weights = {}  # rebinding set the per-row inputs to their default
        for name, w in weights.items():
            buf = self._weights.get(name)
            if buf is None or buf.shape != w.shape:
                buf = self._weights[name] = np.array(w, np.float32)
                self._kv.binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(buf))
            else:
                np.copyto(buf, w)
        return self._kv.run(tokens[:, None], self._lengths[:n])[:, 0]

    def release(self) -> None:
        """Unbind the adapter feeds (before a large new set is built, so the old can go first)."""
        if self._fixed is not None:
            self._kv.bind_adapter(ort_values(self._layout.identity))
            self._fixed, self._weights = None, {}

    def free(self, slot: int) -> None:
        row, last = self.order.index(slot), len(self.order) - 1
        if row != last:  # the last row moves into the hole
            n = int(self._lengths[last])
            for big, _ in self._kv.buffers:
                big[row, :, :n] = big[last, :, :n]
            self._lengths[row] = n
            self.order[row] = self.order[last]
        self.order.pop()
        self._lengths[last] = 0
