"""What a decoder family is, for the fused graph builder (``edgepeft.export.fused``).

A family is one :class:`Family` value in one file: where its weights are, which norms sit where,
how each layer attends (window, rotary table), and the few scalars its maths adds. The builder
reads these and never names a family; a base whose family is not in
:data:`edgepeft.families.REGISTRY`, or whose config the description refuses, is refused with the
reason.

Per-layer behaviour comes from the config (``layer_types``, ``sliding_window``,
``no_rope_layers``...), through the description's functions, as :class:`Layer` values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

ACTIVATIONS = ("silu", "gelu_pytorch_tanh")  # what the builder computes exactly
# rotary scalings whose table depends on the position only (not on the sequence length)
POSITION_ONLY_ROPE = (None, "default", "linear", "llama3", "yarn")
LLAMA_GROUPS = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                "o": ("self_attn.o_proj",),
                "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
                "down": ("mlp.down_proj",)}
LLAMA_NORMS = {"attn_in": "input_layernorm", "mlp_in": "post_attention_layernorm"}


@dataclass(frozen=True)
class Layer:
    """How one decoder layer attends.

    Attributes:
        window: keys a query sees, itself included (HF ``sliding_window``); None: all.
        rope: the rotary table this layer uses (a key of :meth:`Family.rotary`'s tables); None: no
            rotary (NoPE).
    """

    window: int | None
    rope: str | None


def rope_type(rope: Mapping | None) -> str | None:
    """``rope_type`` of one rope-parameters dict (HF names it ``rope_type`` or ``type``)."""
    rope = rope or {}
    return rope.get("rope_type", rope.get("type"))


def rope_parameters(cfg) -> dict:
    return dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})


def check_rope(cfg) -> str | None:
    """Why a single rotary table is not exact for this config, or None."""
    kind = rope_type(rope_parameters(cfg))
    if kind == "longrope":
        return None  # tables up to original_max_position_embeddings (see rotary_positions)
    if kind not in POSITION_ONLY_ROPE:
        return f"rope type {kind!r} (its frequencies depend on the sequence length)"
    return None


def rotary_positions(cfg) -> int:
    """Rows of the rotary tables: every position the model takes, except for LongRoPE, whose
    frequencies switch for all positions once a sequence passes ``original_max_position_embeddings``:
    its tables stop there, so they hold the short factors exactly (longer sequences are refused
    by GroupQueryAttention's table bound)."""
    params = rope_parameters(cfg)
    if rope_type(params) == "longrope":
        return int(params.get("original_max_position_embeddings")
                   or getattr(cfg, "original_max_position_embeddings"))
    return int(cfg.max_position_embeddings)


def window_layers(cfg) -> list[Layer]:
    """Layers from ``layer_types`` (``sliding_attention`` gets ``sliding_window``), else every
    layer windowed when the config has a ``sliding_window`` (Mistral, Phi-3); one rotary table."""
    n = cfg.num_hidden_layers
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        return [Layer(window if t == "sliding_attention" else None, "default") for t in types[:n]]
    return [Layer(window, "default") for _ in range(n)]


def default_rotary(model: torch.nn.Module, decoder: torch.nn.Module, key: str, positions: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin (P, rotary_dim)`` of the decoder's one rotary module (its scaling included)."""
    pos = torch.arange(positions)[None]  # (1, P)
    cos, sin = decoder.rotary_emb(torch.zeros(1, dtype=torch.float32), pos)  # (1, P, D_rot) each
    return cos[0], sin[0]


def head_dim(cfg) -> int:
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def rotary_dim(cfg) -> int:
    """Dimensions of each head that rotary turns (``partial_rotary_factor`` of the head)."""
    factor = rope_parameters(cfg).get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0))
    return int(head_dim(cfg) * float(factor or 1.0))


def default_scale(cfg) -> float:
    return head_dim(cfg) ** -0.5


def no_check(cfg) -> str | None:
    return None


@dataclass(frozen=True)
class Family:
    """One decoder family, as the fused builder reads it.

    Attributes:
        groups: the graph's weight groups, each the layer's modules (paths under
            ``{decoder}.layers.{i}``) that read the same input and run as one MatMul: q|k|v,
            o, gate|up, down. A family whose checkpoint packs them (Phi-3's ``qkv_proj``) lists
            the one packed module.
        norms: the layer's RMSNorm weights by role: ``attn_in`` and ``mlp_in`` always;
            ``attn_out`` / ``mlp_out`` when the family also norms each branch's output before the
            residual add (Gemma's sandwich norms).
        qk_norm: RMSNorm over each head of q and k before rotary (``self_attn.q_norm`` /
            ``k_norm``: Qwen3, Gemma 3).
        norm_offset: added to every RMSNorm weight (Gemma stores ``w`` and scales by ``1 + w``).
        decoder: module path of the decoder stack (``embed_tokens``, ``layers``, ``norm``,
            ``rotary_emb``).
        layers: per-layer attention (:class:`Layer`) from the config.
        rotary: ``(model, decoder, key, positions) -> (cos, sin)`` full tables of one rotary key.
        scale: the attention's scale (HF ``scaling``).
        check: why this config is not computed exactly (None: it is), beyond what the builder
            checks for every family.
        embed_scale: the token embeddings' multiplier (Gemma: sqrt(hidden)); None: none.
        softcaps: config attributes of the attention-logit and final-logit soft caps (Gemma 2).
        text_config: the decoder's config within the model's (a multimodal model's text tower).
    """

    groups: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: LLAMA_GROUPS)
    norms: Mapping[str, str] = field(default_factory=lambda: LLAMA_NORMS)
    qk_norm: bool = False
    norm_offset: float = 0.0
    decoder: str = "model"
    layers: Callable[[object], list[Layer]] = window_layers
    rotary: Callable = default_rotary
    scale: Callable[[object], float] = default_scale
    check: Callable[[object], str | None] = no_check
    embed_scale: Callable[[object], float] | None = None
    softcaps: tuple[str, str] | None = None
    text_config: Callable = lambda cfg: cfg

    def __post_init__(self):
        if set(self.groups) != {"qkv", "o", "gate_up", "down"}:
            raise ValueError(f"a family's groups are qkv, o, gate_up, down; got {sorted(self.groups)}")
        if not {"attn_in", "mlp_in"} <= set(self.norms) <= {"attn_in", "attn_out", "mlp_in", "mlp_out"}:
            raise ValueError(f"a family's norms are attn_in, mlp_in (+ attn_out, mlp_out); got {sorted(self.norms)}")

    def group_table(self, cfg) -> dict[tuple[int | str, str], list[str]]:
        """``{(layer, group): [module path, ...]}`` of every weight group, in graph order."""
        n = self.text_config(cfg).num_hidden_layers
        return {(i, g): [f"{self.decoder}.layers.{i}.{m}" for m in mods]
                for i in range(n) for g, mods in self.groups.items()}


# Encoder classifiers, for the fused encoder builder (edgepeft.export.fused_encoder). Every family
# has BERT's post-norm layer:
#     x = LayerNorm(x + o(attention(q|k|v(x))))
#     x = LayerNorm(x + down(gelu(up(x))))
# with learned (or stored sinusoidal) absolute positions and at most one token-type row, so a
# family differs only in names, how it numbers positions and its head.
BERT_GROUPS = {"qkv": ("attention.self.query", "attention.self.key", "attention.self.value"),
               "o": ("attention.output.dense",),
               "up": ("intermediate.dense",),
               "down": ("output.dense",)}
BERT_NORMS = {"attn": "attention.output.LayerNorm", "out": "output.LayerNorm"}
ENCODER_ACTIVATIONS = ("gelu",)  # the intermediate activations the builder computes exactly (erf GELU)
HEAD_ACTIVATIONS = ("tanh", "relu", None)


@dataclass(frozen=True)
class Encoder:
    """One encoder family.

    Attributes:
        prefix: module path of the encoder model (``{prefix}.embeddings`` with
            ``word_embeddings``, ``position_embeddings``, ``LayerNorm`` and, if the checkpoint
            has them, ``token_type_embeddings``).
        head: the head's linears, applied in order to the first token's hidden state, each with
            the activation after it (``tanh``, ``relu`` or None); the last gives the logits.
        positions: ``index`` (each token's column, BERT) or ``non_pad`` (RoBERTa: the count of
            tokens that are not ``pad_token_id`` up to and including it, plus ``pad_token_id``;
            pads get ``pad_token_id``).
        layers: module path of the layer list under ``prefix``.
        groups: each layer's q|k|v, o, up and down projections (paths under a layer).
        norms: each layer's LayerNorms after attention (``attn``) and after the feed-forward (``out``).
        activation: the config's feed-forward activation.
        eps: the LayerNorms' epsilon from the config.
    """

    prefix: str
    head: tuple[tuple[str, str | None], ...]
    positions: str = "index"
    layers: str = "encoder.layer"
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: BERT_GROUPS)
    norms: Mapping[str, str] = field(default_factory=lambda: BERT_NORMS)
    activation: Callable[[object], str | None] = lambda cfg: getattr(cfg, "hidden_act", None)
    eps: Callable[[object], float] = lambda cfg: float(cfg.layer_norm_eps)

    def __post_init__(self):
        if self.positions not in ("index", "non_pad"):
            raise ValueError(f"an encoder's positions are 'index' or 'non_pad'; got {self.positions!r}")
        if not self.head or any(act not in HEAD_ACTIVATIONS for _, act in self.head) or self.head[-1][1]:
            raise ValueError(f"an encoder head is linears with {HEAD_ACTIVATIONS[:-1]} or no activation, the "
                             f"last without one; got {self.head}")
        if set(self.groups) != set(BERT_GROUPS) or set(self.norms) != set(BERT_NORMS):
            raise ValueError(f"an encoder's groups are {sorted(BERT_GROUPS)} and norms {sorted(BERT_NORMS)}; "
                             f"got {sorted(self.groups)}, {sorted(self.norms)}")

    def text_config(self, cfg):
        return cfg

    def layer_path(self, i: int) -> str:
        return f"{self.prefix}.{self.layers}.{i}"

    def group_table(self, cfg) -> dict[tuple[int | str, str], list[str]]:
        """``{(layer, group): [module path, ...]}`` in graph order: each layer's q|k|v, o, up and
        down, then each head linear as group ``("head", "0")``, ``("head", "1")``..."""
        table = {(i, g): [f"{self.layer_path(i)}.{m}" for m in mods]
                 for i in range(cfg.num_hidden_layers) for g, mods in self.groups.items()}
        table.update({("head", str(j)): [module] for j, (module, _) in enumerate(self.head)})
        return table

    def check(self, cfg) -> str | None:
        """Why the builder does not compute this config exactly, or None."""
        act = self.activation(cfg)
        if act not in ENCODER_ACTIVATIONS:
            return f"activation {act!r} (the fused encoder computes {', '.join(ENCODER_ACTIVATIONS)})"
        kind = getattr(cfg, "position_embedding_type", "absolute") or "absolute"
        if kind != "absolute":
            return f"position_embedding_type {kind!r} (the fused encoder computes absolute positions)"
        if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
            return "a decoder configuration (the fused encoder is bidirectional self-attention)"
        if cfg.hidden_size % cfg.num_attention_heads:
            return f"hidden_size {cfg.hidden_size} not a multiple of num_attention_heads {cfg.num_attention_heads}"
        return None
