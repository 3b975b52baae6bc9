"""Gemma 3 (``gemma3_text``, and as :data:`TOWER` the text tower of the multimodal ``gemma3``): ``(1 + w)`` RMSNorms, sandwich norms around attention and the MLP,
RMSNorm over each head of q and k, attention scaled by ``query_pre_attn_scalar ** -0.5``,
GELU-tanh gated MLP, embeddings scaled by sqrt(hidden), sliding-window layers interleaved with
global ones, each layer type with its own rotary base."""

import dataclasses

import torch

from edgepeft.families.common import Family, Layer, POSITION_ONLY_ROPE, rope_type

NORMS = {"attn_in": "input_layernorm", "attn_out": "post_attention_layernorm",
         "mlp_in": "pre_feedforward_layernorm", "mlp_out": "post_feedforward_layernorm"}


def layers(cfg) -> list[Layer]:
    return [Layer(cfg.sliding_window if t == "sliding_attention" else None, t)
            for t in cfg.layer_types[:cfg.num_hidden_layers]]


def rotary(model, decoder, key: str, positions: int):
    """Tables of one layer type: Gemma 3's rotary module keeps one frequency set per type."""
    pos = torch.arange(positions)[None]  # (1, P)
    cos, sin = decoder.rotary_emb(torch.zeros(1, dtype=torch.float32), pos, key)  # (1, P, D) each
    return cos[0], sin[0]


def check(cfg) -> str | None:
    if getattr(cfg, "use_bidirectional_attention", False):
        return "bidirectional attention (an embedding model, not a causal LM)"
    for t, params in (cfg.rope_parameters or {}).items():
        if rope_type(params) not in POSITION_ONLY_ROPE:
            return f"rope type {rope_type(params)!r} on {t} layers (frequencies depend on the length)"
    return None


FAMILY = Family(norms=NORMS, qk_norm=True, norm_offset=1.0, layers=layers, rotary=rotary,
                scale=lambda cfg: float(cfg.query_pre_attn_scalar) ** -0.5, check=check,
                embed_scale=lambda cfg: float(cfg.hidden_size) ** 0.5,
                softcaps=("attn_logit_softcapping", "final_logit_softcapping"))

# Gemma3ForConditionalGeneration: the same decoder under model.language_model (images are not
# exported; a prompt of text tokens runs it as Gemma 3 text)
TOWER = dataclasses.replace(FAMILY, decoder="model.language_model", text_config=lambda cfg: cfg.text_config)
