"""Encoder classifier (``AutoModelForSequenceClassification``) -> ONNX with adapter side branches.

Inputs ``input_ids (B, S)``, ``attention_mask (B, S)`` and the adapter inputs of ``slots.py``:
layer features, ``head.{param}`` (the classification head each adapter carries) and, when a
prompt-tuning adapter is exported, ``prompt.embeds (n, hidden)``: its rows are placed before the
token embeddings and ``n`` ones before the attention mask, as PEFT does (``n = 0`` by default).
Output ``logits (B, num_labels)``.
"""

from __future__ import annotations


import onnx
import torch
from torch import nn

from edgepeft.export.slots import InputSpec, Slot, dynamo_export, spec_dims, with_side_branches
from edgepeft.contract import PROMPT_INPUT


class _EncoderWrapper(nn.Module):
    def __init__(self, model: nn.Module, feed: dict, names: list[str], prompt: bool):
        super().__init__()
        self.model, self.feed, self.names, self.prompt = model, feed, names, prompt

    def forward(self, input_ids, attention_mask, adapter: list):
        self.feed.update(zip(self.names, adapter))
        if not self.prompt:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        prompt = self.feed[PROMPT_INPUT]  # (n, hidden)
        b = input_ids.shape[0]
        tokens = self.model.get_input_embeddings()(input_ids)  # (B, S, hidden)
        embeds = torch.cat([prompt[None].expand(b, -1, -1), tokens], dim=1)  # (B, n + S, hidden)
        ones = torch.ones(b, prompt.shape[0], dtype=attention_mask.dtype)
        mask = torch.cat([ones, attention_mask], dim=1)  # (B, n + S)
        return self.model(inputs_embeds=embeds, attention_mask=mask).logits


def export_graph(model: nn.Module, slots: list[Slot], specs: list[InputSpec], head_params: list[str],
                 opset: int | None = None) -> onnx.ModelProto:
    """Export a sequence classifier with the given side-branch inputs.

    Args:
        model: fp32 ``*ForSequenceClassification`` in eval mode (not modified).
        slots: adapted layers; empty for a merged graph.
        specs: all adapter inputs (``slots.input_specs``), head and prompt included.
        head_params: names of the head parameters that are inputs.
        opset: ONNX opset, or None for the exporter's default.

    Returns:
        The ONNX model, each adapter input defaulting to its identity value.
    """
    from torch.export import Dim

    feed: dict = {}
    names = [s.name for s in specs]
    prompt = PROMPT_INPUT in names
    body = with_side_branches(model, slots, head_params, feed) if (slots or head_params) else model
    wrapped = _EncoderWrapper(body, feed, names, prompt)
    b, s = 2, 9
    vocab = model.config.vocab_size
    ids = torch.randint(min(5, vocab - 1), vocab, (b, s))
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, -3:] = 0  # right padding in the sample, so the masking path is traced
    adapter = [torch.from_numpy(x.sample) for x in specs]
    batch, seq = Dim("batch"), Dim("seq", max=int(getattr(model.config, "max_position_embeddings", 512)))
    dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq},
               "adapter": spec_dims(specs, {"batch": batch})}
    return dynamo_export(wrapped, (ids, mask, adapter), dynamic, ["input_ids", "attention_mask", *names],
                         ["logits"], opset, specs, model.config.model_type)
