"""Step 6 of an export: what the target profile adds to the artifact."""

from __future__ import annotations

import json
from pathlib import Path

from edgepeft.contract import graph_entries, sha256_file
from edgepeft.progress import log
from edgepeft.targets import Target


def target_bundle(target: Target, manifest: dict, root: Path, quiet: bool) -> None:
    """``.ort`` graphs + the minimal build's operator config, and ``partitions.json`` (estimated
    accelerator coverage), as ``target`` asks; all listed with checksums under
    ``manifest["target"]["files"]``."""
    from edgepeft.targets.bundle import PARTITIONS, convert_to_ort, partition_report

    graphs = graph_entries(manifest)
    # Static artifacts run the bucket graphs; the dynamic one stays as the reference (and "before").
    runnable = manifest["graph"]["buckets"] if manifest.get("static") else graphs
    files = []
    if target.ort_format:
        log(f"converting {len(runnable)} graph(s) to ORT format ({target.ort_optimization} optimizations)", quiet)
        files.append(convert_to_ort(root, runnable, target))
    if target.partition_report:
        log(f"estimating partitions for {', '.join(target.partition_report)}", quiet)
        report = {g["file"]: partition_report(root / g["file"], target.partition_report) for g in graphs}
        (root / PARTITIONS).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        files.append({"file": PARTITIONS, "sha256": sha256_file(root / PARTITIONS)})
        manifest["target"]["partitions"] = report
    manifest["target"]["files"] = files
    for key, why in target.not_applied(manifest["mode"]).items():
        log(f"target {target.name}: {key} not applied: {why}", quiet)
