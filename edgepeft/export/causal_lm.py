"""Causal LM -> ONNX with a KV cache and (optionally) adapter side branches as graph inputs.

One graph serves prefill and decode: inputs ``input_ids (B, S)``, ``attention_mask (B, P+S)``,
``position_ids (B, S)``, ``past.{i}.key|value (B, H_kv, P, D)`` and the adapter inputs of
``slots.py`` (e.g. ``lora.{module}.A (r, in)`` / ``lora.{module}.B (out, r)``, a dynamic rank per
slot). Outputs ``logits (B, S, V)`` and ``present.{i}.key|value (B, H_kv, P+S, D)``. Prefix and
decoder prompt tuning need no inputs of their own: the runtime seeds ``past``.

Sliding-window layers (Gemma 2/3, Mistral, Qwen2 with ``use_sliding_window``) keep every key like
the others (transformers' plain ``DynamicLayer``, not its sliding-window layer, whose ``past <=
window`` bookkeeping torch.export cannot trace with a dynamic past), and the window is applied in
their attention mask instead: a key is seen when it is at most ``sliding_window - 1`` positions
before the query. Positions, not cache slots: a row's left padding (which sits between a prefix
adapter's keys and its tokens) then never changes what the window covers, so a padded row
computes what it computes alone. The graph's inputs and outputs are those of every other family.
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
        # No config: every layer a plain DynamicLayer (full past), sliding ones included.
        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.layers)])
        masks = window_masks(self.model.config, self.model.dtype, input_ids, attention_mask, position_ids, cache)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask if masks is None else masks,
                         position_ids=position_ids, cache=cache, use_cache=True)
        present = []
        for layer in out.cache.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def window_masks(config, dtype: torch.dtype, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor, cache) -> dict | torch.Tensor | None:
    """The attention masks of a model with sliding-window layers, windowed by position.

    Args:
        config: the model's config (``sliding_window``; ``layer_types`` when layers differ).
        dtype: the model's float type (of an additive mask, for eager attention).
        input_ids: ``(B, S)``.
        attention_mask: ``(B, P + S)`` 0/1 over the past and the new tokens.
        position_ids: ``(B, S)``.
        cache: the model's cache, before this call's update (plain layers: ``P`` keys each).

    Returns:
        None without a sliding window (the model builds its own masks); with ``layer_types``, the
        ``{"full_attention": mask, "sliding_attention": mask}`` mapping the model's forward
        takes in place of the 2-D mask; without (every layer sliding, Mistral), the sliding one.
    """
    from transformers.masking_utils import create_causal_mask

    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if window is None or (types is not None and "sliding_attention" not in types):
        return None
    pos = attention_mask.long().cumsum(-1) - 1  # (B, P + S): each slot's position (pads: stale, masked)

    def recent(batch_idx, head_idx, q_idx, kv_idx):
        return pos[batch_idx, kv_idx] > pos[batch_idx, q_idx] - window

    # create_causal_mask reads the batch size, query length, dtype and device off inputs_embeds
    carrier = torch.zeros(*input_ids.shape, 1, dtype=dtype)  # (B, S, 1)
    kwargs = dict(config=config, inputs_embeds=carrier, attention_mask=attention_mask, cache=cache,
                  position_ids=position_ids)
    sliding = create_causal_mask(**kwargs, and_mask_function=recent)
    if types is None:
        return sliding
    return {"full_attention": create_causal_mask(**kwargs), "sliding_attention": sliding}


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
        "adapter": spec_dims(specs, {"batch": batch}),
    }
    input_names = ["input_ids", "attention_mask", "position_ids"]
    output_names = ["logits"]
    for i in range(cache.layers):
        input_names += past_names(i)
        output_names += present_names(i)
    input_names += names
    return dynamo_export(wrapped, (ids, mask, pos, past, adapter), dynamic, input_names, output_names,
                         opset, specs, model.config.model_type)
