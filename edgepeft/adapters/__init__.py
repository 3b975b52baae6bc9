"""Read PEFT adapter directories into one plain form per kind.

Dispatch is this one literal dict from PEFT's ``peft_type`` to the kind module; each kind module
exposes ``read``, ``merge``, ``side_arrays`` and ``manifest_entry`` (see ``lora.py``).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from edgepeft.adapters import lora
from edgepeft.adapters.common import read_config
from edgepeft.errors import EdgepeftError
from edgepeft.runtime.manifest import check_adapter_name

KINDS = {"LORA": lora}


def kind_module(adapter):
    """The kind module that handles an adapter read by :func:`read_adapter`."""
    return next(m for m in KINDS.values() if m.KIND == adapter.kind)


def read_adapter(name: str, adapter_dir: Path, model: nn.Module):
    """Read one adapter directory for ``model``.

    Args:
        name: the adapter's name in the artifact (letters, digits, ``_ - .``).
        adapter_dir: PEFT's ``save_pretrained`` folder.
        model: the base model (no PEFT wrappers).

    Returns:
        The kind's adapter dataclass (e.g. :class:`lora.LoraAdapter`).

    Raises:
        EdgepeftError: unreadable files, an unknown ``peft_type``, or weights that do not fit.
    """
    check_adapter_name(name, f"--adapter {name}={adapter_dir}")
    config = read_config(adapter_dir)
    peft_type = config.get("peft_type")
    if peft_type not in KINDS:
        raise EdgepeftError(f"{adapter_dir / 'adapter_config.json'}: peft_type {peft_type!r} is not "
                            f"supported. Supported: {', '.join(KINDS)}.")
    return KINDS[peft_type].read(name, adapter_dir, config, model)
