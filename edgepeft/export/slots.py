"""Side branches as graph inputs: which layers get which features, and the slot wrapper.

An adapted linear layer (a *slot*) composes the features the exported adapters need. Each kind
declares its features in its own file (``edgepeft/kinds/<kind>.py``, ``FEATURES``); this module
reads those declarations and never names a kind. With today's kinds a slot computes, in order
(``x (B, S, in)``, ``y (B, S, out)``)::

    h = x * ia3_in.scale                                   IA3 on a feed-forward input   (in,)
    y = base(h)                                            W h + b
    y = y + dora.mag * (y - b) + (h dora.A^T) dora.B^T     DoRA: mag = g - 1, B = g s B
    y = y + (h lora.A^T) lora.B^T                          LoRA: A (r, in), B = s B (out, r)
    y = y + lambda_b * ((lambda_d * (h A^T)) B^T)          VeRA: A (R, in), B (out, R) shared per width
    y = y * ia3_out.scale                                  IA3 on an output              (out,)
    y = y + up(act(down(y)))                               bottleneck adapter (per activation)

Every input has a default initializer that makes its feature the identity (rank 0, ones or
zeros), so a run that feeds nothing computes the base model. A classification head carried by
the adapters (PEFT ``modules_to_save``) becomes ``head.{param}`` inputs whose defaults are the
base model's own head. A feature's shared parts (``contract.features``) are one input per layer
shape, whose default is the value most adapters have (:func:`shared_defaults`); such a feature
has a rank fixed at the largest of the adapters' (:func:`fix_ranks`).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgepeft.contract.names import row_offset_shape, rows_axis
from edgepeft.contract import head_input_name, rows_input_name, shared_input_name, slot_input_name, value_digest
from edgepeft.contract.features import Part, widths
from edgepeft.errors import EdgepeftError
from edgepeft import kinds
from edgepeft.kinds.common import SideBranch, is_conv1d

SAMPLE_RANK = 7  # sample size of every dynamic rank axis in the export (>= 2, unlike other dims)
SAMPLE_BATCH = 2  # the exporters' sample batch (causal_lm.py, encoder.py): per-row weights match it


@dataclass(frozen=True)
class Slot:
    """One adapted linear layer and the features it composes (model order)."""

    module: str
    in_features: int
    out_features: int
    features: tuple[str, ...]


@dataclass(frozen=True)
class InputSpec:
    """One adapter-fed graph input.

    Attributes:
        name: graph input name.
        default: the identity value (an initializer of the graph).
        sample: the value traced by the exporter.
        dynamic: ``{axis: dim name}`` of axes that vary per adapter (ranks, prompt length).
        mix: mixing rule, see ``edgepeft.contract.features``.
        shared: a shared part's input: its default is a value, not the identity (the manifest
            records its digest, see ``contract.names.value_digest``).
    """

    name: str
    default: np.ndarray
    sample: np.ndarray
    dynamic: dict[int, str]
    mix: str
    shared: bool = False

    def manifest(self) -> dict:
        shape = [None if i in self.dynamic else int(d) for i, d in enumerate(self.default.shape)]
        return {"shape": shape, "mix": self.mix, **({"default": value_digest(self.default)} if self.shared else {})}


def _linear_dims(m: nn.Module) -> tuple[int, int]:
    w = m.weight
    return (int(w.shape[0]), int(w.shape[1])) if is_conv1d(m) else (int(w.shape[1]), int(w.shape[0]))


def plan_slots(model: nn.Module, sides: list[SideBranch]) -> list[Slot]:
    """The union of (layer, feature) pairs the adapters feed, in the model's module order."""
    wanted: dict[str, set[str]] = {}
    for side in sides:
        for module, feature in side.layers:
            wanted.setdefault(module, set()).add(feature)
    order = list(kinds.FEATURES)  # registry order
    for feats in wanted.values():
        for f in feats:
            kinds.feature(f)  # an unknown feature is an error, never a fallthrough
    slots = []
    for name, m in model.named_modules():
        if name in wanted:
            in_f, out_f = _linear_dims(m)
            slots.append(Slot(name, in_f, out_f, tuple(sorted(wanted[name], key=order.index))))
    return slots


def part_input_name(feature: str, part: Part, slot: Slot) -> str:
    """The graph input a slot reads a part from: its own, or the shared one of its shape."""
    if part.shared:
        return shared_input_name(feature, part.name, widths(part.shape, slot.in_features, slot.out_features))
    return slot_input_name(feature, slot.module, part.name)


def fix_ranks(sides: dict[str, SideBranch]) -> tuple[dict[str, SideBranch], dict[str, int]]:
    """Zero-pad the fixed-rank (``"R"``) axes of every fixed-rank feature to the largest rank any
    adapter has on it, so one graph input shape takes them all (exact: such a feature declares
    zero padding an identity).

    Returns:
        (the sides, padded where needed; ``{feature: fixed rank}``).
    """
    fixed: dict[str, int] = {}
    for side in sides.values():
        for (_, f), parts in side.layers.items():
            r = kinds.feature(f).fixed_rank_of(parts)
            if r is not None:
                fixed[f] = max(fixed.get(f, 0), r)
    if not fixed:
        return sides, fixed
    out = {}
    for name, side in sides.items():
        layers = {}
        for (module, f), parts in side.layers.items():
            feature = kinds.feature(f)
            layers[(module, f)] = {p: pad_axis(v, feature.part(p).fixed_rank_axis, fixed.get(f))
                                   for p, v in parts.items()}
        out[name] = dataclasses.replace(side, layers=layers)
    return out, fixed


def pad_axis(v: np.ndarray, axis: int | None, size: int | None) -> np.ndarray:
    """``v`` zero-padded along ``axis`` to ``size`` (unchanged when axis is None or it has that size)."""
    if axis is None or v.shape[axis] == size:
        return v
    pad = [(0, size - v.shape[axis]) if i == axis else (0, 0) for i in range(v.ndim)]
    return np.pad(v, pad).astype(np.float32)


def shared_defaults(slots: list[Slot], arrays: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The default of every shared input of the slots: the value most adapters feed (ties: the one
    of the first adapter, in export order), so most adapter files can leave it out.

    Args:
        slots: from :func:`plan_slots`.
        arrays: ``{adapter: SideBranch.arrays()}`` (after :func:`fix_ranks`).
    """
    names = {part_input_name(f, p, slot) for slot in slots for f in slot.features
             for p in kinds.feature(f).parts if p.shared}
    out = {}
    for name in sorted(names):
        values = [a[name] for a in arrays.values() if name in a]
        counts = [sum(np.array_equal(v, w) for w in values) for v in values]
        out[name] = values[counts.index(max(counts))]
    return out


def _feature_specs(slot: Slot, rng: np.random.Generator, fixed: dict[str, int],
                   shared: dict[str, np.ndarray]) -> list[InputSpec]:
    """The inputs of one slot, each part's default its identity (a shared part's: from ``shared``)
    and its sample a nearby random value."""
    out = []
    for f in slot.features:
        for part in kinds.feature(f).parts:
            name = part_input_name(f, part, slot)
            r = fixed.get(f)
            if part.shared:
                default = shared[name]
                sample = default + rng.standard_normal(default.shape) * 0.01
            else:
                default = np.full(part.dims(slot.in_features, slot.out_features, 0, r), part.identity, np.float32)
                sample_shape = part.dims(slot.in_features, slot.out_features, SAMPLE_RANK, r)
                sample = part.identity + rng.standard_normal(sample_shape) * 0.01
            dynamic = {part.rank_axis: f"rank.{f}.{slot.module}"} if part.rank_axis is not None else {}
            out.append(InputSpec(name, default, sample.astype(np.float32), dynamic, part.mix, part.shared))
    return out


def rows_specs(slots: list[Slot], seed: int = 1) -> list[InputSpec]:
    """The per-row inputs of every slot feature that declares ``rows`` (``contract.features``): its
    weights ``{feature}.{module}.rows (N, 1, r)``, default ``(1, 1, 1)`` ones (every row alike),
    ``r`` the slot's own rank axis, so the exporter sees one shape per slot; and each scale's
    offsets ``{input}.rows (N, 1, width)``, default zeros. ``N`` is the batch axis."""
    rng = np.random.default_rng(seed)
    out = []
    for slot in slots:
        for f in slot.features:
            feature = kinds.feature(f)
            if feature.row_weighted:
                sample = 1 + rng.standard_normal((SAMPLE_BATCH, 1, SAMPLE_RANK)) * 0.1
                out.append(InputSpec(rows_input_name(f"{f}.{slot.module}"), np.ones((1, 1, 1), np.float32),
                                     sample.astype(np.float32), {0: "batch", 2: f"rank.{f}.{slot.module}"}, "rows"))
            for part in feature.row_valued:
                shape = row_offset_shape(part.dims(slot.in_features, slot.out_features, None))  # (1, width)
                sample = rng.standard_normal((SAMPLE_BATCH, *shape)) * 0.01
                out.append(InputSpec(rows_input_name(part_input_name(f, part, slot)), np.zeros((1, *shape), np.float32),
                                     sample.astype(np.float32), {0: "batch"}, "rows"))
    return out


def free_rows(proto, specs: list[InputSpec]) -> None:
    """Free the first axis of the per-row inputs from the batch's in the exported ``proto``, in
    place: give each its own name (:func:`~edgepeft.contract.names.rows_axis`), and read the batch
    size from ``input_ids`` wherever the exporter read it from them. They are traced with the
    batch's own axis (the Mul broadcasts them over it), but the graph takes ``(1, 1, r)`` too: all
    rows alike.

    Raises:
        EdgepeftError: the exporter used their shape otherwise (a graph this code does not know).
    """
    names = {s.name for s in specs if s.mix == "rows"}
    for v in proto.graph.input:
        if v.name in names:
            v.type.tensor_type.shape.dim[0].dim_param = rows_axis(v.name)
    _unbatch_row_values(proto, names)
    for node in proto.graph.node:
        if node.input and node.input[0] in names and node.op_type == "Shape":
            span = {a.name: a.i for a in node.attribute}
            if span.get("start", 0) != 0 or span.get("end") != 1:
                raise EdgepeftError(f"the exported graph reads {dict(span)} of {node.input[0]}'s shape; only "
                                    "its batch size is known to be the input_ids' own. Please report this.")
            node.input[0] = "input_ids"  # (B, S): the same first axis


def head_rows_specs(model: nn.Module, head_params: list[str], seed: int = 2) -> list[InputSpec]:
    """Per-row offsets of the classification head's parameters (``head.{param}``, whose default is
    the base's head, not an identity): ``{input}.rows``, ``(N, out, in)`` for a weight and
    ``(N, 1, out)`` for a bias, default zeros. A per-row call feeds the head inputs zeros and each
    row's head as its offsets (the manifest's ``row_values`` with ``fed``)."""
    rng = np.random.default_rng(seed)
    params = dict(model.named_parameters())
    out = []
    for p in head_params:
        shape = row_offset_shape(params[p].shape)  # (out, in) / (1, out)
        sample = rng.standard_normal((SAMPLE_BATCH, *shape)) * 0.01
        out.append(InputSpec(rows_input_name(head_input_name(p)), np.zeros((1, *shape), np.float32),
                             sample.astype(np.float32), {0: "batch"}, "rows"))
    return out


def head_row_values(head_params: list[str]) -> dict[str, dict]:
    """The manifest's ``row_values`` of the head offsets: identity 0, and ``fed``: a per-row call
    feeds the head input its identity (zeros), as its graph default is the base's head."""
    return {rows_input_name(head_input_name(p)): {"input": head_input_name(p), "identity": 0.0, "fed": True}
            for p in head_params}


def _unbatch_row_values(proto, names: set[str]) -> None:
    """Forget the first axis of the values computed from per-row inputs before any value of the
    batch joins them (``scale + offsets``, a head's offsets reshaped), in place: the exporter
    recorded it as the batch's (they were traced at the batch's size), but it is the per-row
    input's own, 1 when it is left at its default; onnxruntime plans buffers by those shapes and
    failed ("Shape mismatch attempting to re-use buffer") when a value it took for batch-sized
    was one row."""
    batch = next(d.dim_param for v in proto.graph.input if v.name == "input_ids"
                 for d in v.type.tensor_type.shape.dim[:1])
    info = {v.name: v for v in proto.graph.value_info}
    first = {v.name: (v.type.tensor_type.shape.dim[0].dim_param if v.type.tensor_type.shape.dim else "")
             for v in list(proto.graph.input) + list(proto.graph.value_info)}
    rowed = set(names)
    for node in proto.graph.node:  # topological order
        ins = [i for i in node.input if i]
        if any(i in rowed for i in ins) and not any(first.get(i) == batch and i not in rowed for i in ins):
            for o in node.output:
                rowed.add(o)
                if o in info and info[o].type.tensor_type.shape.dim:
                    info[o].type.tensor_type.shape.dim[0].Clear()  # unknown: 1 or the batch's rows


def rows_manifest(slots: list[Slot]) -> tuple[dict[str, dict], dict[str, dict]]:
    """The manifest's ``rows`` (each per-row weights input -> the inputs whose rank columns it
    weights, the first one's rank axis: ``axis``) and ``row_values`` (each per-row offsets input ->
    the scale input it offsets and that input's identity)."""
    rows, values = {}, {}
    for slot in slots:
        for f in slot.features:
            feature = kinds.feature(f)
            if feature.row_weighted:
                ranked = [p for p in feature.parts if p.rank_axis is not None]
                rows[rows_input_name(f"{f}.{slot.module}")] = {
                    "inputs": [part_input_name(f, p, slot) for p in ranked], "axis": ranked[0].rank_axis}
            for part in feature.row_valued:
                name = part_input_name(f, part, slot)
                values[rows_input_name(name)] = {"input": name, "identity": float(part.identity)}
    return rows, values


def input_specs(slots: list[Slot], model: nn.Module, head_params: list[str],
                prompt_width: int | None, seed: int = 0, fixed: dict[str, int] | None = None,
                shared: dict[str, np.ndarray] | None = None) -> list[InputSpec]:
    """Every adapter-fed input of the graph: layer features, head parameters, the prompt.

    Args:
        slots: from :func:`plan_slots`.
        model: the base model (head defaults are its parameters).
        head_params: parameter names of the carried head, empty for none.
        prompt_width: hidden size when the graph takes an encoder prompt, else None.
        seed: for the traced sample values.
        fixed: the fixed rank of each fixed-rank feature (:func:`fix_ranks`).
        shared: the default of each shared input (:func:`shared_defaults`).
    """
    rng = np.random.default_rng(seed)
    specs = list({s.name: s for slot in slots for s in _feature_specs(slot, rng, fixed or {}, shared or {})}.values())
    params = dict(model.named_parameters())
    for p in head_params:
        value = params[p].detach().float().numpy()
        sample = (value + rng.standard_normal(value.shape) * 0.01).astype(np.float32)
        specs.append(InputSpec(head_input_name(p), value.copy(), sample, {}, "one"))
    if prompt_width is not None:
        from edgepeft.contract import PROMPT_INPUT

        specs.append(InputSpec(PROMPT_INPUT, np.zeros((0, prompt_width), np.float32),
                               (rng.standard_normal((4, prompt_width)) * 0.1).astype(np.float32),
                               {0: "prompt_len"}, "one"))
    return specs


class _SlotLayer(nn.Module):
    """A linear layer plus the side-branch features of its :class:`Slot` (see module docstring)."""

    def __init__(self, base: nn.Module, slot: Slot, feed: dict):
        super().__init__()
        self.base, self.slot, self.feed = base, slot, feed

    def _parts(self, name: str) -> dict[str, torch.Tensor]:
        feature = kinds.feature(name)
        parts = {p.name: self.feed[part_input_name(name, p, self.slot)] for p in feature.parts}
        rows = rows_input_name(f"{name}.{self.slot.module}")
        if feature.row_weighted and rows in self.feed:
            parts["rows"] = self.feed[rows]  # (N, 1, r)
        for p in feature.row_valued:  # (width,) + (N, 1, width): each row its own scale
            offsets = self.feed.get(rows_input_name(part_input_name(name, p, self.slot)))
            if offsets is not None:
                parts[p.name] = parts[p.name] + offsets
        return parts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # (B, in), a pooler or head dense: as (B, 1, in), so per-row inputs (N, 1, w) stay per row
            return self.forward(x.unsqueeze(1)).squeeze(1)
        feats = sorted((kinds.feature(f) for f in self.slot.features), key=lambda f: f.order)  # stable
        h = x
        for f in feats:
            if f.on_input is not None:
                h = f.on_input(h, self._parts(f.name))
        y = self.base(h)  # (B, S, out)
        for f in feats:
            if f.on_output is not None:
                y = f.on_output(y, h, self.base, self._parts(f.name))
        return y


class _FedLinear(nn.Module):
    """A head linear layer whose weight and bias are graph inputs."""

    def __init__(self, name: str, has_bias: bool, feed: dict):
        super().__init__()
        self.name, self.has_bias, self.feed = name, has_bias, feed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.feed[head_input_name(f"{self.name}.weight")]  # (out, in)
        b = self.feed[head_input_name(f"{self.name}.bias")] if self.has_bias else None  # (out,)
        w_rows = self.feed.get(rows_input_name(head_input_name(f"{self.name}.weight")))  # (N, out, in)
        if w_rows is None:
            return F.linear(x, w, b)
        # x W^T + b + x W_rows^T + b_rows: every intermediate has the batch's rows (N is 1 or B)
        x3 = x if x.dim() == 3 else x.unsqueeze(1)  # (B, S, in)
        y = F.linear(x3, w, b) + torch.matmul(x3, w_rows.transpose(-1, -2))  # (B, S, out)
        if b is not None:
            y = y + self.feed[rows_input_name(head_input_name(f"{self.name}.bias"))]  # (N, 1, out)
        return y if x.dim() == 3 else y.squeeze(1)


def with_side_branches(model: nn.Module, slots: list[Slot], head_params: list[str], feed: dict) -> nn.Module:
    """A copy of ``model`` with slot layers wrapped and head linears fed from ``feed`` (composition).

    Raises:
        ValueError: a head parameter that does not belong to an ``nn.Linear``.
    """
    model = copy.deepcopy(model)
    for slot in slots:
        parent_name, _, child = slot.module.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, _SlotLayer(getattr(parent, child), slot, feed))
    for module in sorted({p.rpartition(".")[0] for p in head_params}):
        layer = model.get_submodule(module)
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"head module {module} is a {type(layer).__name__}, not nn.Linear")
        parent_name, _, child = module.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _FedLinear(module, layer.bias is not None, feed))
    return model


def spec_dims(specs: list[InputSpec], known: dict | None = None) -> list[dict]:
    """``dynamic_shapes`` entries for the adapter inputs: one ``Dim`` per distinct name
    (``known``: the exporter's own, e.g. ``{"batch": Dim}`` for per-row weights)."""
    from torch.export import Dim

    dims: dict[str, Dim] = dict(known or {})
    out = []
    for s in specs:
        out.append({axis: dims.setdefault(name, Dim(name.replace(".", "_"))) for axis, name in s.dynamic.items()}
                   or None)
    return out


def add_defaults(proto, specs: list[InputSpec]):
    """Give every adapter input its identity value as an initializer (which makes it optional)."""
    import onnx

    for s in specs:
        proto.graph.initializer.append(onnx.numpy_helper.from_array(s.default, s.name))
    return proto


def dynamo_export(wrapped: nn.Module, args: tuple, dynamic: dict, input_names: list[str],
                  output_names: list[str], opset: int | None, specs: list[InputSpec], model_type: str):
    """``torch.onnx.export(dynamo=True)`` with quiet logs, readable failures and input defaults.

    Raises:
        EdgepeftError: the exporter failed (first line of its message, and what to do).
    """
    import logging
    import warnings

    from edgepeft.errors import EdgepeftError

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # e.g. "torchvision is not installed"
        try:
            program = torch.onnx.export(wrapped, args, dynamo=True, dynamic_shapes=dynamic,
                                        input_names=input_names, output_names=output_names,
                                        opset_version=opset, optimize=True, verbose=False)
        except Exception as e:  # torch.export / onnxscript raise many types; keep the first line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise EdgepeftError(
                f"model_type {model_type!r}: torch.onnx.export (dynamo) failed: {first} This model "
                "family does not export with the pinned torch/transformers; see the README's list "
                "of tested families.") from e
    return add_defaults(program.model_proto, specs)
