"""Names of the artifact contract: file names, graph input/output names, adapter names, the
base tag, checksums and paths inside an artifact. numpy-free, torch-free.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from edgepeft.errors import EdgepeftError

FORMAT = "edgepeft-artifact"
ADAPTER_FILE_FORMAT = "edgepeft-adapter"  # metadata "format" of an adapter's safetensors twin
FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
BASE_CONFIG = "base_config.json"  # the base model's config, for adapters added after export
# what onnxruntime-genai reads (fused causal-LM artifacts of LoRA-family adapters, edgepeft.export.genai):
GENAI_CONFIG = "genai_config.json"
GENAI_GRAPH = "genai.onnx"  # the fused graph with onnxruntime-genai's length inputs, same weights file
MAX_MANIFEST_BYTES = 64 << 20  # a manifest is tens of KB; refuse absurd sizes before reading
ADAPTER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


# A graph's layout: None (the traced model: attention_mask, position_ids, past grows by concat) or
# "fused" (edgepeft.export.fused: seqlens_k, total_sequence_length, right padding, one KV buffer).
LAYOUTS = (None, "fused")
PROMPT_INPUT = "prompt.embeds"  # encoder prompt tuning: (n_virtual, hidden), rule "one"

# The manifest's quantization vocabulary (``precision`` and the int8 options), shared by the
# quantizer and the target profiles (which the runtime install reads without the quantizer).
PRECISIONS = ("fp32", "fp16", "int8", "int8-static", "int4")
INT8_SCHEMES = ("weight-only", "dynamic")
STATIC_ACTIVATIONS = ("int16", "int8")


def slot_input_name(feature: str, module: str, part: str) -> str:
    """Graph input name of one part of a feature of an adapted layer."""
    return f"{feature}.{module}.{part}"


def shared_input_name(feature: str, part: str, widths: list[int]) -> str:
    """Graph input name of a shared part (one per distinct layer shape, see
    ``edgepeft.contract.features``): ``{feature}.shared.{widths joined by 'x'}.{part}``."""
    return f"{feature}.shared.{'x'.join(str(w) for w in widths)}.{part}"


ROWS_PART = "rows"  # per-row weights over a slot's rank columns, or per-row offsets of a scale (contract.features)
ROWS_AXIS = "rows"  # their first axis: the batch's rows, or 1 (the default: every row alike)


def rows_axis(name: str) -> str:
    """The first axis of the per-row input ``name``: ``rows.{name}``, its own, because a per-row
    call feeds some per-row inputs one row per batch row and leaves others at their default of
    one row (onnxruntime takes inputs sharing an axis name to share its size). Artifacts of
    earlier versions named them all :data:`ROWS_AXIS`."""
    return f"{ROWS_AXIS}.{name}"


def rows_input_name(prefix: str) -> str:
    """Graph input of a slot's per-row weights, ``{prefix}.rows (N, 1, r)``: ``prefix`` is the
    slot's input prefix, ``lora.{module}`` (traced graph) or ``lora.{layer}.{group}`` (fused); or of
    a scale's per-row offsets, ``{input}.rows (N, 1, width)``: ``prefix`` is the scale's input."""
    return f"{prefix}.{ROWS_PART}"


def row_offset_shape(shape) -> tuple[int, ...]:
    """One row's offsets of an input of ``shape`` (its ``{input}.rows`` is ``(N, *this)``): ``(1,
    width)`` for a vector, so they broadcast over a row's positions; the input's own shape for a
    matrix (a head weight)."""
    shape = tuple(int(d) for d in shape)
    return shape if len(shape) > 1 else (1, *shape)


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


def base_tag(fingerprint: str) -> int:
    """The number an ``.onnx_adapter`` file carries as its AdapterFormat ``adapter_version``: 31 bits
    of the base weights' fingerprint, so the file itself names the base it was exported for.

    0 and 1 are never produced (files written before the tag carry 1).
    """
    tag = int(fingerprint.rpartition(":")[2][:8], 16) >> 1
    return tag if tag > 1 else tag + 2


UNTAGGED = (0, 1)  # adapter_version of files that carry no base tag


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def value_digest(array) -> str:
    """Hex sha256 of a numpy array's values as float32 little-endian bytes in C order: how the
    manifest names the value of a shared input's default (``inputs[name]["default"]``)."""
    return hashlib.sha256(array.astype("<f4", copy=False).tobytes(order="C")).hexdigest()


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


def read_json_file(path: Path, max_bytes: int, what: str, fix: str, fix_size: str | None = None):
    """Parse a small JSON file (a manifest, an adapter config) with readable refusals.

    Args:
        path: the file (its existence is checked by the caller, who knows what a missing file means).
        max_bytes: refuse larger files before reading them.
        what: e.g. ``"a manifest"``, for the size message.
        fix: the sentence that says what to do, e.g. ``"Export the artifact again."``.
        fix_size: what follows the size refusal's ``(at most N)``; default ``". " + fix``.

    Raises:
        EdgepeftError: too large, not UTF-8 or not JSON (over-long numbers and deep nesting included).
    """
    size = path.stat().st_size
    if size > max_bytes:
        raise EdgepeftError(f"{path}: {size:,} bytes, too large for {what} (at most {max_bytes:,})"
                            f"{fix_size if fix_size is not None else '. ' + fix}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # JSON and UTF-8 errors, over-long numbers, deep nesting
        raise EdgepeftError(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:200]}). {fix}") from None


def sync_dir(path: Path) -> None:
    """fsync a directory (its entries: a rename or a new file in it survives a crash); a no-op
    where the platform cannot (Windows)."""
    import os

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
