"""Writing an adapter's files: onnxruntime's ``.onnx_adapter`` and its ``.safetensors`` twin.

The Python runtime reads the ``.onnx_adapter`` (AdapterFormat); runtimes without an AdapterFormat
reader (onnxruntime's JavaScript API) read the ``.safetensors`` file. Both carry the base tag
(:func:`edgepeft.contract.names.base_tag`) of the base weights they were exported for.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edgepeft.contract.names import ADAPTER_FILE_FORMAT, FORMAT_VERSION, base_tag, sha256_file


def write_adapter_files(arrays: dict[str, np.ndarray], path: Path, precision: str = "fp32",
                        base_fp: str | None = None) -> dict:
    """Write one adapter's arrays twice: ``path`` (an ``.onnx_adapter``) and the ``.safetensors``
    file beside it. Both are stored as fp16 when ``precision`` says so (the runtimes compute the
    branch in fp32) and tagged with the base they belong to (AdapterFormat ``adapter_version``;
    safetensors metadata ``base_tag``); no ``base_fp``: tag 1 (untagged).

    Returns:
        The manifest entry's file fields: ``file``, ``sha256`` and ``safetensors: {file, sha256}``,
        paths relative to the artifact root (``path`` sits in a folder directly under it).
    """
    if precision == "fp16":
        arrays = {k: v.astype(np.float16) for k, v in arrays.items()}
    tag = base_tag(base_fp) if base_fp else 1
    _write_onnx_adapter(arrays, path, tag)
    st = _write_safetensors(arrays, path.with_suffix(".safetensors"), tag)
    os.chmod(st, path.stat().st_mode & 0o777)  # safetensors writes 0600; match the other files
    return {"file": f"{path.parent.name}/{path.name}", "sha256": sha256_file(path),
            "safetensors": {"file": f"{path.parent.name}/{st.name}", "sha256": sha256_file(st)}}


def _write_onnx_adapter(arrays: dict[str, np.ndarray], path: Path, tag: int) -> None:
    """onnxruntime's AdapterFormat file: the arrays, ``adapter_version`` = the base tag."""
    import onnxruntime as ort

    values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in arrays.items()}  # alive until export
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(tag)
    fmt.set_model_version(FORMAT_VERSION)
    fmt.set_parameters(values)
    fmt.export_adapter(str(path))


def _write_safetensors(arrays: dict[str, np.ndarray], path: Path, tag: int) -> Path:
    """The safetensors twin, with metadata ``format``, ``format_version`` and ``base_tag``."""
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path),
              metadata={"format": ADAPTER_FILE_FORMAT, "format_version": str(FORMAT_VERSION),
                        "base_tag": str(tag)})
    return path
