"""PEFT LoRA: ``y = x W^T + s * (x A^T) B^T`` with ``A (r, in)``, ``B (out, r)``.

Every adapter kind module exposes the same names:
    read(name, adapter_dir, config, model) -> adapter   parse + check against the base model
    merge(model, adapter, weight)                       fold the adapter into the weights, in place
    side_arrays(adapter) -> {graph input name: array}   what the side-branch graph is fed
    manifest_entry(adapter) -> dict                     what ``manifest.json`` records
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from edgepeft.adapters.common import module_names_summary, read_tensors
from edgepeft.errors import EdgepeftError
from edgepeft.runtime.manifest import lora_input_names

KIND = "lora"

# adapter_config.json fields PEFT can set that change the maths in ways edgepeft does not export (yet).
# A truthy value is refused with the reason; silently ignoring any of them would give wrong outputs.
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora) is not supported yet; export a plain LoRA",
    "lora_bias": "lora_bias adds a trained bias to lora_B, which is not exported",
    "target_parameters": "LoRA on nn.Parameter targets (target_parameters) is not exported",
    "layer_replication": "layer_replication changes the base model's layer stack",
    "modules_to_save": "modules_to_save (fully trained copies of base modules) is not exported yet",
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
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    transposed: bool


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

    @property
    def scale(self) -> float:
        """The default (unpatterned) scale ``alpha / r`` or ``alpha / sqrt(r)``."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def _adaptable(model: nn.Module) -> dict[str, nn.Module]:
    """Modules LoRA can target in edgepeft: ``nn.Linear`` and GPT-2 ``Conv1D``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


def _expected_targets(config: dict, model: nn.Module, path: Path) -> set[str]:
    """Module names PEFT would wrap for this config on this model (PEFT's own matching rules)."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    target = config.get("target_modules")
    if isinstance(target, str) and target.lower() == "all-linear":  # PEFT: every linear but the head
        head = model.get_output_embeddings()
        return {n for n, m in _adaptable(model).items() if m is not head}
    if not target:
        raise EdgepeftError(f"{path}: target_modules is empty; PEFT records the adapted modules "
                            "there. Re-save the adapter with PEFT.")
    known = {f for f in LoraConfig.__dataclass_fields__}
    try:
        cfg = LoraConfig(**{k: v for k, v in config.items() if k in known and k != "peft_type"})
    except (TypeError, ValueError) as e:
        raise EdgepeftError(f"{path}: PEFT rejects this LoRA config ({e}).") from None
    found = set()
    for n in dict(model.named_modules()):
        hit = check_target_module_exists(cfg, n)
        if hit and type(hit).__name__ != "_ExcludedModule":
            found.add(n)
    return found


def _pattern(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a dotted suffix of the name."""
    from peft.utils.other import get_pattern_key

    key = get_pattern_key(list(patterns), module)
    return patterns.get(key, default)


def read(name: str, adapter_dir: Path, config: dict, model: nn.Module) -> LoraAdapter:
    """Read a PEFT LoRA directory and check every tensor against ``model``.

    Args:
        name: the adapter's name in the artifact.
        adapter_dir: folder with ``adapter_config.json`` and weights.
        config: the parsed ``adapter_config.json``.
        model: the base model (fp32, no PEFT wrappers).

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

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        body = key.removeprefix("base_model.model.")
        for part in ("A", "B"):
            suffix = f".lora_{part}.weight"
            if body.endswith(suffix):
                pairs.setdefault(body[: -len(suffix)], {})[part] = t
                break
        else:
            what = ("LoRA on embeddings" if "lora_embedding" in key else
                    "a DoRA magnitude" if "lora_magnitude" in key else "an unknown tensor")
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
    expected = _expected_targets(config, model, cfg_path)
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

    r0 = int(config.get("r", 8))
    alpha0 = float(config.get("lora_alpha", 8))
    rslora = bool(config.get("use_rslora", False))
    modules: dict[str, LoraModule] = {}
    for mod_name in sorted(pairs):
        p = pairs[mod_name]
        if set(p) != {"A", "B"}:
            raise EdgepeftError(f"{weights_file}: {mod_name} has lora_{'A' if 'A' in p else 'B'} "
                                "but not its pair. The file is incomplete; save it again.")
        a, b = p["A"].float(), p["B"].float()
        base = adaptable[mod_name]
        out_f, in_f = (base.weight.shape[1], base.weight.shape[0]) if isinstance(base, Conv1D) \
            else tuple(base.weight.shape)
        r = a.shape[0] if a.ndim == 2 else -1
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != in_f or b.shape != (out_f, r):
            raise EdgepeftError(
                f"{weights_file}: {mod_name}: expected lora_A (r, {in_f}) and lora_B ({out_f}, r), "
                f"found {tuple(a.shape)} and {tuple(b.shape)}: this adapter was made for a base "
                "model with other layer sizes.")
        r_cfg = int(_pattern(config.get("rank_pattern") or {}, mod_name, r0))
        if r_cfg != r:
            raise EdgepeftError(f"{weights_file}: {mod_name}: config says rank {r_cfg} "
                                f"(r / rank_pattern) but the tensors have rank {r}.")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise EdgepeftError(f"{weights_file}: {mod_name}: weights contain NaN or Inf.")
        alpha = float(_pattern(config.get("alpha_pattern") or {}, mod_name, alpha0))
        scale = alpha / (math.sqrt(r) if rslora else r)
        modules[mod_name] = LoraModule(a, b, scale, isinstance(base, Conv1D))
    return LoraAdapter(name, adapter_dir, weights_file, r0, alpha0, rslora, modules)


@torch.no_grad()
def merge(model: nn.Module, adapter: LoraAdapter, weight: float = 1.0) -> None:
    """Fold ``weight * s * B A`` into the base weights of ``model`` (in place, fp32).

    Args:
        model: the base model the adapter was read against.
        adapter: from :func:`read`.
        weight: mixing weight.
    """
    named = dict(model.named_modules())
    for mod_name, m in adapter.modules.items():
        delta = (weight * m.scale) * (m.B @ m.A)  # (out, in)
        w = named[mod_name].weight
        w += (delta.T if m.transposed else delta).to(w.dtype)


def side_arrays(adapter: LoraAdapter) -> dict[str, np.ndarray]:
    """Graph inputs for this adapter: ``A (r, in)`` and ``s * B (out, r)``, fp32.

    The scale is folded into B here, so the file alone is exact (onnxruntime's own LoraAdapter
    can drive the graph without edgepeft).
    """
    arrays = {}
    for mod_name, m in adapter.modules.items():
        a_name, b_name = lora_input_names(mod_name)
        arrays[a_name] = np.ascontiguousarray(m.A.numpy(), dtype=np.float32)
        arrays[b_name] = np.ascontiguousarray((m.B * m.scale).numpy(), dtype=np.float32)
    return arrays


def manifest_entry(adapter: LoraAdapter) -> dict:
    """What the manifest records for this adapter (besides file and checksum)."""
    ranks = sorted({m.A.shape[0] for m in adapter.modules.values()})
    return {"kind": KIND, "rank": adapter.rank, "ranks": ranks, "alpha": adapter.alpha,
            "rslora": adapter.rslora, "scale": adapter.scale, "scale_folded_into_B": True,
            "targets": sorted(adapter.modules)}
