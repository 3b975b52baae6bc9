"""Mixing adapters: ``{name: weight}`` -> graph feeds and KV-cache seed, input by input, by the
rule the manifest gives each input (``inputs[name]["mix"]``). numpy only.

Rules: ``cat0`` / ``cat1`` concatenate along the rank axis (axis 0 / 1); ``cat0w`` / ``cat1w`` do
the same after scaling by the weight; so ``[A_1; A_2]`` with ``[w_1 B_1 | w_2 B_2]`` computes
``sum_i w_i B_i A_i`` exactly (``B`` already carries the scale). ``sumw`` is the weighted sum;
``one`` takes a single adapter at weight 1 (inputs that do not mix linearly).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from edgepeft.contract.names import row_offset_shape
from edgepeft.errors import EdgepeftError

Key = tuple[tuple[str, float], ...]  # sorted (name, weight) pairs: a mix and its cache key


def combine(key: Key, loaded: Mapping, inputs: Mapping[str, dict], manifest: Path,
            skip: frozenset[str] = frozenset()) -> tuple[dict, list | None]:
    """The feeds and KV-cache seed of the mix ``key``.

    Args:
        key: ``((name, weight), ...)``.
        loaded: name -> adapter with ``entry``, ``graph`` (feeds) and ``prefix`` (seed or None).
        inputs: the manifest's ``inputs`` (each with its ``mix`` rule).
        manifest: the manifest file, for messages.
        skip: inputs left out (the per-row path builds its weighted inputs itself).

    Raises:
        EdgepeftError: two adapters set an input that does not mix, one of them at a weight
            other than 1, two prefixes, a prefix from a decoder prompt with weight changes, or a
            shared input one adapter sets while another relies on the graph's default.
    """
    for n, _ in key:  # a shared input one adapter leaves to the graph's default, another replaces
        for k in loaded[n].entry.get("defaults", ()):
            other = next((m for m, _ in key if k in loaded[m].graph), None)
            if other is not None:
                raise EdgepeftError(f"adapter {other!r} sets {k}, a part shared by the layers of one "
                                    f"shape, and adapter {n!r} uses the graph's default for it; "
                                    "combine them in separate calls.")
    parts: dict[str, list[tuple[str, float, np.ndarray]]] = {}
    for n, w in key:
        for k, v in loaded[n].graph.items():
            if k not in skip:
                parts.setdefault(k, []).append((n, w, v))
    feeds = {k: _mix(k, inputs[k]["mix"], group, manifest) for k, group in parts.items()}
    return feeds, _prefix(key, loaded)


def _mix(k: str, rule: str, group: list[tuple[str, float, np.ndarray]], manifest: Path) -> np.ndarray:
    """One input's feed from ``(adapter, weight, array)`` of each adapter that sets it."""
    if rule == "one":
        if len(group) > 1:
            raise EdgepeftError(f"adapters {group[0][0]!r} and {group[1][0]!r} both set {k}, "
                                "which does not mix (IA3 / DoRA / head / prompt); combine "
                                "at most one of them per call.")
        if group[0][1] != 1.0:
            raise EdgepeftError(f"adapter {group[0][0]!r} sets {k}, which does not scale "
                                "linearly; give it weight 1.")
        return group[0][2]
    if rule == "cat0":
        return np.concatenate([v for _, _, v in group], axis=0)  # (sum r, ...)
    if rule == "cat1":
        return np.concatenate([v for _, _, v in group], axis=1)  # (in, sum r)
    if rule == "cat0w":
        return np.concatenate([np.float32(w) * v for _, w, v in group], axis=0)  # (sum r, out)
    if rule == "cat1w":
        return np.concatenate([np.float32(w) * v for _, w, v in group], axis=1)  # (out, sum r)
    if rule == "sumw":
        return sum(np.float32(w) * v for _, w, v in group).astype(np.float32)
    raise EdgepeftError(f"{manifest}: input {k} has unknown mix rule {rule!r}.")


def _prefix(key: Key, loaded: Mapping) -> list | None:
    """The one KV-cache seed of the mix (a prefix is taken whole, at weight 1), or None."""
    seeded = [(n, w) for n, w in key if loaded[n].prefix is not None]
    if not seeded:
        return None
    if len(seeded) > 1:
        raise EdgepeftError(f"adapters {seeded[0][0]!r} and {seeded[1][0]!r} are both prefixes "
                            "(prefix / prompt tuning); combine at most one per call.")
    n, w = seeded[0]
    if w != 1.0:
        raise EdgepeftError(f"adapter {n!r} is a prefix (prefix / prompt tuning); give it weight 1.")
    others = [m for m, _ in key if m != n and loaded[m].graph]
    if loaded[n].entry["prefix"]["from_prompt"] and others:
        raise EdgepeftError(
            f"adapter {n!r} is prompt tuning on a decoder: its virtual tokens were run through "
            f"the base weights at export, so it cannot be combined with {others[0]!r}, which "
            "changes those weights (PEFT would run the prompt through them too).")
    return loaded[n].prefix


def weighted_inputs(rows: Mapping[str, dict]) -> frozenset[str]:
    """The inputs whose rank columns a per-row weights input weights (the manifest's ``rows``)."""
    return frozenset(k for spec in rows.values() for k in spec["inputs"])


def shared_by_rows(keys: list[Key], loaded: Mapping, inputs: Mapping[str, dict], rows: Mapping[str, dict],
                   manifest: Path, row_values: Mapping[str, dict] | None = None) -> tuple[dict, list | None]:
    """The feeds a call applies to every row of a per-row batch (row ``b`` runs the mix ``keys[b]``,
    ``()``: the base) and its KV-cache seed: every input but the per-row ones, which
    :func:`union_feeds` and :func:`row_weights` build.

    A per-row batch concatenates its adapters along each row-weighted slot's rank axis at weight 1
    (as in a mix) and the slot's per-row weights input gives row ``b`` its weight on each adapter's
    columns, zero on the others: ``y_b = x_b W^T + sum_a w_{b,a} (x_b A_a^T) B_a^T``. A scale
    with per-row offsets (the manifest's ``row_values``: IA3 and DoRA) is left at its identity and
    its offsets give row ``b`` its own value; a classification head likewise, with the head input
    fed zeros (its default is the base's head). Every other input (prompts) and the KV-cache seed
    apply to all rows alike, so the rows must agree on them.

    Raises:
        EdgepeftError: a graph without per-row inputs (rows that differ), a row whose mix does not mix (as in one
            call), or rows that need different values of an input that applies to every row
            (naming both rows, the adapters and the input).
    """
    row_values = row_values or {}
    if not rows and not row_values and len(set(keys)) > 1:  # rows alike need no per-row inputs
        raise EdgepeftError(f"{manifest}: this graph has no per-row weights (exported by an earlier "
                            "edgepeft, or for adapters with no LoRA-type branch); run rows with "
                            "different adapters in separate calls, or export the artifact again.")
    valued, weighted = {v["input"] for v in row_values.values()}, weighted_inputs(rows)
    # each row's own feeds, checked as in a call of its own (a scale of a row: its adapter's, at weight 1)
    alone = [combine(key, loaded, inputs, manifest, weighted) if key else ({}, None) for key in keys]
    alone = [({k: v for k, v in feeds.items() if k not in valued}, prefix) for feeds, prefix in alone]

    def name(b: int) -> str:
        return "+".join(f"{n}" if w == 1 else f"{n}*{w:g}" for n, w in keys[b]) or "the base"

    feeds0, prefix0 = alone[0]
    for b, (feeds, prefix) in enumerate(alone[1:], 1):
        for k in sorted(feeds.keys() | feeds0.keys()):
            if k not in feeds or k not in feeds0 or not np.array_equal(feeds[k], feeds0[k]):
                raise EdgepeftError(
                    f"row 0 ({name(0)}) and row {b} ({name(b)}) need different values of {k}, which the "
                    "graph applies to every row of a call (prompts do not vary per row"
                    + ("" if row_values else "; nor do IA3 and DoRA scales or heads in a graph exported "
                       "before edgepeft offset them per row") + "); run them in separate calls.")
        same = (prefix is None) == (prefix0 is None) and (prefix is None or all(
            k is k0 and v is v0 for (k, v), (k0, v0) in zip(prefix, prefix0)))
        if not same:
            raise EdgepeftError(f"row 0 ({name(0)}) and row {b} ({name(b)}) start from different KV-cache "
                                "prefixes (prefix / prompt tuning), which a call shares; run them in "
                                "separate calls.")
    return feeds0, prefix0


def _columns(names: Sequence[str], loaded: Mapping, spec: dict) -> list[tuple[str, int]]:
    """``[(adapter, rank)]`` of the adapters in ``names`` that feed a row-weighted slot, in order."""
    first, axis = spec["inputs"][0], spec["axis"]
    return [(n, loaded[n].graph[first].shape[axis]) for n in names if first in loaded[n].graph]


def union_feeds(names: Sequence[str], loaded: Mapping, inputs: Mapping[str, dict], rows: Mapping[str, dict],
                manifest: Path) -> dict:
    """The row-weighted inputs of a per-row batch over the adapters ``names``: each slot's
    adapters concatenated along its rank axis at weight 1 (:func:`row_weights` gives each row its
    columns). Depends only on ``names``, so a batch whose rows change keeps it."""
    feeds = {}
    for spec in rows.values():
        cols = _columns(names, loaded, spec)
        for k in spec["inputs"] if cols else ():
            feeds[k] = _mix(k, inputs[k]["mix"], [(n, 1.0, loaded[n].graph[k]) for n, _ in cols], manifest)
    return feeds


def row_weights(keys: list[Key], names: Sequence[str], loaded: Mapping, rows: Mapping[str, dict],
                row_values: Mapping[str, dict] | None = None) -> dict:
    """Each per-row weights input ``(B, 1, R)``: row ``b``'s weight on each adapter's columns of
    :func:`union_feeds` over ``names`` (its mix weight, zero for adapters it does not run); and
    each per-row offsets input ``(B, 1, width)`` a scale of ``names`` feeds: row ``b``'s adapter's
    value minus the identity (zeros when its adapters leave the scale alone)."""
    feeds = {}
    for name_rows, spec in (row_values or {}).items():
        k = spec["input"]
        setting = [n for n in names if k in loaded[n].graph]
        if not setting:
            continue
        shape = loaded[setting[0]].graph[k].shape
        row_shape = row_offset_shape(shape)
        offsets = np.zeros((len(keys), *row_shape), np.float32)  # (B, 1, width) / (B, out, in)
        for b, key in enumerate(keys):
            own = [n for n, _ in key if k in loaded[n].graph]  # at most one, at weight 1 (shared_by_rows)
            if own:
                offsets[b] = (loaded[own[0]].graph[k] - np.float32(spec["identity"])).reshape(row_shape)
            elif spec.get("fed"):  # the input's default is a value (the base's head), not the identity
                row = "+".join(n for n, _ in key) or "the base"
                raise EdgepeftError(
                    f"row {b} ({row}) runs the base model's {k}, and other rows run their adapters' own: "
                    "in one call a row's head comes from its adapter. Give that row an adapter with a head, "
                    "or run it in a separate call.")
        if spec.get("fed"):
            feeds[k] = np.full(shape, np.float32(spec["identity"]))  # the offsets carry every row's value
        feeds[name_rows] = offsets
    for name_rows, spec in rows.items():
        cols = _columns(names, loaded, spec)
        if not cols:
            continue
        weights = np.zeros((len(keys), 1, sum(r for _, r in cols)), np.float32)  # (B, 1, R)
        for b, key in enumerate(keys):
            of_row, start = dict(key), 0
            for n, r in cols:
                weights[b, 0, start:start + r] = of_row.get(n, 0.0)
                start += r
        feeds[name_rows] = weights
    return feeds
