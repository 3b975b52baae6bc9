"""PEFT IA3: a learned per-feature scale ``l`` on chosen linear layers.

Attention-like layers scale the output, bias included: ``y = (x W^T + b) * l`` with ``l (out,)``.
Feed-forward layers (``feedforward_modules``) scale the input: ``y = (x * l) W^T + b``, ``l (in,)``.
Merged: ``W' = diag(l) W, b' = l * b`` or ``W' = W diag(l)`` — exactly what PEFT's merge does.

Same names as every kind module: ``read``, ``merge``, ``side``, ``manifest_entry``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgepeft.kinds.common import (Reference, SideBranch, TrainSpec, config_names, head_to_numpy, is_conv1d,
                                   is_linear, merge_head, model_type, module_names_summary, peft_add, peft_key,
                                   peft_load, peft_select, peft_task_type, read_tensors, split_head)
from edgepeft.contract.features import Feature, Part
from edgepeft.errors import EdgepeftError

KIND = "ia3"
NAMES = (KIND,)
MERGEABLE = True

FEATURES = (
    # scale (in,) / (out,), or (N, 1, width) per row (``rows``: each row of a batch its own scale)
    Feature("ia3_in", (Part("scale", ("in",), 1.0, "one"),), order=10,
            on_input=lambda h, p: h * p["scale"], fused="in_scale", rows=True),  # feed-forward layers: scale the input
    Feature("ia3_out", (Part("scale", ("out",), 1.0, "one"),), order=40,
            on_output=lambda y, h, base, p: y * p["scale"], fused="out_scale", rows=True),  # other layers: the output
)


@dataclass(frozen=True)
class Ia3Module:
    """One scaled layer: ``scale`` is ``(in,)`` when ``feedforward`` else ``(out,)``."""

    scale: torch.Tensor
    feedforward: bool
    transposed: bool


@dataclass(frozen=True)
class Ia3Adapter:
    """An IA3 adapter read from a PEFT directory and checked against a base model."""

    name: str
    source: Path
    weights_file: Path
    modules: dict[str, Ia3Module]
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    kind: str = KIND


def read(name: str, adapter_dir: Path, config: dict, model: nn.Module,
         task: str = "causal-lm") -> Ia3Adapter:
    """Read a PEFT IA3 directory (``ia3_l`` per layer) and check it against ``model``.

    Raises:
        EdgepeftError: weights for modules the base lacks or of the wrong size, NaN/Inf, no tensors.
    """
    weights_file, tensors = read_tensors(adapter_dir)
    tensors, head = split_head(tensors, config, model, weights_file, task)
    ff_names = config_names(config, "feedforward_modules", adapter_dir / "adapter_config.json")
    named = {n: m for n, m in model.named_modules() if is_linear(m)}
    modules = {}
    for key, t in tensors.items():
        body = peft_key(key)
        if not body.endswith(".ia3_l"):
            raise EdgepeftError(f"{weights_file}: tensor {key!r} is not an IA3 vector (ia3_l); "
                                "edgepeft exports IA3 on nn.Linear / Conv1D layers only.")
        mod = body[: -len(".ia3_l")]
        if mod not in named:
            raise EdgepeftError(f"{weights_file}: weights for {mod!r}, which the base model does not "
                                f"have as a linear layer: this adapter was made for another base. "
                                f"Linear layers: {module_names_summary(list(named))}.")
        base = named[mod]
        transposed = is_conv1d(base)
        w = base.weight.T if transposed else base.weight  # (out, in)
        # PEFT stores (1, in) for feed-forward layers and (out, 1) otherwise.
        ff = tuple(t.shape) == (1, w.shape[1]) and (
            any(mod == f or mod.endswith("." + f) for f in ff_names) or tuple(t.shape) != (w.shape[0], 1))
        if not ff and tuple(t.shape) != (w.shape[0], 1):
            raise EdgepeftError(f"{weights_file}: {mod}: ia3_l has shape {tuple(t.shape)}, expected "
                                f"({w.shape[0]}, 1) or (1, {w.shape[1]}) for feed-forward layers.")
        vec = t.float().reshape(-1)
        if not torch.isfinite(vec).all():
            raise EdgepeftError(f"{weights_file}: {mod}: ia3_l contains NaN or Inf.")
        modules[mod] = Ia3Module(vec, ff, transposed)
    if not modules:
        raise EdgepeftError(f"{weights_file}: holds no ia3_l tensors.")
    return Ia3Adapter(name, adapter_dir, weights_file, dict(sorted(modules.items())), head)


@torch.no_grad()
def merge(model: nn.Module, adapter: Ia3Adapter, weight: float = 1.0) -> None:
    """Fold the scales into the weights (and, for output scales, the bias), in place.

    Raises:
        EdgepeftError: a weight other than 1 (a scaled IA3 vector has no PEFT meaning).
    """
    if weight != 1.0:
        raise EdgepeftError(f"adapter {adapter.name!r} is IA3: it merges with weight 1 only.")
    named = dict(model.named_modules())
    for mod, m in adapter.modules.items():
        layer = named[mod]
        w = layer.weight  # Linear (out, in); Conv1D (in, out)
        along_out = not m.feedforward
        if along_out:
            w.mul_(m.scale[None, :] if m.transposed else m.scale[:, None])
            if layer.bias is not None:
                layer.bias.mul_(m.scale)
        else:
            w.mul_(m.scale[:, None] if m.transposed else m.scale[None, :])
    merge_head(model, adapter.head)


def side(adapter: Ia3Adapter, model: nn.Module) -> SideBranch:
    """Graph inputs ``ia3_in.{module}.scale (in,)`` or ``ia3_out.{module}.scale (out,)``."""
    layers = {(mod, "ia3_in" if m.feedforward else "ia3_out"):
              {"scale": np.ascontiguousarray(m.scale.numpy(), dtype=np.float32)}
              for mod, m in adapter.modules.items()}
    return SideBranch(layers=layers, head=head_to_numpy(adapter.head))


def reserve(kind: str, modules: list[str], model: nn.Module) -> dict[str, tuple[str, ...]]:
    """The feature an empty slot of ``export --slots`` gives each module: the input scale on
    feed-forward output layers (PEFT's ``feedforward_modules`` by their usual names), the output
    scale elsewhere. An adapter that scales another side of a layer needs that slot named."""
    return {m: ("ia3_in" if any(m == f or m.endswith("." + f) for f in _FEEDFORWARD) else "ia3_out",)
            for m in modules}


def manifest_entry(adapter: Ia3Adapter) -> dict:
    """What the manifest records for this adapter (besides file and checksum)."""
    return {"kind": KIND, "targets": sorted(adapter.modules),
            "feedforward": sorted(n for n, m in adapter.modules.items() if m.feedforward),
            "head": sorted(adapter.head)}


def describe(entry: dict) -> str:
    """``edgepeft inspect``'s summary of a manifest entry."""
    return f" ({len(entry.get('feedforward', []))} on feed-forward inputs)"


# PyTorch reference (validate, bench): PEFT's model, one per adapter in validate.
REFERENCE = Reference(load=peft_load, add=peft_add, select=peft_select)


# ---------------------------------------------------------------- edgepeft train
# Encoders without a PEFT default mapping: (target_modules, feedforward_modules) per model_type.
_TRAIN_TARGETS = {"distilbert": (["q_lin", "v_lin", "lin2"], ["lin2"])}
# Feed-forward output layers: IA3 scales their input (when the user names them as targets).
_FEEDFORWARD = ("down_proj", "mlp.c_proj", "output.dense", "lin2", "fc2", "dense_4h_to_h", "w2", "wo")


def train_targets(model: nn.Module, cfg) -> tuple[list[str] | None, list[str] | None]:
    """(target_modules, feedforward_modules) for training; (None, None) lets PEFT pick its defaults.

    Raises:
        EdgepeftError: no ``cfg.target_modules`` and no default for the model type.
    """
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as DEFAULTS

    if cfg.target_modules:
        targets = list(cfg.target_modules)
        return targets, [t for t in targets if any(t == f or t.endswith("." + f) for f in _FEEDFORWARD)]
    mt = model_type(model)
    if mt in DEFAULTS:
        return None, None
    if mt in _TRAIN_TARGETS:
        t, ff = _TRAIN_TARGETS[mt]
        return list(t), list(ff)
    raise EdgepeftError(f"{cfg.model}: peft has no default IA3 layers for model type {mt!r}. Pass "
                        "--target-modules (feed-forward output layers among them get IA3 on their input).")


def train_config(model: nn.Module, cfg, classification: bool):
    """PEFT's ``IA3Config`` on :func:`train_targets`."""
    from peft import IA3Config

    targets, ff = train_targets(model, cfg)
    return IA3Config(task_type=peft_task_type(classification), target_modules=targets, feedforward_modules=ff)


TRAIN = {"ia3": TrainSpec(lr=3e-3, peft_config=train_config)}
