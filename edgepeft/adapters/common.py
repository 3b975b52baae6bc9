"""Reading a PEFT adapter directory: ``adapter_config.json`` + weights, with readable errors.

Nothing here knows an adapter kind; the kind modules (``lora.py``, ...) interpret what this reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from edgepeft.errors import EdgepeftError

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
LEGACY_BIN_NAME = "adapter_model.bin"


def read_config(adapter_dir: Path) -> dict:
    """Parse ``adapter_config.json`` of a PEFT adapter directory.

    Args:
        adapter_dir: folder written by ``PeftModel.save_pretrained``.

    Returns:
        The JSON object as a dict.

    Raises:
        EdgepeftError: the folder or file is missing, or the JSON is not an object.
    """
    if not adapter_dir.is_dir():
        raise EdgepeftError(f"{adapter_dir}: adapter directory not found. Pass the folder that "
                            f"holds {CONFIG_NAME} and {SAFETENSORS_NAME}.")
    path = adapter_dir / CONFIG_NAME
    if not path.is_file():
        raise EdgepeftError(f"{path}: missing. An adapter directory needs {CONFIG_NAME} as written "
                            "by PeftModel.save_pretrained.")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EdgepeftError(f"{path}: not valid JSON ({e}). Re-save the adapter with "
                            "PeftModel.save_pretrained.") from None
    if not isinstance(config, dict):
        raise EdgepeftError(f"{path}: expected a JSON object, found {type(config).__name__}.")
    return config


def read_tensors(adapter_dir: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """Load the adapter weights, safetensors first; a legacy ``.bin`` only with ``weights_only``.

    Args:
        adapter_dir: the adapter folder.

    Returns:
        (file read, {key: tensor}) with tensors as stored (not cast).

    Raises:
        EdgepeftError: no weights file, a corrupt file, or a pickle that is not plain tensors.
    """
    st = adapter_dir / SAFETENSORS_NAME
    if st.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return st, load_file(st)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise EdgepeftError(f"{st}: cannot read safetensors file ({e}). The file is corrupt or "
                                "truncated; copy or save the adapter again.") from None
    legacy = adapter_dir / LEGACY_BIN_NAME
    if legacy.is_file():
        try:
            state = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
            raise EdgepeftError(f"{legacy}: refused to load ({type(e).__name__}: {e}). Only plain "
                                "tensor pickles are read (weights_only=True); convert the adapter "
                                "to safetensors.") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise EdgepeftError(f"{legacy}: expected a dict of tensors.")
        return legacy, state
    raise EdgepeftError(f"{adapter_dir}: no {SAFETENSORS_NAME} (or legacy {LEGACY_BIN_NAME}) found. "
                        "Save the adapter with PeftModel.save_pretrained.")


def module_names_summary(names: list[str], limit: int = 12) -> str:
    """Short listing of module names for error messages: leaf names with counts.

    Args:
        names: full dotted module names.
        limit: most distinct leaf names to show.

    Returns:
        e.g. ``"q_proj (x2), k_proj (x2), ..."``.
    """
    counts: dict[str, int] = {}
    for n in names:
        leaf = n.rsplit(".", 1)[-1]
        counts[leaf] = counts.get(leaf, 0) + 1
    items = [f"{k} (x{v})" for k, v in counts.items()]
    more = f", ... {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
