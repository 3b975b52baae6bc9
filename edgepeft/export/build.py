"""Step 4 of an export: build the graph(s) and the adapter files, one builder per layout.

- :func:`traced_side`: the traced base model with a side branch per planned slot; adapters are
  files of graph inputs (every architecture and adapter kind).
- :func:`fused_side`: the fused-kernel graph of a causal LM of a known family
  (``edgepeft.export.fused``) with packed LoRA / DoRA / IA3 inputs; :func:`fused_encoder_side`
  the same for an encoder classifier (``edgepeft.export.fused_encoder``).
- :func:`merged`: one graph per adapter, its delta folded into the weights (traced or fused).

Each saves its graphs through step 5 (:func:`edgepeft.export.graphs.save_graph`: quantization)
and returns the manifest parts it made: ``graph``, ``slots``, ``inputs``, ``adapters``, ``static``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import torch

from edgepeft import kinds
from edgepeft.kinds import kind_module
from edgepeft.contract.adapter_files import write_adapter_files
from edgepeft.contract.features import FUSED_MIX
from edgepeft.contract.entries import adapter_entry, merged_adapter_entry
from edgepeft.errors import EdgepeftError
from edgepeft.export import causal_lm, encoder, fused, fused_encoder, fused_layout
from edgepeft.export.calibrate import fused_probe_feeds, quantization_feeds
from edgepeft.export.config import ExportConfig
from edgepeft.export.graphs import save_graph, static_graphs
from edgepeft.export.load import Base
from edgepeft.export.plan import plan_traced, side_branches
from edgepeft.export.slots import free_rows, head_row_values, rows_manifest
from edgepeft.progress import bar, log


def choose_graph(cfg: ExportConfig, base: Base, adapters: list) -> tuple[str, str | None]:
    """``(graph, why)``: ``cfg.graph`` when it names one, else (``auto``) ``fused`` wherever the
    task, the target, the precision, the base's family and the adapters allow it, else
    ``generic`` and the reason (None for a graph that was asked for or is fused)."""
    if cfg.graph != "auto":
        return cfg.graph, None
    why = cfg.why_not_fused()
    if why is None and base.task == "classification" and cfg.slots:
        why = "reserved slots on a classifier (the fused encoder does not reserve them)"
    if why is None:
        sides = {} if cfg.mode == "merged" else side_branches(cfg, base, adapters)
        why = _fused_unsupported(base)(base.model, sides)
    return ("generic", why) if why else ("fused", None)


def _fused_unsupported(base: Base):
    """Why the fused graph of the base's task (decoders, encoder classifiers) cannot take it."""
    return fused_layout.unsupported if base.task == "causal-lm" else fused_layout.encoder_unsupported


def builder(cfg: ExportConfig, base: Base):
    """The builder for ``cfg.graph`` (``generic`` or ``fused``: resolved by :func:`choose_graph`)
    and ``cfg.mode``.

    Raises:
        EdgepeftError: ``--graph fused`` with reserved slots on a classifier.
    """
    if cfg.graph == "fused" and base.task == "classification" and cfg.slots:
        raise EdgepeftError("--graph fused with --slots: the fused encoder does not reserve slots. "
                            "Use --graph generic.")
    if cfg.mode == "merged":
        return merged
    if cfg.graph != "fused":
        return traced_side
    return fused_side if base.task == "causal-lm" else fused_encoder_side


def traced_side(cfg: ExportConfig, base: Base, adapters: list, root: Path, quiet: bool) -> dict:
    """One traced graph with every planned slot as inputs, and one file per adapter feeding them."""
    plan = plan_traced(cfg, base, adapters)
    log(f"exporting side-branch graph ({len(plan.slots)} adapted layers, {len(plan.specs)} adapter inputs)",
        quiet)
    calibration, probe = quantization_feeds(cfg, base.task, base.model, adapters, plan.sides, plan.specs,
                                            base.cache, quiet)
    proto = _trace(cfg, base, base.model, plan.slots, plan.specs + plan.rows, plan.head_params)
    free_rows(proto, plan.rows)
    parts = {"graph": save_graph(proto, root, "model.onnx", cfg.quant, [x.name for x in plan.specs + plan.rows],
                                 calibration, probe, quiet=quiet)}
    if cfg.target.static_shapes:
        log(f"writing fixed-shape graphs for sequence buckets {list(cfg.target.sequence_buckets)}", quiet)
        parts["static"] = static_graphs(cfg.target, base.task, parts["graph"], root)
    parts["slots"] = [{"module": s.module, "in": s.in_features, "out": s.out_features,
                       "features": list(s.features)} for s in plan.slots]
    parts["features"] = {f: kinds.feature(f).table(plan.fixed.get(f)) for s in plan.slots for f in s.features}
    parts["inputs"] = {s.name: s.manifest() for s in plan.specs}
    parts["rows"], parts["row_values"] = rows_manifest(plan.slots)
    parts["row_values"].update(head_row_values(plan.head_params))
    (root / "adapters").mkdir()
    parts["adapters"] = {}
    for a in adapters:
        side = plan.sides[a.name]
        # a shared input whose value is the graph's default stays out of the file
        uses = sorted(n for n, v in plan.arrays[a.name].items()
                      if n in plan.shared and np.array_equal(v, plan.shared[n]))
        arrays = {n: v for n, v in plan.arrays[a.name].items() if n not in uses}
        inputs = sorted(n for n in arrays if n in parts["inputs"])
        parts["adapters"][a.name] = _write_adapter(cfg, base, a, arrays, root, inputs, side.prefix_entry(), uses)
    return parts


def fused_side(cfg: ExportConfig, base: Base, adapters: list, root: Path, quiet: bool) -> dict:
    """One fused graph with packed adapter inputs (low rank, scales) for the projection groups
    any adapter feeds, and one file per adapter packed to them."""
    model = base.model
    sides = side_branches(cfg, base, adapters)
    log("building fused graph", quiet)
    proto, defaults, used = fused.build_graph(model, sides, cfg.opset or 17)
    table = fused_layout.group_table(model)
    names = [n for n, _ in defaults]
    rows, values = fused_layout.rows_manifest(used, names)
    probe = fused_probe_feeds(cfg, model, base.cache, defaults)
    parts = {"graph": {**save_graph(proto, root, "model.onnx", cfg.quant, names + list(rows) + list(values), probe=probe,
                                    quiet=quiet),
                       "layout": "fused", "positions": fused_layout.positions(model)},
             "slots": [{"layer": layer, "group": group, "modules": table[(layer, group)]}
                       for layer, group in used],
             "inputs": {n: _fused_input(n, d) for n, d in defaults}, "rows": rows, "row_values": values}
    parts["adapters"] = _write_packed(cfg, base, adapters, root, lambda a: fused_layout.pack_adapter(model, sides[a.name], used))
    return parts


def fused_encoder_side(cfg: ExportConfig, base: Base, adapters: list, root: Path, quiet: bool) -> dict:
    """One fused encoder graph with packed adapter inputs for the projection groups any adapter
    feeds, ``head.{param}`` inputs for the heads they carry and ``prompt.embeds`` for their
    prompts; one file per adapter."""
    model = base.model
    sides = side_branches(cfg, base, adapters)
    log("building fused encoder graph", quiet)
    proto, defaults, used, heads, fed = fused_encoder.build_graph(model, sides, cfg.opset or 17)
    table = fused_layout.group_table(model)
    names = [n for n, _ in defaults]
    rows, values = fused_layout.rows_manifest(used, names)
    values.update(head_row_values(heads))
    calibration, probe = quantization_feeds(cfg, base.task, model, [], {}, [], base.cache, quiet)
    graph_inputs = names + list(fed) + list(rows) + list(values)
    parts = {"graph": {**save_graph(proto, root, "model.onnx", cfg.quant, graph_inputs, calibration, probe,
                                    quiet=quiet), "kernels": "fused"},
             "slots": [{"layer": layer, "group": group, "modules": table[(layer, group)]} for layer, group in used],
             "inputs": {**{n: _fused_input(n, d) for n, d in defaults}, **fed},
             "rows": rows, "row_values": values}
    parts["adapters"] = _write_packed(cfg, base, adapters, root,
                                      lambda a: fused_layout.encoder_adapter_arrays(model, sides[a.name], used))
    return parts


def _write_packed(cfg: ExportConfig, base: Base, adapters: list, root: Path, arrays_of) -> dict:
    """``root/adapters/``: each adapter's file of the inputs ``arrays_of(adapter)`` gives (a fused
    graph's: every array is an input); returns their manifest entries."""
    (root / "adapters").mkdir()
    entries = {}
    for a in adapters:
        arrays = arrays_of(a)
        entries[a.name] = _write_adapter(cfg, base, a, arrays, root, sorted(arrays), None)
    return entries


def merged(cfg: ExportConfig, base: Base, adapters: list, root: Path, quiet: bool) -> dict:
    """One graph per adapter (``merged/NAME.onnx``), built from a copy of the base with the
    adapter's delta folded in; traced, or fused for ``--graph fused``."""
    is_fused = cfg.graph == "fused"
    entries = {}
    for i, a in enumerate(bar(adapters, desc="merged graphs", unit="graph", quiet=quiet)):
        log(f"{'building fused' if is_fused else 'exporting'} merged graph {i + 1}/{len(adapters)}: {a.name}",
            quiet)
        model = copy.deepcopy(base.model)
        kind_module(a).merge(model, a)
        rel = f"merged/{a.name}.onnx"
        if is_fused and base.task == "classification":
            proto = fused_encoder.build_graph(model, {}, cfg.opset or 17)[0]
            calibration, probe = quantization_feeds(cfg, base.task, model, [], {}, [], base.cache, quiet)
            del model
            graph = {**save_graph(proto, root, rel, cfg.quant, [], calibration, probe, quiet=quiet), "kernels": "fused"}
        elif is_fused:
            proto, _, _ = fused.build_graph(model, {}, cfg.opset or 17)
            probe = fused_probe_feeds(cfg, model, base.cache, [])
            positions = fused_layout.positions(model)
            del model
            graph = {**save_graph(proto, root, rel, cfg.quant, [], probe=probe, quiet=quiet), "layout": "fused",
                     "positions": positions}
        else:
            calibration, probe = quantization_feeds(cfg, base.task, model, [], {}, [], base.cache, quiet)
            proto = _trace(cfg, base, model, [], [], [])
            graph = save_graph(proto, root, rel, cfg.quant, [], calibration, probe, quiet=quiet)
            del model
        entries[a.name] = merged_adapter_entry(_kind_entry(a), graph, base.fingerprint,
                                               a.source)
    kernels = {} if not is_fused else {"kernels": "fused"} if base.task == "classification" else {"layout": "fused"}
    return {"adapters": entries, "graph": {"per_adapter": True, **kernels}}


def _trace(cfg: ExportConfig, base: Base, model: torch.nn.Module, slots, specs, head_params) -> onnx.ModelProto:
    """torch.onnx.export of ``model`` (the base or a merged copy) with side branches at ``slots``."""
    if base.task == "causal-lm":
        return causal_lm.export_graph(model, slots, specs, base.cache, cfg.opset)
    return encoder.export_graph(model, slots, specs, head_params, cfg.opset)


def _kind_entry(a) -> dict:
    """The kind's manifest fields plus ``summary``, its one-line description (``inspect`` shows it
    without importing the kind modules, which need torch)."""
    entry = kind_module(a).manifest_entry(a)
    return {**entry, "summary": kind_module(a).describe(entry).strip()}


def _fused_input(name: str, default: np.ndarray) -> dict:
    """Manifest entry of a fused adapter input (``edgepeft.export.fused``): its mix rule and rank
    axis from ``contract.features.FUSED_MIX`` (``*.AT (in, r)`` mixes along axis 1, ``*.BT (r,
    out)`` along axis 0 weighted; a scale is taken from one adapter: a product of scales is no
    weighted sum; a bottleneck's ``DT`` / ``db`` / ``UT`` concatenate hidden units, ``ub`` sums)."""
    rule, axis = FUSED_MIX[name.rsplit(".", 1)[1]]
    return {"shape": [None if i == axis else int(d) for i, d in enumerate(default.shape)], "mix": rule}


def _write_adapter(cfg: ExportConfig, base: Base, a, arrays: dict[str, np.ndarray], root: Path,
                   inputs: list[str], prefix: dict | None, defaults: list[str] = ()) -> dict:
    """Write ``root/adapters/NAME.onnx_adapter`` (+ its safetensors twin); returns its manifest entry."""
    path = root / "adapters" / f"{a.name}.onnx_adapter"
    files = write_adapter_files(arrays, path, cfg.quant.adapter_precision, base.fingerprint)
    return adapter_entry(_kind_entry(a), files, base.fingerprint, inputs, prefix, a.source,
                         defaults)
