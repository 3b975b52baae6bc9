"""Llama-family decoders -> one ONNX graph of onnxruntime's fused kernels, built from the weights.

The generic export (``causal_lm.py``) traces the model: about 2,600 small nodes per decode step
on SmolLM2, so a step costs more in kernel launches than in reading the 4-bit weights. This
builds the same computation from the state dict, per layer::

    SkipSimplifiedLayerNormalization -> MatMul qkv (q|k|v packed) [+ LoRA] -> GroupQueryAttention
    (rotary inside, KV cache in one preallocated buffer) -> MatMul o [+ LoRA]
    -> SkipSimplifiedLayerNormalization -> MatMul gate|up [+ LoRA] -> SiLU(gate) * up
    -> MatMul down [+ LoRA]

Inputs: ``input_ids (B, S)``, ``seqlens_k (B,)`` int32 (each row's total length - 1),
``total_sequence_length ()`` int32, ``past.{i}.key|value (B, H_kv, M, D)`` (a buffer of M slots the
runtime binds to ``present.{i}.key|value`` too: onnxruntime writes the new keys in place), and the
LoRA inputs ``lora.{layer}.{group}.AT (in, R)`` / ``.BT (R, out)``, transposed so both are plain
row-major MatMuls (a transposed-B MatMul on a run-time input costs ~10 % more per decode step). A
group packs the projections that read the same input (q|k|v, gate|up): their A's stack along the
rank axis and their B's sit block-diagonally, so one adapter (or a mix, which concatenates ranks)
runs as two MatMuls per group. Rows are right-padded (the runtime converts); positions are each row's own.

Scope: ``LlamaForCausalLM``-shaped models (RMSNorm, rotary with a position-only frequency table,
SiLU-gated MLP, optional q/k/v/o biases) and plain LoRA adapters. Anything else is refused with
the reason; the generic graph handles it.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from edgepeft import kinds
from edgepeft.kinds.common import SideBranch
from edgepeft.errors import EdgepeftError
from edgepeft.contract import past_names, present_names

GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",),
          "gate_up": ("gate_proj", "up_proj"), "down": ("down_proj",)}
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
MODEL_TYPES = ("llama", "mistral", "qwen2")
ROPE_TYPES = (None, "default", "linear", "llama3", "yarn", "longrope")  # position-only tables


def lora_group_names(layer: int, group: str) -> tuple[str, str]:
    """Graph input names of one packed LoRA group: ``A^T (in, R)``, ``B^T (R, out)``."""
    return f"lora.{layer}.{group}.AT", f"lora.{layer}.{group}.BT"


def check_supported(model: torch.nn.Module, sides: dict[str, SideBranch]) -> None:
    """Refuse, with the reason, what the fused graph cannot compute exactly.

    Raises:
        EdgepeftError: another architecture, an unsupported rotary scaling, a non-SiLU MLP, or an
            adapter that is not plain LoRA on the decoder's projections.
    """
    cfg = model.config
    why = None
    rope = (getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    rope_type = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
    if cfg.model_type not in MODEL_TYPES:
        why = f"model_type {cfg.model_type!r} (the fused graph knows {', '.join(MODEL_TYPES)})"
    elif getattr(cfg, "hidden_act", "silu") != "silu":
        why = f"hidden_act {cfg.hidden_act!r} (SiLU only)"
    elif rope_type not in ROPE_TYPES:
        why = f"rope type {rope_type!r} (its frequencies depend on the sequence length)"
    elif getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) \
            and cfg.model_type == "mistral":
        why = "a sliding attention window"
    elif getattr(cfg, "mlp_bias", False):
        why = "MLP biases"
    if why:
        raise EdgepeftError(f"--graph fused: this base has {why}. Export with --graph generic.")
    for name, side in sides.items():
        odd = [f for f in (side.head, side.prompt, side.prefix) if f]
        bad = [f"{m} ({feat})" for m, feat in side.layers
               if kinds.feature(feat).fused != "lora" or m.rpartition(".")[2] not in _PARENT]
        if odd or bad:
            what = bad[0] if bad else "a prompt, prefix or classification head"
            raise EdgepeftError(f"--graph fused: adapter {name!r} has {what}; the fused graph takes plain "
                                "LoRA on q/k/v/o/gate/up/down projections only. Export it with --graph generic.")


def _module(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.{_PARENT[proj]}.{proj}"


def groups_used(sides: dict[str, SideBranch], layers: int) -> list[tuple[int, str]]:
    """``(layer, group)`` pairs that at least one adapter touches, in graph order."""
    touched = {m for side in sides.values() for m, _ in side.layers}
    return [(i, g) for i in range(layers) for g, projs in GROUPS.items()
            if any(_module(i, p) in touched for p in projs)]


def pack_adapter(side: SideBranch, used: list[tuple[int, str]], outs: dict[str, int], ins: dict[str, int]
                 ) -> dict[str, np.ndarray]:
    """One adapter's LoRA arrays in the fused graph's packed inputs.

    Args:
        side: the adapter's side branch (``B`` already carries the scale).
        used: the graph's LoRA groups (:func:`groups_used`).
        outs / ins: output / input width of each projection (``q_proj`` ...).

    Returns:
        ``{lora.{layer}.{group}.AT: (in, R), ...BT: (R, out_total)}`` for the groups this
        adapter touches: A's stacked, B's block-diagonal (zeros elsewhere), so the product is exact.
    """
    out: dict[str, np.ndarray] = {}
    for layer, group in used:
        projs = GROUPS[group]
        parts = [side.layers.get((_module(layer, p), "lora")) for p in projs]
        if not any(parts):
            continue
        ranks = [0 if p is None else p["A"].shape[0] for p in parts]
        a = np.zeros((sum(ranks), ins[projs[0]]), np.float32)  # (R, in)
        b = np.zeros((sum(outs[p] for p in projs), sum(ranks)), np.float32)  # (out_total, R)
        r0 = o0 = 0
        for p, part, r in zip(projs, parts, ranks):
            if part is not None:
                a[r0:r0 + r] = part["A"]
                b[o0:o0 + outs[p], r0:r0 + r] = part["B"]
            r0, o0 = r0 + r, o0 + outs[p]
        name_a, name_b = lora_group_names(layer, group)
        out[name_a], out[name_b] = np.ascontiguousarray(a.T), np.ascontiguousarray(b.T)  # (in, R), (R, out)
    return out


class _Graph:
    """Nodes, initializers and inputs of the graph being built."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def node(self, op: str, inputs: list[str], outputs: int | list[str] = 1, domain: str = "", **attrs) -> list[str]:
        self.n += 1
        name = f"{op}_{self.n}"
        outs = [f"{name}/out{j}" for j in range(outputs)] if isinstance(outputs, int) else outputs
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain or None, **attrs))
        return outs

    def init(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def rotary_tables(model: torch.nn.Module, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """``cos, sin`` ``(positions, head_dim / 2)`` from the model's own rotary module (its scaling
    included), the halves GroupQueryAttention's non-interleaved rotary takes."""
    rotary = model.model.rotary_emb
    pos = torch.arange(positions)[None]  # (1, P)
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), pos)  # (1, P, D) each
    half = cos.shape[-1] // 2
    return _np(cos[0, :, :half]), _np(sin[0, :, :half])


def build_graph(model: torch.nn.Module, sides: dict[str, SideBranch], opset: int = 17
                ) -> tuple[onnx.ModelProto, list[tuple[str, np.ndarray]], list[tuple[int, str]]]:
    """The fused decoder graph of ``model`` (fp32 weights as initializers).

    Args:
        model: a Llama-family causal LM (merged weights for a merged artifact).
        sides: the adapters' side branches; their LoRA targets decide which groups get inputs.
        opset: ONNX opset of the default domain.

    Returns:
        ``(model proto, [(adapter input name, identity default)], used groups)``. Each default is
        a rank-0 array, so a run that feeds nothing is the base model.
    """
    check_supported(model, sides)
    cfg = model.config
    sd = model.state_dict()
    n_layers, hidden = cfg.num_hidden_layers, cfg.hidden_size
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    eps = float(cfg.rms_norm_eps)
    inter = cfg.intermediate_size
    outs, ins = widths(model)
    used = groups_used(sides, n_layers)
    g = _Graph()
    adapter_inputs: list[tuple[str, np.ndarray]] = []

    def linear(x: str, layer: int, group: str) -> str:
        projs = GROUPS[group]
        prefix = f"model.layers.{layer}.{_PARENT[projs[0]]}"
        w = np.concatenate([_np(sd[f"{prefix}.{p}.weight"]) for p in projs], axis=0)  # (out_total, in)
        wname = g.init(f"{prefix}.{group}.weight_t", w.T)  # (in, out_total)
        (y,) = g.node("MatMul", [x, wname])
        biases = [sd.get(f"{prefix}.{p}.bias") for p in projs]
        if any(b is not None for b in biases):
            bias = np.concatenate([_np(b) if b is not None else np.zeros(outs[p], np.float32)
                                   for p, b in zip(projs, biases)])
            (y,) = g.node("Add", [y, g.init(f"{prefix}.{group}.bias", bias)])
        if (layer, group) in used:
            name_a, name_b = lora_group_names(layer, group)
            adapter_inputs.append((name_a, np.zeros((ins[projs[0]], 0), np.float32)))
            adapter_inputs.append((name_b, np.zeros((0, sum(outs[p] for p in projs)), np.float32)))
            (t,) = g.node("MatMul", [x, name_a])  # (B, S, R)
            (d,) = g.node("MatMul", [t, name_b])  # (B, S, out)
            (y,) = g.node("Add", [y, d])
        return y

    embed = g.init("model.embed_tokens.weight", _np(sd["model.embed_tokens.weight"]))  # (V, H)
    (x,) = g.node("Gather", [embed, "input_ids"])  # (B, S, H)
    cos, sin = rotary_tables(model, int(cfg.max_position_embeddings))
    g.init("rotary.cos", cos)
    g.init("rotary.sin", sin)
    (normed,) = g.node("SimplifiedLayerNormalization",
                       [x, g.init("model.layers.0.input_layernorm.weight",
                                  _np(sd["model.layers.0.input_layernorm.weight"]))], epsilon=eps, axis=-1)
    residual = x
    for i in range(n_layers):
        qkv = linear(normed, i, "qkv")  # (B, S, (H + 2 H_kv) D)
        pk, pv = past_names(i)
        ok, ov = present_names(i)
        (attn,) = g.node("GroupQueryAttention",
                         [qkv, "", "", pk, pv, "seqlens_k", "total_sequence_length", "rotary.cos", "rotary.sin"],
                         [f"attn.{i}", ok, ov], domain="com.microsoft", num_heads=heads,
                         kv_num_heads=kv_heads, do_rotary=1, rotary_interleaved=0)[:1]
        o = linear(attn, i, "o")
        post = g.init(f"model.layers.{i}.post_attention_layernorm.weight",
                      _np(sd[f"model.layers.{i}.post_attention_layernorm.weight"]))
        normed, _, _, residual = g.node("SkipSimplifiedLayerNormalization", [o, residual, post], 4,
                                        domain="com.microsoft", epsilon=eps)
        gu = linear(normed, i, "gate_up")  # (B, S, 2 I)
        gate, up = g.node("Split", [gu, g.init(f"mlp.{i}.split", np.array([inter, inter], np.int64))], 2, axis=-1)
        (sig,) = g.node("Sigmoid", [gate])
        (act,) = g.node("Mul", [gate, sig])
        (act,) = g.node("Mul", [act, up])  # (B, S, I)
        down = linear(act, i, "down")
        last = i == n_layers - 1
        gamma = "model.norm.weight" if last else f"model.layers.{i + 1}.input_layernorm.weight"
        normed, _, _, residual = g.node("SkipSimplifiedLayerNormalization", [down, residual,
                                        g.init(gamma, _np(sd[gamma]))], 4, domain="com.microsoft", epsilon=eps)
    head = sd.get("lm_head.weight")
    if head is None or getattr(cfg, "tie_word_embeddings", False) and torch.equal(head, sd["model.embed_tokens.weight"]):
        (head_t,) = g.node("Transpose", [embed], perm=[1, 0])  # tied: the table, read transposed
    else:
        head_t = g.init("lm_head.weight_t", _np(head).T)  # (H, V)
    g.node("MatMul", [normed, head_t], ["logits"])  # (B, S, V)

    vocab = int(sd["model.embed_tokens.weight"].shape[0])
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
              helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab])]
    for i in range(n_layers):
        for name in past_names(i):
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", kv_heads, "max_seq", head_dim]))
        for name in present_names(i):
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", kv_heads, "max_seq", head_dim]))
    for name, default in adapter_inputs:  # graph inputs with a default: overridable initializers
        rank = f"rank.{name.rsplit('.', 1)[0]}"
        shape = [default.shape[0], rank] if name.endswith(".AT") else [rank, default.shape[1]]
        inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
        g.init(name, default)
    graph = helper.make_graph(g.nodes, "edgepeft-fused-decoder", inputs, outputs, g.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid("com.microsoft", 1)],
                              producer_name="edgepeft")
    proto.ir_version = 8
    return proto, adapter_inputs, used


def widths(model: torch.nn.Module) -> tuple[dict[str, int], dict[str, int]]:
    """``(outs, ins)``: output and input width of each projection, for :func:`pack_adapter`."""
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    h, inter = cfg.hidden_size, cfg.intermediate_size
    outs = {"q_proj": heads * head_dim, "k_proj": kv_heads * head_dim, "v_proj": kv_heads * head_dim,
            "o_proj": h, "gate_proj": inter, "up_proj": inter, "down_proj": h}
    ins = {"q_proj": h, "k_proj": h, "v_proj": h, "o_proj": heads * head_dim,
           "gate_proj": h, "up_proj": h, "down_proj": inter}
    return outs, ins
