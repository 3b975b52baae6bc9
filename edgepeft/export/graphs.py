"""Step 5 of an export: write a built graph into the artifact, quantized per the config, with
its manifest entry (files, checksums, inputs, outputs, ops, what quantization did); and the
fixed-shape copies a static-shape target runs."""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx

from edgepeft.contract import sha256_file
from edgepeft.progress import log
from edgepeft.quantize import QuantConfig, quantize_graph, store_tied_table_once, tied_table
from edgepeft.targets import Target


def save_graph(proto: onnx.ModelProto, root: Path, rel: str, quant: QuantConfig | None = None,
               adapter_inputs: list[str] = (), calibration=None, probe=None, quiet: bool = True) -> dict:
    """Write a graph to ``root/rel`` with its weights as external data beside it, quantized per
    ``quant`` (adapter branches kept float; ``quiet``: no bar over the quantization stages);
    ``calibration`` / ``probe``: :func:`edgepeft.export.calibrate.quantization_feeds`.

    Returns:
        Its manifest entry: files (relative to the artifact root), checksums, inputs, outputs,
        and what quantization did.
    """
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    drop_exporter_records(proto)
    if quant is None or quant.precision == "fp32":
        store_tied_table_once(proto)
        _save(proto, path)
        return graph_entry(proto, root, rel, f"{rel}.data", None)
    quantized = _quantize(proto, root, path, quant, adapter_inputs, calibration, probe, quiet)
    if quantized.get("source_wide_nodes"):
        log(f"{rel}: {quantized['source_wide_nodes']} of {quantized['quantized_weight_nodes']} MatMuls kept 8-bit: "
            "not on the 4-bit grid the other weights come on (--widths uniform: all 4-bit)", quiet)
    proto = onnx.load(str(path), load_external_data=False)
    return graph_entry(proto, root, rel, f"{rel}.data", quantized)


def _quantize(proto: onnx.ModelProto, root: Path, path: Path, quant: QuantConfig, adapter_inputs,
              calibration, probe, quiet: bool) -> dict:
    """Quantize ``proto`` into ``path`` from an fp32 copy staged in ``root/.fp32``; returns what
    quantization did."""
    staging = root / ".fp32"
    staging.mkdir(exist_ok=True)
    src = staging / path.name
    _save(proto, src)
    quantized = quantize_graph(src, path, quant, list(adapter_inputs), calibration, probe, quiet=quiet)
    shutil.rmtree(staging)
    if tied_table(onnx.load(str(path), load_external_data=False)):  # a float tied head the quantizers
        proto = onnx.load(str(path))                                 # left alone (checked without weights)
        store_tied_table_once(proto)
        _save(proto, path)
    return quantized


def drop_exporter_records(proto: onnx.ModelProto) -> None:
    """Clear each node's ``doc_string`` and ``metadata_props``, in place: torch's exporter records
    there the module, class hierarchy and FX node each ONNX node came from, about 90 % of a traced
    graph's file, which onnxruntime keeps in memory per session (~1.4 MB a MiniLM session,
    measured) and no runtime reads."""
    stack = [proto.graph]
    while stack:
        graph = stack.pop()
        for node in graph.node:
            node.doc_string = ""
            del node.metadata_props[:]
            stack += [a.g for a in node.attribute if a.HasField("g")] + [g for a in node.attribute for g in a.graphs]


def _save(proto: onnx.ModelProto, path: Path) -> None:
    """``path`` with its weights in ``path.data`` (replaced: onnx appends to an existing data file)."""
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)


def graph_entry(proto: onnx.ModelProto, root: Path, rel: str, data_rel: str, quantized: dict | None) -> dict:
    """The manifest entry of the graph ``root/rel`` (``proto``, its weights in ``root/data_rel``)."""
    def io(values):
        return [{"name": v.name, "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
                 "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name}
                for v in values]

    return {"file": rel, "data_file": data_rel,
            "sha256": sha256_file(root / rel), "data_sha256": sha256_file(root / data_rel),
            "inputs": io(proto.graph.input), "outputs": io(proto.graph.output),
            "opset": max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
            "ops": op_counts(proto), "quantization": quantized}


def static_graphs(target: Target, task: str, graph: dict, root: Path) -> dict:
    """Fixed-shape copies of the side graph, one per sequence bucket (``edgepeft.targets.static``),
    added to ``graph["buckets"]``; returns the manifest's ``static`` entry."""
    from edgepeft.targets.static import write_bucket_graphs

    context = target.context_length if task == "causal-lm" else None
    buckets = target.sequence_buckets
    if task == "classification":  # a classifier's input holds at least [CLS] and [SEP]
        buckets = tuple(s for s in buckets if s > 1) or buckets
    graph["buckets"] = []
    for seq, rel in write_bucket_graphs(root, graph["file"], task, target.batch, buckets,
                                        context, target.max_rank):
        proto = onnx.load(str(root / rel), load_external_data=False)
        graph["buckets"].append({"seq": seq, **graph_entry(proto, root, rel, graph["data_file"],
                                                            graph["quantization"])})
    return {"batch": target.batch, "buckets": list(buckets), "context": context, "max_rank": target.max_rank}


def op_counts(proto: onnx.ModelProto) -> dict[str, int]:
    """How many nodes of each op type the graph has (shows what quantization made of it)."""
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))
