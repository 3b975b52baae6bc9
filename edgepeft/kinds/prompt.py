"""PEFT PROMPT_TUNING and P_TUNING: ``n`` virtual-token embeddings placed before the input.

PEFT saves ``prompt_embeddings (n, hidden)`` after the prompt encoder (P-tuning's MLP/LSTM runs
at save time), so both kinds read the same way.

- Decoder: with causal attention the virtual tokens never see the real ones, so their keys and
  values are computed once here, through the base weights, and become a prefix (see
  ``prefix.py``): exact at run time, no extra graph. The one limit: composed with an adapter that
  changes the base weights, PEFT would run the virtual tokens through the changed weights too, so
  the runtime refuses that composition.
- Encoder (bidirectional): the embeddings are a graph input concatenated before the token
  embeddings, with ``n`` ones prepended to the attention mask, as PEFT does.

Same names as every kind module: ``read``, ``merge``, ``side``, ``manifest_entry``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgepeft.kinds.common import (Reference, SideBranch, TrainSpec, config_int, head_to_numpy,
                                   peft_add, peft_load, peft_select, peft_task_type, prompt_dims,
                                   read_tensors, split_head)
from edgepeft.errors import EdgepeftError

KIND = "prompt"
NAMES = (KIND,)
MERGEABLE = False
FEATURES = ()  # decoder: a KV-cache seed; encoder: the prompt.embeds graph input


@dataclass(frozen=True)
class PromptAdapter:
    """Soft prompt ``embeddings (n, hidden)`` (+ a classification head on encoders)."""

    name: str
    source: Path
    weights_file: Path
    embeddings: torch.Tensor
    task: str
    peft_type: str
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    kind: str = KIND


def read(name: str, adapter_dir: Path, config: dict, model: nn.Module,
         task: str = "causal-lm") -> PromptAdapter:
    """Read a PEFT prompt-tuning / P-tuning directory and check it against ``model``.

    Raises:
        EdgepeftError: encoder-decoder configs, embeddings of another width, NaN/Inf.
    """
    cfg_path = adapter_dir / "adapter_config.json"
    if (config_int(config, "num_transformer_submodules", 1, cfg_path, minimum=0) or 1) != 1:
        raise EdgepeftError(f"{cfg_path}: num_transformer_submodules != 1 (encoder-decoder); "
                            "edgepeft exports prompts for decoders and encoders only.")
    weights_file, tensors = read_tensors(adapter_dir)
    tensors, head = split_head(tensors, config, model, weights_file, task)
    if set(tensors) != {"prompt_embeddings"}:
        raise EdgepeftError(f"{weights_file}: expected one tensor 'prompt_embeddings', found "
                            f"{', '.join(sorted(tensors)) or 'none'}.")
    emb = tensors["prompt_embeddings"].float()
    hidden = model.get_input_embeddings().weight.shape[1]
    n = config_int(config, "num_virtual_tokens", 0, cfg_path, minimum=0)
    if n < 1 or tuple(emb.shape) != (n, hidden):
        raise EdgepeftError(f"{weights_file}: prompt_embeddings has shape {tuple(emb.shape)}, this base "
                            f"model needs ({n}, {hidden}) (num_virtual_tokens, hidden size). The "
                            "adapter was made for another base model.")
    if not torch.isfinite(emb).all():
        raise EdgepeftError(f"{weights_file}: prompt_embeddings contains NaN or Inf.")
    return PromptAdapter(name, adapter_dir, weights_file, emb, task, config["peft_type"], head)


def merge(model: nn.Module, adapter: PromptAdapter, weight: float = 1.0) -> None:
    """Soft prompts are extra tokens, not weights: there is nothing to merge."""
    raise EdgepeftError(f"adapter {adapter.name!r} is prompt tuning: it adds virtual tokens, not "
                        "weight deltas, so it cannot be merged. Export it with --mode side.")


@torch.no_grad()
def side(adapter: PromptAdapter, model: nn.Module) -> SideBranch:
    """Encoder: the embeddings as a graph input. Decoder: their keys/values as a prefix."""
    head = head_to_numpy(adapter.head)
    if adapter.task != "causal-lm":
        return SideBranch(prompt=np.ascontiguousarray(adapter.embeddings.numpy(), np.float32), head=head)
    from transformers import DynamicCache

    n = adapter.embeddings.shape[0]
    # A cache of plain layers keeps all n keys on sliding-window layers too (the config's cache
    # would keep the last window - 1 there): the traced graph's past is full on every layer.
    out = model(inputs_embeds=adapter.embeddings[None], position_ids=torch.arange(n)[None],
                attention_mask=torch.ones(1, n, dtype=torch.long), cache=DynamicCache(), use_cache=True)
    prefix = [(np.ascontiguousarray(layer.keys.float().numpy()),  # (1, H, n, D)
               np.ascontiguousarray(layer.values.float().numpy())) for layer in out.cache.layers]
    return SideBranch(prefix=prefix, prefix_from_prompt=True, head=head)


def manifest_entry(adapter: PromptAdapter) -> dict:
    """What the manifest records for this adapter (besides file and checksum)."""
    return {"kind": KIND, "peft_type": adapter.peft_type, "virtual_tokens": int(adapter.embeddings.shape[0]),
            "targets": [], "head": sorted(adapter.head)}


def describe(entry: dict) -> str:
    """``edgepeft inspect``'s summary of a manifest entry."""
    return f" {entry['virtual_tokens']} virtual tokens"


# PyTorch reference (validate, bench): PEFT's prompt-learning model. Its seed on a decoder went
# through the base weights at export, so it does not compose with weight changes.
REFERENCE = Reference(load=peft_load, add=peft_add, select=peft_select, prompt_learning=True)


def train_config(model: nn.Module, cfg, classification: bool):
    """PEFT's ``PromptTuningConfig``: ``cfg.num_virtual_tokens`` randomly initialised tokens."""
    from peft import PromptTuningConfig

    return PromptTuningConfig(task_type=peft_task_type(classification),
                              num_virtual_tokens=cfg.num_virtual_tokens, prompt_tuning_init="RANDOM",
                              **prompt_dims(model))


TRAIN = {"prompt": TrainSpec(lr=3e-2, peft_config=train_config, target_modules=False, embeds_input=True)}
