"""Side branches as graph inputs: which layers get which features, and the maths of each.

An adapted linear layer (a *slot*) composes the features the exported adapters need, in this
order (``x (B, S, in)``, ``y (B, S, out)``)::

    h = x * ia3_in.scale                                   IA3 on a feed-forward input   (in,)
    y = base(h)                                            W h + b
    y = y + dora.mag * (y - b) + (h dora.A^T) dora.B^T     DoRA: mag = g - 1, B = g s B
    y = y + (h lora.A^T) lora.B^T                          LoRA: A (r, in), B = s B (out, r)
    y = y * ia3_out.scale                                  IA3 on an output              (out,)
    y = y + up(act(down(y)))                               bottleneck adapter (per activation)

Every input has a default initializer that makes its feature the identity (rank 0, ones or
zeros), so a run that feeds nothing computes the base model. A classification head carried by
the adapters (PEFT ``modules_to_save``) becomes ``head.{param}`` inputs whose defaults are the
base model's own head.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgepeft.adapters.common import SideBranch
from edgepeft.contract import FEATURE_PARTS, head_input_name, slot_input_name

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}
SAMPLE_RANK = 7  # sample size of every dynamic rank axis in the export (>= 2, unlike other dims)


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
        mix: mixing rule, see ``edgepeft.contract.FEATURE_PARTS``.
    """

    name: str
    default: np.ndarray
    sample: np.ndarray
    dynamic: dict[int, str]
    mix: str

    def manifest(self) -> dict:
        shape = [None if i in self.dynamic else int(d) for i, d in enumerate(self.default.shape)]
        return {"shape": shape, "mix": self.mix}


def _linear_dims(m: nn.Module) -> tuple[int, int]:
    from transformers.pytorch_utils import Conv1D

    w = m.weight
    return (int(w.shape[0]), int(w.shape[1])) if isinstance(m, Conv1D) else (int(w.shape[1]), int(w.shape[0]))


def plan_slots(model: nn.Module, sides: list[SideBranch]) -> list[Slot]:
    """The union of (layer, feature) pairs the adapters feed, in the model's module order."""
    wanted: dict[str, set[str]] = {}
    for side in sides:
        for module, feature in side.layers:
            wanted.setdefault(module, set()).add(feature)
    order = list(FEATURE_PARTS)
    slots = []
    for name, m in model.named_modules():
        if name in wanted:
            in_f, out_f = _linear_dims(m)
            slots.append(Slot(name, in_f, out_f, tuple(sorted(wanted[name], key=order.index))))
    return slots


def _feature_specs(slot: Slot, rng: np.random.Generator) -> list[InputSpec]:
    i, o, r = slot.in_features, slot.out_features, SAMPLE_RANK
    m = slot.module

    def spec(feature, part, default, sample, dynamic):
        rule = dict(FEATURE_PARTS[feature])[part]
        return InputSpec(slot_input_name(feature, m, part), default.astype(np.float32),
                         sample.astype(np.float32), dynamic, rule)

    def rnd(*shape):
        return rng.standard_normal(shape) * 0.01

    out = []
    for f in slot.features:
        rank = f"rank.{f}.{m}"
        if f in ("lora", "dora"):
            out += [spec(f, "A", np.zeros((0, i)), rnd(r, i), {0: rank}),
                    spec(f, "B", np.zeros((o, 0)), rnd(o, r), {1: rank})]
            if f == "dora":
                out.append(spec(f, "mag", np.zeros(o), rnd(o), {}))
        elif f == "ia3_in":
            out.append(spec(f, "scale", np.ones(i), 1 + rnd(i), {}))
        elif f == "ia3_out":
            out.append(spec(f, "scale", np.ones(o), 1 + rnd(o), {}))
        else:  # bottleneck_<act>: down (r, out), down_bias (r,), up (out, r), up_bias (out,)
            out += [spec(f, "down", np.zeros((0, o)), rnd(r, o), {0: rank}),
                    spec(f, "down_bias", np.zeros(0), rnd(r), {0: rank}),
                    spec(f, "up", np.zeros((o, 0)), rnd(o, r), {1: rank}),
                    spec(f, "up_bias", np.zeros(o), rnd(o), {})]
    return out


def input_specs(slots: list[Slot], model: nn.Module, head_params: list[str],
                prompt_width: int | None, seed: int = 0) -> list[InputSpec]:
    """Every adapter-fed input of the graph: layer features, head parameters, the prompt.

    Args:
        slots: from :func:`plan_slots`.
        model: the base model (head defaults are its parameters).
        head_params: parameter names of the carried head, empty for none.
        prompt_width: hidden size when the graph takes an encoder prompt, else None.
        seed: for the traced sample values.
    """
    rng = np.random.default_rng(seed)
    specs = [s for slot in slots for s in _feature_specs(slot, rng)]
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

    def _in(self, feature: str, part: str) -> torch.Tensor:
        return self.feed[slot_input_name(feature, self.slot.module, part)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.slot.features
        h = x * self._in("ia3_in", "scale") if "ia3_in" in features else x
        y = self.base(h)  # (B, S, out)
        if "dora" in features:
            bias = self.base.bias
            plain = y if bias is None else y - bias  # h W^T
            y = y + self._in("dora", "mag") * plain + F.linear(F.linear(h, self._in("dora", "A")),
                                                               self._in("dora", "B"))
        if "lora" in features:
            y = y + F.linear(F.linear(h, self._in("lora", "A")), self._in("lora", "B"))  # (B, S, r) -> out
        if "ia3_out" in features:
            y = y * self._in("ia3_out", "scale")
        for f in features:
            if f.startswith("bottleneck_"):
                act = ACTIVATIONS[f.removeprefix("bottleneck_")]
                z = act(F.linear(y, self._in(f, "down"), self._in(f, "down_bias")))  # (B, S, r)
                y = y + F.linear(z, self._in(f, "up"), self._in(f, "up_bias"))
        return y


class _FedLinear(nn.Module):
    """A head linear layer whose weight and bias are graph inputs."""

    def __init__(self, name: str, has_bias: bool, feed: dict):
        super().__init__()
        self.name, self.has_bias, self.feed = name, has_bias, feed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.feed[head_input_name(f"{self.name}.weight")]
        b = self.feed[head_input_name(f"{self.name}.bias")] if self.has_bias else None
        return F.linear(x, w, b)


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


def spec_dims(specs: list[InputSpec]) -> list[dict]:
    """``dynamic_shapes`` entries for the adapter inputs: one ``Dim`` per distinct name."""
    from torch.export import Dim

    dims: dict[str, Dim] = {}
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
