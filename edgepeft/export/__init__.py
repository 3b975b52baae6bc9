"""``edgepeft export``: base model + PEFT adapters -> an artifact directory, as a pipeline.

1. load the base model (:mod:`~edgepeft.export.load`; a GGUF file is dequantized once into a cached
   Hugging Face folder first, :mod:`edgepeft.gguf`)
2. read the adapters and check they belong to it (:mod:`~edgepeft.export.load`)
3. plan the adapter slots (:mod:`~edgepeft.export.plan`)
4. build the graph(s): traced | fused | merged, and the adapter files (:mod:`~edgepeft.export.build`)
5. quantize and save each graph (:mod:`~edgepeft.export.graphs`)
6. add what the target asks for (:mod:`~edgepeft.export.bundle`), and what onnxruntime-genai
   reads where the artifact allows it (:mod:`~edgepeft.export.genai`)
7. publish atomically: OUT is absent or complete, even if the process is killed
   (:mod:`~edgepeft.export.publish`)

Steps 3-5 run inside the builder of the chosen layout; the manifest (:mod:`~edgepeft.export.manifest`)
is written last.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from edgepeft.progress import log

if TYPE_CHECKING:
    from edgepeft.export.config import ExportConfig
    from edgepeft.export.load import Base

# The stages import torch, transformers and onnx; they load when an export runs, so that a tool
# that needs one light module of this package (``adapter add``: the fused packing, slot padding)
# does not pay for them.
_LAZY = {"Base": "edgepeft.export.load", "load_base": "edgepeft.export.load",
         **dict.fromkeys(("GRAPHS", "MODES", "TASKS", "ExportConfig"), "edgepeft.export.config")}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["GRAPHS", "MODES", "TASKS", "Base", "ExportConfig", "export", "load_base", "write_artifact"]


def export(cfg: ExportConfig, quiet: bool = False) -> dict:
    """Export per ``cfg``; returns the manifest written to ``cfg.out``.

    ``cfg.base`` may be a GGUF file (:func:`edgepeft.gguf.resolve_base`): the artifact is exported
    from its dequantized folder, whose path the manifest records as ``base.source``, with the
    file and its sha256 as ``base.gguf``.

    Raises:
        EdgepeftError: bad base model (or GGUF file), adapters, or an OUT that exists.
    """
    from edgepeft.export.build import choose_graph
    from edgepeft.export.load import load_base, read_adapters
    from edgepeft.export.publish import atomic_dir, remove_dead_temps
    from edgepeft.gguf import resolve_base

    t0 = time.perf_counter()
    remove_dead_temps(cfg.out)  # what killed exports to OUT left
    log(f"loading base model {cfg.base}", quiet)
    source = resolve_base(cfg.base, quiet)  # a GGUF file: its dequantized folder in the cache
    if source.gguf is not None:
        cfg = replace(cfg, base=source.folder)  # every later step reads that folder
    base = load_base(cfg, gguf=source.manifest())  # 1
    adapters = read_adapters(cfg, base, quiet)  # 2
    graph, why = choose_graph(cfg, base, adapters)
    log(f"graph: {graph}" + (f" (the traced model; not fused: {why})" if why else ""), quiet)
    cfg = dataclasses.replace(cfg, graph=graph)
    with atomic_dir(cfg.out) as tmp:  # 7: renamed to OUT when the block succeeds, else removed
        manifest = write_artifact(cfg, base, adapters, tmp, quiet)
    log(f"wrote {cfg.out} in {time.perf_counter() - t0:.1f}s", quiet)
    return manifest


def write_artifact(cfg: ExportConfig, base: Base, adapters: list, root: Path, quiet: bool) -> dict:
    """Steps 3-6 into the (temporary) directory ``root``: graphs, adapter files, tokenizer, target
    files, onnxruntime-genai's files, then the manifest, which is returned."""
    from edgepeft.export.build import builder
    from edgepeft.export.bundle import target_bundle
    from edgepeft.export.genai import write_genai
    from edgepeft.export.manifest import manifest_head, write_base_config, write_manifest, write_tokenizer
    from edgepeft.contract.packs import slot_schema

    manifest = manifest_head(cfg, base)
    manifest["tokenizer"] = write_tokenizer(cfg.base, root)
    write_base_config(base, root)
    build = builder(cfg, base)  # traced | fused | merged
    manifest.update(build(cfg, base, adapters, root, quiet))  # steps 3-5
    target_bundle(cfg.target, manifest, root, quiet)
    manifest["genai"] = write_genai(manifest, root)  # genai_config.json + genai.onnx, or why not
    log("onnxruntime-genai: " + ("ready" if manifest["genai"]["ready"] else f"not ready ({manifest['genai']['reason']})"),
        quiet)
    if manifest["mode"] == "side":  # what an adapter pack must have been made for (contract.packs)
        manifest["slot_schema"] = slot_schema(manifest)
    write_manifest(manifest, root)
    return manifest
