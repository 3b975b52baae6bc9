"""Causal LM -> ONNX with a KV cache and (optionally) adapter side branches as graph inputs.

One graph serves prefill and decode: inputs ``input_ids (B, S)``, ``attention_mask (B, P+S)``,
``position_ids (B, S)``, ``past.{i}.key|value (B, H_kv, P, D)`` and the adapter inputs of
``slots.py`` (e.g. ``lora.{module}.A (r, in)`` / ``lora.{module}.B (out, r)``, a dynamic rank per
slot). Outputs ``logits (B, S, V)`` and ``present.{i}.key|value (B, H_kv, P+S, D)``. Prefix and
decoder prompt tuning need no inputs of their own: the runtime seeds ``past``.
"""

from __future__ import annotations

import onnx
import torch
from torch import nn

from edgepeft.export.slots import InputSpec, Slot, dynamo_export, spec_dims, with_side_branches
from edgepeft.contract import past_names, present_names
from edgepeft.kinds.common import CacheShape


class _CacheWrapper(nn.Module):
    """Flat tensors in, flat tensors out: the KV cache as a list of past keys/values."""

    def __init__(self, model: nn.Module, layers: int, feed: dict, names: list[str]):
        super().__init__()
        self.model, self.layers, self.feed, self.names = model, layers, feed, names

    def forward(self, input_ids, attention_mask, position_ids, past: list, adapter: list):
        from transformers import DynamicCache

        self.feed.update(zip(self.names, adapter))
        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.layers)],
                             config=self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, use_cache=True)
        present = []
        for layer in out.cache.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def export_graph(model: nn.Module, slots: list[Slot], specs: list[InputSpec], cache: CacheShape,
                 opset: int | None = None) -> onnx.ModelProto:
    """Export ``model`` (base or merged) with a KV cache and the given side-branch inputs.

    Args:
        model: fp32 causal LM in eval mode (not modified).
        slots: adapted layers (``slots.plan_slots``); empty for a merged graph.
        specs: their inputs (``slots.input_specs``).
        cache: from :func:`probe_cache`.
        opset: ONNX opset, or None for the exporter's default.

    Returns:
        The ONNX model, with each adapter input's identity value as its default initializer, so
        a run that feeds nothing computes the base model.
    """
    from torch.export import Dim

    feed: dict = {}
    names = [s.name for s in specs]
    wrapped = _CacheWrapper(with_side_branches(model, slots, [], feed) if slots else model,
                            cache.layers, feed, names)
    # Sample sizes: distinct, >= 2 (the exporter fixes dims of size 0/1 and may unify equal ones).
    b, s, p = 2, 3, 5
    ids = torch.randint(0, model.config.get_text_config().vocab_size, (b, s))
    mask = torch.ones(b, p + s, dtype=torch.long)
    mask[1, :2] = 0  # left padding in the sample, so the masking path is traced, not skipped
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, p:]
    past = []
    for h, d in zip(cache.kv_heads, cache.head_dims):
        past += [torch.randn(b, h, p, d) * 0.1, torch.randn(b, h, p, d) * 0.1]
    adapter = [torch.from_numpy(s.sample) for s in specs]

    batch, seq, past_len, total = Dim("batch"), Dim("seq"), Dim("past_seq"), Dim("total_seq")
    dynamic = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq},
        "past": [{0: batch, 2: past_len} for _ in past],
        "adapter": spec_dims(specs),
    }
    input_names = ["input_ids", "attention_mask", "position_ids"]
    output_names = ["logits"]
    for i in range(cache.layers):
        input_names += past_names(i)
        output_names += present_names(i)
    input_names += names
    return dynamo_export(wrapped, (ids, mask, pos, past, adapter), dynamic, input_names, output_names,
                         opset, specs, model.config.model_type)
