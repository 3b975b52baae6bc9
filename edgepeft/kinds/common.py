"""Reading a PEFT adapter directory: ``adapter_config.json`` + weights, with readable errors.

Nothing here knows an adapter kind; the kind modules (``lora.py``, ...) interpret what this reads.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgepeft.errors import EdgepeftError

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
LEGACY_BIN_NAME = "adapter_model.bin"
MAX_CONFIG_BYTES = 16 << 20  # PEFT configs are a few KB; refuse anything absurd before reading it


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
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise EdgepeftError(f"{path}: {size:,} bytes, too large for an adapter config (at most "
                            f"{MAX_CONFIG_BYTES:,}). Re-save the adapter with PeftModel.save_pretrained.")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # JSON and UTF-8 errors, over-long numbers, deep nesting
        raise EdgepeftError(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:200]}). Re-save "
                            "the adapter with PeftModel.save_pretrained.") from None
    if not isinstance(config, dict):
        raise EdgepeftError(f"{path}: expected a JSON object, found {type(config).__name__}.")
    return config


def config_int(config: dict, key: str, default: int, path: Path, minimum: int = 1) -> int:
    """An integer field of ``adapter_config.json`` (null or absent: ``default``).

    Raises:
        EdgepeftError: not an integer, or below ``minimum``.
    """
    value = config.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise EdgepeftError(f"{path}: {key}={_short(value)}: expected an integer >= {minimum}. Re-save "
                            "the adapter with PEFT.")
    return value


def config_float(config: dict, key: str, default: float, path: Path) -> float:
    """A finite number field of ``adapter_config.json`` (null or absent: ``default``).

    Raises:
        EdgepeftError: not a number, or not finite as a float.
    """
    value = config.get(key)
    if value is None:
        return float(default)
    try:
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(float(value))
    except OverflowError:  # an integer past float range
        ok = False
    if not ok:
        raise EdgepeftError(f"{path}: {key}={_short(value)}: expected a finite number. Re-save the "
                            "adapter with PEFT.")
    return float(value)


def config_names(config: dict, key: str, path: Path) -> list[str]:
    """A module-name list field of ``adapter_config.json``: null, one string or a list of strings.

    Raises:
        EdgepeftError: any other type.
    """
    value = config.get(key)
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise EdgepeftError(f"{path}: {key}={_short(value)}: expected a module name or a list of "
                            "module names. Re-save the adapter with PEFT.")
    return value


def config_pattern(config: dict, key: str, path: Path) -> dict[str, int | float]:
    """``rank_pattern`` / ``alpha_pattern``: ``{module name or regex: number}``.

    Raises:
        EdgepeftError: not such a dict.
    """
    value = config.get(key) or {}
    if not isinstance(value, dict) or not all(_plain_number(v) for v in value.values()):
        raise EdgepeftError(f"{path}: {key}={_short(value)}: expected {{module: number}}. Re-save the "
                            "adapter with PEFT.")
    for pattern in value:
        try:
            re.compile(rf"(.*\.)?({pattern})$")  # how PEFT's get_pattern_key matches it
        except re.error as e:
            raise EdgepeftError(f"{path}: {key} key {_short(pattern)} is not a valid regular expression "
                                f"({e}). Re-save the adapter with PEFT.") from None
    return value


def _plain_number(v) -> bool:
    if isinstance(v, bool):
        return False
    return (isinstance(v, int) and abs(v) < 2**63) or (isinstance(v, float) and math.isfinite(v))


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


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


@dataclass(frozen=True)
class SideBranch:
    """What one adapter feeds the side-branch graph and the runtime; all arrays fp32.

    Attributes:
        layers: ``{(module, feature): {part: array}}`` for adapted linear layers; features and
            parts as the kinds' ``FEATURES`` declare them (``edgepeft.contract.features``).
        head: ``{parameter name: array}`` of a classification head carried in the adapter.
        prompt: ``(n_virtual, hidden)`` virtual-token embeddings (encoder prompt tuning).
        prefix: per decoder layer ``(key, value)``, each ``(1, kv_heads, p, head_dim)``: the KV
            cache seed of prefix tuning (and of prompt tuning on a decoder).
        prefix_from_prompt: the prefix was computed through the base weights at export (decoder
            prompt tuning), so it is exact only while no other adapter changes those weights.
    """

    layers: dict[tuple[str, str], dict[str, np.ndarray]] = field(default_factory=dict)
    head: dict[str, np.ndarray] = field(default_factory=dict)
    prompt: np.ndarray | None = None
    prefix: list[tuple[np.ndarray, np.ndarray]] | None = None
    prefix_from_prompt: bool = False

    def arrays(self, features: dict) -> dict[str, np.ndarray]:
        """Everything the adapter feeds, by name: graph inputs and the KV-cache seed.

        Args:
            features: feature name -> ``contract.features.Feature`` (``edgepeft.kinds.FEATURES``):
                a shared part becomes one input per layer shape (equal on every such layer).

        Raises:
            ValueError: a shared part that differs between two layers of one shape.
        """
        from edgepeft.contract import (PROMPT_INPUT, head_input_name, prefix_names,
                                       shared_input_name, slot_input_name)
        from edgepeft.contract.features import WIDTHS

        out = {}
        for (module, feature), parts in self.layers.items():
            for part, value in parts.items():
                p = features[feature].part(part)
                if not p.shared:
                    out[slot_input_name(feature, module, part)] = value
                    continue
                name = shared_input_name(feature, part, [d for s, d in zip(p.shape, value.shape) if s in WIDTHS])
                if name in out and not np.array_equal(out[name], value):
                    raise ValueError(f"{name}: layer {module} has another value than an earlier layer")
                out[name] = value
        for param, value in self.head.items():
            out[head_input_name(param)] = value
        if self.prompt is not None:
            out[PROMPT_INPUT] = self.prompt
        for i, (k, v) in enumerate(self.prefix or []):
            kn, vn = prefix_names(i)
            out[kn], out[vn] = k, v
        return out


def peft_key(key: str) -> str:
    """A saved PEFT tensor key as the base model's own name (``base_model.model.`` etc. removed)."""
    for prefix in ("base_model.model.", "base_model."):
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    return key.replace(".modules_to_save.default.", ".").replace(".original_module.", ".")


def split_head(tensors: dict[str, torch.Tensor], config: dict, model: nn.Module, weights_file: Path,
               task: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Separate ``modules_to_save`` parameters (a classification head) from adapter tensors.

    Args:
        tensors: all tensors of the adapter file.
        config: its ``adapter_config.json``.
        model: the base model.
        weights_file: for messages.
        task: ``"causal-lm"`` or ``"classification"``.

    Returns:
        (the other tensors, ``{base parameter name: fp32 tensor}`` of the head).

    Raises:
        EdgepeftError: head parameters on a causal LM (not exported), or whose shapes do not fit.
    """
    to_save = [m for m in config_names(config, "modules_to_save", weights_file.parent / CONFIG_NAME) if m]
    params = dict(model.named_parameters())
    head, rest = {}, {}
    for key, t in tensors.items():
        name = peft_key(key)
        module = name.rpartition(".")[0]
        parts = module.split(".")
        owners = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]  # the module and its parents
        # PEFT wraps a module when its name ends with an entry (so "classifier" also takes
        # DistilBERT's "pre_classifier"); its parameters are saved under the module's name.
        if to_save and name in params and any(o.endswith(m) for o in owners for m in to_save):
            head[name] = t
        else:
            rest[key] = t
    if head and task != "classification":
        raise EdgepeftError(f"{weights_file}: holds fully trained copies of {', '.join(sorted(head))} "
                            "(modules_to_save); on a causal LM these are not exported. Retrain "
                            "without modules_to_save.")
    for name, t in head.items():
        if tuple(t.shape) != tuple(params[name].shape):
            raise EdgepeftError(f"{weights_file}: head parameter {name} has shape {tuple(t.shape)}, the "
                                f"base model's is {tuple(params[name].shape)} (another number of "
                                "labels?). Export with a base of the same num_labels.")
        if not torch.isfinite(t).all():
            raise EdgepeftError(f"{weights_file}: head parameter {name} contains NaN or Inf.")
    return rest, {n: t.float() for n, t in head.items()}


def head_to_numpy(head: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {n: np.ascontiguousarray(t.numpy(), dtype=np.float32) for n, t in head.items()}


@torch.no_grad()
def merge_head(model: nn.Module, head: dict[str, torch.Tensor]) -> None:
    """Copy a carried classification head into ``model`` (merged mode)."""
    params = dict(model.named_parameters())
    for name, t in head.items():
        params[name].copy_(t)


@dataclass(frozen=True)
class CacheShape:
    """Per-layer KV cache geometry, probed from a real forward pass."""

    kv_heads: tuple[int, ...]
    head_dims: tuple[int, ...]

    @property
    def layers(self) -> int:
        return len(self.kv_heads)


def probe_cache(model: nn.Module) -> CacheShape:
    """Run one token through ``model`` and read the cache geometry it produces."""
    with torch.no_grad():
        out = model(input_ids=torch.zeros(1, 1, dtype=torch.long), use_cache=True)
    layers = out.cache.layers
    return CacheShape(tuple(int(l.keys.shape[1]) for l in layers), tuple(int(l.keys.shape[3]) for l in layers))
