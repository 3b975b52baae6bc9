"""Quantize an exported graph's base weights; keep every adapter branch in float.

Precisions (onnxruntime.quantization and its float16 converter):
    fp32          as exported
    fp16          weights and compute in fp16; adapter branches and the graph's inputs/outputs fp32
    int8          int8 weights; scheme ``weight-only`` (default: MatMulNBits, 8 bits, block-wise,
                  asymmetric, float activations) or ``dynamic`` (activations quantized on the fly:
                  integer kernels, but decoders' activation outliers ruin it: SmolLM2-135M KL 1.76
                  vs 0.0016 weight-only)
    int8-static   QDQ, int8 weights, int16 (default) or int8 activations with ranges from
                  calibration data; ranges are collected with the
                  base and with each adapter active in turn (one reader yields them all, so the
                  calibrator merges them), so no adapter's activations clip
    int4          weight-only, blockwise (MatMulNBits), scales and zero points fitted by HQQ
                  (half-quadratic optimisation, no calibration data; far below round-to-nearest's
                  error on SmolLM2, see the README); ``protect`` keeps chosen MatMuls at 8 bits

Sensitivity (``protect``): each base MatMul's quantization error is measured on calibration texts
(the RMS of ``x (Q(W) - W)`` over real activations ``x``, with ``Q`` simulating the scheme); the
``protect`` share with the largest error is kept at higher precision: 8-bit under int4 (as
llama.cpp's Q4_K_M keeps ffn_down / attn_v at 6 bits), float under int8. The error is simulated
with round-to-nearest (the ranking, not the exact value, matters). Off by default.

Adapter-branch nodes are found from the graph inputs the export named (``lora.*``, ``ia3_*``, ...):
every node that consumes an adapter input, directly or through layout-only ops (Transpose, Cast,
Reshape, ...), is excluded. No node name is pattern-matched.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from edgepeft.contract.names import INT8_SCHEMES, PRECISIONS, STATIC_ACTIVATIONS
from edgepeft.errors import EdgepeftError

ADAPTER_PRECISIONS = ("fp32", "fp16")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
WIDTHS = ("source", "uniform")
# Ops an adapter weight passes through before it meets activations: follow them.
_LAYOUT_OPS = {"Transpose", "Cast", "Reshape", "Unsqueeze", "Squeeze", "Identity", "Concat", "Expand",
               "Flatten"}
_WEIGHT_OPS = ("MatMul", "Gemm")


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize an artifact's graphs.

    Attributes:
        precision: one of ``PRECISIONS``.
        adapter_precision: ``fp32`` or ``fp16``: storage of adapter files (the branch computes in
            fp32 either way; fp16 halves the files and rounds the weights once).
        calibration: int8-static only: a txt/jsonl file, or the name of a set in ``edgepeft/calibration/``.
        calibration_method: ``minmax``, ``entropy`` or ``percentile``.
        quantize_embeddings: also quantize the LM head (untied first when tied, as in SmolLM2)
            with the scheme's MatMul quantizer, and the token embedding table: 8-bit under int8
            dynamic / static, 4-bit GatherBlockQuantized under int4; int8 weight-only keeps the
            table float (onnxruntime quantizes Gather at 4 bits only). Off by default.
        block_size: int4 / weight-only int8 block size along the input dimension; None: 16 for
            int8 (SmolLM2-135M KL 0.0016 -> 0.0010 against 32, ~13 % more bytes per weight), 32
            for int4.
        int8_scheme: ``weight-only`` (default) or ``dynamic``; see the module docstring.
        static_activations: int8-static activation type: ``int16`` (default, A16W8: activation
            outliers survive 16-bit ranges; what NPUs such as QNN HTP run LLMs with) or ``int8``
            (A8W8: integer kernels on CPU and NNAPI, but SmolLM2-135M: top-1 7 %).
        protect: share (0..1) of base MatMuls, the most sensitive by measured error, kept at
            higher precision (int4: 8-bit; int8 / int8-static: float). Default 0. Under int4 the
            share is of the MatMuls ``widths`` leaves at 4 bits.
        accuracy_level: int4: onnxruntime's MatMulNBits compute type, 0 (float activations,
            default) or 4 (activations rounded to int8 per block: integer dot products, ~3x
            faster per MatMul on x86; SmolLM2-135M KL 0.0003 -> ~0.01).
        head_bits: int4: the LM head (untied first when tied) as an 8-bit MatMulNBits with the
            token table as an 8-bit GatherBlockQuantized (``8``), or the head as a 4-bit HQQ
            MatMulNBits with the table float (``4``; SmolLM2: top-1 ~80 %, over budget); None: both
            float (default). In float the head is a third of a 4-bit SmolLM2 decode step and the
            table 113 of its resident MB.
        widths: int4: ``source`` (default) keeps at 8 bits the base MatMuls whose weights are
            *not* on a 4-bit grid when others are (:func:`source_wide`): a base dequantized from a
            mixed GGUF such as Q4_K_M (Gemma 3 270M: 45 of 72 packed MatMuls stored at 5-8 bits)
            keeps its wider tensors wide, as llama.cpp runs them; a float base, or one on a 4-bit
            grid throughout (SmolLM2's Q4_1), is unchanged. In a merged graph the MatMuls an
            adapter changed are off the grid too, and kept 8-bit. ``uniform``: every base MatMul
            4-bit.
    """

    precision: str = "fp32"
    adapter_precision: str = "fp32"
    calibration: str | None = None
    calibration_method: str = "minmax"
    quantize_embeddings: bool = False
    block_size: int | None = None
    int8_scheme: str = "weight-only"
    static_activations: str = "int16"
    protect: float = 0.0
    accuracy_level: int = 0
    head_bits: int | None = None
    widths: str = "source"

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise EdgepeftError(f"--precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}.")
        if self.adapter_precision not in ADAPTER_PRECISIONS:
            raise EdgepeftError(f"--adapter-precision {self.adapter_precision!r}: choose fp32 or fp16.")
        if self.calibration_method not in CALIBRATION_METHODS:
            raise EdgepeftError(f"--calibration-method {self.calibration_method!r}: choose one of "
                                f"{', '.join(CALIBRATION_METHODS)}.")
        if self.calibration and self.precision in ("fp32", "fp16"):
            raise EdgepeftError(f"--calibration is for integer precisions, not {self.precision}.")
        if self.block_size is None:
            object.__setattr__(self, "block_size", 16 if self.precision == "int8" else 32)
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise EdgepeftError(f"--block-size {self.block_size}: a power of two >= 16.")
        if self.int8_scheme not in INT8_SCHEMES:
            raise EdgepeftError(f"--int8-scheme {self.int8_scheme!r}: choose one of {', '.join(INT8_SCHEMES)}.")
        if self.int8_scheme != "weight-only" and self.precision != "int8":
            raise EdgepeftError(f"--int8-scheme is for --precision int8, not {self.precision}.")
        if self.static_activations not in STATIC_ACTIVATIONS:
            raise EdgepeftError(f"--static-activations {self.static_activations!r}: choose one of "
                                f"{', '.join(STATIC_ACTIVATIONS)}.")
        if self.static_activations != "int16" and self.precision != "int8-static":
            raise EdgepeftError(f"--static-activations is for --precision int8-static, not {self.precision}.")
        if not 0 <= self.protect <= 1:
            raise EdgepeftError(f"--protect {self.protect}: a share between 0 and 1.")
        if self.protect and self.precision in ("fp32", "fp16"):
            raise EdgepeftError(f"--protect is for integer precisions, not {self.precision}.")
        if self.accuracy_level not in (0, 4):
            raise EdgepeftError(f"--accuracy-level {self.accuracy_level}: 0 (float compute) or 4 (int8 compute).")
        if (self.accuracy_level or self.head_bits is not None) and self.precision != "int4":
            raise EdgepeftError(f"--accuracy-level / --head-bits are for --precision int4, not {self.precision}.")
        if self.head_bits not in (None, 4, 8):
            raise EdgepeftError(f"--head-bits {self.head_bits}: 4 or 8.")
        if self.widths not in WIDTHS:
            raise EdgepeftError(f"--widths {self.widths!r}: choose one of {', '.join(WIDTHS)}.")
        if self.widths != "source" and self.precision != "int4":
            raise EdgepeftError(f"--widths is for --precision int4, not {self.precision}.")
        if self.head_bits is not None and self.quantize_embeddings:
            raise EdgepeftError("--head-bits and --quantize-embeddings both set the head; pick one.")



def adapter_nodes(model: onnx.ModelProto, adapter_inputs: Iterable[str]) -> set[str]:
    """Names of the nodes on adapter branches.

    Args:
        model: the exported graph.
        adapter_inputs: its adapter-fed input names (the manifest's ``inputs``).

    Returns:
        Every node that consumes an adapter input directly or through layout-only ops, plus those
        layout ops themselves.
    """
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found: set[str] = set()
    frontier = list(adapter_inputs)
    seen = set(frontier)
    while frontier:
        tensor = frontier.pop()
        for node in consumers.get(tensor, []):
            found.add(node.name)
            if node.op_type in _LAYOUT_OPS:
                for out in node.output:
                    if out not in seen:
                        seen.add(out)
                        frontier.append(out)
    return found


def head_nodes(model: onnx.ModelProto, output: str = "logits") -> set[str]:
    """The token-embedding Gathers (of ``input_ids``) and the MatMul that produces ``output``."""
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name for i in model.graph.initializer}
    found = {n.name for n in model.graph.node if n.op_type == "Gather" and len(n.input) > 1
             and n.input[0] in inits and n.input[1] == "input_ids"}
    tensor, steps = output, 0
    while tensor in producer and steps < 8:  # walk back over e.g. Reshape / Add to the head MatMul
        node = producer[tensor]
        if node.op_type in _WEIGHT_OPS:
            found.add(node.name)
            break
        tensor, steps = node.input[0], steps + 1
    return found


def untie_head(model: onnx.ModelProto, output: str = "logits") -> str | None:
    """Give a tied LM head its own weight, in place, so quantizers can take it.

    A tied head exports as ``MatMul(h, Transpose(E))`` over the embedding table ``E``
    ``(vocab, d)``; quantizers only take a MatMul whose B is an initializer. Store ``E^T``
    ``(d, vocab)`` as one and drop the Transpose (onnxruntime folds it into a second float copy
    at load anyway).

    Returns:
        The head MatMul's name when it was untied, else None (untied already, or no such head).
    """
    from onnx import numpy_helper

    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    names = head_nodes(model, output)
    head = [n for n in model.graph.node if n.name in names and n.op_type == "MatMul"]
    if not head or head[0].input[1] in inits or head[0].input[1] not in producer:
        return None
    node, transpose = head[0], producer[head[0].input[1]]
    perm = [a.ints for a in transpose.attribute if a.name == "perm"]
    if transpose.op_type != "Transpose" or transpose.input[0] not in inits or (perm and list(perm[0]) != [1, 0]):
        return None
    table = inits[transpose.input[0]]
    weight = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(table).T), f"{table.name}.T")
    model.graph.initializer.append(weight)
    node.input[1] = weight.name
    if not any(transpose.output[0] in n.input for n in model.graph.node):
        model.graph.node.remove(transpose)
    return node.name


def tied_table(model: onnx.ModelProto, output: str = "logits") -> tuple[str, str] | None:
    """``(E, E^T source)`` when the token Gathers read a table ``E`` that the LM head reads
    transposed: ``MatMul(h, Transpose(E))`` (source: the Transpose's output), or an initializer of
    the transposed shape that the exporter folded from it (source: its name; equality is checked
    by :func:`store_tied_table_once`, which has the weights). None otherwise; needs no weights."""
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    names = head_nodes(model, output)
    head = [n for n in model.graph.node if n.name in names and n.op_type == "MatMul"]
    gathers = [n for n in model.graph.node if n.name in names and n.op_type == "Gather"]
    if not head or len({g.input[0] for g in gathers}) != 1 or any(
            a.name == "axis" and a.i != 0 for g in gathers for a in g.attribute):
        return None
    table, b = gathers[0].input[0], head[0].input[1]
    if b in inits:
        return (table, b) if list(inits[b].dims) == list(inits[table].dims)[::-1] else None
    transpose = producer.get(b)
    if transpose is None or transpose.op_type != "Transpose" or transpose.input[0] != table:
        return None
    perm = [list(a.ints) for a in transpose.attribute if a.name == "perm"]
    return (table, b) if not perm or perm[0] == [1, 0] else None


def store_tied_table_once(model: onnx.ModelProto, output: str = "logits") -> bool:
    """Keep one copy of a tied embedding / LM head table, as ``E^T (d, vocab)``, in place.

    A tied head exports as ``MatMul(h, Transpose(E))`` (or with that Transpose folded into a
    second initializer by the exporter, for small tables); onnxruntime folds the Transpose into
    a second float copy of the table (113 MB for SmolLM2 in fp32), at every session load and
    inside every ``.ort`` file. Here the head reads ``E^T`` and each token Gather becomes
    ``Transpose(Gather(E^T, ids, axis=1))``: ``(d, B, S) -> (B, S, d)``, the same rows, exactly.

    Returns:
        Whether the graph had such a table (then only ``E^T`` is stored).
    """
    from onnx import numpy_helper

    found = tied_table(model, output)
    if found is None:
        return False
    table, b = found
    inits = {i.name: i for i in model.graph.initializer}
    if b in inits:  # folded by the exporter: the same numbers, transposed?
        if not np.array_equal(numpy_helper.to_array(inits[b]), numpy_helper.to_array(inits[table]).T):
            return False
        transposed = b
    else:
        untie_head(model, output)  # appends E.T, points the head at it, drops the Transpose
        transposed = f"{table}.T"
    helper = onnx.helper
    nodes = []
    for node in model.graph.node:
        nodes.append(node)
        if node.op_type != "Gather" or node.input[0] != table:
            continue
        gathered = node.output[0]
        node.input[0] = transposed
        node.output[0] = f"{gathered}/columns"  # (d, B, S)
        del node.attribute[:]
        node.attribute.append(helper.make_attribute("axis", 1))
        nodes.append(helper.make_node("Transpose", [node.output[0]], [gathered], perm=[1, 2, 0],
                                      name=f"{node.name}/rows"))  # (B, S, d)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if not any(table in n.input for n in model.graph.node):
        keep = [i for i in model.graph.initializer if i.name != table]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
    return True


def _untie_adapter_gemms(model: onnx.ModelProto, adapter_inputs: set[str]) -> None:
    """Rewrite each Gemm that takes an adapter input as ``MatMul(x, Transpose(w)) + b``, in place.

    onnxruntime's quantizers turn ``Gemm(transB=1)`` with an initializer B into a MatMul on a
    transposed *constant copy* of it; an adapter input has an initializer (its default), so the
    copy would cut the input off the graph (a classifier head would stop swapping).

    Raises:
        EdgepeftError: an adapter Gemm with alpha/beta != 1 or transA (the exporter makes none).
    """
    helper = onnx.helper
    nodes = []
    for node in model.graph.node:
        if node.op_type != "Gemm" or not adapter_inputs & set(node.input[1:]):
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA", 0):
            raise EdgepeftError(f"Gemm {node.name} on an adapter input has alpha/beta/transA set; "
                                "edgepeft cannot keep it float through quantization.")
        weight = node.input[1]
        if attrs.get("transB", 0):
            weight = f"{node.name}/adapter_wT"
            nodes.append(helper.make_node("Transpose", [node.input[1]], [weight], name=f"{node.name}/adapter_T"))
        has_bias = len(node.input) > 2 and node.input[2]
        mm_out = f"{node.name}/adapter_mm" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], weight], [mm_out], name=f"{node.name}/adapter_MatMul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]],
                                          name=f"{node.name}/adapter_Add"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _weight_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    inits = {i.name for i in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type in _WEIGHT_OPS and len(n.input) > 1 and n.input[1] in inits]


def grid_levels(w: np.ndarray, block: int) -> int:
    """The most distinct values in any block of ``block`` weights along K of ``w`` ``(K, N)``:
    at most 16 for a matrix dequantized from a 4-bit GGUF type (Q4_0, Q4_1, Q4_K), up to
    ``block`` for anything wider or float."""
    k, n = w.shape
    full = k - k % block
    levels = 0
    for part in (w[:full].reshape(-1, block, n), w[full:][None]):  # (K/block, block, N), the tail
        if part.shape[1]:
            s = np.sort(part, axis=1)
            levels = max(levels, int((np.diff(s, axis=1) != 0).sum(1).max()) + 1)
    return levels


def source_wide(model: onnx.ModelProto, nodes: list[onnx.NodeProto], block: int) -> dict[str, int]:
    """The MatMuls of ``nodes`` that a 4-bit quantization would take off their source grid.

    A base dequantized from a GGUF keeps each tensor's grid: every block of 32 weights of a Q4_K
    or Q4_1 tensor holds at most 16 distinct values, which HQQ's per-block scale and zero point
    reproduce. Mixed files store some tensors wider (Q4_K_M: Q5_0, Q6_K, Q8_0); 4 bits would
    round those. So when some of ``nodes`` are on a 4-bit grid, the others are returned (to be
    kept at 8 bits); when none is (a float base) or all are, nothing is.

    Returns:
        ``{node name: most distinct values in one block}`` of the nodes off the 4-bit grid.
    """
    from onnx import numpy_helper

    weights = {i.name: i for i in model.graph.initializer}

    def levels_of(w: np.ndarray) -> int:  # a float matrix shows it in its first blocks: skip the full sort
        first = grid_levels(w[:8 * block], block)
        return first if first > 16 else grid_levels(w, block)

    levels = {n.name: levels_of(numpy_helper.to_array(weights[n.input[1]])) for n in nodes}
    wide = {name: v for name, v in levels.items() if v > 16}
    return wide if len(wide) < len(levels) else {}


def _fake_quant_blocks(w: np.ndarray, bits: int, block: int) -> np.ndarray:
    """Symmetric round-to-nearest of ``w`` ``(K, N)`` in blocks of ``block`` along K."""
    k, n = w.shape
    pad = -k % block
    wb = np.pad(w, ((0, pad), (0, 0))).reshape(-1, block, n)  # (K/block, block, N)
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(wb).max(1, keepdims=True) / qmax
    scale[scale == 0] = 1
    return (np.clip(np.round(wb / scale), -qmax - 1, qmax) * scale).reshape(-1, n)[:k]


def _fake_quant_int8(x: np.ndarray, w: np.ndarray, act_bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Per-tensor asymmetric ``act_bits`` ``x`` ``(M, K)`` and per-column symmetric int8 ``w`` ``(K, N)``."""
    top = 2 ** act_bits - 1
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    step = (hi - lo) / top or 1.0
    zero = np.round(-lo / step)
    xq = (np.clip(np.round(x / step) + zero, 0, top) - zero) * step
    scale = np.abs(w).max(0, keepdims=True) / 127
    scale[scale == 0] = 1
    return xq, np.round(w / scale) * scale


def activations(model: onnx.ModelProto, nodes: list[onnx.NodeProto], probe: list[dict[str, np.ndarray]],
                max_rows: int = 1024) -> dict[str, np.ndarray]:
    """The real inputs ``x`` of ``nodes`` on ``probe`` feeds, by input name.

    Args:
        model: the fp32 graph (weights loaded).
        nodes: MatMul nodes; their first input is captured.
        probe: a few feeds of the graph (calibration texts, base model).
        max_rows: rows kept per input (evenly subsampled).

    Returns:
        ``{input name: x (rows, K)}``.
    """
    import onnxruntime as ort

    inputs = sorted({n.input[0] for n in nodes})
    added = [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in inputs]
    model.graph.output.extend(added)
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    finally:
        for _ in added:
            model.graph.output.pop()
    acts: dict[str, list[np.ndarray]] = {name: [] for name in inputs}
    for feed in probe:
        for name, x in zip(inputs, session.run(inputs, feed)):
            acts[name].append(x.reshape(-1, x.shape[-1]))  # (B*T, K)
    del session
    out = {}
    for name, xs in acts.items():
        x = np.concatenate(xs)
        out[name] = x[np.linspace(0, len(x) - 1, min(len(x), max_rows)).astype(int)]
    return out


def _fake_quant_rows(x: np.ndarray, block: int) -> np.ndarray:
    """What MatMulNBits' int8 compute (accuracy_level 4) does to ``x`` ``(M, K)``: symmetric int8
    per row in blocks of ``block`` along K."""
    m, k = x.shape
    xb = np.pad(x, ((0, 0), (0, -k % block))).reshape(m, -1, block)  # (M, K/block, block)
    scale = np.abs(xb).max(-1, keepdims=True) / 127
    scale[scale == 0] = 1
    return (np.round(xb / scale) * scale).reshape(m, -1)[:, :k]


def sensitivity(model: onnx.ModelProto, nodes: list[onnx.NodeProto], probe: list[dict[str, np.ndarray]],
                cfg: QuantConfig, max_rows: int = 1024) -> dict[str, float]:
    """Each weight node's output error under ``cfg``'s scheme, on real activations.

    Args:
        model: the fp32 graph (weights loaded).
        nodes: MatMul nodes with an initializer B ``(K, N)``.
        probe: a few feeds of the graph (calibration texts, base model).
        cfg: precision and scheme.
        max_rows: activation rows ``x`` used per node (evenly subsampled).

    Returns:
        ``{node name: RMS of Q(x) Q(W) - x W}``: ``Q(x)`` is the activation rounding of the
        scheme's kernel (int8 weight-only computes in int8, blocks along K; int8 dynamic: 8-bit
        per tensor; int8-static: 8 or 16-bit per tensor), identity for int4 (fp32 compute).
    """
    from onnx import numpy_helper

    acts = activations(model, nodes, probe, max_rows)
    weights = {i.name: i for i in model.graph.initializer}
    errors = {}
    for node in nodes:
        x = acts[node.input[0]]
        w = numpy_helper.to_array(weights[node.input[1]]).astype(np.float32)
        if cfg.precision == "int4":
            err = x @ (_fake_quant_blocks(w, 4, cfg.block_size) - w)
        elif cfg.precision == "int8" and cfg.int8_scheme == "weight-only":
            err = _fake_quant_rows(x, cfg.block_size) @ _fake_quant_blocks(w, 8, cfg.block_size) - x @ w
        else:
            bits = 16 if cfg.precision == "int8-static" and cfg.static_activations == "int16" else 8
            xq, wq = _fake_quant_int8(x, w, bits)
            err = xq @ wq - x @ w
        errors[node.name] = float(np.sqrt(np.mean(np.square(err))))
    return errors


def quantize_graph(src: Path, dst: Path, cfg: QuantConfig, adapter_inputs: list[str],
                   calibration: Iterator[dict[str, np.ndarray]] | None = None,
                   probe: list[dict[str, np.ndarray]] | None = None, quiet: bool = True) -> dict:
    """Quantize ``src`` (an fp32 graph with external data) into ``dst`` (external data beside it).

    Args:
        src: the exported fp32 graph.
        dst: where to write; ``dst.data`` holds its weights.
        cfg: precision and options.
        adapter_inputs: adapter-fed input names; their branches stay float.
        calibration: int8-static: feeds for the graph, base and every adapter in turn.
        probe: a few base feeds for the sensitivity measurement (needed when ``cfg.protect``).
        quiet: no progress bar over the stages (load, sensitivity, quantize) on stderr.

    Returns:
        Counts for the manifest (adapter, kept-float, weight, quantized, protected nodes) and the
        protected nodes' names with their measured errors.

    Raises:
        EdgepeftError: int8-static without calibration data, or a quantizer failure.
    """
    from edgepeft.progress import bar

    measure = bool(cfg.protect and cfg.precision not in ("fp32", "fp16"))
    stages = bar(total=2 + measure, desc=f"quantize {cfg.precision}", unit="stage", quiet=quiet)
    stages.set_postfix_str("load")
    model = onnx.load(str(src), load_external_data=True)
    stages.update()
    _untie_adapter_gemms(model, set(adapter_inputs))
    if (cfg.quantize_embeddings or cfg.head_bits) and cfg.precision != "fp16":
        untie_head(model)
    branches = adapter_nodes(model, adapter_inputs)
    head = head_nodes(model)
    keep = set(branches) if cfg.quantize_embeddings or cfg.precision == "fp16" else branches | head
    if cfg.head_bits:  # the head MatMul is quantized (below); the token Gather stays float
        keep -= {n.name for n in model.graph.node if n.name in head and n.op_type == "MatMul"}
    ops = ["MatMul", "Gemm"] + (["Gather"] if cfg.quantize_embeddings else [])
    weight_only = cfg.precision == "int4" or (cfg.precision == "int8" and cfg.int8_scheme == "weight-only")
    weight_nodes = _weight_nodes(model)
    weights = [n.name for n in weight_nodes]
    skipped = {n.name for n in weight_nodes if weight_only and n.op_type != "MatMul"}  # MatMulNBits: MatMul only
    protected: dict[str, float] = {}
    candidates = [n for n in weight_nodes if n.op_type == "MatMul" and n.name not in keep]
    wide: dict[str, int] = {}
    if cfg.precision == "int4" and cfg.widths == "source":
        wide = source_wide(model, [n for n in candidates if n.name not in head], cfg.block_size)
        candidates = [n for n in candidates if n.name not in wide]
    if cfg.protect and cfg.precision not in ("fp32", "fp16"):
        if not probe:
            raise EdgepeftError(f"--protect {cfg.protect} needs calibration texts to measure sensitivity.")
        stages.set_postfix_str("sensitivity")
        errors = sensitivity(model, candidates, probe, cfg)
        stages.update()
        count = round(cfg.protect * len(candidates))
        protected = dict(sorted(errors.items(), key=lambda kv: -kv[1])[:count])
    float_protect = set(protected) if cfg.precision != "int4" else set()
    data = dst.with_name(dst.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    info = {"adapter_nodes": len(branches), "excluded_nodes": len(keep | float_protect),
            "weight_nodes": len(weights),
            "quantized_weight_nodes": len([w for w in weights if w not in keep | float_protect | skipped]),
            "protected_nodes": len(protected),
            "protected": {k: round(v, 6) for k, v in protected.items()},
            "source_wide_nodes": len(wide)}
    keep = keep | float_protect
    stages.set_postfix_str("quantize")
    try:
        with _quiet_quantizers():
            _quantize(model, dst, cfg, keep, branches, ops, {**protected, **dict.fromkeys(wide, 0.0)},
                      calibration, src)
        if not data.is_file():  # small graphs: the quantizer may inline everything; keep the layout
            _save(onnx.load(str(dst), load_external_data=True), dst)
        stages.update()
    finally:
        stages.close()
    return info


@contextlib.contextmanager
def _quiet_quantizers():
    """onnxruntime.quantization logs every node at INFO on the root logger, and its calibration
    sessions warn once per adapter input that has a default; keep errors only."""
    import onnxruntime as ort

    loggers = [logging.getLogger(), logging.getLogger("onnxruntime.quantization"),
               logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    ort.set_default_logger_severity(3)
    try:
        yield
    finally:
        ort.set_default_logger_severity(2)  # onnxruntime's default; it has no getter
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _quantize(model, dst, cfg, keep, branches, ops, protected, calibration, src) -> None:
    try:
        if cfg.precision == "fp16":
            from onnxruntime.transformers.float16 import convert_float_to_float16

            out = convert_float_to_float16(model, keep_io_types=True, node_block_list=sorted(branches))
            _save(out, dst)
        elif cfg.precision == "int8" and cfg.int8_scheme == "weight-only":
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            q = MatMulNBitsQuantizer(model, bits=8, block_size=cfg.block_size, is_symmetric=False,
                                     accuracy_level=4, nodes_to_exclude=sorted(keep))
            q.process()
            _save(q.model.model, dst)
        elif cfg.precision == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(model, str(dst), weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=ops, nodes_to_exclude=sorted(keep),
                             use_external_data_format=True, extra_options={"MatMulConstBOnly": True})
        elif cfg.precision == "int8-static":
            if calibration is None:
                raise EdgepeftError("--precision int8-static needs calibration data.")
            from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                                  quantize_static)

            method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                      "percentile": CalibrationMethod.Percentile}[cfg.calibration_method]
            quantize_static(model, str(dst), _Reader(calibration), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=ops, per_channel=True,
                            activation_type=QuantType.QUInt16 if cfg.static_activations == "int16" else QuantType.QInt8,
                            weight_type=QuantType.QInt8,
                            nodes_to_exclude=sorted(keep), use_external_data_format=True,
                            calibrate_method=method,
                            extra_options={"MatMulConstBOnly": True, "ActivationSymmetric": False})
        elif cfg.precision == "int4":
            from onnxruntime.quantization.matmul_nbits_quantizer import (HQQWeightOnlyQuantConfig,
                                                                         MatMulNBitsQuantizer)

            if cfg.head_bits == 8:  # 8-bit: protected like the most sensitive MatMuls
                head = head_nodes(model)
                protected = {**protected, **{n.name: 0.0 for n in model.graph.node
                                             if n.op_type == "MatMul" and n.name in head}}
            if protected:  # the most sensitive at 8 bits first; the 4-bit pass skips them
                others = sorted(n.name for n in model.graph.node if n.name not in protected)
                q = MatMulNBitsQuantizer(model, bits=8, block_size=cfg.block_size, is_symmetric=False,
                                         accuracy_level=4, nodes_to_exclude=others)  # (its nodes_to_include adds, not limits)
                q.process()
                model = q.model.model
            q = MatMulNBitsQuantizer(model, nodes_to_exclude=sorted(keep),
                                     algo_config=HQQWeightOnlyQuantConfig(block_size=cfg.block_size, bits=4))
            q.process()
            model = q.model.model
            integer_zero_points(model)
            for node in model.graph.node if cfg.accuracy_level else ():  # every MatMulNBits' compute type
                if node.op_type == "MatMulNBits":
                    attrs = [a for a in node.attribute if a.name != "accuracy_level"]
                    del node.attribute[:]
                    node.attribute.extend([*attrs, onnx.helper.make_attribute("accuracy_level", cfg.accuracy_level)])
            if cfg.quantize_embeddings:
                model = _quantize_embedding_gathers(model, cfg.block_size)
            if cfg.head_bits == 8:
                gather_uint8(model, cfg.block_size)
            _save(model, dst)
        else:
            _save(model, dst)
    except EdgepeftError:
        raise
    except Exception as e:  # onnxruntime.quantization raises many types
        raise EdgepeftError(f"{src}: {cfg.precision} quantization failed ({type(e).__name__}: {e}).") from e


def _quantize_embedding_gathers(model: onnx.ModelProto, block_size: int) -> onnx.ModelProto:
    """Token-embedding Gathers -> GatherBlockQuantized, 4 bits, asymmetric, blocks along the
    hidden dimension (HQQ cannot do Gather; onnxruntime's Gather quantizer is 4-bit only)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 MatMulNBitsQuantizer)

    gathers = {n.name for n in model.graph.node if n.op_type == "Gather"} & head_nodes(model)
    if not gathers:
        return model
    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=False, bits=4,
                                          op_types_to_quantize=("Gather",), quant_axes=(("Gather", 1),))
    q = MatMulNBitsQuantizer(model, nodes_to_exclude=sorted(n.name for n in model.graph.node if n.name not in gathers),
                             algo_config=config)
    q.process()
    return q.model.model


def gather_uint8(model: onnx.ModelProto, block: int) -> int:
    """Token-embedding Gathers -> 8-bit ``GatherBlockQuantized``, in place.

    Each row ``(d,)`` of the table is cut in blocks of ``block`` along d, each stored as uint8
    with a float scale and a uint8 zero point (asymmetric, round to nearest):
    ``x ~ (q - z) s``, error at most ``s / 2``, a quarter of the float table's bytes.

    Returns:
        How many Gathers were rewritten.
    """
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    head = head_nodes(model)
    count, done = 0, {}
    for node in list(model.graph.node):
        if node.op_type != "Gather" or node.name not in head or node.input[0] not in inits:
            continue
        if any(a.name == "axis" and a.i != 0 for a in node.attribute):
            continue
        table = node.input[0]
        if table not in done:
            e = numpy_helper.to_array(inits[table]).astype(np.float32)  # (V, d)
            v, d = e.shape
            if d % block:
                continue
            blocks = e.reshape(v, d // block, block)  # (V, d / block, block)
            lo, hi = blocks.min(-1), blocks.max(-1)
            scale = np.where(hi > lo, (hi - lo) / 255.0, 1.0).astype(np.float32)  # (V, d / block)
            zp = np.clip(np.round(-lo / scale), 0, 255)
            q = np.clip(np.round(blocks / scale[..., None]) + zp[..., None], 0, 255).astype(np.uint8)
            names = (f"{table}_u8", f"{table}_u8_scale", f"{table}_u8_zp")
            model.graph.initializer.extend([numpy_helper.from_array(q.reshape(v, d), names[0]),
                                            numpy_helper.from_array(scale, names[1]),
                                            numpy_helper.from_array(zp.astype(np.uint8), names[2])])
            done[table] = names
        quantized = onnx.helper.make_node("GatherBlockQuantized", [done[table][0], node.input[1], *done[table][1:]],
                                          list(node.output), name=f"{node.name}_u8", domain="com.microsoft",
                                          gather_axis=0, quantize_axis=1, block_size=block, bits=8)
        index = list(model.graph.node).index(node)
        model.graph.node.remove(node)
        model.graph.node.insert(index, quantized)
        count += 1
    used = {i for n in model.graph.node for i in n.input}
    for name in done:
        if name not in used:
            model.graph.initializer.remove(inits[name])
    return count


def integer_zero_points(model: onnx.ModelProto) -> int:
    """Give HQQ's 4-bit MatMulNBits nodes uint8 zero points, exactly, in place.

    HQQ fits a float zero point ``z`` per block (``w = (q - z) s``); onnxruntime's fast 4-bit
    kernels take integer zero points only (with float ones a SmolLM2 token takes 288 ms against
    57 ms in fp32; rewritten, 48 ms at the same KL).
    Split ``z = zi + f`` with ``zi = round(z)``: ``x W = MatMulNBits(x; q, s, zi) - (x E) C`` where
    ``E`` ``(K, K/block)`` sums each block of ``x`` and ``C[b, n] = f[n, b] s[n, b]`` — two small
    float MatMuls (~4 % of the FLOPs) that keep the result exact. A ``K`` that is not a multiple
    of the block (SmolLM2's 576 in blocks of 128) ends in a partial block, which ``E`` sums as far
    as it goes; left with float zero points, such a MatMul ran 8x slower.

    Returns:
        How many nodes were rewritten.
    """
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    nodes, count, shared = [], 0, {}
    for node in model.graph.node:
        nodes.append(node)
        if node.op_type != "MatMulNBits" or len(node.input) < 4 or node.input[3] not in inits:
            continue
        zp = inits[node.input[3]]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        k, n, bits, block = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
        if zp.data_type != onnx.TensorProto.FLOAT or bits != 4:
            continue
        blocks = -(-k // block)  # the last one partial when block does not divide K
        z = numpy_helper.to_array(zp).reshape(n, blocks)
        scale = numpy_helper.to_array(inits[node.input[2]]).reshape(n, blocks)
        zi = np.clip(np.round(z), 0, 15).astype(np.uint8)
        packed = np.zeros((n, (blocks + 1) // 2), np.uint8)  # two per byte, low nibble first
        for b in range(blocks):
            packed[:, b // 2] |= zi[:, b] << (4 * (b % 2))
        name = node.input[3]
        summer = f"blocksum_{k}x{block}"  # one per shape, shared by every MatMul of that K
        extra = [numpy_helper.from_array(packed, f"{name}_u4"),
                 numpy_helper.from_array(np.repeat(np.eye(blocks, dtype=np.float32), block, axis=0)[:k], summer),  # (K, blocks)
                 numpy_helper.from_array(((z - zi) * scale).T.astype(np.float32), f"{name}_offset")]  # (blocks, N)
        if summer in shared:
            extra[1] = shared[summer]
            model.graph.initializer.extend([extra[0], extra[2]])
        else:
            shared[summer] = extra[1]
            model.graph.initializer.extend(extra)
        node.input[3] = extra[0].name
        out = node.output[0]
        node.output[0] = f"{out}/int_zp"
        x = node.input[0]
        nodes += [onnx.helper.make_node("MatMul", [x, extra[1].name], [f"{out}/block_sums"], name=f"{node.name}/block_sums"),
                  onnx.helper.make_node("MatMul", [f"{out}/block_sums", extra[2].name], [f"{out}/offset"],
                                        name=f"{node.name}/offset"),
                  onnx.helper.make_node("Sub", [node.output[0], f"{out}/offset"], [out], name=f"{node.name}/exact")]
        count += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for node in model.graph.node for i in node.input}
    zombies = [i for i in model.graph.initializer if i.name not in used]
    for i in zombies:
        model.graph.initializer.remove(i)
    return count


def _save(model: onnx.ModelProto, dst: Path) -> None:
    data = dst.with_name(dst.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)


class _Reader:
    """onnxruntime's ``CalibrationDataReader`` protocol over an iterator of feeds."""

    def __init__(self, feeds: Iterator[dict[str, np.ndarray]]):
        self._it = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)
