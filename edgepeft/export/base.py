"""Loading the Hugging Face base model and fingerprinting its weights."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from edgepeft.errors import EdgepeftError


def load_causal_lm(base: Path) -> nn.Module:
    """Load an ``AutoModelForCausalLM`` from a local folder in fp32, eval mode.

    Args:
        base: a Hugging Face model folder (``config.json`` + weights).

    Returns:
        The model.

    Raises:
        EdgepeftError: not a folder, no ``config.json``, or transformers cannot load it.
    """
    from transformers import AutoModelForCausalLM

    cfg = base / "config.json"
    if not cfg.is_file():
        raise EdgepeftError(f"{base}: not a Hugging Face model folder (no config.json). Pass the "
                            "folder written by save_pretrained.")
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise EdgepeftError(f"{base}: transformers cannot load it as a causal LM ({e}).") from None
    return model.eval()


def fingerprint(model: nn.Module) -> str:
    """sha256 over the base weights (names, dtypes, shapes, bytes), before any adapter.

    Tied weights count once (``state_dict`` keeps both names; the hash covers both entries, which
    is deterministic for a given model class).

    Returns:
        ``"sha256:<hex>"``.
    """
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def save_tokenizer(base: Path, out: Path) -> dict | None:
    """Copy the base model's fast tokenizer into ``out`` (for the runtime's ``tokenizers``).

    Returns:
        ``{"dir": "tokenizer", "eos_token_id": int | None, "bos_token_id": ...}`` or None when the
        base has no fast tokenizer (the runtime then takes token ids only).
    """
    from transformers import AutoTokenizer

    if not any((base / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None  # transformers would build an empty tokenizer from the model type
    try:
        tok = AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not getattr(tok, "is_fast", False):
        return None
    tok.save_pretrained(out)
    if not (out / "tokenizer.json").is_file():
        return None
    return {"dir": out.name, "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id,
            "pad_token_id": tok.pad_token_id}
