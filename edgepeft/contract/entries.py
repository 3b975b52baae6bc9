"""The manifest entry of one exported adapter: one builder for every export layout.

An entry is the kind's own fields (``kind``, rank, targets, scale: the kind module's
``manifest_entry``), then where its weights are (``file`` / ``sha256`` / ``safetensors`` for an
adapter file, or ``graph`` for a merged graph), then the base it belongs to, the graph inputs it
feeds, its prefix, and the PEFT folder it came from. The key order is part of the artifact's bytes.
"""

from __future__ import annotations

from pathlib import Path


def adapter_entry(kind_entry: dict, files: dict, base_fingerprint: str, inputs: list[str],
                  prefix: dict | None, source: Path, defaults: list[str] = ()) -> dict:
    """The entry of an adapter stored as a file beside a shared graph (side branch, fused).

    Args:
        kind_entry: the kind's fields (``kind_module(a).manifest_entry(a)``).
        files: what :func:`edgepeft.contract.adapter_files.write_adapter_files` returned.
        base_fingerprint: fingerprint of the base weights the adapter was exported for.
        inputs: the graph inputs the adapter file feeds (sorted).
        prefix: ``{"length", "from_prompt"}`` for prefix / decoder prompt tuning, else None.
        source: the adapter's PEFT folder.
        defaults: shared inputs whose value the adapter leaves to the graph's default (sorted;
            recorded only when there are some, see ``edgepeft.contract.features``).
    """
    entry = _entry(kind_entry, files, base_fingerprint, inputs, prefix, source)
    if defaults:
        entry = {**{k: v for k, v in entry.items() if k != "source"}, "defaults": list(defaults),
                 "source": entry["source"]}
    return entry


def merged_adapter_entry(kind_entry: dict, graph: dict, base_fingerprint: str, source: Path) -> dict:
    """The entry of an adapter folded into its own graph (``--mode merged``): no file, no inputs."""
    return _entry(kind_entry, {"graph": graph}, base_fingerprint, [], None, source)


def _entry(kind_entry: dict, stored: dict, base_fingerprint: str, inputs: list[str], prefix: dict | None,
           source: Path) -> dict:
    return {**kind_entry, **stored, "base_fingerprint": base_fingerprint, "inputs": list(inputs),
            "prefix": prefix, "source": str(Path(source).resolve())}
