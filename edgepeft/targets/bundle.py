"""Mobile bundle: ORT-format graphs + the minimal build's operator config, and partition reports.

Both run onnxruntime's own tools in a subprocess (``convert_onnx_models_to_ort``, and the
functions behind ``check_onnx_model_mobile_usability``), so their memory (each loads the whole
graph, weights included) is returned when they end and their prints stay out of the export's
output.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from edgepeft.errors import EdgepeftError
from edgepeft.contract import sha256_file
from edgepeft.targets import PLATFORMS, Target

ORT_CONFIG = "required_operators_and_types.config"
PARTITIONS = "partitions.json"
_COREML_OPS = {"coreml": "coreml_supported_mlprogram_ops.md", "coreml-nn": "coreml_supported_neuralnetwork_ops.md"}


def _tail(text: str, lines: int = 6) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def convert_to_ort(root: Path, graphs: list[dict], target: Target) -> dict:
    """Write ``X.ort`` beside each graph ``X.onnx`` of the artifact at ``root`` (weights inside,
    no external data) and ``required_operators_and_types.config`` for an ORT minimal build
    (``--include_ops_by_config``); each graph entry gets ``ort: {file, sha256}``.

    Adapter inputs stay graph inputs with their identity defaults (onnxruntime never folds an
    initializer that is also a graph input), so adapters swap and mix on the ``.ort`` as on the
    ``.onnx``.

    Returns:
        The config file's manifest entry ``{file, sha256}``.

    Raises:
        EdgepeftError: the converter failed (its last lines).
    """
    stage, out = root / ".ort-in", root / ".ort-out"
    for g in graphs:
        for rel in (g["file"], g["data_file"]):
            dst = stage / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if dst.exists():  # a weights file the static bucket graphs share
                continue
            try:
                os.link(root / rel, dst)
            except OSError:
                shutil.copyfile(root / rel, dst)
    style = "Runtime" if target.ort_optimization == "runtime" else "Fixed"
    cmd = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(stage),
           "--output_dir", str(out), "--optimization_style", style, "--enable_type_reduction"]
    if PLATFORMS[target.platform]:
        cmd += ["--target_platform", PLATFORMS[target.platform]]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise EdgepeftError(f"target {target.name!r}: onnxruntime's ORT-format conversion failed: "
                            f"{_tail(res.stderr or res.stdout)}. Export with a target without "
                            "ort_format, or report the graph that fails.")
    suffix = ".with_runtime_opt" if style == "Runtime" else ""
    for g in graphs:
        rel = Path(g["file"]).with_suffix(".ort")
        os.replace(out / Path(g["file"]).with_suffix(f"{suffix}.ort"), root / rel)
        g["ort"] = {"file": rel.as_posix(), "sha256": sha256_file(root / rel),
                    "optimization": target.ort_optimization}
    os.replace(out / f"required_operators_and_types{suffix}.config", root / ORT_CONFIG)
    shutil.rmtree(stage)
    shutil.rmtree(out)
    return {"file": ORT_CONFIG, "sha256": sha256_file(root / ORT_CONFIG)}


def partition_report(path: Path, accelerators: tuple[str, ...]) -> dict:
    """Estimated node coverage of ``path`` per accelerator, as onnxruntime's
    ``check_onnx_model_mobile_usability`` computes it (the graph optimized to the basic level, as
    ORT-format conversion does, shapes inferred), twice: with the shapes as exported, and as if
    every shape were fixed (what static-shape export can reach)."""
    here = str(Path(__file__).resolve().parents[2])  # this edgepeft, whatever sys.path the child gets
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}
    res = subprocess.run([sys.executable, "-m", "edgepeft.targets.bundle", str(path), *accelerators],
                         capture_output=True, text=True, env=env)
    if res.returncode != 0:
        return {"error": _tail(res.stderr or res.stdout, 3)}
    return json.loads(res.stdout)


def _report(path: Path, accelerators: list[str]) -> dict:
    import tempfile

    from onnxruntime.tools.mobile_helpers import usability_checker as uc
    from onnxruntime.tools.onnx_model_utils import ModelProtoWithShapeInfo, optimize_model

    with tempfile.TemporaryDirectory() as d:
        optimized = Path(d) / path.name
        optimize_model(path, optimized, use_external_initializers=True)
        model = ModelProtoWithShapeInfo(optimized).model_with_shape_info
    _explicit_transpose_perms(model)
    report = {}
    for acc in accelerators:
        entry = {}
        for label, fixed in (("as_exported", True), ("if_shapes_fixed", False)):
            if acc == "nnapi":
                info = uc.check_nnapi_partitions(model, fixed)
            else:
                info = uc.check_coreml_partitions(model, fixed, _COREML_OPS[acc])
            entry[label] = {
                "nodes": info.num_nodes, "supported_nodes": info.num_supported_nodes,
                "supported_pct": round(100 * info.num_supported_nodes / max(info.num_nodes, 1), 1),
                "partitions": info.num_partitions,
                "largest_partitions": sorted((len(g) for g in info.supported_groups), reverse=True)[:10],
                "unsupported_ops": sorted(info.unsupported_ops),
                "nodes_unsupported_by_op": info.nodes_unsupported_due_to_op,
                "nodes_unsupported_by_dynamic_shape": info.nodes_unsupported_due_to_dynamic_input,
                "nodes_unsupported_by_rank": info.num_unsupported_nodes_due_to_rank,
                "verdict": info.suitability().name,
            }
        report[acc] = entry
    return report


def _explicit_transpose_perms(model) -> None:
    """Give each Transpose without attributes its default ``perm`` (the reversed axes), which it
    means anyway: onnxruntime's checker reads ``node.attribute[0]`` of every Transpose and fails
    on one without (the fp16 converter writes such nodes). The graph is only analysed, never run."""
    import onnx

    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in
             list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)
             if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")}
    ranks.update({t.name: len(t.dims) for t in model.graph.initializer})
    for node in model.graph.node:
        if node.op_type == "Transpose" and not node.attribute:
            rank = ranks.get(node.input[0])
            perm = list(range(rank))[::-1] if rank else [0]  # unknown rank: read as 1, under any limit
            node.attribute.append(onnx.helper.make_attribute("perm", perm))


def summary_lines(partitions: dict) -> list[str]:
    """One line per graph and accelerator, for the end of an export and ``inspect``."""
    lines = []
    for graph, report in partitions.items():
        if "error" in report:
            lines.append(f"partitions {graph}: not estimated ({report['error']})")
            continue
        for acc, e in report.items():
            a, f = e["as_exported"], e["if_shapes_fixed"]
            ops = ", ".join(op.partition(":")[2] for op in f["unsupported_ops"]) or "none"
            lines.append(f"partitions {graph} {acc}: {a['supported_pct']:.1f}% of {a['nodes']} nodes in "
                         f"{a['partitions']} partition(s) as exported; {f['supported_pct']:.1f}% in "
                         f"{f['partitions']} with fixed shapes; unsupported ops: {ops}")
    return lines


if __name__ == "__main__":  # python -m edgepeft.targets.bundle GRAPH ACCELERATOR...
    import logging

    logging.disable(logging.CRITICAL)
    print(json.dumps(_report(Path(sys.argv[1]), sys.argv[2:])))
