"""How adapters feed the fused graphs (``fused.py``, ``fused_encoder.py``): the names of the
packed groups' inputs, which groups an adapter touches, what the fused graph cannot take, and an
adapter's arrays packed as those inputs take them.

Apart from the graph builders, which import onnx: ``edgepeft adapter add`` packs an adapter for an
existing fused graph with this module alone. What the inputs compute is in ``fused.py``'s
docstring.
"""

from __future__ import annotations

import numpy as np
import torch

from edgepeft import families, kinds
from edgepeft.contract import PROMPT_INPUT, head_input_name, rows_input_name
from edgepeft.contract.features import (FUSED_BOTTLENECK, FUSED_BOTTLENECK_ACTS, FUSED_FORMS, FUSED_LOW_RANK,
                                        FUSED_SCALES)
from edgepeft.errors import EdgepeftError
from edgepeft.families.common import ACTIVATIONS, rotary_dim, rotary_positions
from edgepeft.kinds.common import SideBranch


def fused_input_name(layer: int, group: str, place: str) -> str:
    """Graph input of one packed group: ``lora.{layer}.{group}.AT (in, R)`` / ``.BT (R, out)``,
    ``scale.{layer}.{group}.in (in,)`` / ``.mag (out,)`` / ``.out (out,)``,
    ``residual.{layer}.{group}.{act}_DT (out, R)`` / ``_db (R,)`` / ``_UT (R, out)`` / ``_ub (out,)``."""
    kind = "lora" if place in FUSED_LOW_RANK else "residual" if place in FUSED_BOTTLENECK else "scale"
    return f"{kind}.{layer}.{group}.{place}"


def rank_name(name: str) -> str:
    """The rank dimension of a fused input: shared by one group's AT / BT, and by one bottleneck's
    DT / db / UT (``rank.residual.0.o.relu``)."""
    head, _, place = name.rpartition(".")
    return f"rank.{head}" + (f".{place.rpartition('_')[0]}" if place in FUSED_BOTTLENECK else "")


def lora_group_names(layer: int, group: str) -> tuple[str, str]:
    """Graph input names of one packed LoRA group: ``A^T (in, R)``, ``B^T (R, out)``."""
    return fused_input_name(layer, group, "AT"), fused_input_name(layer, group, "BT")


def rows_name(layer: int, group: str) -> str:
    """Per-row weights of one packed group's rank columns, ``lora.{layer}.{group}.rows (N, 1, R)``."""
    return rows_input_name(f"lora.{layer}.{group}")


def rows_manifest(used: list[tuple[int, str]], inputs: list[str]) -> tuple[dict[str, dict], dict[str, dict]]:
    """The manifest's ``rows`` and ``row_values`` (``inputs``: the graph's adapter inputs): each
    low-rank group's ``rows`` weights the columns of its ``AT`` (axis 1) and ``BT``; each scale
    ``s`` has per-row offsets ``s.rows`` (identity 0: a fused scale holds its value minus 1)."""
    have = set(inputs)
    rows = {rows_name(layer, group): {"inputs": list(lora_group_names(layer, group)), "axis": 1}
            for layer, group in used if lora_group_names(layer, group)[0] in have}
    values = {rows_input_name(n): {"input": n, "identity": 0.0}
              for n in inputs if n.rpartition(".")[2] in FUSED_SCALES}
    return rows, values


def places(feature: str) -> dict[str, str]:
    """``{part: fused input}`` of a feature with a fused form (see ``contract.features``)."""
    return FUSED_FORMS[kinds.feature(feature).fused]


def activation(cfg) -> str:
    return getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", "silu")


def group_table(model: torch.nn.Module) -> dict[tuple[int | str, str], list[str]]:
    """``{(layer, group): [module path, ...]}`` of every weight group of ``model``'s family
    (decoder or encoder), in graph order; each group's modules in packing order."""
    return families.family(model.config).group_table(model.config)


def positions(model: torch.nn.Module) -> int:
    """Rows of the graph's rotary tables: the longest sequence it computes (the manifest's
    ``graph.positions``, which the runtimes check a call against)."""
    return rotary_positions(families.family(model.config).text_config(model.config))


def unsupported(model: torch.nn.Module, sides: dict[str, SideBranch]) -> str | None:
    """Why the fused graph cannot compute ``model`` with these adapters exactly, or None.

    The reason is one phrase: ``model_type 'x' (...)``, ``hidden_act ...``, ``adapter 'a' has ...``.
    """
    fam = families.REGISTRY.get(model.config.model_type)
    if fam is None:
        return f"model_type {model.config.model_type!r} (the fused graph knows {', '.join(families.REGISTRY)})"
    cfg = fam.text_config(model.config)
    if activation(cfg) not in ACTIVATIONS:
        return f"hidden activation {activation(cfg)!r} (the fused graph computes {', '.join(ACTIVATIONS)})"
    why = fam.check(cfg)
    if why:
        return why
    rotary = rotary_dim(cfg)
    if rotary % 16:
        return (f"a rotary width of {rotary} per head (GroupQueryAttention rotates a multiple of 16 "
                "dimensions)")
    table = group_table(model)
    for name, side in sides.items():
        if side.head or side.prompt is not None or side.prefix:
            return f"adapter {name!r} has a prompt, prefix or classification head"
        why = layers_problem(table, name, side, "the attention and MLP projections")
        if why:
            return why
    return None


def layers_problem(table: dict[tuple[int | str, str], list[str]], name: str, side: SideBranch,
                   where: str) -> str | None:
    """Why one adapter's layers do not fit the groups of ``table`` (``where`` names them for the
    message), or None: a feature without a fused form, a module outside the groups, or scales
    that do not pack (:func:`packing_problem`)."""
    modules = {m for ms in table.values() for m in ms}
    for m, feat in side.layers:
        if kinds.feature(feat).fused is None or m not in modules:
            return f"adapter {name!r} has {m} ({feat}); the fused graph takes LoRA, DoRA and IA3 on {where}"
    return None if side.reserved else packing_problem(table, name, side)


def packing_problem(table: dict[tuple[int | str, str], list[str]], name: str, side: SideBranch) -> str | None:
    """Why one adapter's scales do not fit the packed groups, or None: a projection fed one scale
    twice, or an input scale that differs between the projections of one group (they read one
    input through one MatMul)."""
    by_module = _by_module(side)
    for mods in table.values():
        ins = []
        for m in mods:
            fed = [place for feat, _ in by_module.get(m, ()) for place in places(feat).values()
                   if place in FUSED_SCALES]
            if len(fed) != len(set(fed)):
                return f"adapter {name!r} feeds {m} one scale twice ({', '.join(fed)})"
            ins += [parts[part] for feat, parts in by_module.get(m, ())
                    for part, place in places(feat).items() if place == "in"] or [None]
        if any(v is not None for v in ins) and any(v is None or not np.array_equal(v, ins[0]) for v in ins):
            return (f"adapter {name!r} scales the inputs of {', '.join(mods)} differently; the fused "
                    "graph runs them as one MatMul on one input")
    return None


def _by_module(side: SideBranch) -> dict[str, list[tuple[str, dict[str, np.ndarray]]]]:
    """``{module: [(feature, parts), ...]}`` of one adapter."""
    out: dict[str, list] = {}
    for (m, feat), parts in side.layers.items():
        out.setdefault(m, []).append((feat, parts))
    return out


def check_supported(model: torch.nn.Module, sides: dict[str, SideBranch]) -> None:
    """Raise :func:`unsupported`'s reason, if any.

    Raises:
        EdgepeftError: the reason, with what to do.
    """
    why = unsupported(model, sides)
    if why:
        raise EdgepeftError(f"--graph fused: {why}. Export with --graph generic.")


def group_inputs(model: torch.nn.Module, sides: dict[str, SideBranch]) -> dict[tuple[int, str], tuple[str, ...]]:
    """``{(layer, group): fused inputs}`` of the groups at least one adapter touches, in graph
    order; the inputs (``AT``, ``BT``, ``in``, ``mag``, ``out``) those adapters' features feed."""
    fed: dict[str, set[str]] = {}
    for side in sides.values():
        for m, feat in side.layers:
            fed.setdefault(m, set()).update(places(feat).values())
    order = FUSED_LOW_RANK + FUSED_SCALES + FUSED_BOTTLENECK
    used = {}
    for key, mods in group_table(model).items():
        wanted = set().union(*(fed.get(m, set()) for m in mods))
        if wanted:
            used[key] = tuple(p for p in order if p in wanted)
    return used


def groups_used(model: torch.nn.Module, sides: dict[str, SideBranch]) -> list[tuple[int, str]]:
    """``(layer, group)`` pairs that at least one adapter touches, in graph order."""
    return list(group_inputs(model, sides))


def pack_adapter(model: torch.nn.Module, side: SideBranch, used: list[tuple[int, str]]) -> dict[str, np.ndarray]:
    """One adapter's arrays in the fused graph's packed inputs (:func:`fused_input_name`).

    Args:
        model: the base (its weights give each module's width).
        side: the adapter's side branch (``B`` already carries the scale).
        used: the graph's groups (:func:`groups_used`).

    Returns:
        For the groups this adapter touches: ``lora.{layer}.{group}.AT (in, R)`` / ``.BT (R,
        out_total)``, A's stacked and B's block-diagonal (zeros elsewhere), so the product is
        exact; ``scale.{layer}.{group}.in (in,)`` / ``.mag`` / ``.out (out_total,)``, each
        projection's part value minus its identity (zeros for the projections it does not scale).
    """
    table = group_table(model)
    params = dict(model.named_parameters())
    by_module = _by_module(side)
    out: dict[str, np.ndarray] = {}
    for layer, group in used:
        mods = table[(layer, group)]
        widths = [tuple(params[f"{m}.weight"].shape) for m in mods]  # (out, in) each
        low_rank: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in mods]  # per module: (A, B)
        scales = {place: [None] * len(mods) for place in FUSED_SCALES}
        bottlenecks = {act: [[] for _ in mods] for act in FUSED_BOTTLENECK_ACTS}  # per module: (down, db, up, ub)
        for j, m in enumerate(mods):
            for feat, parts in by_module.get(m, ()):
                part_of = {place: part for part, place in places(feat).items()}  # fused input -> part
                if "AT" in part_of:
                    low_rank[j].append((parts[part_of["AT"]], parts[part_of["BT"]]))
                for act in FUSED_BOTTLENECK_ACTS:
                    if f"{act}_DT" in part_of:
                        bottlenecks[act][j].append(tuple(parts[part_of[f"{act}_{p}"]] for p in ("DT", "db", "UT", "ub")))
                for place in scales.keys() & part_of.keys():
                    identity = kinds.feature(feat).part(part_of[place]).identity
                    scales[place][j] = parts[part_of[place]] - np.float32(identity)  # 0: the identity
        if any(low_rank):
            out.update(_pack_low_rank(layer, group, widths, low_rank))
        for act, per_module in bottlenecks.items():
            if any(per_module):
                out.update(_pack_bottleneck(layer, group, act, widths, per_module))
        for place, values in scales.items():
            if any(v is not None for v in values):
                out[fused_input_name(layer, group, place)] = _pack_scale(place, widths, values)
    return out


def _pack_low_rank(layer: int, group: str, widths: list[tuple[int, int]],
                   pairs: list[list[tuple[np.ndarray, np.ndarray]]]) -> dict[str, np.ndarray]:
    """``AT (in, R)``, ``BT (R, out_total)`` of one group from each module's ``(A (r, in), B (out, r))``."""
    flat = [(j, a, b) for j, ps in enumerate(pairs) for a, b in ps]
    offsets = np.cumsum([0] + [o for o, _ in widths])  # each module's first output row
    a = np.zeros((sum(x.shape[0] for _, x, _ in flat), widths[0][1]), np.float32)  # (R, in)
    b = np.zeros((int(offsets[-1]), a.shape[0]), np.float32)  # (out_total, R)
    r0 = 0
    for j, part_a, part_b in flat:
        r = part_a.shape[0]
        a[r0:r0 + r] = part_a
        b[offsets[j]:offsets[j + 1], r0:r0 + r] = part_b
        r0 += r
    name_a, name_b = fused_input_name(layer, group, "AT"), fused_input_name(layer, group, "BT")
    return {name_a: np.ascontiguousarray(a.T), name_b: np.ascontiguousarray(b.T)}  # (in, R), (R, out)


def _pack_bottleneck(layer: int, group: str, act: str, widths: list[tuple[int, int]],
                     per_module: list[list[tuple[np.ndarray, ...]]]) -> dict[str, np.ndarray]:
    """``DT (out_total, R)``, ``db (R,)``, ``UT (R, out_total)``, ``ub (out_total,)`` of one group's
    bottlenecks of activation ``act`` from each module's ``(down (r, out), down_bias (r,), up (out, r),
    up_bias (out,))``: each module's hidden units read and write only its own output columns, so the
    packed branch is exact."""
    flat = [(j, *parts) for j, ps in enumerate(per_module) for parts in ps]
    offsets = np.cumsum([0] + [o for o, _ in widths])  # each module's first output column
    total, rank = int(offsets[-1]), sum(d.shape[0] for _, d, _, _, _ in flat)
    dt, db = np.zeros((total, rank), np.float32), np.zeros(rank, np.float32)
    ut, ub = np.zeros((rank, total), np.float32), np.zeros(total, np.float32)
    r0 = 0
    for j, down, down_bias, up, up_bias in flat:
        r, cols = down.shape[0], slice(offsets[j], offsets[j + 1])
        dt[cols, r0:r0 + r], db[r0:r0 + r] = down.T, down_bias
        ut[r0:r0 + r, cols] = up.T
        ub[cols] += up_bias
        r0 += r
    return {fused_input_name(layer, group, f"{act}_{p}"): v for p, v in (("DT", dt), ("db", db), ("UT", ut), ("ub", ub))}


def _pack_scale(place: str, widths: list[tuple[int, int]], values: list[np.ndarray | None]) -> np.ndarray:
    """One group's scale input: ``in`` the projections' common ``(in,)`` (checked equal by
    :func:`unsupported`), ``mag`` / ``out`` the projections' ``(out,)`` end to end, zeros where unset."""
    if place == "in":
        return np.ascontiguousarray(values[0], np.float32)
    return np.concatenate([np.zeros(o, np.float32) if v is None else v.astype(np.float32)
                           for (o, _), v in zip(widths, values)])  # (out_total,)


def encoder_unsupported(model: torch.nn.Module, sides: dict[str, SideBranch]) -> str | None:
    """Why the fused encoder cannot compute ``model`` with these adapters exactly, or None (one
    phrase, as :func:`unsupported`)."""
    fam = families.ENCODERS.get(model.config.model_type)
    if fam is None:
        return f"model_type {model.config.model_type!r} (the fused encoder knows {', '.join(families.ENCODERS)})"
    why = fam.check(model.config)
    if why:
        return why
    table = group_table(model)
    heads = {m for m, _ in fam.head}
    for name, side in sides.items():
        if side.prefix:
            return f"adapter {name!r} has a prefix"
        stray = sorted({p.rpartition(".")[0] for p in side.head} - heads)
        if stray:
            return f"adapter {name!r} carries {stray[0]} as its head; the fused encoder's head is {', '.join(heads)}"
        why = layers_problem(table, name, side, "the attention, feed-forward and head linears")
        if why:
            return why
    return None


def encoder_adapter_arrays(model: torch.nn.Module, side: SideBranch, used: list[tuple[int | str, str]]
                   ) -> dict[str, np.ndarray]:
    """One adapter's inputs of the fused encoder: its packed groups
    (:func:`pack_adapter`), the head it carries (``head.{param}``) and its
    prompt (``prompt.embeds``)."""
    arrays = {**pack_adapter(model, side, used), **{head_input_name(p): v for p, v in side.head.items()}}
    if side.prompt is not None:
        arrays[PROMPT_INPUT] = side.prompt
    return arrays
