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
                            "folder written by save_pretrained, or a GGUF file.")
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
                            "folder written by save_pretrained, or a GGUF file.")
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
                            "folder written by save_pretrained, or a GGUF file.")
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


# ---------------------------------------------------------------- binding an adapter to its base
BINDING_NAME = "edgepeft.json"  # written by `edgepeft train` beside the adapter files
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def write_binding(adapter_dir: Path, base: Path, base_fp: str, task: str) -> None:
    """Record in ``adapter_dir/edgepeft.json`` which base weights (:func:`fingerprint`) an adapter
    was trained on, so that export can refuse another base of the same shapes."""
    (adapter_dir / BINDING_NAME).write_text(json.dumps(
        {"base_fingerprint": base_fp, "base": str(base.resolve()), "task": task}, indent=2) + "\n",
        encoding="utf-8")


def _weights_digest(folder: Path) -> list[str]:
    """sha256 of the weight files at the top of a model folder (sorted), empty when it has none."""
    from edgepeft.contract import sha256_file

    return sorted(sha256_file(p) for p in folder.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)


def _hub_id(base: Path) -> str | None:
    """``org/name`` when ``base`` is a Hugging Face hub cache snapshot (``models--org--name/...``)."""
    for part in base.resolve().parts:
        if part.startswith("models--"):
            return "/".join(part[len("models--"):].split("--"))
    return None


def binding_mismatch(adapter_dir: Path, base: Path, base_fp: str) -> str | None:
    """Why the adapter in ``adapter_dir`` was not trained on the base at ``base``, or None.

    In order of strength:

    1. ``edgepeft.json`` (written by ``edgepeft train``): its weight fingerprint must equal
       ``base_fp``; this is exact, and when it matches nothing else is checked.
    2. PEFT's ``base_model_name_or_path``, when it names a model folder on this machine: the same
       folder, or one whose weight files are byte-identical (a copy), is fine; a folder with other
       weights is a mismatch (a re-saved copy with other bytes too: override it).
    3. Otherwise (a hub id, or a path from another machine): a mismatch only when ``base`` is a hub
       cache snapshot of another repository. A base folder with a name of its own says nothing
       about which model it holds, so that case is accepted.

    Raises:
        EdgepeftError: an ``edgepeft.json`` that is not readable JSON.
    """
    binding = adapter_dir / BINDING_NAME
    if binding.is_file():
        try:
            recorded = json.loads(binding.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise EdgepeftError(f"{binding}: not valid JSON ({e}); delete it or train the adapter "
                                "again.") from None
        fp = recorded.get("base_fingerprint") if isinstance(recorded, dict) else None
        if fp:
            if fp == base_fp:
                return None
            return (f"it was trained on base {recorded.get('base', '?')} with weight fingerprint "
                    f"{fp[:23]}... ({binding.name}), but {base} has {base_fp[:23]}...")
    try:
        from edgepeft.kinds.common import read_config

        named = read_config(adapter_dir).get("base_model_name_or_path")
    except EdgepeftError:
        return None
    if not named or not isinstance(named, str):
        return None
    path = Path(named).expanduser()
    if path.is_dir():
        if path.resolve() == base.resolve() or not (path / "config.json").is_file():
            return None
        theirs, ours = _weights_digest(path), _weights_digest(base)
        if theirs and ours and theirs != ours:
            return (f"PEFT recorded base_model_name_or_path {named!r}, a model folder whose weight "
                    f"files differ from those of {base}")
        return None
    hub = _hub_id(base)
    if hub is None:
        return None
    if named.strip("/").lower() == hub.lower() or Path(named).name.lower() == hub.rsplit("/", 1)[-1].lower():
        return None
    return f"PEFT recorded base_model_name_or_path {named!r}, but {base} is a snapshot of {hub!r}"
