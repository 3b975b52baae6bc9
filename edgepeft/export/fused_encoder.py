"""Encoder classifiers -> one ONNX graph of onnxruntime's fused kernels, built from the weights.

The traced encoder graph (``encoder.py``) runs attention as MatMul, Transpose, Where and Softmax
nodes and every bias and residual as its own Add. This builds the same computation from the state
dict, per layer (``x (B, S, H)``)::

    MatMul q|k|v [+ LoRA] -> Split -> MultiHeadAttention (q/k/v biases, key padding mask inside)
    -> MatMul o [+ LoRA] -> + bias + residual -> LayerNorm
    -> MatMul up [+ LoRA] -> BiasGelu -> MatMul down [+ LoRA] -> + bias + residual -> LayerNorm

after word + position (+ token-type row 0) embeddings and their LayerNorm; then the family's head
on the first token (BERT: pooler dense + tanh, classifier). The projection groups and their
adapter inputs (LoRA ``AT`` / ``BT``, DoRA and IA3 scales, bottlenecks, per-row weights) are
those of the fused decoder (:class:`edgepeft.export.fused.Groups`); the head's linears are groups too, and a head an
adapter carries (PEFT ``modules_to_save``) is fed as in the traced graph: ``head.{param}`` with the
base's head as default, and per-row offsets ``head.{param}.rows``.

A prompt-tuning adapter (prompt tuning, P-tuning) feeds ``prompt.embeds (n, H)``, as in the
traced graph: its rows go before the token embeddings and ``n`` ones before the mask, as PEFT does
(``n = 0`` by default); the tokens are then packed from the embedded ``(B, n + S, H)``.

Inputs ``input_ids (B, S)``, ``attention_mask (B, S)`` (right padding, as the runtime feeds it),
the adapter inputs; output ``logits (B, num_labels)``: the traced graph's interface, so the
runtimes run it as they run that one.

Scope: the families of ``edgepeft.families.ENCODERS``, adapters whose features have a fused form
(LoRA, DoRA, IA3, bottlenecks), prompts, heads on the family's head linears. Other kinds (VeRA)
are refused with the reason (:func:`unsupported`); the traced graph handles them.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from edgepeft import families
from edgepeft.contract import PROMPT_INPUT, head_input_name, rows_input_name
from edgepeft.contract.names import rows_axis
from edgepeft.errors import EdgepeftError
from edgepeft.export.fused import Groups, _Graph, model_proto
from edgepeft.export.fused_layout import encoder_unsupported as unsupported
from edgepeft.kinds.common import SideBranch, to_numpy as _np


def head_params(model: torch.nn.Module, sides: dict[str, SideBranch]) -> list[str]:
    """Parameter names of the head linears an adapter carries (each becomes ``head.{param}``)."""
    carried = {p.rpartition(".")[0] for side in sides.values() for p in side.head}
    return sorted(n for n, _ in model.named_parameters() if n.rpartition(".")[0] in carried)


class _Builder:
    """Builds one fused encoder graph; one method per piece."""

    def __init__(self, model: torch.nn.Module, sides: dict[str, SideBranch]):
        self.cfg = model.config
        self.fam = families.ENCODERS[model.config.model_type]
        self.eps = self.fam.eps(self.cfg)
        self.g = _Graph()
        self.groups = Groups(self.g, model, sides)
        self.sd = self.groups.sd
        self.heads = head_params(model, sides)
        self.head_inputs: list[tuple[str, np.ndarray]] = []  # (name, default): the base's head
        self.head_rows: list[tuple[str, tuple[int, ...]]] = []  # per-row offsets, (name, shape of one row)
        self.prompt = any(side.prompt is not None for side in sides.values())  # a prompt.embeds input

    def init(self, name: str) -> str:
        return self.g.init(name, _np(self.sd[name]))

    def prompted_mask(self) -> str:
        """``attention_mask``, with ``n`` ones before it when the graph takes a prompt (``n`` the
        rows of ``prompt.embeds``): ``(B, n + S)``."""
        if not self.prompt:
            return "attention_mask"
        g = self.g
        (self.b,) = g.node("Shape", ["input_ids"], start=0, end=1)  # (1,) = B
        (self.n,) = g.node("Shape", [PROMPT_INPUT], start=0, end=1)  # (1,) = n
        one = helper.make_tensor("one", TensorProto.INT64, [1], [1])
        (ones,) = g.node("ConstantOfShape", [g.node("Concat", [self.b, self.n], axis=0)[0]], value=one)  # (B, n)
        return g.node("Concat", [ones, "attention_mask"], axis=1)[0]  # (B, n + S)

    def tokens(self, mask: str) -> None:
        """Which positions of ``mask (B, S)`` the graph computes: every token of the mask and each
        row's first position (the head reads it), as indices into the flattened ``(B S)``
        positions: ``self.idx (T,)``, each one's row ``self.row (T,)`` and column ``self.col
        (T,)``; and the shapes that scatter packed tokens back to ``(B, S)``."""
        g = self.g
        (shape,) = g.node("Shape", [mask])  # (2,) = B, S
        (s,) = g.node("Shape", [mask], start=1, end=2)  # (1,) = S
        (b,) = g.node("Shape", [mask], start=0, end=1)  # (1,) = B
        (first,) = g.node("Equal", [g.node("Range", [g.init("zero", np.array(0, np.int64)),
                                                      g.node("Squeeze", [s])[0],
                                                      g.init("one", np.array(1, np.int64))])[0], "zero"])  # (S,)
        (sel,) = g.node("Or", [g.node("Cast", [mask], to=TensorProto.BOOL)[0], first])  # (B, S)
        flat = g.init("flat", np.array([-1], np.int64))
        (nz,) = g.node("NonZero", [g.node("Reshape", [sel, flat])[0]])  # (1, T)
        (self.idx,) = g.node("Squeeze", [nz, "axis0"])  # (T,)
        (self.row,) = g.node("Div", [self.idx, s])  # (T,)
        (self.col,) = g.node("Mod", [self.idx, s])  # (T,)
        counts = g.node("ReduceSum", [g.node("Cast", [sel], to=TensorProto.INT64)[0],
                                      g.init("axis1", np.array([1], np.int64))], keepdims=0)[0]  # (B,)
        (self.starts,) = g.node("CumSum", [counts, g.init("axis0_scalar", np.array(0, np.int64))], exclusive=1)
        (bs,) = g.node("Mul", [b, s])  # (1,) = B S
        h3 = g.init("qkv.width", np.array([3 * self.cfg.hidden_size], np.int64))
        (self.scatter_shape,) = g.node("Concat", [bs, h3], axis=0)  # (B S, 3 H)
        (self.padded_shape,) = g.node("Concat", [shape, flat], axis=0)  # (B, S, -1)
        (self.rows_shape,) = g.node("Concat", [b, g.init("ones2", np.array([1, 1], np.int64))], axis=0)  # B, 1, 1
        self.per_row: dict[str, str] = {}

    def per_token(self, name: str) -> str:
        """A per-row input ``(N, 1, W)`` (N is 1 or B) as each packed token's ``(T, W)``."""
        if name not in self.per_row:
            g = self.g
            (rows,) = g.node("Expand", [name, self.rows_shape])  # (B, 1, W)
            (tok,) = g.node("Gather", [rows, self.row], axis=0)  # (T, 1, W)
            self.per_row[name] = g.node("Squeeze", [tok, "axis1"])[0]  # (T, W)
        return self.per_row[name]

    def embeddings(self) -> str:
        """``LayerNorm(word[ids] + position[position id] + token_type[0])`` of the packed tokens,
        ``(T, H)``; with a prompt, its rows take the place of the first ``n`` words."""
        g, emb = self.g, f"{self.fam.prefix}.embeddings"
        words = self.init(f"{emb}.word_embeddings.weight")  # (V, H)
        if self.prompt:
            h = self.cfg.hidden_size
            (x,) = g.node("Gather", [words, "input_ids"])  # (B, S, H)
            shape = g.node("Concat", [self.b, self.n, g.init("prompt.width", np.array([h], np.int64))], axis=0)[0]
            (p,) = g.node("Expand", [g.node("Unsqueeze", [PROMPT_INPUT, "axis0"])[0], shape])  # (B, n, H)
            (x,) = g.node("Concat", [p, x], axis=1)  # (B, n + S, H)
            (x,) = g.node("Gather", [g.node("Reshape", [x, "tokens.shape"])[0], self.idx])  # (T, H)
        else:
            (ids,) = g.node("Gather", [g.node("Reshape", ["input_ids", "flat"])[0], self.idx])  # (T,)
            (x,) = g.node("Gather", [words, ids])  # (T, H)
        table = _np(self.sd[f"{emb}.position_embeddings.weight"])  # (P, H)
        if f"{emb}.token_type_embeddings.weight" in self.sd:  # the runtime feeds no token types: row 0
            table = table + _np(self.sd[f"{emb}.token_type_embeddings.weight"])[0]
        (pos,) = g.node("Gather", [g.init("positions.table", table), self.position_ids()])  # (T, H)
        (x,) = g.node("Add", [x, pos])
        return g.node("LayerNormalization", [x, self.init(f"{emb}.LayerNorm.weight"),
                                             self.init(f"{emb}.LayerNorm.bias")], epsilon=self.eps, axis=-1)[0]

    def position_ids(self) -> str:
        """Each packed token's position id ``(T,)``, as the family's HF model computes it."""
        g = self.g
        if self.fam.positions == "index":
            return self.col
        pad = g.init("positions.pad", np.array(int(self.cfg.pad_token_id), np.int64))
        if self.prompt:  # from embeddings HF cannot tell pads: every position counts, from pad + 1
            return g.node("Add", [g.node("Add", [self.col, pad])[0], "one"])[0]
        (real,) = g.node("Cast", [g.node("Not", [g.node("Equal", ["input_ids", pad])[0]])[0]], to=TensorProto.INT64)
        (count,) = g.node("CumSum", [real, g.init("positions.axis", np.array(1, np.int64))])  # (B, S)
        (pos,) = g.node("Add", [g.node("Mul", [count, real])[0], pad])  # pads: pad_token_id
        return g.node("Gather", [g.node("Reshape", [pos, "flat"])[0], self.idx])[0]  # (T,)

    def layer(self, x: str, i: int, mask: str) -> str:
        """One layer on the packed tokens ``x (T, H)``; attention runs on ``(B, S)`` (scattered
        there and gathered back), every MatMul and norm on the T tokens only."""
        g, cfg = self.g, self.cfg
        norms = {role: f"{self.fam.layer_path(i)}.{n}" for role, n in self.fam.norms.items()}
        qkv, bias = self.groups.linear_parts(x, i, "qkv", self.per_token)  # (T, 3 H)
        (zeros,) = g.node("ConstantOfShape", [self.scatter_shape])  # (B S, 3 H)
        (qkv,) = g.node("ScatterND", [zeros, g.node("Unsqueeze", [self.idx, "axis1"])[0], qkv])
        (qkv,) = g.node("Reshape", [qkv, self.padded_shape])  # (B, S, 3 H)
        h = cfg.hidden_size
        q, k, v = g.node("Split", [qkv, g.init(f"attn.{i}.split", np.array([h, h, h], np.int64))], 3, axis=-1)
        (a,) = g.node("MultiHeadAttention", [q, k, v, bias or "", mask], domain="com.microsoft",
                      num_heads=int(cfg.num_attention_heads),
                      scale=float((h // cfg.num_attention_heads) ** -0.5))  # (B, S, H)
        (a,) = g.node("Gather", [g.node("Reshape", [a, "tokens.shape"])[0], self.idx])  # (T, H)
        x = self.add_norm(*self.groups.linear_parts(a, i, "o", self.per_token), x, norms["attn"])
        up, bias = self.groups.linear_parts(x, i, "up", self.per_token)  # (T, I)
        (act,) = (g.node("BiasGelu", [up, bias], domain="com.microsoft") if bias
                  else g.node("Gelu", [up], domain="com.microsoft"))
        return self.add_norm(*self.groups.linear_parts(act, i, "down", self.per_token), x, norms["out"])

    def add_norm(self, y: str, bias: str | None, residual: str, norm: str) -> str:
        """``LayerNorm(y + bias + residual)``: two Adds and a ``LayerNormalization`` on the 2-D
        packed tokens (onnxruntime 1.32's ``SkipLayerNormalization`` was slower on CPU in a scratch
        micro-benchmark; onnxruntime fuses it only for 3-D inputs)."""
        g = self.g
        (y,) = g.node("Add", [y, residual])
        if bias:
            (y,) = g.node("Add", [y, bias])
        return g.node("LayerNormalization", [y, self.init(f"{norm}.weight"), self.init(f"{norm}.bias")],
                      epsilon=self.eps, axis=-1)[0]

    def head(self, x: str) -> str:
        """The family's head on the first token: ``(B, S, H) -> (B, num_labels)``."""
        g = self.g
        (x,) = g.node("Gather", [x, self.starts])  # (B, H): each row's first token
        (x,) = g.node("Unsqueeze", [x, "axis1"])  # (B, 1, H), as the groups take it
        for j, (module, act) in enumerate(self.fam.head):
            x = self.fed_linear(x, module) if f"{module}.weight" in self.heads else self.groups.linear(x, "head", str(j))
            if act:
                (x,) = g.node({"tanh": "Tanh", "relu": "Relu"}[act], [x])
        return g.node("Squeeze", [x, "axis1"])[0]  # (B, num_labels)

    def fed_linear(self, x: str, module: str) -> str:
        """A head linear whose weight and bias are graph inputs (an adapter's own head), as the
        traced graph computes it: ``x W^T + b + x W_rows^T + b_rows``, every row its own head
        (``x (B, 1, in)``, ``W_rows (N, out, in)``, ``b_rows (N, 1, out)``)."""
        g = self.g
        w, b = head_input_name(f"{module}.weight"), head_input_name(f"{module}.bias")
        weight = _np(self.sd[f"{module}.weight"])  # (out, in)
        self.head_inputs.append((w, weight))
        self.head_rows.append((rows_input_name(w), weight.shape))
        (y,) = g.node("MatMul", [x, g.node("Transpose", [w], perm=[1, 0])[0]])  # (B, 1, out)
        (d,) = g.node("MatMul", [x, g.node("Transpose", [rows_input_name(w)], perm=[0, 2, 1])[0]])  # (B, 1, out)
        (y,) = g.node("Add", [y, d])
        if f"{module}.bias" in self.sd:
            self.head_inputs.append((b, _np(self.sd[f"{module}.bias"])))
            self.head_rows.append((rows_input_name(b), (1, weight.shape[0])))
            (y,) = g.node("Add", [y, b])
            (y,) = g.node("Add", [y, rows_input_name(b)])
        return y

    def build(self) -> onnx.GraphProto:
        g = self.g
        g.init("tokens.shape", np.array([-1, self.cfg.hidden_size], np.int64))
        g.init("axis0", np.array([0], np.int64))
        full = self.prompted_mask()  # (B, n + S)
        (mask,) = g.node("Cast", [full], to=TensorProto.INT32)  # 1 = a token (or a prompt row)
        self.tokens(full)
        x = self.embeddings()
        for i in range(self.cfg.num_hidden_layers):
            x = self.layer(x, i, mask)
        g.node("Identity", [self.head(x)], ["logits"])
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
                  helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])]
        self.groups.declare(inputs)
        for name, default in self.head_inputs:
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(default.shape)))
            g.init(name, default)
        if self.prompt:  # default (0, H): no prompt
            inputs.append(helper.make_tensor_value_info(PROMPT_INPUT, TensorProto.FLOAT, ["prompt_len", self.cfg.hidden_size]))
            g.init(PROMPT_INPUT, np.zeros((0, self.cfg.hidden_size), np.float32))
        for name, shape in self.head_rows:  # default zeros, (1, *shape): every row the fed head
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [rows_axis(name), *shape]))
            g.init(name, np.zeros((1, *shape), np.float32))
        labels = int(_np(self.sd[f"{self.fam.head[-1][0]}.weight"]).shape[0])
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", labels])]
        return helper.make_graph(g.nodes, "edgepeft-fused-encoder", inputs, outputs, g.inits)


def build_graph(model: torch.nn.Module, sides: dict[str, SideBranch], opset: int = 17
                ) -> tuple[onnx.ModelProto, list[tuple[str, np.ndarray]], list[tuple[int | str, str]], list[str], dict]:
    """The fused encoder graph of ``model`` (fp32 weights as initializers).

    Args:
        model: a ``*ForSequenceClassification`` of a family in ``edgepeft.families.ENCODERS``
            (merged weights for a merged artifact).
        sides: the adapters' side branches; their targets decide which groups get inputs, their
            heads which head linears are inputs, their prompts whether ``prompt.embeds`` is one.
        opset: ONNX opset of the default domain.

    Returns:
        ``(model proto, [(group input, identity default)], used groups, head params, {head or
        prompt input: its manifest entry})``; a run that feeds nothing is the base model with its
        own head.

    Raises:
        EdgepeftError: what :func:`unsupported` finds.
    """
    why = unsupported(model, sides)
    if why:
        raise EdgepeftError(f"--graph fused: {why}. Export with --graph generic.")
    builder = _Builder(model, sides)
    proto = model_proto(builder.build(), opset)
    fed = {name: {"shape": list(default.shape), "mix": "one"} for name, default in builder.head_inputs}
    if builder.prompt:
        fed[PROMPT_INPUT] = {"shape": [None, int(model.config.hidden_size)], "mix": "one"}
    return proto, builder.groups.adapter_inputs, list(builder.groups.used), builder.heads, fed
