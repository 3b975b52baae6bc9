"""The artifact contract: ``manifest.json`` names, reading and checking. numpy-free, torch-free.

The exporter writes what this module reads; both sides use these names so they cannot drift.

Layout of an artifact dir::

    manifest.json
    model.onnx, model.onnx.data            side mode: one base graph, LoRA A/B as inputs
    merged/NAME.onnx, merged/NAME.onnx.data merged mode: one graph per adapter
    adapters/NAME.onnx_adapter             side mode: adapter weights (onnxruntime AdapterFormat)
    tokenizer/tokenizer.json, ...          when the base model has a fast tokenizer
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from edgepeft.errors import EdgepeftError

FORMAT = "edgepeft-artifact"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
ADAPTER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def lora_input_names(module: str) -> tuple[str, str]:
    """Graph input names of one LoRA slot: ``A (r, in)`` and ``B (out, r)``."""
    return f"lora.{module}.A", f"lora.{module}.B"


def past_names(layer: int) -> tuple[str, str]:
    """KV-cache input names of one decoder layer, each ``(batch, kv_heads, past, head_dim)``."""
    return f"past.{layer}.key", f"past.{layer}.value"


def present_names(layer: int) -> tuple[str, str]:
    """KV-cache output names of one decoder layer, each ``(batch, kv_heads, past+seq, head_dim)``."""
    return f"present.{layer}.key", f"present.{layer}.value"


def check_adapter_name(name: str, where: str) -> str:
    """Adapter names become file names: keep them short, plain and inside the artifact.

    Raises:
        EdgepeftError: the name has path separators, dots at the start, or other characters.
    """
    if not ADAPTER_NAME_RE.match(name):
        raise EdgepeftError(f"{where}: adapter name {name!r} is not allowed. Use letters, digits, "
                            "'_', '-', '.' (not first), at most 64 characters.")
    return name


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def inside(root: Path, rel: str, where: str) -> Path:
    """Resolve ``rel`` under ``root``; refuse absolute paths and ``..`` escapes.

    Raises:
        EdgepeftError: the path leaves the artifact directory.
    """
    p = (root / rel).resolve()
    if Path(rel).is_absolute() or not p.is_relative_to(root.resolve()):
        raise EdgepeftError(f"{where}: path {rel!r} points outside the artifact directory {root}; "
                            "the artifact is corrupt or tampered with. Export it again.")
    return p


def read_manifest(root: Path) -> dict:
    """Load and sanity-check ``manifest.json`` of an artifact dir.

    Args:
        root: the artifact directory.

    Returns:
        The manifest dict.

    Raises:
        EdgepeftError: missing, not JSON, another format or a newer format version, or missing keys.
    """
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise EdgepeftError(f"{root}: artifact directory not found. Create one with `edgepeft export`.")
    if not path.is_file():
        raise EdgepeftError(f"{path}: missing; {root} is not an edgepeft artifact (or its export "
                            "did not finish). Export it again.")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EdgepeftError(f"{path}: not valid JSON ({e}). Export the artifact again.") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise EdgepeftError(f"{path}: not an edgepeft manifest (format != {FORMAT!r}).")
    if m.get("format_version") != FORMAT_VERSION:
        raise EdgepeftError(f"{path}: format_version {m.get('format_version')!r}; this edgepeft "
                            f"reads version {FORMAT_VERSION}. Use the matching edgepeft version.")
    for key in ("task", "mode", "base", "graph", "adapters"):
        if key not in m:
            raise EdgepeftError(f"{path}: key {key!r} missing. Export the artifact again.")
    for name in m["adapters"]:
        check_adapter_name(name, str(path))
    return m


def verify(root: Path) -> list[str]:
    """Check every file the manifest names: present, inside ``root``, sha256 as recorded.

    Args:
        root: the artifact directory.

    Returns:
        One line per problem; empty when the artifact is intact.

    Raises:
        EdgepeftError: the manifest itself is missing or unreadable.
    """
    m = read_manifest(root)
    where = str(root / MANIFEST_NAME)
    graphs = [m["graph"]] if m["mode"] == "side" else [e["graph"] for e in m["adapters"].values()]
    files = [(g["file"], g["sha256"]) for g in graphs] + [(g["data_file"], g["data_sha256"]) for g in graphs]
    files += [(e["file"], e["sha256"]) for e in m["adapters"].values() if "file" in e]
    problems = []
    for rel, digest in files:
        try:
            path = inside(root, rel, where)
        except EdgepeftError as e:
            problems.append(str(e))
            continue
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif sha256_file(path) != digest:
            problems.append(f"{path}: sha256 differs from the manifest (changed or damaged)")
    return problems
