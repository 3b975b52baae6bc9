"""Greedy decoding, once for every layout: the loop, EOS bookkeeping, and joining the
generations of row groups back into one ``(B, S + n)`` array. numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgepeft.runtime.layout import Decoding


def eos_ids(manifest: dict, stop_at_eos: bool) -> set[int]:
    """The base model's EOS token ids (``base.eos_token_id``: none, one or a list); empty when
    generation does not stop at EOS."""
    eos = manifest["base"].get("eos_token_id") if stop_at_eos else None
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


def greedy(run: Decoding, max_new_tokens: int, eos: set[int]) -> np.ndarray:
    """The argmax token of each step until ``max_new_tokens`` or every row has hit EOS (a row
    that has repeats EOS from then on).

    Returns:
        ``(rows, n)`` int64, ``n <= max_new_tokens``.
    """
    if max_new_tokens <= 0:
        return np.zeros((run.rows, 0), np.int64)
    out = []
    last = run.prefill()  # (B, V)
    done = np.zeros(run.rows, bool)
    stop = list(eos)
    for step in range(max_new_tokens):
        nxt = last.argmax(-1).astype(np.int64)  # (B,)
        if eos:
            nxt = np.where(done, stop[0], nxt)
            done |= np.isin(nxt, stop)
        out.append(nxt[:, None])
        if done.all() or step == max_new_tokens - 1:
            break
        last = run.step(nxt)
    return np.concatenate(out, axis=1)


def generate(ids: np.ndarray, runs: Sequence[Decoding], max_new_tokens: int, eos: set[int]) -> np.ndarray:
    """``(B, S + n)``: ``ids`` followed by the greedy tokens of ``runs`` (row groups in order;
    rows past ``B`` are dropped). Groups that stop early are filled with EOS to the longest."""
    groups = [greedy(run, max_new_tokens, eos) for run in runs]
    width = max(g.shape[1] for g in groups)
    fill = next(iter(eos)) if eos else 0
    groups = [g if g.shape[1] == width else np.pad(g, ((0, 0), (0, width - g.shape[1])), constant_values=fill)
              for g in groups]
    return np.concatenate([ids, np.concatenate(groups)[:ids.shape[0]]], axis=1)  # (B, S + n)
