"""Adapter files (``adapters/NAME.onnx_adapter`` and the ``.safetensors`` twin): writing them,
reading them and checking them against their manifest entry.

Both carry the base tag (:func:`edgepeft.contract.names.base_tag`) of the base weights they were
exported for. The runtimes read the ``.safetensors`` twin when the manifest entry lists one: the
JavaScript API has no AdapterFormat reader, and in Python onnxruntime's reader reads the whole file
into the heap, where (in a process that runs sessions) it stays after the copy: adding SmolLM2's
``numbers`` adapter (10.5 MB of arrays) to a running model added 21.2 MB of RSS that way, 10.8 MB
through safetensors' mapped reader (``benchmarks/bench_adapter_memory.py``). The ``.onnx_adapter``
is read when the entry lists no twin (older artifacts), and is what onnxruntime's own adapter API
takes.
numpy, onnxruntime and safetensors are imported when a file is written or read.
"""

from __future__ import annotations

import os
from pathlib import Path

from edgepeft.contract.names import (ADAPTER_FILE_FORMAT, FORMAT_VERSION, MANIFEST_NAME, UNTAGGED, base_tag,
                                     inside, sha256_file)
from edgepeft.errors import EdgepeftError


# ---------------------------------------------------------------- writing
def write_adapter_files(arrays: dict, path: Path, precision: str = "fp32",
                        base_fp: str | None = None) -> dict:
    """Write one adapter's arrays twice: ``path`` (an ``.onnx_adapter``) and the ``.safetensors``
    file beside it. Both are stored as fp16 when ``precision`` says so (the runtimes compute the
    branch in fp32) and tagged with the base they belong to (AdapterFormat ``adapter_version``;
    safetensors metadata ``base_tag``); no ``base_fp``: tag 1 (untagged).

    Returns:
        The manifest entry's file fields: ``file``, ``sha256`` and ``safetensors: {file, sha256}``,
        paths relative to the artifact root (``path`` sits in a folder directly under it).
    """
    import numpy as np

    if precision == "fp16":
        arrays = {k: v.astype(np.float16) for k, v in arrays.items()}
    tag = base_tag(base_fp) if base_fp else 1
    _write_onnx_adapter(arrays, path, tag)
    st = _write_safetensors(arrays, path.with_suffix(".safetensors"), tag)
    os.chmod(st, path.stat().st_mode & 0o777)  # safetensors writes 0600; match the other files
    return {"file": f"{path.parent.name}/{path.name}", "sha256": sha256_file(path),
            "safetensors": {"file": f"{path.parent.name}/{st.name}", "sha256": sha256_file(st)}}


def _write_onnx_adapter(arrays: dict, path: Path, tag: int) -> None:
    """onnxruntime's AdapterFormat file: the arrays, ``adapter_version`` = the base tag."""
    import onnxruntime as ort

    values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in arrays.items()}  # alive until export
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(tag)
    fmt.set_model_version(FORMAT_VERSION)
    fmt.set_parameters(values)
    fmt.export_adapter(str(path))


def _write_safetensors(arrays: dict, path: Path, tag: int) -> Path:
    """The safetensors twin, with metadata ``format``, ``format_version`` and ``base_tag``."""
    import numpy as np
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path),
              metadata={"format": ADAPTER_FILE_FORMAT, "format_version": str(FORMAT_VERSION),
                        "base_tag": str(tag)})
    return path


# ---------------------------------------------------------------- reading
def read_adapter_file(path: Path, where: str) -> tuple[dict, int]:
    """Arrays of an ``.onnx_adapter`` file as numpy (copies, so the file can be closed), and its
    base tag (``adapter_version``).

    Args:
        path: the file.
        where: what names it (e.g. ``adapter 'chat' of out/manifest.json``), for messages.

    Returns:
        ``({name: ndarray}, tag)``.

    Raises:
        EdgepeftError: onnxruntime cannot read the file.
    """
    import numpy as np
    import onnxruntime as ort

    try:
        fmt = ort.AdapterFormat.read_adapter(str(path))
        params = fmt.get_parameters()
        return {k: np.array(v.numpy(), copy=True) for k, v in params.items()}, fmt.get_adapter_version()
    except Exception as e:  # onnxruntime raises its own Fail / RuntimeError types
        raise EdgepeftError(f"{path}: cannot read adapter file ({e}); {where}. Export the artifact "
                            "again.") from None


def read_safetensors_file(path: Path, where: str) -> tuple[dict, int]:
    """Arrays of an adapter's ``.safetensors`` twin (read through a file mapping: one copy in
    memory) and its base tag (metadata ``base_tag``); as :func:`read_adapter_file`."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            tag = int((f.metadata() or {})["base_tag"])
            return {k: f.get_tensor(k) for k in f.keys()}, tag
    except Exception as e:  # safetensors raises its own SafetensorError; a missing tag a KeyError
        raise EdgepeftError(f"{path}: cannot read adapter file ({type(e).__name__}: {e}); {where}. Export the "
                            "artifact again.") from None


def read_checked_adapter(root: Path, name: str, entry: dict, fingerprint: str) -> tuple[Path, str, dict]:
    """The arrays of adapter ``name`` of the artifact at ``root``, once its file matches its
    manifest entry: inside ``root``, present, the recorded sha256, made for base ``fingerprint``
    (the entry's ``base_fingerprint`` and the file's base tag).

    Returns:
        ``(file, where, {name: ndarray})``; ``where`` names the adapter for later messages.

    Raises:
        EdgepeftError: naming the file and which check failed.
    """
    where = f"adapter {name!r} of {root / MANIFEST_NAME}"
    file = inside(root, entry["file"], where)
    twin = entry.get("safetensors")
    files = [(file, entry["sha256"])] + ([(inside(root, twin["file"], where), twin["sha256"])] if twin else [])
    for f, sha in files:  # both, so a damaged .onnx_adapter is found here too
        if not f.is_file():
            raise EdgepeftError(f"{f}: missing ({where}). Export the artifact again.")
        if sha256_file(f) != sha:
            raise EdgepeftError(f"{f}: sha256 does not match the manifest ({where}); the file "
                                "was changed or damaged. Export the artifact again.")
    if entry.get("base_fingerprint") != fingerprint:
        raise EdgepeftError(f"{file}: made for base {entry.get('base_fingerprint')}, this "
                            f"artifact's base is {fingerprint} ({where}).")
    file = files[-1][0]  # the twin when there is one
    arrays, tag = (read_safetensors_file if twin else read_adapter_file)(file, where)
    if tag not in UNTAGGED and tag != base_tag(fingerprint):
        raise EdgepeftError(f"{file}: the file was exported for another base model (its tag "
                            f"{tag} is not {base_tag(fingerprint)}, from {fingerprint[:23]}...) ({where}). "
                            "Export the adapter with this artifact's base.")
    return file, where, arrays
