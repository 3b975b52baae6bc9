"""Adapter files (``adapters/NAME.onnx_adapter``): reading them and checking them against their
manifest entry. numpy and onnxruntime are imported when a file is read, so importing this module
stays numpy-free like the rest of :mod:`edgepeft.contract`.
"""

from __future__ import annotations

from pathlib import Path

from edgepeft.contract.names import MANIFEST_NAME, UNTAGGED, base_tag, inside, sha256_file
from edgepeft.errors import EdgepeftError


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
    if not file.is_file():
        raise EdgepeftError(f"{file}: missing ({where}). Export the artifact again.")
    if sha256_file(file) != entry["sha256"]:
        raise EdgepeftError(f"{file}: sha256 does not match the manifest ({where}); the file "
                            "was changed or damaged. Export the artifact again.")
    if entry.get("base_fingerprint") != fingerprint:
        raise EdgepeftError(f"{file}: made for base {entry.get('base_fingerprint')}, this "
                            f"artifact's base is {fingerprint} ({where}).")
    arrays, tag = read_adapter_file(file, where)
    if tag not in UNTAGGED and tag != base_tag(fingerprint):
        raise EdgepeftError(f"{file}: the file was exported for another base model (its tag "
                            f"{tag} is not {base_tag(fingerprint)}, from {fingerprint[:23]}...) ({where}). "
                            "Export the adapter with this artifact's base.")
    return file, where, arrays
