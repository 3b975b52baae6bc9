"""PEFT PREFIX_TUNING on decoders: per-layer key/value prefixes of length ``p``.

With a KV cache this is exactly a non-empty past: the runtime seeds the cache with the prefix,
prepends ``p`` ones to the attention mask and starts positions at ``p`` (PEFT offsets given
``position_ids`` by ``num_virtual_tokens``; without them the model counts from the cache length,
the same numbers). No extra graph; nothing to merge.

PEFT saves ``prompt_embeddings (p, layers * 2 * token_dim)``: the prefix after its projection
MLP (if any), viewed as ``(p, 2 * layers, kv_heads, head_dim)``; layer ``i`` takes rows ``2i``
(keys) and ``2i + 1`` (values).

Same names as every kind module: ``read``, ``merge``, ``side``, ``manifest_entry``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgepeft.kinds.common import (Reference, SideBranch, TrainSpec, config_int, peft_add, peft_load,
                                   peft_select, peft_task_type, probe_cache, prompt_dims, read_tensors)
from edgepeft.errors import EdgepeftError

KIND = "prefix"
NAMES = (KIND,)
MERGEABLE = False
FEATURES = ()  # no graph inputs: the runtime seeds the KV cache


@dataclass(frozen=True)
class PrefixAdapter:
    """A prefix-tuning adapter: per layer ``(key, value)``, each ``(1, kv_heads, p, head_dim)``."""

    name: str
    source: Path
    weights_file: Path
    virtual_tokens: int
    kv: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    kind: str = KIND


def read(name: str, adapter_dir: Path, config: dict, model: nn.Module,
         task: str = "causal-lm") -> PrefixAdapter:
    """Read a PEFT prefix-tuning directory and check it against the model's KV-cache geometry.

    Raises:
        EdgepeftError: an encoder task (PEFT's prefix tuning does not run on BERT-family encoders
            with transformers 5), a cache geometry other than the model's, NaN/Inf.
    """
    cfg_path = adapter_dir / "adapter_config.json"
    if task != "causal-lm":
        raise EdgepeftError(f"{cfg_path}: prefix tuning is exported for decoders only; PEFT itself "
                            "cannot run it on BERT-family encoders with transformers 5 (no "
                            "past_key_values there). Use prompt tuning or LoRA for classifiers.")
    if (config_int(config, "num_transformer_submodules", 1, cfg_path, minimum=0) or 1) != 1:
        raise EdgepeftError(f"{cfg_path}: num_transformer_submodules != 1 (encoder-decoder); "
                            "edgepeft exports decoder-only prefixes.")
    weights_file, tensors = read_tensors(adapter_dir)
    if set(tensors) != {"prompt_embeddings"}:
        raise EdgepeftError(f"{weights_file}: expected one tensor 'prompt_embeddings' (PEFT prefix "
                            f"tuning), found {', '.join(sorted(tensors)) or 'none'}.")
    cache = probe_cache(model)
    p = config_int(config, "num_virtual_tokens", 0, cfg_path, minimum=0)
    emb = tensors["prompt_embeddings"].float()  # (p, 2 * L * H * D)
    width = 2 * sum(h * d for h, d in zip(cache.kv_heads, cache.head_dims))
    if len(set(zip(cache.kv_heads, cache.head_dims))) != 1:
        raise EdgepeftError(f"{cfg_path}: the base model's layers have different KV shapes; PEFT's "
                            "prefix layout assumes one shape for all layers.")
    if p < 1 or tuple(emb.shape) != (p, width):
        raise EdgepeftError(f"{weights_file}: prompt_embeddings has shape {tuple(emb.shape)}; this "
                            f"base model needs ({p}, {width}) = (num_virtual_tokens, 2 x {cache.layers} "
                            f"layers x {cache.kv_heads[0]} kv heads x {cache.head_dims[0]} head dim). "
                            "The adapter was made for another base model.")
    if not torch.isfinite(emb).all():
        raise EdgepeftError(f"{weights_file}: prompt_embeddings contains NaN or Inf.")
    h, d = cache.kv_heads[0], cache.head_dims[0]
    kv = emb.view(p, 2 * cache.layers, h, d).permute(1, 2, 0, 3)  # (2L, H, p, D)
    pairs = tuple((kv[2 * i][None].contiguous(), kv[2 * i + 1][None].contiguous())  # (1, H, p, D)
                  for i in range(cache.layers))
    return PrefixAdapter(name, adapter_dir, weights_file, p, pairs)


def merge(model: nn.Module, adapter: PrefixAdapter, weight: float = 1.0) -> None:
    """Prefixes are extra keys/values, not weights: there is nothing to merge."""
    raise EdgepeftError(f"adapter {adapter.name!r} is prefix tuning: it adds virtual tokens, not "
                        "weight deltas, so it cannot be merged. Export it with --mode side.")


def side(adapter: PrefixAdapter, model: nn.Module) -> SideBranch:
    """The KV-cache seed; no graph inputs."""
    prefix = [(np.ascontiguousarray(k.numpy(), np.float32), np.ascontiguousarray(v.numpy(), np.float32))
              for k, v in adapter.kv]
    return SideBranch(prefix=prefix)


def manifest_entry(adapter: PrefixAdapter) -> dict:
    """What the manifest records for this adapter (besides file and checksum)."""
    return {"kind": KIND, "virtual_tokens": adapter.virtual_tokens, "targets": [], "head": []}


def describe(entry: dict) -> str:
    """``edgepeft inspect``'s summary of a manifest entry."""
    return f" {entry['virtual_tokens']} virtual tokens"


# PyTorch reference (validate, bench): PEFT's prompt-learning model; its seed is the trained
# keys/values themselves, so validate composes it with a LoRA mix.
REFERENCE = Reference(load=peft_load, add=peft_add, select=peft_select, prompt_learning=True,
                      seed_composes=True)


def train_config(model: nn.Module, cfg, classification: bool):
    """PEFT's ``PrefixTuningConfig``: ``cfg.num_virtual_tokens`` keys/values per layer."""
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(task_type=peft_task_type(classification),
                              num_virtual_tokens=cfg.num_virtual_tokens, **prompt_dims(model))


_CLASSIFICATION = ("prefix tuning trains on causal LMs only: peft's prefix tuning does not run on "
                   "BERT-family encoders with transformers 5. Use --kind prompt (or lora/ia3/bottleneck) "
                   "for classification.")
TRAIN = {"prefix": TrainSpec(lr=1e-2, peft_config=train_config, target_modules=False, tasks=("causal-lm",),
                             refusal=_CLASSIFICATION)}
