"""Causal LM -> ONNX with a KV cache and (optionally) LoRA side branches as graph inputs.

One graph serves prefill and decode: inputs ``input_ids (B, S)``, ``attention_mask (B, P+S)``,
``position_ids (B, S)``, ``past.{i}.key|value (B, H_kv, P, D)`` and, per LoRA slot,
``lora.{module}.A (r, in)`` / ``lora.{module}.B (out, r)`` with a dynamic rank per slot. Outputs
``logits (B, S, V)`` and ``present.{i}.key|value (B, H_kv, P+S, D)``.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass

import onnx
import torch
import torch.nn.functional as F
from torch import nn

from edgepeft.errors import EdgepeftError
from edgepeft.runtime.manifest import lora_input_names, past_names, present_names


@dataclass(frozen=True)
class LoraSlot:
    """One adapted layer in the side-branch graph."""

    module: str
    in_features: int
    out_features: int


@dataclass(frozen=True)
class CacheShape:
    """Per-layer KV cache geometry, probed from a real forward pass."""

    kv_heads: tuple[int, ...]
    head_dims: tuple[int, ...]

    @property
    def layers(self) -> int:
        return len(self.kv_heads)


class _SideBranch(nn.Module):
    """``base(x) + (x A^T) B^T`` where A, B are the export's inputs for this slot."""

    def __init__(self, base: nn.Module, index: int, feed: list):
        super().__init__()
        self.base, self.index, self.feed = base, index, feed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.feed[0][2 * self.index], self.feed[0][2 * self.index + 1]  # (r, in), (out, r)
        return self.base(x) + F.linear(F.linear(x, a), b)  # (B, S, out)


class _CacheWrapper(nn.Module):
    """Flat tensors in, flat tensors out: the KV cache as a list of past keys/values."""

    def __init__(self, model: nn.Module, layers: int, feed: list):
        super().__init__()
        self.model, self.layers, self.feed = model, layers, feed

    def forward(self, input_ids, attention_mask, position_ids, past: list, lora: list):
        from transformers import DynamicCache

        self.feed[0] = lora
        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.layers)],
                             config=self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, use_cache=True)
        present = []
        for layer in out.cache.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def probe_cache(model: nn.Module) -> CacheShape:
    """Run one token through ``model`` and read the cache geometry it produces."""
    with torch.no_grad():
        out = model(input_ids=torch.zeros(1, 1, dtype=torch.long), use_cache=True)
    layers = out.cache.layers
    return CacheShape(tuple(int(l.keys.shape[1]) for l in layers), tuple(int(l.keys.shape[3]) for l in layers))


def lora_slots(model: nn.Module, modules: set[str]) -> list[LoraSlot]:
    """Slots for the given module names, in the model's own module order."""
    from transformers.pytorch_utils import Conv1D

    slots = []
    for name, m in model.named_modules():
        if name in modules:
            w = m.weight
            in_f, out_f = (w.shape[0], w.shape[1]) if isinstance(m, Conv1D) else (w.shape[1], w.shape[0])
            slots.append(LoraSlot(name, int(in_f), int(out_f)))
    return slots


def _with_side_branches(model: nn.Module, slots: list[LoraSlot], feed: list) -> nn.Module:
    """A copy of ``model`` whose slot layers are wrapped in :class:`_SideBranch` (composition)."""
    model = copy.deepcopy(model)
    for i, slot in enumerate(slots):
        parent_name, _, child = slot.module.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, _SideBranch(getattr(parent, child), i, feed))
    return model


def export_graph(model: nn.Module, slots: list[LoraSlot], cache: CacheShape,
                 opset: int | None = None) -> onnx.ModelProto:
    """Export ``model`` (base or merged) with a KV cache and the given LoRA slots as inputs.

    Args:
        model: fp32 causal LM in eval mode (not modified).
        slots: layers that get ``lora.{module}.A/B`` inputs; empty for a merged graph.
        cache: from :func:`probe_cache`.
        opset: ONNX opset, or None for the exporter's default.

    Returns:
        The ONNX model, with a rank-0 default initializer for every LoRA input so that a run
        that does not feed a slot computes the base model there.
    """
    from torch.export import Dim

    feed: list = [None]
    wrapped = _CacheWrapper(_with_side_branches(model, slots, feed) if slots else model,
                            cache.layers, feed)
    # Sample sizes: distinct, >= 2 (the exporter fixes dims of size 0/1 and may unify equal ones).
    b, s, p, r = 2, 3, 5, 7
    ids = torch.randint(0, model.config.get_text_config().vocab_size, (b, s))
    mask = torch.ones(b, p + s, dtype=torch.long)
    mask[1, :2] = 0  # left padding in the sample, so the masking path is traced, not skipped
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, p:]
    past = []
    for h, d in zip(cache.kv_heads, cache.head_dims):
        past += [torch.randn(b, h, p, d) * 0.1, torch.randn(b, h, p, d) * 0.1]
    lora = []
    for slot in slots:
        lora += [torch.randn(r, slot.in_features) * 0.01, torch.randn(slot.out_features, r) * 0.01]

    batch, seq, past_len, total = Dim("batch"), Dim("seq"), Dim("past_seq"), Dim("total_seq")
    ranks = [Dim(f"rank_{i}") for i in range(len(slots))]
    dynamic = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq},
        "past": [{0: batch, 2: past_len} for _ in past],
        "lora": [{0: ranks[i // 2]} if i % 2 == 0 else {1: ranks[i // 2]} for i in range(len(lora))],
    }
    input_names = ["input_ids", "attention_mask", "position_ids"]
    output_names = ["logits"]
    for i in range(cache.layers):
        input_names += past_names(i)
        output_names += present_names(i)
    for slot in slots:
        input_names += lora_input_names(slot.module)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # e.g. "torchvision is not installed"
        try:
            program = torch.onnx.export(wrapped, (ids, mask, pos, past, lora), dynamo=True,
                                        dynamic_shapes=dynamic, input_names=input_names,
                                        output_names=output_names, opset_version=opset,
                                        optimize=True, verbose=False)
        except Exception as e:  # torch.export / onnxscript raise many types; keep the first line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise EdgepeftError(
                f"model_type {model.config.model_type!r}: torch.onnx.export (dynamo) failed: {first} "
                "This model family does not export with the pinned torch/transformers; see the "
                "README's list of tested families.") from e
    proto = program.model_proto
    for slot in slots:  # rank-0 defaults: an initializer named like the input makes it optional
        a_name, b_name = lora_input_names(slot.module)
        proto.graph.initializer.append(onnx.helper.make_tensor(a_name, onnx.TensorProto.FLOAT,
                                                               [0, slot.in_features], []))
        proto.graph.initializer.append(onnx.helper.make_tensor(b_name, onnx.TensorProto.FLOAT,
                                                               [slot.out_features, 0], []))
    return proto
