"""Model families the fused graphs build: one description per file.

:data:`REGISTRY` (HF ``model_type`` -> a decoder's description, ``edgepeft.export.fused``) and
:data:`ENCODERS` (-> an encoder classifier's, ``edgepeft.export.fused_encoder``) are the lists;
:func:`family` looks a config up in both and refuses what is in neither.
"""

from __future__ import annotations

from edgepeft.errors import EdgepeftError
from edgepeft.families import bert, distilbert, gemma2, gemma3, llama, mistral, phi3, qwen2, qwen3, roberta, smollm3
from edgepeft.families.common import Encoder, Family, Layer

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

ENCODERS = {
    "bert": bert.ENCODER,
    "roberta": roberta.ENCODER,
    "distilbert": distilbert.ENCODER,
}


def family(cfg) -> Family | Encoder:
    """The description of ``cfg.model_type`` (a decoder's or an encoder's).

    Raises:
        EdgepeftError: a model type without a description.
    """
    fam = REGISTRY.get(cfg.model_type) or ENCODERS.get(cfg.model_type)
    if fam is None:
        raise EdgepeftError(f"model_type {cfg.model_type!r} (the fused graphs know {', '.join([*REGISTRY, *ENCODERS])})")
    return fam


__all__ = ["ENCODERS", "REGISTRY", "Encoder", "Family", "Layer", "family"]
