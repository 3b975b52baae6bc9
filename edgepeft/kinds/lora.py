"""PEFT LoRA: ``y = x W^T + s * (x A^T) B^T`` with ``A (r, in)``, ``B (out, r)``; and DoRA.

DoRA (``use_dora``) rescales each output row: ``y = g * (x W^T + s (x A^T) B^T) + b`` with
``g = m / ||W + s B A||_row`` (PEFT's magnitude ``m``, norm detached). As a side branch that is
``y = base(x) + (g - 1) * (base(x) - b) + (x A^T) (g s B)^T``: the norm is computed here, once.

Every adapter kind module exposes the same names:
    read(name, adapter_dir, config, model, task) -> adapter   parse + check against the base model
    merge(model, adapter, weight)                 fold the adapter into the weights, in place
    side(adapter, model) -> SideBranch            what the side-branch graph and runtime are fed
    manifest_entry(adapter) -> dict               what ``manifest.json`` records
    REFERENCE                                     ``common.Reference``: the PyTorch model of validate, bench
    TRAIN                                         ``{"lora": common.TrainSpec, "dora": ...}`` for train
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from edgepeft.kinds.common import (Reference, SideBranch, TrainSpec, config_float, config_int, config_pattern,
                                   head_to_numpy, is_conv1d, is_linear, merge_head, model_type, module_names_summary,
                                   peft_add, peft_delta_mix, peft_key, peft_load, peft_pattern, peft_select,
                                   peft_targets, peft_task_type, read_tensors, split_head, to_numpy)
from edgepeft.contract.features import Feature, Part
from edgepeft.errors import EdgepeftError

KIND = "lora"
NAMES = ("lora", "dora")
DEFAULT_SLOTS = True  # `export --slots q_proj,v_proj` (no kind) reserves LoRA slots
MERGEABLE = True


def _low_rank(h: torch.Tensor, p: dict) -> torch.Tensor:
    """``((h A^T) * rows) B^T`` with ``A (r, in)``, ``B = s B (out, r)``; a mix concatenates along
    r, and ``rows (N, 1, r)`` weights each row's rank columns (ones: every row the same)."""
    t = F.linear(h, p["A"])  # (B, S, in) -> (B, S, r)
    if "rows" in p:
        t = t * p["rows"]  # (B, S, r) * (N, 1, r): each row its own adapters' columns
    return F.linear(t, p["B"])  # (B, S, out)


def _lora_out(y: torch.Tensor, h: torch.Tensor, base: nn.Module, p: dict) -> torch.Tensor:
    """``y + ((h A^T) * rows) B^T``: LoRA beside ``base``."""
    return y + _low_rank(h, p)


def _dora_out(y: torch.Tensor, h: torch.Tensor, base: nn.Module, p: dict) -> torch.Tensor:
    """``y + mag * (y - b) + ((h A^T) * rows) B^T`` with ``mag = g - 1`` (``(out,)``, or
    ``(N, 1, out)`` per row), ``B = g s B``: DoRA around ``base``. Two DoRA adapters on one layer
    do not mix (``mag`` is ``one``), so per row at most one adapter's columns are non-zero."""
    plain = y if base.bias is None else y - base.bias  # h W^T  (B, S, out)
    return y + p["mag"] * plain + _low_rank(h, p)


FEATURES = (
    Feature("lora", (Part("A", ("r", "in"), 0.0, "cat0"), Part("B", ("out", "r"), 0.0, "cat1w")),
            order=30, on_output=_lora_out, fused="low_rank", rows=True),
    Feature("dora", (Part("A", ("r", "in"), 0.0, "cat0"), Part("B", ("out", "r"), 0.0, "cat1w"),
                     Part("mag", ("out",), 0.0, "one")), order=20, on_output=_dora_out, fused="low_rank+mag",
            rows=True),
)

# adapter_config.json fields PEFT can set that change the maths in ways edgepeft does not export (yet).
# A truthy value is refused with the reason; silently ignoring any of them would give wrong outputs.
_UNSUPPORTED = {
    "lora_bias": "lora_bias adds a trained bias to lora_B, which is not exported",
    "target_parameters": "LoRA on nn.Parameter targets (target_parameters) is not exported",
    "layer_replication": "layer_replication changes the base model's layer stack",
    "trainable_token_indices": "trainable token embeddings are not exported",
    "use_qalora": "QA-LoRA pooling is not exported",
    "alora_invocation_tokens": "activated LoRA (aLoRA) is not exported",
    "megatron_config": "Megatron-parallel LoRA layers are not exported",
    "arrow_config": "Arrow routing is not exported",
    "use_bdlora": "block-diagonal LoRA is not exported",
    "kasa_config": "KaSA's singular-value scaling is not exported",
    "monteclora_config": "MonteCLoRA's sampled weights are not exported",
}


@dataclass(frozen=True)
class LoraModule:
    """One adapted layer.

    Attributes:
        A: ``(r, in)`` down-projection.
        B: ``(out, r)`` up-projection.
        scale: ``alpha / r`` (or ``alpha / sqrt(r)`` for rsLoRA) for this layer.
        transposed: the base layer stores its weight as ``(in, out)`` (GPT-2 ``Conv1D``).
        magnitude: DoRA's ``(out,)`` magnitude vector, None for plain LoRA.
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    transposed: bool
    magnitude: torch.Tensor | None = None


@dataclass(frozen=True)
class LoraAdapter:
    """A LoRA adapter read from a PEFT directory and checked against a base model."""

    name: str
    source: Path
    weights_file: Path
    rank: int
    alpha: float
    rslora: bool
    modules: dict[str, LoraModule]
    kind: str = KIND
    dora: bool = False
    head: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def scale(self) -> float:
        """The default (unpatterned) scale ``alpha / r`` or ``alpha / sqrt(r)``."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def _adaptable(model: nn.Module) -> dict[str, nn.Module]:
    """Modules LoRA can target in edgepeft: ``nn.Linear`` and GPT-2 ``Conv1D``."""
    return {n: m for n, m in model.named_modules() if is_linear(m)}


def read(name: str, adapter_dir: Path, config: dict, model: nn.Module,
         task: str = "causal-lm") -> LoraAdapter:
    """Read a PEFT LoRA directory and check every tensor against ``model``.

    Args:
        name: the adapter's name in the artifact.
        adapter_dir: folder with ``adapter_config.json`` and weights.
        config: the parsed ``adapter_config.json``.
        model: the base model (fp32, no PEFT wrappers).
        task: ``causal-lm`` or ``classification`` (a carried head is allowed only there).

    Returns:
        The adapter with per-layer ``A (r, in)``, ``B (out, r)`` and scale, in fp32.

    Raises:
        EdgepeftError: unsupported options, weights that do not fit this base, target modules that
            match nothing, or tensors the config does not account for.
    """
    cfg_path = adapter_dir / "adapter_config.json"
    for key, why in _UNSUPPORTED.items():
        if config.get(key):
            raise EdgepeftError(f"{cfg_path}: {key}={config[key]!r}: {why}. Retrain without it.")
    if config.get("bias", "none") != "none":
        raise EdgepeftError(f"{cfg_path}: bias={config['bias']!r}: trained biases are not exported. "
                            "Retrain with bias='none'.")
    weights_file, tensors = read_tensors(adapter_dir)
    tensors, head = split_head(tensors, config, model, weights_file, task)
    dora = bool(config.get("use_dora"))

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        body = peft_key(key)
        for part, suffix in (("A", ".lora_A.weight"), ("B", ".lora_B.weight"),
                             ("m", ".lora_magnitude_vector.weight"), ("m", ".lora_magnitude_vector")):
            if body.endswith(suffix) and (part != "m" or dora):
                pairs.setdefault(body[: -len(suffix)], {})[part] = t
                break
        else:
            what = ("LoRA on embeddings" if "lora_embedding" in key else
                    "a DoRA magnitude without use_dora" if "lora_magnitude" in key else "an unknown tensor")
            raise EdgepeftError(f"{weights_file}: tensor {key!r} is {what}, which edgepeft does not "
                                "export. Retrain targeting nn.Linear/Conv1D layers only.")
    if not pairs:
        raise EdgepeftError(f"{weights_file}: holds no lora_A/lora_B tensors.")

    adaptable = _adaptable(model)
    unknown = sorted(set(pairs) - set(adaptable))
    if unknown:
        raise EdgepeftError(
            f"{weights_file}: weights for {len(unknown)} module(s) the base model does not have "
            f"(e.g. {unknown[0]!r}): this adapter was made for another base model. Modules that "
            f"exist: {module_names_summary(list(adaptable))}.")
    expected = peft_targets(config, model, cfg_path, "LoRA")
    if not expected:
        raise EdgepeftError(
            f"{cfg_path}: target_modules={config.get('target_modules')!r} matches no module of the "
            f"base model. Modules that exist: {module_names_summary(list(adaptable))}.")
    odd = sorted(expected - set(adaptable))
    if odd:
        kind = type(dict(model.named_modules())[odd[0]]).__name__
        raise EdgepeftError(f"{cfg_path}: target_modules match {odd[0]!r}, a {kind}; edgepeft exports "
                            "LoRA on nn.Linear / Conv1D layers only. Retrain without it.")
    missing = sorted(expected - set(pairs))
    if missing:
        raise EdgepeftError(f"{weights_file}: target_modules name {len(missing)} module(s) without "
                            f"weights (e.g. {missing[0]!r}). The file is incomplete; save it again.")

    r0 = config_int(config, "r", 8, cfg_path)
    alpha0 = config_float(config, "lora_alpha", 8, cfg_path)
    rslora = bool(config.get("use_rslora", False))
    rank_pattern = config_pattern(config, "rank_pattern", cfg_path)
    alpha_pattern = config_pattern(config, "alpha_pattern", cfg_path)
    modules: dict[str, LoraModule] = {}
    for mod_name in sorted(pairs):
        p = pairs[mod_name]
        want = {"A", "B", "m"} if dora else {"A", "B"}
        if set(p) != want:
            raise EdgepeftError(f"{weights_file}: {mod_name} has {', '.join(sorted(p))} but needs "
                                f"{', '.join(sorted(want))} (A, B = lora_A/lora_B, m = DoRA's "
                                "lora_magnitude_vector). The file is incomplete; save it again.")
        a, b = p["A"].float(), p["B"].float()
        base = adaptable[mod_name]
        out_f, in_f = (base.weight.shape[1], base.weight.shape[0]) if is_conv1d(base) \
            else tuple(base.weight.shape)
        r = a.shape[0] if a.ndim == 2 else -1
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != in_f or b.shape != (out_f, r):
            raise EdgepeftError(
                f"{weights_file}: {mod_name}: expected lora_A (r, {in_f}) and lora_B ({out_f}, r), "
                f"found {tuple(a.shape)} and {tuple(b.shape)}: this adapter was made for a base "
                "model with other layer sizes.")
        if r < 1:
            raise EdgepeftError(f"{weights_file}: {mod_name}: lora_A has rank 0 (shape "
                                f"{tuple(a.shape)}); the file is damaged. Save the adapter again.")
        r_cfg = int(peft_pattern(rank_pattern, mod_name, r0))
        if r_cfg != r:
            raise EdgepeftError(f"{weights_file}: {mod_name}: config says rank {r_cfg} "
                                f"(r / rank_pattern) but the tensors have rank {r}.")
        for part, t in (("lora_A", a), ("lora_B", b)):
            if not torch.isfinite(t).all():
                raise EdgepeftError(f"{weights_file}: {mod_name}.{part}.weight contains NaN or Inf; "
                                    "the training diverged. Retrain or use an earlier checkpoint.")
        alpha = float(peft_pattern(alpha_pattern, mod_name, alpha0))
        scale = alpha / (math.sqrt(r) if rslora else r)
        mag = None
        if dora:
            mag = p["m"].float().reshape(-1)
            if mag.shape != (out_f,) or not torch.isfinite(mag).all():
                raise EdgepeftError(f"{weights_file}: {mod_name}: DoRA magnitude has shape "
                                    f"{tuple(p['m'].shape)}, expected ({out_f},), finite.")
        modules[mod_name] = LoraModule(a, b, scale, is_conv1d(base), mag)
    return LoraAdapter(name, adapter_dir, weights_file, r0, alpha0, rslora, modules,
                       "dora" if dora else KIND, dora, head)


def _dora_gain(w: torch.Tensor, m: LoraModule) -> torch.Tensor:
    """DoRA's per-row gain ``g = magnitude / ||W + s B A||_row`` as PEFT computes it. -> (out,)"""
    w = w.T if m.transposed else w  # (out, in)
    norm = torch.linalg.norm(w + m.scale * (m.B @ m.A), dim=1)
    return m.magnitude / norm


@torch.no_grad()
def merge(model: nn.Module, adapter: LoraAdapter, weight: float = 1.0) -> None:
    """Fold ``weight * s * B A`` into the base weights of ``model`` (in place, fp32).

    Args:
        model: the base model the adapter was read against.
        adapter: from :func:`read`.
        weight: mixing weight (DoRA: 1 only; its row norm is not linear in the delta).

    Raises:
        EdgepeftError: a DoRA adapter with a weight other than 1.
    """
    if adapter.dora and weight != 1.0:
        raise EdgepeftError(f"adapter {adapter.name!r} is DoRA: it merges with weight 1 only.")
    named = dict(model.named_modules())
    for mod_name, m in adapter.modules.items():
        delta = (weight * m.scale) * (m.B @ m.A)  # (out, in)
        w = named[mod_name].weight
        if m.magnitude is not None:
            g = _dora_gain(w.float(), m)  # (out,)
            merged = g[:, None] * ((w.T if m.transposed else w).float() + delta)  # (out, in)
            w.copy_((merged.T if m.transposed else merged).to(w.dtype))
        else:
            w += (delta.T if m.transposed else delta).to(w.dtype)
    merge_head(model, adapter.head)


@torch.no_grad()
def side(adapter: LoraAdapter, model: nn.Module) -> SideBranch:
    """Graph inputs: LoRA ``A (r, in)``, ``s B (out, r)``; DoRA also ``g - 1 (out,)`` with ``g s B``.

    The scale (and DoRA's gain) is folded into B here, so the file alone is exact (for LoRA,
    onnxruntime's own LoraAdapter can drive the graph without edgepeft).
    """
    named = dict(model.named_modules())
    layers = {}
    for mod_name, m in adapter.modules.items():
        if m.magnitude is None:
            layers[(mod_name, "lora")] = {"A": to_numpy(m.A), "B": to_numpy(m.B * m.scale)}
        else:
            g = _dora_gain(named[mod_name].weight.float(), m)  # (out,)
            layers[(mod_name, "dora")] = {"A": to_numpy(m.A), "B": to_numpy(g[:, None] * m.B * m.scale),
                                          "mag": to_numpy(g - 1)}
    return SideBranch(layers=layers, head=head_to_numpy(adapter.head))


def reserve(kind: str, modules: list[str], model: nn.Module) -> dict[str, tuple[str, ...]]:
    """The features an empty slot of ``export --slots`` gives each module: LoRA's, or DoRA's for
    ``dora:`` (A, B and the magnitude)."""
    return {m: ("dora" if kind == "dora" else KIND,) for m in modules}


def manifest_entry(adapter: LoraAdapter) -> dict:
    """What the manifest records for this adapter (besides file and checksum)."""
    ranks = sorted({m.A.shape[0] for m in adapter.modules.values()})
    return {"kind": adapter.kind, "rank": adapter.rank, "ranks": ranks, "alpha": adapter.alpha,
            "rslora": adapter.rslora, "scale": adapter.scale, "scale_folded_into_B": True,
            "targets": sorted(adapter.modules), "head": sorted(adapter.head)}


def describe(entry: dict) -> str:
    """``edgepeft inspect``'s summary of a manifest entry."""
    return (f" rank {entry['rank']} (ranks {entry['ranks']}), alpha {entry['alpha']:g}, scale "
            f"{entry['scale']:.4g}{' rsLoRA' if entry['rslora'] else ''}")


# ---------------------------------------------------------------- PyTorch reference (validate, bench)
def _layer_class() -> type:
    from peft.tuners.lora import LoraLayer

    return LoraLayer


# validate's weighted-mix reference: the base plus sum_i w_i delta_W_i, each PEFT's get_delta_weight
mix_deltas = peft_delta_mix(_layer_class, lambda layer, name: name in layer.lora_A)


def combine_cat(model: nn.Module, weights: dict[str, float], name: str) -> None:
    """PEFT's own weighted combination of loaded adapters as adapter ``name``, selected: ranks
    concatenated (``"cat"``), as edgepeft's runtime mixes."""
    model.add_weighted_adapter(list(weights), list(weights.values()), name, combination_type="cat")
    model.set_adapter(name)


REFERENCE = Reference(load=peft_load, add=peft_add, select=peft_select, shared=True, mix=mix_deltas,
                      combine=combine_cat)


# ---------------------------------------------------------------- edgepeft train
_TRAIN_TARGETS = {"distilbert": ["q_lin", "v_lin"]}  # encoders without a PEFT default mapping
# Leaf names of attention query/value layers, for LoRA on encoders PEFT has no default for.
_QUERY_VALUE = ("query", "value", "q_lin", "v_lin", "q_proj", "v_proj", "q", "v")


def train_targets(model: nn.Module, cfg, classification: bool) -> list[str] | str:
    """``target_modules`` for training: ``cfg.target_modules``, else PEFT's default for the model
    type, else edgepeft's per-type list, else every linear layer (causal LM) or the attention
    query/value layers (classifier)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    if cfg.target_modules:
        return list(cfg.target_modules)
    mt = model_type(model)
    if mt in DEFAULTS:
        return list(DEFAULTS[mt])
    if mt in _TRAIN_TARGETS:
        return list(_TRAIN_TARGETS[mt])
    if not classification:
        return "all-linear"
    leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                     if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in _QUERY_VALUE})
    return leaves or "all-linear"


def train_config(model: nn.Module, cfg, classification: bool, dora: bool = False):
    """PEFT's ``LoraConfig``: rank ``cfg.r``, ``lora_alpha = 2 r``, no dropout (DoRA: ``use_dora``)."""
    from peft import LoraConfig

    return LoraConfig(task_type=peft_task_type(classification), r=cfg.r, lora_alpha=2 * cfg.r,
                      lora_dropout=0.0, target_modules=train_targets(model, cfg, classification),
                      use_dora=dora)


TRAIN = {"lora": TrainSpec(lr=1e-3, peft_config=train_config),
         "dora": TrainSpec(lr=1e-3, peft_config=partial(train_config, dora=True))}
