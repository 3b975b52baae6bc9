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


ENCODER_TYPES = ("bert", "roberta", "distilbert", "xlm-roberta", "electra", "albert", "deberta-v2")


def detect_task(base: Path, adapter_tasks: list[str | None]) -> str:
    """``causal-lm`` or ``classification`` from the adapters' PEFT task_type, else the base config.

    Raises:
        EdgepeftError: adapters of both tasks, or no config.json.
    """
    known = {t for t in adapter_tasks if t}
    if len(known) > 1:
        raise EdgepeftError("the adapters were trained for different tasks (task_type CAUSAL_LM and "
                            "SEQ_CLS); export them into separate artifacts.")
    if known:
        return known.pop()
    cfg = base / "config.json"
    if not cfg.is_file():
        raise EdgepeftError(f"{base}: not a Hugging Face model folder (no config.json). Pass the "
                            "folder written by save_pretrained.")
    config = json.loads(cfg.read_text(encoding="utf-8"))
    archs = " ".join(config.get("architectures") or [])
    if "SequenceClassification" in archs or config.get("model_type") in ENCODER_TYPES:
        return "classification"
    return "causal-lm"


def load_classifier(base: Path, num_labels: int | None = None) -> tuple[nn.Module, list[str]]:
    """Load an ``AutoModelForSequenceClassification`` in fp32, eval mode, deterministically.

    A base without a trained head (e.g. a sentence encoder) gets a seeded random one; adapters
    carry their own (PEFT ``modules_to_save``).

    Args:
        base: a Hugging Face model folder.
        num_labels: head size; None keeps the checkpoint's.

    Returns:
        (model, names of parameters that were not in the checkpoint, i.e. freshly initialized).

    Raises:
        EdgepeftError: not a folder, no ``config.json``, or transformers cannot load it.
    """
    from transformers import AutoModelForSequenceClassification

    if not (base / "config.json").is_file():
        raise EdgepeftError(f"{base}: not a Hugging Face model folder (no config.json). Pass the "
                            "folder written by save_pretrained.")
    kwargs = {"num_labels": num_labels} if num_labels else {}
    torch.manual_seed(0)
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            base, dtype=torch.float32, output_loading_info=True, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise EdgepeftError(f"{base}: transformers cannot load it as a sequence classifier ({e}).") from None
    params = {n for n, _ in model.named_parameters()}
    fresh = sorted(set(info.get("missing_keys", [])) & params)
    return model.eval(), fresh


def fingerprint(model: nn.Module, exclude: tuple[str, ...] | list[str] = ()) -> str:
    """sha256 over the base weights (names, dtypes, shapes, bytes), before any adapter.

    Tied weights count once (``state_dict`` keeps both names; the hash covers both entries, which
    is deterministic for a given model class).

    Args:
        model: the base model.
        exclude: parameter names left out (a classifier head initialized at load time).

    Returns:
        ``"sha256:<hex>"``.
    """
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if name in exclude:
            continue
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
    # Fixed padding / truncation in tokenizer.json (sentence-transformers: MiniLM pads to 128)
    # would make other readers of the artifact feed pads as real tokens; the runtime pads itself.
    tok.backend_tokenizer.no_padding()
    tok.backend_tokenizer.no_truncation()
    tok.save_pretrained(out)
    if not (out / "tokenizer.json").is_file():
        return None
    return {"dir": out.name, "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id,
            "pad_token_id": tok.pad_token_id}
