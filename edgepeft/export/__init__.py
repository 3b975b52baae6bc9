"""``edgepeft export``: base model + PEFT adapters -> an artifact directory, as a pipeline.

1. load the base model (:mod:`~edgepeft.export.load`)
2. read the adapters and check they belong to it (:mod:`~edgepeft.export.load`)
3. plan the adapter slots (:mod:`~edgepeft.export.plan`)
4. build the graph(s): traced | fused | merged, and the adapter files (:mod:`~edgepeft.export.build`)
5. quantize and save each graph (:mod:`~edgepeft.export.graphs`)
6. add what the target asks for (:mod:`~edgepeft.export.bundle`)
7. publish atomically: OUT is absent or complete, even if the process is killed
   (:mod:`~edgepeft.export.publish`)

Steps 3-5 run inside the builder of the chosen layout; the manifest (:mod:`~edgepeft.export.manifest`)
is written last.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from edgepeft.export.build import builder, choose_graph
from edgepeft.export.bundle import target_bundle
from edgepeft.export.config import GRAPHS, MODES, TASKS, ExportConfig
from edgepeft.export.load import Base, load_base, read_adapters
from edgepeft.export.manifest import manifest_head, write_manifest, write_tokenizer
from edgepeft.export.publish import atomic_dir, remove_dead_temps
from edgepeft.progress import log

__all__ = ["GRAPHS", "MODES", "TASKS", "Base", "ExportConfig", "export", "load_base", "write_artifact"]


def export(cfg: ExportConfig, quiet: bool = False) -> dict:
    """Export per ``cfg``; returns the manifest written to ``cfg.out``.

    Raises:
        EdgepeftError: bad base model, adapters, or an OUT that exists.
    """
    t0 = time.perf_counter()
    remove_dead_temps(cfg.out)  # what killed exports to OUT left
    log(f"loading base model {cfg.base}", quiet)
    base = load_base(cfg)  # 1
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
    files, then the manifest, which is returned."""
    manifest = manifest_head(cfg, base)
    manifest["tokenizer"] = write_tokenizer(cfg.base, root)
    build = builder(cfg, base)  # traced | fused | merged
    manifest.update(build(cfg, base, adapters, root, quiet))  # steps 3-5
    target_bundle(cfg.target, manifest, root, quiet)
    write_manifest(manifest, root)
    return manifest
