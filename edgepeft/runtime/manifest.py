"""The artifact contract: ``manifest.json`` names, reading and checking. numpy-free, torch-free.

The exporter writes what this module reads; both sides use these names so they cannot drift.

Layout of an artifact dir::

    manifest.json
    model.onnx, model.onnx.data            side mode: one base graph, adapter weights as inputs
    merged/NAME.onnx, merged/NAME.onnx.data merged mode: one graph per adapter
    adapters/NAME.onnx_adapter             side mode: adapter arrays (onnxruntime AdapterFormat):
                                           graph inputs by name, plus ``prefix.{i}.key|value``
                                           for prefix / decoder prompt tuning (a KV-cache seed)
    tokenizer/tokenizer.json, ...          when the base model has a fast tokenizer
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from edgepeft.errors import EdgepeftError

FORMAT = "edgepeft-artifact"
FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
ADAPTER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


# The side branch of one adapted linear layer is a composition of features; each adds graph inputs
# named ``{feature}.{module}.{part}``. Per part: its mixing rule when several adapters are active,
#   cat0  concatenate along axis 0 (A, down-projections: the rank axis)
#   cat1w concatenate along axis 1 after multiplying by the adapter's weight (B, up-projections)
#   sumw  weighted sum (up-projection biases)
#   one   at most one active adapter may feed it, with weight 1 (non-linear in the weights).
# See edgepeft/export/slots.py for the maths.
FEATURE_PARTS = {
    "lora": (("A", "cat0"), ("B", "cat1w")),
    "dora": (("A", "one"), ("B", "one"), ("mag", "one")),
    "ia3_in": (("scale", "one"),),
    "ia3_out": (("scale", "one"),),
    "bottleneck_relu": (("down", "cat0"), ("down_bias", "cat0"), ("up", "cat1w"), ("up_bias", "sumw")),
    "bottleneck_gelu": (("down", "cat0"), ("down_bias", "cat0"), ("up", "cat1w"), ("up_bias", "sumw")),
    "bottleneck_silu": (("down", "cat0"), ("down_bias", "cat0"), ("up", "cat1w"), ("up_bias", "sumw")),
}
MIX_RULES = ("cat0", "cat1w", "sumw", "one")
PROMPT_INPUT = "prompt.embeds"  # encoder prompt tuning: (n_virtual, hidden), rule "one"


def slot_input_name(feature: str, module: str, part: str) -> str:
    """Graph input name of one part of a feature of an adapted layer."""
    return f"{feature}.{module}.{part}"


def lora_input_names(module: str) -> tuple[str, str]:
    """Graph input names of one LoRA slot: ``A (r, in)`` and ``B (out, r)``."""
    return slot_input_name("lora", module, "A"), slot_input_name("lora", module, "B")


def head_input_name(param: str) -> str:
    """Graph input of one classification-head parameter (PEFT ``modules_to_save``), rule "one"."""
    return f"head.{param}"


def prefix_names(layer: int) -> tuple[str, str]:
    """Adapter-file arrays that seed the KV cache of one decoder layer, each ``(1, kv_heads, p, head_dim)``."""
    return f"prefix.{layer}.key", f"prefix.{layer}.value"


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
