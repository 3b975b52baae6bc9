"""Decoding, once for every layout: picking each row's next token (greedy or sampled), the loop
with its stop conditions, and joining the generations of row groups back into one ``(B, S + n)``
array. numpy only.

The next-token rules follow transformers' logits processors, in their order: repetition penalty
(over the row's prompt and generated tokens), temperature, top-k, top-p; then the argmax
(temperature 0, the default) or a draw from a ``numpy.random.Generator`` seeded once per call, so
a seed reproduces a generation.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from edgepeft.errors import EdgepeftError
from edgepeft.runtime.layout import Decoding


@dataclass(frozen=True)
class Sampling:
    """How a row's next token is chosen.

    Attributes:
        temperature: 0 picks the most likely token (greedy); above 0 draws from the softmax of the
            logits divided by it.
        top_k: draw among the k most likely tokens only (0: all).
        top_p: draw among the most likely tokens whose probabilities add up to ``top_p`` (1: all).
        repetition_penalty: tokens already in the row (prompt or generated) have their logit
            divided by it when positive, multiplied when negative (1: off; transformers' rule).
        seed: seeds the draws; None draws from fresh entropy.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        for name, ok, what in (
                ("temperature", self.temperature >= 0, ">= 0 (0: greedy)"),
                ("top_k", isinstance(self.top_k, (int, np.integer)) and self.top_k >= 0, "an integer >= 0 (0: off)"),
                ("top_p", 0 < self.top_p <= 1, "in (0, 1] (1: off)"),
                ("repetition_penalty", self.repetition_penalty > 0, "> 0 (1: off)"),
                ("seed", self.seed is None or (isinstance(self.seed, (int, np.integer)) and self.seed >= 0),
                 "an integer >= 0 or None")):
            if not ok:
                raise EdgepeftError(f"{name}={getattr(self, name)!r}: must be {what}.")

    def processed(self, logits: np.ndarray, seen: Sequence[np.ndarray] = ()) -> np.ndarray:
        """``logits (B, V)`` after the repetition penalty (``seen[b]``: row b's token ids so
        far), the temperature, top-k and top-p; removed tokens are ``-inf``. Greedy skips the
        temperature and the filters, as transformers does."""
        x = np.array(logits, np.float32, copy=True)
        if self.repetition_penalty != 1:
            for b, ids in enumerate(seen):
                ids = np.unique(ids)
                v = x[b, ids]
                x[b, ids] = np.where(v < 0, v * self.repetition_penalty, v / self.repetition_penalty)
        if self.temperature == 0:
            return x
        x /= np.float32(self.temperature)
        if 0 < self.top_k < x.shape[-1]:
            kth = np.partition(x, -self.top_k, axis=-1)[:, -self.top_k, None]  # (B, 1)
            x[x < kth] = -np.inf
        if self.top_p < 1:
            order = np.argsort(x, axis=-1, kind="stable")  # ascending, as transformers sorts
            ranked = np.take_along_axis(x, order, -1)
            cum = np.cumsum(_softmax(ranked), axis=-1)
            drop = cum <= 1 - self.top_p
            drop[:, -1] = False  # keep at least the most likely token
            np.put_along_axis(x, order, np.where(drop, -np.inf, ranked), -1)
        return x


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


GREEDY = Sampling()


class Picker:
    """Chooses each row's next token under ``sampling`` and keeps the rows' histories (for the
    repetition penalty) and the seeded generator of one call."""

    def __init__(self, sampling: Sampling, prompts: Sequence[np.ndarray]):
        self.sampling = sampling
        self.seen = [np.asarray(p, np.int64) for p in prompts] if sampling.repetition_penalty != 1 else []
        self.rng = np.random.default_rng(sampling.seed)

    def __call__(self, logits: np.ndarray, rows: slice) -> np.ndarray:
        """``(b,)`` int64 next tokens of ``logits (b, V)``, the rows ``rows`` of the batch."""
        s = self.sampling
        x = s.processed(logits, self.seen[rows]) if (s.temperature or self.seen) else logits
        if s.temperature == 0:
            nxt = x.argmax(-1).astype(np.int64)
        else:
            p = _softmax(x.astype(np.float64))  # (b, V); -inf -> 0
            u = 1 - self.rng.random(len(p))[:, None]  # (0, 1]: never the prefix of zeros
            nxt = np.minimum((np.cumsum(p, -1) < u * p.sum(-1, keepdims=True)).sum(-1), p.shape[-1] - 1)
            nxt = nxt.astype(np.int64)
        if self.seen:
            r = range(*rows.indices(len(self.seen)))
            for i, t in zip(r, nxt):
                self.seen[i] = np.append(self.seen[i], t)
        return nxt


def eos_ids(manifest: dict, stop_at_eos: bool, stop_token_ids: Sequence[int] = ()) -> set[int]:
    """The tokens that end a row: the base model's EOS (``base.eos_token_id``: none, one or a
    list) unless not ``stop_at_eos``, and ``stop_token_ids``."""
    eos = manifest["base"].get("eos_token_id") if stop_at_eos else None
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos]) | {int(t) for t in stop_token_ids}


def steps(run: Decoding, max_new_tokens: int, eos: set[int], pick: Picker, rows: slice) -> Iterator[np.ndarray]:
    """Each step's ``(rows,)`` tokens until ``max_new_tokens`` or every row has ended (a row
    that has repeats the first of ``eos`` from then on, as the JS runtime does)."""
    if max_new_tokens <= 0:
        return
    last = run.prefill()  # (B, V)
    done = np.zeros(run.rows, bool)
    stop = list(eos)
    for step in range(max_new_tokens):
        nxt = pick(last, rows)  # (B,)
        if eos:
            nxt = np.where(done, stop[0], nxt)
            done |= np.isin(nxt, stop)
        yield nxt
        if done.all() or step == max_new_tokens - 1:
            return
        last = run.step(nxt)


def generate(ids: np.ndarray, mask: np.ndarray, runs: Sequence[Decoding], max_new_tokens: int, eos: set[int],
             sampling: Sampling = GREEDY) -> np.ndarray:
    """``(B, S + n)``: ``ids`` followed by the tokens of ``runs`` (row groups in order; rows past
    ``B`` are dropped). Groups that stop early are filled with the first of ``eos``."""
    pick = Picker(sampling, [r[m == 1] for r, m in zip(ids, mask)])
    groups, start = [], 0
    for run in runs:
        rows = slice(start, start + run.rows)
        toks = list(steps(run, max_new_tokens, eos, pick, rows))
        groups.append(np.stack(toks, 1) if toks else np.zeros((run.rows, 0), np.int64))
        start += run.rows
    width = max(g.shape[1] for g in groups)
    fill = next(iter(eos)) if eos else 0
    groups = [g if g.shape[1] == width else np.pad(g, ((0, 0), (0, width - g.shape[1])), constant_values=fill)
              for g in groups]
    return np.concatenate([ids, np.concatenate(groups)[:ids.shape[0]]], axis=1)  # (B, S + n)
