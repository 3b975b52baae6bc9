"""Decoder families the fused graph builds (``edgepeft.export.fused``): one description per file.

:data:`REGISTRY` (HF ``model_type`` -> family module, each with a ``FAMILY``) is the one list;
:func:`family` looks a config up and refuses what is not in it.
"""

from __future__ import annotations

from edgepeft.errors import EdgepeftError
from edgepeft.families import gemma2, gemma3, llama, mistral, phi3, qwen2, qwen3, smollm3
from edgepeft.families.common import Family, Layer

REGISTRY = {
    "llama": llama,
    "mistral": mistral,
    "qwen2": qwen2,
    "qwen3": qwen3,
    "smollm3": smollm3,
    "phi3": phi3,
    "gemma3_text": gemma3,
    "gemma2": gemma2,
}


def family(cfg) -> Family:
    """The description of ``cfg.model_type``.

    Raises:
        EdgepeftError: a model type without a description.
    """
    module = REGISTRY.get(cfg.model_type)
    if module is None:
        raise EdgepeftError(f"model_type {cfg.model_type!r} (the fused graph knows {', '.join(REGISTRY)})")
    return module.FAMILY


__all__ = ["REGISTRY", "Family", "Layer", "family"]
