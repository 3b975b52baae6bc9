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
