"""Continuous batching: generations that join and leave one running batch between decode steps,
each with its own adapter (or mix), sampling, stop tokens and length, one session run per step
for all of them. numpy only.

A row joins with its prompt: the prompt runs alone into the row's KV slots (its first new token is
picked at once), then every :meth:`Batcher.step` runs all live rows in one call, with per-row
adapter weights (:meth:`~edgepeft.runtime.adapters.AdapterStore.feeds_rows`) when their
adapters differ, and picks each row's next token by its own rules. A row leaves when it ends (EOS
or one of its stop tokens, or its length) or when the caller drops it (:meth:`Batcher.leave`: a
stop string, a client gone). The server (:mod:`edgepeft.serve`) runs one ``Batcher`` in one
thread; a ``Batcher`` is not thread-safe.

The layouts that keep rows apart offer it (``slots(capacity, context)``: fused and traced
side-branch graphs). Merged artifacts (one graph per adapter) and fixed-shape targets (a fixed
batch on a sliding window) do not; :meth:`Batcher.__init__` says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from edgepeft.errors import EdgepeftError
from edgepeft.runtime.adapters import AdapterChoice
from edgepeft.runtime.decode import GREEDY, Picker, Sampling, eos_ids


@dataclass
class Row:
    """One generation in the batch: its prompt, choices, the tokens so far and how it ended
    (``finish``: None while it runs, ``"stop"`` at EOS or a stop token, ``"length"`` at
    ``max_new_tokens``; the ending token is not in ``tokens``)."""

    slot: int
    prompt: np.ndarray
    adapter: AdapterChoice
    max_new_tokens: int
    stop: frozenset[int]
    picker: Picker
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None
    logits: np.ndarray | None = None  # (V,) the logits the last token was picked from


class Batcher:
    """A running batch of up to ``capacity`` generations (see the module doc).

    Args:
        model: a side-branch causal-LM :class:`~edgepeft.runtime.Model` on a fused or traced graph.
        capacity: rows decoded together at most.
        context: KV slots per row: a row's prompt + new tokens at most (default: the model's
            ``max_length`` or the positions its graph computes, at most 1024; the fused graph keeps
            ``capacity x context`` slots).

    Merged artifacts (one graph per adapter) and fixed-shape targets cannot run rows of
    different lengths side by side: their ``Batcher`` has ``serial`` set and a capacity of 1 (one
    generation at a time; the others wait).

    Raises:
        EdgepeftError: a classifier, a bad capacity or context.
    """

    def __init__(self, model, capacity: int = 8, context: int | None = None):
        model._need("causal-lm", "a Batcher")
        if not isinstance(capacity, int) or capacity < 1:
            raise EdgepeftError(f"capacity={capacity!r}: an integer >= 1.")
        layout = None if model.merged else model._layouts[None]
        longest = model.manifest["base"].get("max_length") or getattr(layout, "positions", None) or 1024
        context = context or min(int(longest), 1024)
        if not isinstance(context, int) or context < 2:
            raise EdgepeftError(f"context={context!r}: an integer >= 2 (prompt + new tokens per row).")
        self.serial = layout is None or not hasattr(layout, "slots")
        if self.serial:  # merged graphs, fixed-shape targets: one row at a time
            capacity = 1
            self._slots = _Serial(context)
        else:
            self._slots = layout.slots(capacity, context)
        self.model, self.capacity, self.context = model, capacity, context
        self.rows: dict[int, Row] = {}  # slot -> row, the live ones
        self._union: set[str] = set()  # adapters of this busy spell's rows (see _feeds)
        self._last = None  # (rows' choices, union) -> (fixed, weights) of the last per-row step
        self.runs = 0  # decode calls so far (one per step, whatever the rows' adapters)

    # ---------------------------------------------------------------- rows
    def fits(self, adapter: AdapterChoice) -> bool:
        """Whether a row with ``adapter`` can join now: a free slot, and its adapter can share a
        call with the live rows' (prompts and prefixes must agree: see
        :func:`~edgepeft.runtime.mix.shared_by_rows`). A row that does not fit waits for rows to
        leave; an unknown adapter raises."""
        self._open(adapter)  # names checked: unknown adapters raise
        if len(self.rows) >= self.capacity:
            return False
        if self.serial:
            return True
        try:
            self.model._store.rows_agree([*(r.adapter for r in self.rows.values()), adapter])
        except EdgepeftError:
            return False
        return True

    def forget(self, name: str) -> None:
        """Drop ``name`` from the adapters this busy spell's rows used (no live row uses it any
        more: the caller removed it from the model), so later steps do not look it up."""
        self._union.discard(name)

    def join(self, prompt: Sequence[int], adapter: AdapterChoice = None, max_new_tokens: int = 32,
             sampling: Sampling = GREEDY, stop_token_ids: Sequence[int] = (), stop_at_eos: bool = True) -> Row:
        """Run ``prompt`` into a free slot and pick its first new token (in ``row.tokens``, or
        ``row.finish`` set when it ends at once).

        Raises:
            EdgepeftError: no free slot or an adapter that cannot share the batch (check
                :meth:`fits` first), an empty prompt or ids out of range, prompt + new tokens
                above ``context``.
        """
        ids = np.asarray(prompt, np.int64)
        vocab = self.model.manifest["base"]["vocab_size"]
        if ids.ndim != 1 or not len(ids) or ids.min() < 0 or ids.max() >= vocab:
            raise EdgepeftError(f"a prompt is a non-empty list of token ids in [0, {vocab}).")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise EdgepeftError(f"max_new_tokens={max_new_tokens!r}: an integer >= 1.")
        if len(ids) + max_new_tokens > self.context:
            raise EdgepeftError(f"{len(ids)} prompt tokens + {max_new_tokens} new tokens exceed the {self.context} "
                                "tokens a row holds; shorten the prompt or ask for fewer tokens.")
        if not self.fits(adapter):
            raise EdgepeftError("the batch is full, or adapter="
                                f"{adapter!r} cannot share a call with the live rows; wait for rows to leave.")
        slot = min(set(range(self.capacity)) - set(self.rows))
        row = Row(slot, ids, adapter, max_new_tokens, frozenset(eos_ids(self.model.manifest, stop_at_eos, stop_token_ids)),
                  Picker(sampling, [ids]))
        logits = self._slots.prefill(slot, *self._open(adapter), ids, max_new_tokens)  # (V,)
        if not self.rows:
            self._union.clear()
        self._union |= set([adapter] if isinstance(adapter, str) else adapter or ())
        self.rows[slot] = row
        self._take(row, logits[None])
        return row

    def leave(self, row: Row) -> None:
        """Drop ``row`` from the batch (ended or not); its slot is free for the next join."""
        if self.rows.get(row.slot) is row:
            del self.rows[row.slot]
            self._slots.free(row.slot)

    def step(self) -> list[Row]:
        """One decode call for every live row; the rows that got a token or ended (ended rows
        leave the batch). Nothing to do: an empty list."""
        live = list(self._slots.order)  # the rows of the graph batch, in order
        if not live:
            return []
        tokens = np.array([self.rows[s].tokens[-1] for s in live], np.int64)  # a live row has one
        fixed, weights = self._feeds({s: self.rows[s].adapter for s in live})
        logits = self._slots.step(fixed, weights, live, tokens)  # (n, V)
        self.runs += 1
        rows = [self.rows[s] for s in live]
        for row, x in zip(rows, logits):
            self._take(row, x[None])
        return rows

    def _take(self, row: Row, logits: np.ndarray) -> None:
        """Pick ``row``'s next token from ``logits (1, V)``; end and drop the row when it ends."""
        row.logits = logits[0]
        t = int(row.picker(logits, slice(0, 1))[0])
        if t in row.stop:
            row.finish = "stop"
        else:
            row.tokens.append(t)
            if len(row.tokens) >= row.max_new_tokens:
                row.finish = "length"
        if row.finish:
            self.leave(row)

    def _open(self, adapter: AdapterChoice) -> tuple:
        """What a row's prefill takes: its feeds and KV-cache seed (serial: its layout with them)."""
        if self.serial:
            layout, feeds, prefix = self.model._choose(adapter)
            return (layout, feeds), prefix
        return self.model._store.feeds(adapter)

    def _feeds(self, choices: dict[int, AdapterChoice]) -> tuple[dict, dict]:
        """``(fixed, weights)``: the graph feeds of a step whose rows (by slot) run ``choices``.
        Rows that agree run their adapter's own feeds; else the adapters every row of this busy
        spell has used are concatenated once (``fixed``, kept while rows come and go) and the
        small per-row weights pick each row's columns."""
        if self.serial:
            return {}, {}
        distinct = list({_key(c): c for c in choices.values()}.values())
        if len(distinct) == 1:
            return self.model._store.feeds(distinct[0])[0], {}
        order = [choices[s] for s in self._slots.order]
        key = (tuple(map(_key, order)), tuple(sorted(self._union)))
        if self._last is None or self._last[0] != key:  # rows came or went: new weights
            if self._last is not None and self._last[0][1] != key[1]:  # a new set of adapters: the
                self._last = None                                   # old concatenation goes first
                self._slots.release()
            fixed, weights, _ = self.model._store.rows_parts(order, key[1], cache=False)
            self._last = key, (fixed, weights)
        return self._last[1]


def _key(choice: AdapterChoice):
    return tuple(sorted(choice.items())) if isinstance(choice, Mapping) else choice


class _Serial:
    """One generation at a time on any layout's own decoding (merged graphs, fixed shapes)."""

    def __init__(self, context: int):
        self.context = context
        self.order: list[int] = []
        self._run = None

    def prefill(self, slot: int, chosen: tuple, prefix, ids: np.ndarray, new_tokens: int) -> np.ndarray:
        layout, feeds = chosen
        self._run = layout.decodings(feeds, prefix, ids[None], np.ones((1, len(ids)), np.int64),
                                     new_tokens)[0]
        self.order = [slot]
        return self._run.prefill()[0]

    def step(self, fixed: dict, weights: dict, live: list[int], tokens: np.ndarray) -> np.ndarray:
        return self._run.step(tokens)

    def release(self) -> None:
        pass

    def free(self, slot: int) -> None:
        self._run, self.order = None, []
