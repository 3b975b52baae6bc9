"""Read PEFT adapter directories into one plain form per kind.

Dispatch is this one literal dict from PEFT's ``peft_type`` to the kind module; each kind module
exposes ``read``, ``merge``, ``side`` and ``manifest_entry`` (see ``lora.py``).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from edgepeft.adapters import bottleneck, ia3, lora, prefix, prompt
from edgepeft.adapters.common import read_config
from edgepeft.errors import EdgepeftError
from edgepeft.contract import check_adapter_name

KINDS = {"LORA": lora, "IA3": ia3, "PREFIX_TUNING": prefix, "PROMPT_TUNING": prompt,
         "P_TUNING": prompt, "BOTTLENECK": bottleneck}
# What each adapter dataclass's ``kind`` says -> its module (LoRA with use_dora says "dora").
_BY_KIND = {"lora": lora, "dora": lora, "ia3": ia3, "prefix": prefix, "prompt": prompt,
            "bottleneck": bottleneck}


def kind_module(adapter):
    """The kind module that handles an adapter read by :func:`read_adapter`."""
    return _BY_KIND[adapter.kind]


def task_of(adapter_dir: Path) -> str | None:
    """``causal-lm`` / ``classification`` from an adapter's PEFT ``task_type``, None if unset."""
    task_type = read_config(adapter_dir).get("task_type")
    if not isinstance(task_type, str):
        return None
    return {"CAUSAL_LM": "causal-lm", "SEQ_CLS": "classification"}.get(task_type)


def read_adapter(name: str, adapter_dir: Path, model: nn.Module, task: str = "causal-lm"):
    """Read one adapter directory for ``model``.

    Args:
        name: the adapter's name in the artifact (letters, digits, ``_ - .``).
        adapter_dir: PEFT's ``save_pretrained`` folder.
        model: the base model (no PEFT wrappers).
        task: ``causal-lm`` or ``classification``.

    Returns:
        The kind's adapter dataclass (e.g. :class:`lora.LoraAdapter`).

    Raises:
        EdgepeftError: unreadable files, an unknown ``peft_type``, or weights that do not fit.
    """
    check_adapter_name(name, f"--adapter {name}={adapter_dir}")
    config = read_config(adapter_dir)
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or peft_type not in KINDS:
        raise EdgepeftError(f"{adapter_dir / 'adapter_config.json'}: peft_type {peft_type!r} is not "
                            f"supported. Supported: {', '.join(KINDS)}.")
    return KINDS[peft_type].read(name, adapter_dir, config, model, task)
