"""PEFT VeRA: ``y = x W^T + lambda_b * ((lambda_d * (x A_s^T)) B_s^T)`` on chosen linear layers.

VeRA trains two vectors per layer, ``lambda_d (r,)`` and ``lambda_b (out,)``, around a pair of
frozen random projections that every layer shares: ``vera_A (r, max_in)`` and ``vera_B
(max_out, r)``, sliced per layer to ``A_s = vera_A[:, :in]`` and ``B_s = vera_B[:out, :]``
(PEFT's ``peft/tuners/vera/layer.py``; no alpha scale). PEFT saves the projections once per
adapter as ``base_model.vera_A`` / ``base_model.vera_B`` when ``save_projection`` is true (its
default); without them it regenerates them from ``projection_prng_key`` with torch's generator,
which edgepeft does not reproduce, so such a file is refused.

In the graph the projections are *shared* parts (``edgepeft.contract.features``): one input per
layer width, ``vera.shared.{in}.A (R, in)`` and ``vera.shared.{out}.B (out, R)``, whose defaults
are the projections most exported adapters have; an adapter file holds its lambdas, and its own
projections only when they differ from those. ``R`` is the largest VeRA rank of the artifact;
a smaller adapter is zero-padded (``lambda_d`` pads with 0, so the extra rows add nothing).
Nothing fed (``lambda_d = lambda_b = 0``) is the identity.

Mixing: ``lambda_b`` scales each output after the rank sum, so two VeRA adapters on one layer
do not combine by concatenating ranks (that would need per-adapter B matmuls, or LoRA's own
per-layer matrices); every part mixes by rule ``one``. A VeRA adapter combines with adapters of
other kinds (a LoRA on the same layers adds) at weight 1.

Same names as every kind module: ``read``, ``merge``, ``side``, ``manifest_entry``, ``describe``,
``REFERENCE``, ``TRAIN``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from edgepeft.contract.features import Feature, Part
from edgepeft.errors import EdgepeftError
from edgepeft.kinds.common import (CONFIG_NAME, Reference, SideBranch, TrainSpec, config_int, head_to_numpy,
                                   is_conv1d, is_linear, merge_head, model_type, module_names_summary, peft_key,
                                   peft_load, peft_task_type, read_tensors, split_head, to_numpy)

KIND = "vera"
NAMES = (KIND,)
MERGEABLE = True


def _vera_out(y: torch.Tensor, h: torch.Tensor, base: nn.Module, p: dict) -> torch.Tensor:
    """``y + lambda_b * ((lambda_d * (h A^T)) B^T)`` with ``A (R, in)``, ``B (out, R)``."""
    z = F.linear(h, p["A"]) * p["lambda_d"]  # (B, S, in) -> (B, S, R)
    return y + p["lambda_b"] * F.linear(z, p["B"])  # (B, S, out)


FEATURES = (
    Feature("vera", (Part("lambda_d", ("R",), 0.0, "one"), Part("lambda_b", ("out",), 0.0, "one"),
                     Part("A", ("R", "in"), None, "one", shared=True),
                     Part("B", ("out", "R"), None, "one", shared=True)),
            order=35, on_output=_vera_out),
)


@dataclass(frozen=True)
class VeraModule:
    """One adapted layer: ``lambda_d (r,)``, ``lambda_b (out,)``; ``transposed`` for GPT-2's Conv1D."""

    lambda_d: torch.Tensor
    lambda_b: torch.Tensor
    in_features: int
    out_features: int
    transposed: bool


@dataclass(frozen=True)
class VeraAdapter:
    """A VeRA adapter read from a PEFT directory and checked against a base model.

    Attributes:
        A: ``vera_A (r, max_in)``, the shared down-projection.
        B: ``vera_B (max_out, r)``, the shared up-projection.
        prng_key: ``projection_prng_key`` (recorded; the projections come from the file).
    """

    name: str
    source: Path
    weights_file: Path
    rank: int
    A: torch.Tensor
    B: torch.Tensor
    prng_key: int
    modules: dict[str, VeraModule]
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    kind: str = KIND

    def sliced(self, m: VeraModule) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A_s (r, in), B_s (out, r))`` of one layer, as PEFT slices them."""
        return self.A[:, : m.in_features], self.B[: m.out_features, :]


def _check_config(config: dict, cfg_path: Path) -> None:
    """Refuse settings whose maths edgepeft does not export, with the reason."""
    if config.get("save_projection") is False:
        raise EdgepeftError(
            f"{cfg_path}: save_projection=false: the file does not hold the shared projections "
            "vera_A / vera_B; PEFT regenerates them from projection_prng_key with torch's random "
            "generator, which edgepeft does not do (the values could differ across torch versions "
            "and machines). Save the adapter again with save_projection=True (PEFT's default).")
    if config.get("bias", "none") != "none":
        raise EdgepeftError(f"{cfg_path}: bias={config['bias']!r}: trained biases are not exported. "
                            "Retrain with bias='none'.")


def _split(tensors: dict[str, torch.Tensor], weights_file: Path) -> tuple[dict, dict[str, dict]]:
    """``({"A": vera_A, "B": vera_B} as found, {module: {"d": lambda_d, "b": lambda_b}})``."""
    shared, layers = {}, {}
    for key, t in tensors.items():
        body = peft_key(key)
        if body in ("vera_A", "vera_B"):
            shared[body[-1]] = t
            continue
        for part, suffix in (("d", ".vera_lambda_d"), ("b", ".vera_lambda_b")):
            if body.endswith(suffix):
                layers.setdefault(body[: -len(suffix)], {})[part] = t
                break
        else:
            raise EdgepeftError(f"{weights_file}: tensor {key!r} is not a VeRA tensor (vera_A, vera_B, "
                                "vera_lambda_d, vera_lambda_b); edgepeft exports VeRA on nn.Linear / "
                                "Conv1D layers only.")
    return shared, layers


def read(name: str, adapter_dir: Path, config: dict, model: nn.Module,
         task: str = "causal-lm") -> VeraAdapter:
    """Read a PEFT VeRA directory and check it against ``model``.

    Raises:
        EdgepeftError: save_projection=false, a trained bias, missing projections or lambdas,
            weights for modules the base lacks, shapes that do not fit, NaN/Inf.
    """
    cfg_path = adapter_dir / CONFIG_NAME
    _check_config(config, cfg_path)
    weights_file, tensors = read_tensors(adapter_dir)
    tensors, head = split_head(tensors, config, model, weights_file, task)
    shared, layers = _split(tensors, weights_file)
    if set(shared) != {"A", "B"}:
        raise EdgepeftError(f"{weights_file}: no {'vera_A' if 'A' not in shared else 'vera_B'} (the shared "
                            "projection); the file is incomplete. Save the adapter again with "
                            "save_projection=True.")
    if not layers:
        raise EdgepeftError(f"{weights_file}: holds no vera_lambda_d / vera_lambda_b tensors.")
    a, b = shared["A"].float(), shared["B"].float()
    r = config_int(config, "r", 256, cfg_path)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != r or b.shape[1] != r:
        raise EdgepeftError(f"{weights_file}: vera_A {tuple(a.shape)} and vera_B {tuple(b.shape)} must be "
                            f"(r, max_in) and (max_out, r) with r = {r} (adapter_config.json).")
    named = {n: m for n, m in model.named_modules() if is_linear(m)}
    modules = {}
    for mod in sorted(layers):
        if mod not in named:
            raise EdgepeftError(f"{weights_file}: weights for {mod!r}, which the base model does not "
                                f"have as a linear layer: this adapter was made for another base. "
                                f"Linear layers: {module_names_summary(list(named))}.")
        modules[mod] = _module(mod, layers[mod], named[mod], a, b, weights_file)
    for label, t in (("vera_A", a), ("vera_B", b)):
        if not torch.isfinite(t).all():
            raise EdgepeftError(f"{weights_file}: {label} contains NaN or Inf; the file is damaged.")
    key = config_int(config, "projection_prng_key", 0, cfg_path, minimum=-(2**63))
    return VeraAdapter(name, adapter_dir, weights_file, r, a, b, key, modules, head)


def _module(mod: str, parts: dict, base: nn.Module, a: torch.Tensor, b: torch.Tensor,
            weights_file: Path) -> VeraModule:
    """One layer's lambdas, checked against the layer and the projections."""
    if set(parts) != {"d", "b"}:
        raise EdgepeftError(f"{weights_file}: {mod} has only vera_lambda_{next(iter(parts))}; the file is "
                            "incomplete. Save the adapter again.")
    transposed = is_conv1d(base)
    out_f, in_f = (base.weight.shape[1], base.weight.shape[0]) if transposed else tuple(base.weight.shape)
    d, lb = parts["d"].float(), parts["b"].float()
    if tuple(d.shape) != (a.shape[0],) or tuple(lb.shape) != (out_f,):
        raise EdgepeftError(f"{weights_file}: {mod}: vera_lambda_d {tuple(d.shape)} and vera_lambda_b "
                            f"{tuple(lb.shape)} must be ({a.shape[0]},) and ({out_f},): this adapter was "
                            "made for a base model with other layer sizes.")
    if a.shape[1] < in_f or b.shape[0] < out_f:
        raise EdgepeftError(f"{weights_file}: {mod} ({in_f} -> {out_f}) does not fit the projections "
                            f"vera_A {tuple(a.shape)} / vera_B {tuple(b.shape)}: this adapter was made for "
                            "a base model with other layer sizes.")
    if not (torch.isfinite(d).all() and torch.isfinite(lb).all()):
        raise EdgepeftError(f"{weights_file}: {mod}: a lambda contains NaN or Inf; the training "
                            "diverged. Retrain or use an earlier checkpoint.")
    return VeraModule(d, lb, int(in_f), int(out_f), transposed)


def _delta(adapter: VeraAdapter, m: VeraModule) -> torch.Tensor:
    """``(lambda_b B_s) (lambda_d A_s)``, PEFT's ``get_delta_weight``. -> (out, in)"""
    a_s, b_s = adapter.sliced(m)
    return (m.lambda_b[:, None] * b_s) @ (m.lambda_d[:, None] * a_s)


@torch.no_grad()
def merge(model: nn.Module, adapter: VeraAdapter, weight: float = 1.0) -> None:
    """Fold ``weight * delta`` into the base weights of ``model`` (in place; linear in lambda_b)."""
    named = dict(model.named_modules())
    for mod, m in adapter.modules.items():
        delta = weight * _delta(adapter, m)  # (out, in)
        w = named[mod].weight
        w += (delta.T if m.transposed else delta).to(w.dtype)
    merge_head(model, adapter.head)


def side(adapter: VeraAdapter, model: nn.Module) -> SideBranch:
    """Graph inputs per layer ``lambda_d (r,)``, ``lambda_b (out,)`` and the layer's slices of the
    shared projections (export stores each width's slice once)."""
    layers = {}
    for mod, m in adapter.modules.items():
        a_s, b_s = adapter.sliced(m)
        layers[(mod, "vera")] = {"lambda_d": to_numpy(m.lambda_d), "lambda_b": to_numpy(m.lambda_b),
                                 "A": to_numpy(a_s), "B": to_numpy(b_s)}
    return SideBranch(layers=layers, head=head_to_numpy(adapter.head))


def manifest_entry(adapter: VeraAdapter) -> dict:
    """What the manifest records for this adapter (besides file and checksum)."""
    return {"kind": KIND, "rank": adapter.rank, "projection_prng_key": adapter.prng_key,
            "projections": [list(adapter.A.shape), list(adapter.B.shape)],
            "targets": sorted(adapter.modules), "head": sorted(adapter.head)}


def describe(entry: dict) -> str:
    """``edgepeft inspect``'s summary of a manifest entry."""
    a, b = entry.get("projections") or [[], []]
    own = [n for n in entry.get("inputs", []) if ".shared." in n]
    return (f" rank {entry['rank']}, projections A {tuple(a)} B {tuple(b)} ({len(own)} slices in its file, "
            f"{len(entry.get('defaults', []))} the graph's)")


# PyTorch reference (validate, bench): PEFT's model, one per adapter (PEFT re-draws the shared
# projections when a second VeRA adapter is added, so one model does not hold two of them).
REFERENCE = Reference(load=peft_load)


# ---------------------------------------------------------------- edgepeft train
# Leaf names of attention query/value layers, for encoders PEFT has no VeRA default for.
_QUERY_VALUE = ("query", "value", "q_lin", "v_lin", "q_proj", "v_proj")


def train_targets(model: nn.Module, cfg) -> list[str]:
    """``target_modules`` for training: ``cfg.target_modules``, else PEFT's VeRA default for the
    model type, else the attention query / value layers.

    Raises:
        EdgepeftError: none of those exists.
    """
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING as DEFAULTS

    if cfg.target_modules:
        return list(cfg.target_modules)
    if model_type(model) in DEFAULTS:
        return list(DEFAULTS[model_type(model)])
    leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                     if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in _QUERY_VALUE})
    if not leaves:
        raise EdgepeftError(f"{cfg.model}: peft has no default VeRA layers for model type "
                            f"{model_type(model)!r}. Pass --target-modules.")
    return leaves


def train_config(model: nn.Module, cfg, classification: bool):
    """PEFT's ``VeraConfig``: rank ``cfg.r``, the projections saved in the file (edgepeft reads
    no PRNG-regenerated ones), no dropout."""
    from peft import VeraConfig

    return VeraConfig(task_type=peft_task_type(classification), r=cfg.r, target_modules=train_targets(model, cfg),
                      save_projection=True, vera_dropout=0.0)


TRAIN = {"vera": TrainSpec(lr=1e-2, peft_config=train_config)}
