"""Running a fused-layout graph (``edgepeft.export.fused``): right padding, one KV buffer.

The graph takes ``input_ids (B, S)``, ``seqlens_k (B,)`` (each row's total length - 1) and
``total_sequence_length`` instead of a mask and positions. Its KV cache is one buffer of M slots
per layer that is both ``past`` and ``present``: bound once with I/O binding, onnxruntime writes
each step's keys and values into it in place, so a decode step copies no cache.

numpy + onnxruntime only.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnxruntime as ort

from edgepeft.errors import EdgepeftError
from edgepeft.contract import past_names, present_names


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
        self._step_ids = np.zeros((batch, 1), np.int64)  # (B, 1), rewritten in place every step
        self._seqlens = np.zeros(batch, np.int32)
        self._total = np.zeros((), np.int32)
        self._bound: Mapping | None = None
        self._step_bound = False
        self._step_logits: np.ndarray | None = None  # (B, 1, V), decode steps write here

    def bind_adapter(self, values: Mapping[str, ort.OrtValue]) -> None:
        """Point the adapter inputs at ``values`` (already OrtValues: nothing is copied)."""
        if values is self._bound:
            return
        for name, value in values.items():
            self.binding.bind_ortvalue_input(name, value)
        self._bound = values

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


def logits(session: ort.InferenceSession, cache: list[tuple[int, int]], values: Mapping[str, ort.OrtValue],
           ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``(B, S, V)`` logits of every position, in the caller's padding layout (``values``: the
    adapter inputs, :func:`ort_values`)."""
    right, lengths = right_align(ids, mask)
    kv = Cache(session, cache, ids.shape[0], right.shape[1])
    kv.bind_adapter(values)
    return restore(kv.run(right, lengths), mask)


def generate(session: ort.InferenceSession, cache: list[tuple[int, int]], values: Mapping[str, ort.OrtValue],
             ids: np.ndarray, mask: np.ndarray, max_new_tokens: int, eos: set[int]) -> np.ndarray:
    """Greedy decoding; returns ``(B, S + n)``: the caller's prompt, then the new tokens."""
    right, lengths = right_align(ids, mask)
    kv = Cache(session, cache, ids.shape[0], right.shape[1] + max_new_tokens)
    kv.bind_adapter(values)
    out = [ids]
    done = np.zeros(ids.shape[0], bool)
    logits_ = kv.run(right, lengths)
    last = logits_[np.arange(ids.shape[0]), lengths - 1]  # (B, V)
    for t in range(max_new_tokens):
        nxt = last.argmax(-1).astype(np.int64)  # (B,)
        if eos:
            nxt = np.where(done, next(iter(eos)), nxt)
            done |= np.isin(nxt, list(eos))
        out.append(nxt[:, None])
        if done.all() or t == max_new_tokens - 1:
            break
        lengths = lengths + 1
        last = kv.run(nxt[:, None], lengths)[:, 0]  # (B, V)
    return np.concatenate(out, axis=1)
