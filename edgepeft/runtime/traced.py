"""The traced layout: one session that takes ``input_ids``, ``attention_mask``, ``position_ids``
and (causal LMs) the past keys / values, and returns logits and the present ones. Any padding;
a prefix adapter's keys / values start the cache. numpy + onnxruntime only.
"""

from __future__ import annotations

import numpy as np

from edgepeft.contract import past_names
from edgepeft.runtime.adapters import Feeding
from edgepeft.runtime.batch import positions
from edgepeft.runtime.session import Opened


class TracedLayout:
    """Runs a traced graph (:class:`~edgepeft.runtime.layout.Layout`).

    Args:
        opened: the checked session.
        cache: ``[(kv_heads, head_dim)]`` per layer (empty for classifiers).
    """

    longest = None

    def __init__(self, opened: Opened, cache: list[tuple[int, int]]):
        self.session = opened.session
        self.cache = cache
        self.feeding = Feeding(shapes=opened.shapes, base={})

    def start(self, batch: int, mask: np.ndarray, prefix) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Initial past (empty, or the adapter's prefix for every row) and the mask it needs."""
        feeds = {}
        for i, (h, d) in enumerate(self.cache):
            names = past_names(i)
            if prefix is None:
                feeds[names[0]] = feeds[names[1]] = np.zeros((batch, h, 0, d), np.float32)
            else:
                for n, v in zip(names, prefix[i]):
                    feeds[n] = np.ascontiguousarray(np.broadcast_to(v, (batch, *v.shape[1:])))
        if prefix is not None:
            p = prefix[0][0].shape[2]
            mask = np.concatenate([np.ones((batch, p), np.int64), mask], axis=1)  # (B, p + S)
        return feeds, mask

    def run(self, feeds: dict, ids: np.ndarray, mask: np.ndarray, past: dict) -> list[np.ndarray]:
        """One call: ``ids (B, S)`` after ``past``; ``mask (B, P + S)`` covers both.

        Returns:
            ``[logits (B, S, V), present key, value of layer 0, ...]``.
        """
        pos = positions(mask)[:, -ids.shape[1]:]  # (B, S)
        return self.session.run(None, {"input_ids": ids, "attention_mask": mask, "position_ids": pos,
                                       **past, **feeds})

    def logits(self, feeds: dict, prefix, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        past, mask = self.start(ids.shape[0], mask, prefix)
        return self.run(feeds, ids, mask, past)[0]

    def decodings(self, feeds: dict, prefix, ids: np.ndarray, mask: np.ndarray, new_tokens: int) -> list:
        return [_Decoding(self, feeds, prefix, ids, mask)]

    def slots(self, capacity: int, context: int) -> Slots:
        """The live rows of a running batch (:class:`Slots`)."""
        return Slots(self, capacity, context)

    def classify(self, feeds: dict, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.session.run(["logits"], {"input_ids": ids, "attention_mask": mask, **feeds})[0]

    def presents(self, outputs: list[np.ndarray]) -> dict[str, np.ndarray]:
        """The past of the next call: the present keys / values of :meth:`run`'s ``outputs``."""
        return {n: v for i in range(len(self.cache)) for n, v in zip(past_names(i), outputs[2 * i + 1:2 * i + 3])}


class _Decoding:
    """A generation on the traced graph: the past grows by one position per step."""

    def __init__(self, layout: TracedLayout, feeds: dict, prefix, ids: np.ndarray, mask: np.ndarray):
        self.rows = ids.shape[0]
        self._layout, self._feeds, self._ids = layout, feeds, ids
        self._past, self._mask = layout.start(ids.shape[0], mask, prefix)

    def prefill(self) -> np.ndarray:
        return self._run(self._ids)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        step = tokens[:, None]  # (B, 1)
        self._mask = np.concatenate([self._mask, np.ones_like(step)], axis=1)  # (B, P+1)
        return self._run(step)

    def _run(self, ids: np.ndarray) -> np.ndarray:
        outputs = self._layout.run(self._feeds, ids, self._mask, self._past)
        self._past = self._layout.presents(outputs)
        return outputs[0][:, -1]  # (B, V)


class Slots:
    """Rows that join and leave a running batch (:class:`edgepeft.runtime.batching.Batcher`) on
    the traced graph: the batch holds the live rows only, left-padded to one past length.

    A joining row's prompt runs alone (its adapter's prefix seeds its cache), then its past is
    merged into the batch's; a leaving row's past is dropped, and the columns no row uses any more
    with it. Positions follow each row's own mask, so rows at different lengths decode together.
    """

    def __init__(self, layout: TracedLayout, capacity: int, context: int):
        self._layout, self.capacity, self.context = layout, capacity, context
        self.order: list[int] = []  # slot of each batch row
        self._past: dict[str, np.ndarray] = {}  # name -> (B, H, P, D)
        self._mask = np.zeros((0, 0), np.int64)  # (B, P)

    def prefill(self, slot: int, feeds: dict, prefix, ids: np.ndarray, new_tokens: int) -> np.ndarray:
        past, mask = self._layout.start(1, np.ones((1, len(ids)), np.int64), prefix)
        outputs = self._layout.run(feeds, ids[None], mask, past)
        new = self._layout.presents(outputs)
        width = max(self._mask.shape[1], mask.shape[1])

        def left(x: np.ndarray, axis: int) -> np.ndarray:
            pad = [(0, 0)] * x.ndim
            pad[axis] = (width - x.shape[axis], 0)
            return np.pad(x, pad)

        self._past = {n: np.concatenate([left(self._past[n], 2), left(v, 2)]) if self.order else v
                      for n, v in new.items()}
        self._mask = np.concatenate([left(self._mask, 1), left(mask, 1)]) if self.order else mask
        self.order.append(slot)
        return outputs[0][0, -1]

    def step(self, fixed: dict, weights: dict, live: list[int], tokens: np.ndarray) -> np.ndarray:
        """Append ``tokens`` to the ``live`` rows (``order``) in one call, with the adapter feeds
        ``fixed`` and per-row ``weights``; their ``(n, V)`` logits."""
        self._mask = np.concatenate([self._mask, np.ones((len(live), 1), np.int64)], axis=1)  # (B, P+1)
        outputs = self._layout.run({**fixed, **weights}, tokens[:, None], self._mask, self._past)
        self._past = self._layout.presents(outputs)
        return outputs[0][:, -1]

    def release(self) -> None:
        """Nothing bound between calls here."""

    def free(self, slot: int) -> None:
        keep = np.array([s != slot for s in self.order])
        self.order = [s for s in self.order if s != slot]
        used = self._mask[keep].any(0)  # columns a remaining row attends to
        first = int(used.argmax()) if used.any() else self._mask.shape[1]
        self._mask = self._mask[keep, first:]
        self._past = {n: v[keep][:, :, first:] for n, v in self._past.items()}
