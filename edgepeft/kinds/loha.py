"""PEFT LoHa (low-rank Hadamard product) on linear layers, exported as an exact LoRA.

PEFT's delta on a linear layer ``in -> out`` (``peft/tuners/loha/layer.py``, ``make_weight``)::

    delta_W = ((w1_a @ w1_b) * (w2_a @ w2_b)) * s      w1_a, w2_a (out, r); w1_b, w2_b (r, in)

with ``s = alpha / r`` per layer (``rank_pattern`` / ``alpha_pattern``; LoHa has no rsLoRA).
A Hadamard product of two rank-r products is a rank-r² product (the face-splitting identity)::

    A[i*r + j, :] = w1_b[i, :] * w2_b[j, :]         (r², in)
    B[:, i*r + j] = s * w1_a[:, i] * w2_a[:, j]     (out, r²)      delta_W = B @ A

so LoHa feeds the ``lora`` feature declared by ``lora.py`` and needs no graph of its own: it
swaps, mixes with LoRA (and other LoHa) adapters by rank concatenation, keeps its branch float on
quantized bases and runs on the fused graph. When ``r² >= min(in, out)`` the dense delta is
cheaper and just as exact: ``A = I (in, in), B = delta_W`` or ``A = delta_W, B = I (out, out)``.

Only ``nn.Linear`` layers: PEFT 0.21 cannot put LoHa on GPT-2's ``Conv1D``, and convolutions
(``hada_t1`` / ``hada_t2``, ``use_effective_conv2d``) have no slot in edgepeft's graphs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from edgepeft.errors import EdgepeftError
from edgepeft.kinds.common import (Reference, SideBranch, TrainSpec, config_float, config_int, config_pattern,
                                   head_to_numpy, merge_head, model_type, module_names_summary, peft_add,
                                   peft_delta_mix, peft_key, peft_load, peft_pattern, peft_select, peft_targets,
                                   peft_task_type, read_tensors, split_head, to_numpy)

KIND = "loha"
NAMES = (KIND,)
MERGEABLE = True
FEATURES = ()  # feeds the "lora" feature declared by lora.py
_FEATURE = "lora"
_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
_CONV_PARTS = ("hada_t1", "hada_t2")


@dataclass(frozen=True)
class LohaModule:
    """One adapted ``nn.Linear`` (fp32).

    Attributes:
        w1_a, w2_a: ``(out, r)``.
        w1_b, w2_b: ``(r, in)``.
        scale: ``alpha / r`` for this layer.
    """

    w1_a: torch.Tensor
    w1_b: torch.Tensor
    w2_a: torch.Tensor
    w2_b: torch.Tensor
    scale: float

    def __post_init__(self):
        out_f, r = self.w1_a.shape
        if self.w2_a.shape != (out_f, r) or self.w1_b.shape != self.w2_b.shape or self.w1_b.shape[0] != r:
            raise ValueError(f"LoHa factors of inconsistent shapes: w1_a {tuple(self.w1_a.shape)}, "
                             f"w1_b {tuple(self.w1_b.shape)}, w2_a {tuple(self.w2_a.shape)}, "
                             f"w2_b {tuple(self.w2_b.shape)}")

    @property
    def rank(self) -> int:
        return int(self.w1_b.shape[0])

    @property
    def lora_rank(self) -> int:
        """The rank of the exported ``B @ A``: ``r²``, or ``min(in, out)`` when that is smaller."""
        out_f, in_f = self.w1_a.shape[0], self.w1_b.shape[1]
        return min(self.rank ** 2, in_f, out_f)

    def delta(self) -> torch.Tensor:
        """PEFT's ``delta_W = ((w1_a w1_b) * (w2_a w2_b)) * s``, in its order of operations. -> (out, in)"""
        return ((self.w1_a @ self.w1_b) * (self.w2_a @ self.w2_b)) * self.scale

    def lora(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A (k, in), B (out, k))`` with ``B @ A = delta_W`` exactly in exact arithmetic, k = :attr:`lora_rank`."""
        r = self.rank
        out_f, in_f = self.w1_a.shape[0], self.w1_b.shape[1]
        if r * r < min(in_f, out_f):
            a = (self.w1_b[:, None, :] * self.w2_b[None, :, :]).reshape(r * r, in_f)  # (r, r, in) -> (r², in)
            b = (self.w1_a[:, :, None] * self.w2_a[:, None, :]).reshape(out_f, r * r)  # (out, r, r) -> (out, r²)
            return a, b * self.scale
        if in_f <= out_f:
            return torch.eye(in_f), self.delta()  # (in, in), (out, in)
        return self.delta(), torch.eye(out_f)  # (out, in), (out, out)


@dataclass(frozen=True)
class LohaAdapter:
    """A LoHa adapter read from a PEFT directory and checked against a base model."""

    name: str
    source: Path
    weights_file: Path
    rank: int
    alpha: float
    modules: dict[str, LohaModule]
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    kind: str = KIND

    @property
    def scale(self) -> float:
        """The default (unpatterned) scale ``alpha / r``."""
        return self.alpha / self.rank


def _group(tensors: dict[str, torch.Tensor], weights_file: Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{module: {hada_w1_a: t, ...}}`` from the file's keys.

    Raises:
        EdgepeftError: convolution factors (``hada_t1`` / ``hada_t2``) or any other tensor.
    """
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        module, _, part = peft_key(key).rpartition(".")
        if part in _CONV_PARTS:
            raise EdgepeftError(f"{weights_file}: tensor {key!r} is a LoHa convolution factor "
                                "(use_effective_conv2d on a Conv layer), which edgepeft does not "
                                "export. Retrain targeting nn.Linear layers only.")
        if part not in _PARTS or not module:
            raise EdgepeftError(f"{weights_file}: tensor {key!r} is not a LoHa factor "
                                f"({', '.join(_PARTS)}); edgepeft does not export it. Re-save the "
                                "adapter with PEFT.")
        groups.setdefault(module, {})[part] = t
    if not groups:
        raise EdgepeftError(f"{weights_file}: holds no LoHa tensors ({', '.join(_PARTS)}).")
    return groups


def _check_targets(groups: dict, config: dict, model: nn.Module, weights_file: Path, cfg_path: Path) -> dict:
    """The base's ``nn.Linear`` layers, after checking the file's modules are exactly PEFT's targets.

    Raises:
        EdgepeftError: modules the base lacks, targets that match nothing or a non-Linear layer,
            targets without weights.
    """
    named = dict(model.named_modules())
    linears = {n: m for n, m in named.items() if isinstance(m, nn.Linear)}
    unknown = sorted(set(groups) - set(named))
    if unknown:
        raise EdgepeftError(
            f"{weights_file}: weights for {len(unknown)} module(s) the base model does not have "
            f"(e.g. {unknown[0]!r}): this adapter was made for another base model. Linear layers "
            f"that exist: {module_names_summary(list(linears))}.")
    expected = peft_targets(config, model, cfg_path, "LoHa", regex_layers=True)
    if not expected:
        raise EdgepeftError(
            f"{cfg_path}: target_modules={config.get('target_modules')!r} matches no module of the "
            f"base model. Linear layers that exist: {module_names_summary(list(linears))}.")
    odd = sorted((expected | set(groups)) - set(linears))
    if odd:
        kind = type(named[odd[0]]).__name__
        raise EdgepeftError(f"{cfg_path}: LoHa on {odd[0]!r}, a {kind}; edgepeft exports LoHa on "
                            "nn.Linear layers only (PEFT's LoHa cannot adapt GPT-2's Conv1D, and "
                            "convolutions have no slot). Retrain without it.")
    missing = sorted(expected - set(groups))
    if missing:
        raise EdgepeftError(f"{weights_file}: target_modules name {len(missing)} module(s) without "
                            f"weights (e.g. {missing[0]!r}). The file is incomplete; save it again.")
    extra = sorted(set(groups) - expected)
    if extra:
        raise EdgepeftError(f"{weights_file}: weights for {extra[0]!r}, which target_modules does not "
                            "name: the config does not belong to these weights. Save the adapter again.")
    return linears


def _module(mod_name: str, parts: dict, base: nn.Linear, r_cfg: int, alpha: float,
            weights_file: Path) -> LohaModule:
    """Check one layer's four factors against ``base`` and the config's rank; scale ``alpha / r``.

    Raises:
        EdgepeftError: a factor missing, shapes that do not fit, a rank other than the config's, NaN/Inf.
    """
    if set(parts) != set(_PARTS):
        raise EdgepeftError(f"{weights_file}: {mod_name} has {', '.join(sorted(parts))} but needs "
                            f"{', '.join(_PARTS)}. The file is incomplete; save it again.")
    t = {p: parts[p].float() for p in _PARTS}
    out_f, in_f = base.weight.shape
    r = t["hada_w1_b"].shape[0] if t["hada_w1_b"].ndim == 2 else -1
    want = {"hada_w1_a": (out_f, r), "hada_w1_b": (r, in_f), "hada_w2_a": (out_f, r), "hada_w2_b": (r, in_f)}
    if r < 1 or any(tuple(t[p].shape) != s for p, s in want.items()):
        found = ", ".join(f"{p} {tuple(t[p].shape)}" for p in _PARTS)
        raise EdgepeftError(f"{weights_file}: {mod_name}: expected hada_w1_a / hada_w2_a ({out_f}, r) and "
                            f"hada_w1_b / hada_w2_b (r, {in_f}) with one r >= 1, found {found}: this "
                            "adapter was made for a base model with other layer sizes.")
    if r_cfg != r:
        raise EdgepeftError(f"{weights_file}: {mod_name}: config says rank {r_cfg} (r / rank_pattern) "
                            f"but the tensors have rank {r}.")
    for p in _PARTS:
        if not torch.isfinite(t[p]).all():
            raise EdgepeftError(f"{weights_file}: {mod_name}.{p} contains NaN or Inf; the training "
                                "diverged. Retrain or use an earlier checkpoint.")
    return LohaModule(t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"], alpha / r)


def read(name: str, adapter_dir: Path, config: dict, model: nn.Module,
         task: str = "causal-lm") -> LohaAdapter:
    """Read a PEFT LoHa directory and check every tensor against ``model``.

    Args:
        name: the adapter's name in the artifact.
        adapter_dir: folder with ``adapter_config.json`` and weights.
        config: the parsed ``adapter_config.json``.
        model: the base model (fp32, no PEFT wrappers).
        task: ``causal-lm`` or ``classification`` (a carried head is allowed only there).

    Returns:
        The adapter with each layer's four factors and scale, in fp32.

    Raises:
        EdgepeftError: convolution factors or targets, weights that do not fit this base, target
            modules that match nothing, tensors the config does not account for, NaN/Inf.
    """
    cfg_path = adapter_dir / "adapter_config.json"
    weights_file, tensors = read_tensors(adapter_dir)
    tensors, head = split_head(tensors, config, model, weights_file, task)
    groups = _group(tensors, weights_file)
    linears = _check_targets(groups, config, model, weights_file, cfg_path)
    r0 = config_int(config, "r", 8, cfg_path)
    alpha0 = config_float(config, "alpha", 8, cfg_path)
    rank_pattern = config_pattern(config, "rank_pattern", cfg_path)
    alpha_pattern = config_pattern(config, "alpha_pattern", cfg_path)
    modules = {}
    for mod_name in sorted(groups):
        r_cfg = int(peft_pattern(rank_pattern, mod_name, r0))
        alpha = float(peft_pattern(alpha_pattern, mod_name, alpha0))
        modules[mod_name] = _module(mod_name, groups[mod_name], linears[mod_name], r_cfg, alpha, weights_file)
    return LohaAdapter(name, adapter_dir, weights_file, r0, alpha0, modules, head)


@torch.no_grad()
def merge(model: nn.Module, adapter: LohaAdapter, weight: float = 1.0) -> None:
    """Fold ``weight * delta_W`` (PEFT's own product, fp32) into the base weights, in place."""
    named = dict(model.named_modules())
    for mod_name, m in adapter.modules.items():
        w = named[mod_name].weight  # nn.Linear: (out, in)
        w += (weight * m.delta()).to(w.dtype)
    merge_head(model, adapter.head)


@torch.no_grad()
def side(adapter: LohaAdapter, model: nn.Module) -> SideBranch:
    """Graph inputs of the ``lora`` feature: ``A (k, in)``, ``B (out, k)`` with ``B @ A = delta_W``."""
    layers = {}
    for mod_name, m in adapter.modules.items():
        a, b = m.lora()
        layers[(mod_name, _FEATURE)] = {"A": to_numpy(a), "B": to_numpy(b)}
    return SideBranch(layers=layers, head=head_to_numpy(adapter.head))


def manifest_entry(adapter: LohaAdapter) -> dict:
    """What the manifest records for this adapter (besides file and checksum)."""
    return {"kind": KIND, "rank": adapter.rank, "ranks": sorted({m.rank for m in adapter.modules.values()}),
            "alpha": adapter.alpha, "scale": adapter.scale, "scale_folded_into_B": True,
            "lora_ranks": sorted({m.lora_rank for m in adapter.modules.values()}),
            "targets": sorted(adapter.modules), "head": sorted(adapter.head)}


def describe(entry: dict) -> str:
    """``edgepeft inspect``'s summary of a manifest entry."""
    return (f" rank {entry['rank']} (ranks {entry['ranks']}), alpha {entry['alpha']:g}, scale "
            f"{entry['scale']:.4g}, fed as LoRA of ranks {entry['lora_ranks']}")


# ---------------------------------------------------------------- PyTorch reference (validate, bench)
def _layer_class() -> type:
    from peft.tuners.loha import LoHaLayer

    return LoHaLayer


# validate's weighted-mix reference: the base plus sum_i w_i delta_W_i, each PEFT's get_delta_weight
mix_deltas = peft_delta_mix(_layer_class, lambda layer, name: name in layer.hada_w1_a)


# PEFT has no weighted combination of LoHa adapters (add_weighted_adapter is LoRA's): no combine.
REFERENCE = Reference(load=peft_load, add=peft_add, select=peft_select, shared=True, mix=mix_deltas)


# ---------------------------------------------------------------- edgepeft train
_TRAIN_TARGETS = {"distilbert": ["q_lin", "v_lin"]}  # encoders without a PEFT default mapping


def train_targets(model: nn.Module, cfg, classification: bool) -> list[str] | str | None:
    """``target_modules`` for training: ``cfg.target_modules``, else None (PEFT's LoHa default for
    the model type), else edgepeft's per-type list, else every linear layer of a causal LM.

    Raises:
        EdgepeftError: a classifier of a type with no default and no ``--target-modules``.
    """
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LOHA_TARGET_MODULES_MAPPING as DEFAULTS

    if cfg.target_modules:
        return list(cfg.target_modules)
    mt = model_type(model)
    if mt in DEFAULTS:
        return None
    if mt in _TRAIN_TARGETS:
        return list(_TRAIN_TARGETS[mt])
    if not classification:
        return "all-linear"
    raise EdgepeftError(f"{cfg.model}: peft has no default LoHa layers for model type {mt!r}. Pass "
                        "--target-modules (nn.Linear layers, e.g. the attention query and value).")


def train_config(model: nn.Module, cfg, classification: bool):
    """PEFT's ``LoHaConfig``: rank ``cfg.r``, ``alpha = 2 r``, PEFT's init (``w2_b = 0``: starts at the base)."""
    from peft import LoHaConfig

    return LoHaConfig(task_type=peft_task_type(classification), r=cfg.r, alpha=2 * cfg.r,
                      target_modules=train_targets(model, cfg, classification))


TRAIN = {"loha": TrainSpec(lr=2e-3, peft_config=train_config)}
