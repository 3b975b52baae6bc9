"""Decoders -> one ONNX graph of onnxruntime's fused kernels, built from the weights.

The generic export (``causal_lm.py``) traces the model: about 2,600 small nodes per decode step
on SmolLM2, so a step costs more in kernel launches than in reading the 4-bit weights. This
builds the same computation from the state dict, per layer::

    SkipSimplifiedLayerNormalization -> MatMul qkv (q|k|v packed) [+ LoRA] [-> q/k RMSNorm]
    -> GroupQueryAttention (rotary inside, window, soft cap, KV cache in one preallocated buffer)
    -> MatMul o [+ LoRA] [-> RMSNorm] -> SkipSimplifiedLayerNormalization
    -> MatMul gate|up [+ LoRA] -> act(gate) * up -> MatMul down [+ LoRA] [-> RMSNorm]

What differs between model families (where the weights are, which norms, windows, rotary tables,
scales) is read from the family's description (``edgepeft.families``); this file names no family.

Inputs: ``input_ids (B, S)``, ``seqlens_k (B,)`` int32 (each row's total length - 1),
``total_sequence_length ()`` int32, ``past.{i}.key|value (B, H_kv, M, D)`` (a buffer of M slots the
runtime binds to ``present.{i}.key|value`` too: onnxruntime writes the new keys in place), and the
adapter inputs of each packed group (:func:`fused_input_name`). A group packs the projections
that read the same input (q|k|v, gate|up) into one MatMul; per group the graph computes
(``x (B, S, in)``, ``y (B, S, out)``, ``out`` the group's total)::

    x = x * (1 + scale.{i}.{g}.in)       (in,)      IA3 on a feed-forward input
    y = x W^T                                       the packed base MatMul
    y = y * (1 + scale.{i}.{g}.mag)      (out,)     DoRA's g - 1, before the bias
    y = y + b
    y = y + ((x lora.{i}.{g}.AT) * lora.{i}.{g}.rows) lora.{i}.{g}.BT
                                  (in, R), (N, 1, R), (R, out): LoRA / DoRA (B = g s B), rows
                                  weighting each row's rank columns (default ones: all alike)
    y = y * (1 + scale.{i}.{g}.out)      (out,)     IA3 on an output, bias and LoRA included
    y = y + act(y DT + db) UT + ub                  a bottleneck adapter per activation:
                                  residual.{i}.{g}.{act}_DT (out, R), _db (R,), _UT (R, out),
                                  _ub (out,); hidden units of several adapters concatenated

where each scale ``s`` is ``s + s.rows`` with ``s.rows (N, 1, width)`` its per-row offsets
(default zeros: every row alike), so each row of a batch can run its own adapter.

(the order of the traced graph's slot, ``edgepeft/export/slots.py``). Which of these a kind feeds
is its features' fused form (``edgepeft.contract.features.FUSED_FORMS``); this file names no kind.
Every input's default is its identity: AT / BT have rank 0; a scale holds the part's value
minus its identity, so zeros (also for the projections of a group an adapter does not touch)
leave the group as the base computes it. AT / BT are transposed so both are plain row-major
MatMuls (a transposed-B MatMul on a run-time input costs ~10 % more per decode step); their A's
stack along the rank axis and their B's sit block-diagonally, so one adapter (or a mix, which
concatenates ranks) runs as two MatMuls per group. Rows are right-padded (the runtime converts);
positions are each row's own.

Scope: the families of ``edgepeft.families`` and adapters whose features have a fused form, on
the attention and MLP projections; an input scale on a packed group needs the same scale on all
its projections (they share one input). Anything else is refused with the reason
(:func:`edgepeft.export.fused_layout.unsupported`); the traced graph handles it.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from edgepeft import families
from edgepeft.contract import past_names, present_names, rows_input_name
from edgepeft.contract.names import rows_axis
from edgepeft.contract.features import FUSED_BOTTLENECK_ACTS, FUSED_MIX
from edgepeft.families.common import head_dim, rotary_positions
from edgepeft.kinds.common import SideBranch, to_numpy as _np
from edgepeft.export.fused_layout import (activation, check_supported, fused_input_name, group_inputs, group_table,
                                         rank_name, rows_name)


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


class Groups:
    """The packed weight groups of a graph being built: each group's MatMul with the adapter
    inputs its adapters feed, and those inputs' declarations. Shared by the decoder builder and
    the encoder builder (``edgepeft.export.fused_encoder``)."""

    def __init__(self, g: _Graph, model: torch.nn.Module, sides: dict[str, SideBranch]):
        self.g = g
        self.sd = model.state_dict()
        self.used = group_inputs(model, sides)
        self.table = group_table(model)
        self.adapter_inputs: list[tuple[str, np.ndarray]] = []
        self.rows_inputs: list[str] = []  # per-row weights of the low-rank groups (graph inputs, default ones)
        self.offset_inputs: list[tuple[str, int]] = []  # per-row offsets of the scales, width (default zeros)
        self._one = ""  # the scalar 1 the scales add, made on first use

    def linear(self, x: str, layer: int | str, group: str) -> str:
        """``x @ W^T (+ b)`` of one packed group, with the adapter inputs its adapters feed
        (scales and the low-rank branch, in the order of the module docstring)."""
        y, bias = self.linear_parts(x, layer, group)
        return self.g.node("Add", [y, bias])[0] if bias else y

    def linear_parts(self, x: str, layer: int | str, group: str, per_token=None) -> tuple[str, str | None]:
        """:meth:`linear` without its bias, for a fused kernel that adds it (``BiasGelu``,
        ``MultiHeadAttention``) or an Add the caller makes anyway: ``(y, bias initializer or None)``.
        With an output scale or a bottleneck the bias is added here (they act on the whole output)
        and None returned.

        ``per_token``: for ``x`` of packed tokens ``(T, in)`` rather than ``(B, S, in)``, maps a
        per-row input ``(N, 1, W)`` to the value each token multiplies by, ``(T, W)`` (None: rows
        broadcast over ``(B, S)`` as they are)."""
        rows = per_token or (lambda name: name)
        g, mods = self.g, self.table[(layer, group)]
        prefix = f"{mods[0].rpartition('.')[0]}.{group}"  # e.g. model.layers.0.self_attn.qkv
        w = np.concatenate([_np(self.sd[f"{m}.weight"]) for m in mods], axis=0)  # (out_total, in)
        fed = self.used.get((layer, group), ())
        if "in" in fed:
            x = self.scaled(x, fused_input_name(layer, group, "in"), w.shape[1], rows)
        (y,) = g.node("MatMul", [x, g.init(f"{prefix}.weight_t", w.T)])  # (B, S, out_total)
        if "mag" in fed:
            y = self.scaled(y, fused_input_name(layer, group, "mag"), w.shape[0], rows)
        biases = [self.sd.get(f"{m}.bias") for m in mods]
        bias = None
        if any(b is not None for b in biases):
            bias = g.init(f"{prefix}.bias", np.concatenate(
                [_np(b) if b is not None else np.zeros(self.sd[f"{m}.weight"].shape[0], np.float32)
                 for m, b in zip(mods, biases)]))
        if "AT" in fed:
            name_a, name_b = fused_input_name(layer, group, "AT"), fused_input_name(layer, group, "BT")
            self.adapter_inputs.append((name_a, np.zeros((w.shape[1], 0), np.float32)))
            self.adapter_inputs.append((name_b, np.zeros((0, w.shape[0]), np.float32)))
            (t,) = g.node("MatMul", [x, name_a])  # (B, S, R)
            self.rows_inputs.append(rows_name(layer, group))
            (t,) = g.node("Mul", [t, rows(self.rows_inputs[-1])])  # (B, S, R) * (N, 1, R): each row's columns
            (d,) = g.node("MatMul", [t, name_b])  # (B, S, out)
            (y,) = g.node("Add", [y, d])
        acts = [act for act in FUSED_BOTTLENECK_ACTS if f"{act}_DT" in fed]
        if bias and ("out" in fed or acts):  # both act on the whole output, bias included
            (y,) = g.node("Add", [y, bias])
            bias = None
        if "out" in fed:
            y = self.scaled(y, fused_input_name(layer, group, "out"), w.shape[0], rows)
        for act in acts:
            y = self.bottleneck(y, layer, group, act, w.shape[0])
        return y, bias

    def bottleneck(self, y: str, layer: int | str, group: str, act: str, width: int) -> str:
        """``y + act(y DT + db) UT + ub``: the residual bottleneck MLPs of activation ``act`` on the
        group's output ``y (.., out)``; rank-0 defaults (no hidden units) are the identity."""
        g = self.g
        dt, db, ut, ub = (fused_input_name(layer, group, f"{act}_{p}") for p in ("DT", "db", "UT", "ub"))
        self.adapter_inputs += [(dt, np.zeros((width, 0), np.float32)), (db, np.zeros(0, np.float32)),
                                (ut, np.zeros((0, width), np.float32)), (ub, np.zeros(width, np.float32))]
        (z,) = g.node("MatMul", [y, dt])  # (.., R)
        if act == "gelu":  # exact (erf), as the kind's torch maths
            (z,) = g.node("BiasGelu", [z, db], domain="com.microsoft")
        else:
            (z,) = g.node("Add", [z, db])
            (z,) = (g.node("Relu", [z]) if act == "relu" else g.node("Mul", [z, g.node("Sigmoid", [z])[0]]))
        (u,) = g.node("MatMul", [z, ut])  # (.., out)
        return g.node("Add", [y, g.node("Add", [u, ub])[0]])[0]

    def scaled(self, x: str, name: str, width: int, rows=lambda name: name) -> str:
        """``x * (1 + name + name.rows)`` over the last axis, ``name`` an adapter input ``(width,)``
        whose identity default is zeros (the fed value is the scale minus 1), ``name.rows`` its
        per-row offsets ``(N, 1, width)``, default zeros."""
        g = self.g
        self.adapter_inputs.append((name, np.zeros(width, np.float32)))
        self.offset_inputs.append((rows_input_name(name), width))
        if not self._one:
            self._one = g.init("adapter_scale.one", np.array(1.0, np.float32))
        (factor,) = g.node("Add", [name, self._one])  # (width,)
        (factor,) = g.node("Add", [factor, rows(self.offset_inputs[-1][0])])  # (N, 1, width)
        return g.node("Mul", [x, factor])[0]

    def declare(self, inputs: list) -> None:
        """Append the adapter inputs to the graph's ``inputs``, each with its identity default
        as an initializer (an overridable input)."""
        g = self.g
        for name, default in self.adapter_inputs:
            axis = FUSED_MIX[name.rsplit(".", 1)[1]][1]  # the rank axis, or None
            shape = [rank_name(name) if i == axis else d for i, d in enumerate(default.shape)]
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
            g.init(name, default)
        for name in self.rows_inputs:  # default (1, 1, 1) ones: every row alike
            rank = f"rank.{name.rsplit('.', 1)[0]}"
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [rows_axis(name), 1, rank]))
            g.init(name, np.ones((1, 1, 1), np.float32))
        for name, width in self.offset_inputs:  # default (1, 1, width) zeros: every row alike
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [rows_axis(name), 1, width]))
            g.init(name, np.zeros((1, 1, width), np.float32))


class _Builder:
    """Builds one fused decoder graph; one method per piece of a layer."""

    def __init__(self, model: torch.nn.Module, sides: dict[str, SideBranch]):
        self.model = model
        self.fam = families.family(model.config)
        self.cfg = self.fam.text_config(model.config)
        self.eps = float(self.cfg.rms_norm_eps)
        self.g = _Graph()
        self.groups = Groups(self.g, model, sides)
        self.sd = self.groups.sd
        self.linear = self.groups.linear

    def weight(self, name: str) -> np.ndarray:
        return _np(self.sd[name])

    def norm_weight(self, name: str) -> str:
        """An RMSNorm's weight as the graph multiplies it (``w + norm_offset``)."""
        return self.g.init(name, self.weight(name) + np.float32(self.fam.norm_offset))

    def rms_norm(self, x: str, name: str) -> str:
        return self.g.node("SimplifiedLayerNormalization", [x, self.norm_weight(name)], epsilon=self.eps, axis=-1)[0]

    def head_norm(self, x: str, heads: int, name: str) -> str:
        """RMSNorm over each head: ``(B, S, H D) -> (B, S, H, D)`` -> norm -> ``(B, S, H D)``."""
        g, d = self.g, head_dim(self.cfg)
        (h,) = g.node("Reshape", [x, g.init(f"{name}.shape", np.array([0, 0, heads, d], np.int64))])
        (h,) = g.node("SimplifiedLayerNormalization", [h, self.norm_weight(name)], epsilon=self.eps, axis=-1)
        return g.node("Reshape", [h, g.init(f"{name}.flat", np.array([0, 0, heads * d], np.int64))])[0]

    def attention(self, x: str, i: int, layer, tables: dict[str, tuple[str, str]]) -> str:
        cfg, g, fam = self.cfg, self.g, self.fam
        heads, kv_heads, d = cfg.num_attention_heads, cfg.num_key_value_heads, head_dim(cfg)
        qkv = self.linear(x, i, "qkv")  # (B, S, (H + 2 H_kv) D)
        if fam.qk_norm:
            sizes = g.init(f"attn.{i}.split", np.array([heads * d, kv_heads * d, kv_heads * d], np.int64))
            q, k, v = g.node("Split", [qkv, sizes], 3, axis=-1)
            attn_dir = f"{fam.decoder}.layers.{i}.self_attn"
            qkv_in = [self.head_norm(q, heads, f"{attn_dir}.q_norm.weight"),
                      self.head_norm(k, kv_heads, f"{attn_dir}.k_norm.weight"), v]
        else:
            qkv_in = [qkv, "", ""]
        cos, sin = tables[layer.rope] if layer.rope else ("", "")
        attrs = {"num_heads": heads, "kv_num_heads": kv_heads, "do_rotary": int(bool(layer.rope)),
                 "rotary_interleaved": 0, "scale": float(fam.scale(cfg))}
        if layer.window:
            attrs["local_window_size"] = int(layer.window)  # keys q - W + 1 .. q, as HF's mask
        cap = getattr(cfg, fam.softcaps[0], None) if fam.softcaps else None
        if cap:
            attrs["softcap"] = float(cap)
        pk, pv = past_names(i)
        ok, ov = present_names(i)
        return g.node("GroupQueryAttention", [*qkv_in, pk, pv, "seqlens_k", "total_sequence_length", cos, sin],
                      [f"attn.{i}", ok, ov], domain="com.microsoft", **attrs)[0]

    def mlp(self, x: str, i: int) -> str:
        g = self.g
        gu = self.linear(x, i, "gate_up")  # (B, S, 2 I)
        inter = self.sd[f"{self.fam.decoder}.layers.{i}.{self.fam.groups['down'][0]}.weight"].shape[1]
        gate, up = g.node("Split", [gu, g.init(f"mlp.{i}.split", np.array([inter, inter], np.int64))], 2, axis=-1)
        if activation(self.cfg) == "silu":
            (act,) = g.node("Mul", [gate, g.node("Sigmoid", [gate])[0]])
        else:  # gelu_pytorch_tanh: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
            (act,) = g.node("FastGelu", [gate], domain="com.microsoft")
        (act,) = g.node("Mul", [act, up])  # (B, S, I)
        return self.linear(act, i, "down")

    def rotary_tables(self, layers) -> dict[str, tuple[str, str]]:
        """``{rope key: (cos, sin)}`` initializers ``(P, rotary_dim / 2)``: the halves
        GroupQueryAttention's non-interleaved rotary takes (a partial rotary is narrower)."""
        decoder = self.model.get_submodule(self.fam.decoder)
        positions = rotary_positions(self.cfg)
        tables = {}
        for key in dict.fromkeys(layer.rope for layer in layers if layer.rope):
            with torch.no_grad():
                cos, sin = self.fam.rotary(self.model, decoder, key, positions)  # (P, D_rot) each
            half = cos.shape[-1] // 2
            tables[key] = (self.g.init(f"rotary.{key}.cos", _np(cos[:, :half])),
                           self.g.init(f"rotary.{key}.sin", _np(sin[:, :half])))
        return tables

    def build(self) -> onnx.GraphProto:
        cfg, g, fam, dec = self.cfg, self.g, self.fam, self.fam.decoder
        layers = fam.layers(cfg)
        norms = [{role: f"{dec}.layers.{i}.{n}.weight" for role, n in fam.norms.items()} for i in range(len(layers))]
        embed = g.init(f"{dec}.embed_tokens.weight", self.weight(f"{dec}.embed_tokens.weight"))  # (V, H)
        (x,) = g.node("Gather", [embed, "input_ids"])  # (B, S, H)
        if fam.embed_scale:
            (x,) = g.node("Mul", [x, g.init("embed_scale", np.array(fam.embed_scale(cfg), np.float32))])
        tables = self.rotary_tables(layers)
        normed, residual = self.rms_norm(x, norms[0]["attn_in"]), x
        for i, layer in enumerate(layers):
            h = self.attention(normed, i, layer, tables)
            h = self.linear(h, i, "o")
            if "attn_out" in norms[i]:
                h = self.rms_norm(h, norms[i]["attn_out"])
            normed, _, _, residual = g.node("SkipSimplifiedLayerNormalization",
                                            [h, residual, self.norm_weight(norms[i]["mlp_in"])], 4,
                                            domain="com.microsoft", epsilon=self.eps)
            h = self.mlp(normed, i)
            if "mlp_out" in norms[i]:
                h = self.rms_norm(h, norms[i]["mlp_out"])
            gamma = norms[i + 1]["attn_in"] if i + 1 < len(layers) else f"{dec}.norm.weight"
            normed, _, _, residual = g.node("SkipSimplifiedLayerNormalization",
                                            [h, residual, self.norm_weight(gamma)], 4,
                                            domain="com.microsoft", epsilon=self.eps)
        head = self.sd.get("lm_head.weight")
        if head is None or getattr(cfg, "tie_word_embeddings", False) and torch.equal(head, self.sd[f"{dec}.embed_tokens.weight"]):
            (head_t,) = g.node("Transpose", [embed], perm=[1, 0])  # tied: the table, read transposed
        else:
            head_t = g.init("lm_head.weight_t", _np(head).T)  # (H, V)
        cap = getattr(cfg, fam.softcaps[1], None) if fam.softcaps else None
        if cap:  # logits = cap * tanh(logits / cap)
            (y,) = g.node("MatMul", [normed, head_t])
            c = g.init("final_softcap", np.array(cap, np.float32))
            g.node("Mul", [g.node("Tanh", [g.node("Div", [y, c])[0]])[0], c], ["logits"])
        else:
            g.node("MatMul", [normed, head_t], ["logits"])  # (B, S, V)
        return self.graph()

    def graph(self) -> onnx.GraphProto:
        cfg, g = self.cfg, self.g
        kv_heads, d = cfg.num_key_value_heads, head_dim(cfg)
        vocab = int(self.sd[f"{self.fam.decoder}.embed_tokens.weight"].shape[0])
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
                  helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
                  helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab])]
        for i in range(cfg.num_hidden_layers):
            for name in past_names(i):
                inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", kv_heads, "max_seq", d]))
            for name in present_names(i):
                outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", kv_heads, "max_seq", d]))
        self.groups.declare(inputs)
        return helper.make_graph(g.nodes, "edgepeft-fused-decoder", inputs, outputs, g.inits)


def build_graph(model: torch.nn.Module, sides: dict[str, SideBranch], opset: int = 17
                ) -> tuple[onnx.ModelProto, list[tuple[str, np.ndarray]], list[tuple[int, str]]]:
    """The fused decoder graph of ``model`` (fp32 weights as initializers).

    Args:
        model: a causal LM of a family in ``edgepeft.families`` (merged weights for a merged artifact).
        sides: the adapters' side branches; their LoRA targets decide which groups get inputs.
        opset: ONNX opset of the default domain.

    Returns:
        ``(model proto, [(adapter input name, identity default)], used groups)``. Each default is
        the identity (rank-0 AT / BT, zero scales), so a run that feeds nothing is the base model.

    Raises:
        EdgepeftError: what :func:`edgepeft.export.fused_layout.unsupported` finds.
    """
    check_supported(model, sides)
    builder = _Builder(model, sides)
    return model_proto(builder.build(), opset), builder.groups.adapter_inputs, list(builder.groups.used)


def model_proto(graph: onnx.GraphProto, opset: int) -> onnx.ModelProto:
    """A built graph as a model of ``opset`` and onnxruntime's contrib domain (IR version 8)."""
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid("com.microsoft", 1)],
                              producer_name="edgepeft")
    proto.ir_version = 8
    return proto
