"""Decoder families the fused graph builds (``edgepeft.export.fused``): one description per file.

:data:`REGISTRY` (HF ``model_type`` -> the family's description, from its file) is the one list;
:func:`family` looks a config up and refuses what is not in it.
"""

from __future__ import annotations

from edgepeft.errors import EdgepeftError
from edgepeft.families import gemma2, gemma3, llama, mistral, phi3, qwen2, qwen3, smollm3
from edgepeft.families.common import Family, Layer

REGISTRY = {
    "llama": llama.FAMILY,
    "mistral": mistral.FAMILY,
    "qwen2": qwen2.FAMILY,
    "qwen3": qwen3.FAMILY,
    "smollm3": smollm3.FAMILY,
    "phi3": phi3.FAMILY,
    "gemma3_text": gemma3.FAMILY,
    "gemma3": gemma3.TOWER,
    "gemma2": gemma2.FAMILY,
}


def family(cfg) -> Family:
    """The description of ``cfg.model_type``.

    Raises:
        EdgepeftError: a model type without a description.
    """
    fam = REGISTRY.get(cfg.model_type)
    if fam is None:
        raise EdgepeftError(f"model_type {cfg.model_type!r} (the fused graph knows {', '.join(REGISTRY)})")
    return fam


__all__ = ["REGISTRY", "Family", "Layer", "family"]
