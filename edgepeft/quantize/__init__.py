"""Quantize an exported graph's base weights; keep every adapter branch in float.

Precisions (onnxruntime.quantization and its float16 converter):
    fp32          as exported
    fp16          weights and compute in fp16; adapter branches and the graph's inputs/outputs fp32
    int8          dynamic: int8 weights of MatMul/Gemm, activations quantized on the fly
    int8-static   QDQ with activation ranges from calibration data; ranges are collected with the
                  base and with each adapter active in turn (one reader yields them all, so the
                  calibrator merges them), so no adapter's activations clip
    int4          weight-only, blockwise (MatMulNBits)

Adapter-branch nodes are found from the graph inputs the export named (``lora.*``, ``ia3_*``, ...):
every node that consumes an adapter input, directly or through layout-only ops (Transpose, Cast,
Reshape, ...), is excluded. No node name is pattern-matched.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from edgepeft.errors import EdgepeftError

PRECISIONS = ("fp32", "fp16", "int8", "int8-static", "int4")
ADAPTER_PRECISIONS = ("fp32", "fp16")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
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
        calibration: int8-static only: a txt/jsonl file, or the name of a set in ``calibration/``.
        calibration_method: ``minmax``, ``entropy`` or ``percentile``.
        quantize_embeddings: also quantize the token embedding table and LM head (they dominate
            small models' size; tied in e.g. SmolLM2). Off by default: they cost accuracy.
        block_size: int4 block size along the input dimension.
    """

    precision: str = "fp32"
    adapter_precision: str = "fp32"
    calibration: str | None = None
    calibration_method: str = "minmax"
    quantize_embeddings: bool = False
    block_size: int = 32

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise EdgepeftError(f"--precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}.")
        if self.adapter_precision not in ADAPTER_PRECISIONS:
            raise EdgepeftError(f"--adapter-precision {self.adapter_precision!r}: choose fp32 or fp16.")
        if self.calibration_method not in CALIBRATION_METHODS:
            raise EdgepeftError(f"--calibration-method {self.calibration_method!r}: choose one of "
                                f"{', '.join(CALIBRATION_METHODS)}.")
        if self.calibration and self.precision != "int8-static":
            raise EdgepeftError(f"--calibration is for --precision int8-static, not {self.precision}.")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise EdgepeftError(f"--block-size {self.block_size}: a power of two >= 16.")


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


def quantize_graph(src: Path, dst: Path, cfg: QuantConfig, adapter_inputs: list[str],
                   calibration: Iterator[dict[str, np.ndarray]] | None = None) -> dict:
    """Quantize ``src`` (an fp32 graph with external data) into ``dst`` (external data beside it).

    Args:
        src: the exported fp32 graph.
        dst: where to write; ``dst.data`` holds its weights.
        cfg: precision and options.
        adapter_inputs: adapter-fed input names; their branches stay float.
        calibration: int8-static: feeds for the graph, base and every adapter in turn.

    Returns:
        ``{"excluded_nodes", "quantized_nodes", "weight_nodes"}`` counts for the manifest.

    Raises:
        EdgepeftError: int8-static without calibration data, or a quantizer failure.
    """
    model = onnx.load(str(src), load_external_data=True)
    _untie_adapter_gemms(model, set(adapter_inputs))
    branches = adapter_nodes(model, adapter_inputs)
    keep = set(branches) if cfg.quantize_embeddings or cfg.precision == "fp16" else branches | head_nodes(model)
    ops = ["MatMul", "Gemm"] + (["Gather"] if cfg.quantize_embeddings else [])
    weights = [n.name for n in _weight_nodes(model)]
    data = dst.with_name(dst.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    info = {"adapter_nodes": len(branches), "excluded_nodes": len(keep), "weight_nodes": len(weights),
            "quantized_weight_nodes": len([w for w in weights if w not in keep])}
    try:
        if cfg.precision == "fp16":
            from onnxruntime.transformers.float16 import convert_float_to_float16

            out = convert_float_to_float16(model, keep_io_types=True, node_block_list=sorted(branches))
            _save(out, dst)
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
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            nodes_to_exclude=sorted(keep), use_external_data_format=True,
                            calibrate_method=method,
                            extra_options={"MatMulConstBOnly": True, "ActivationSymmetric": False})
        elif cfg.precision == "int4":
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            q = MatMulNBitsQuantizer(model, bits=4, block_size=cfg.block_size, is_symmetric=True,
                                     accuracy_level=4, nodes_to_exclude=sorted(keep))
            q.process()
            _save(q.model.model, dst)
        else:
            _save(model, dst)
    except EdgepeftError:
        raise
    except Exception as e:  # onnxruntime.quantization raises many types
        raise EdgepeftError(f"{src}: {cfg.precision} quantization failed ({type(e).__name__}: {e}).") from e
    if not data.is_file():  # small graphs: the quantizer may inline everything; keep the layout
        _save(onnx.load(str(dst), load_external_data=True), dst)
    return info


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
