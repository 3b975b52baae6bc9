"""Reading a PEFT adapter directory: ``adapter_config.json`` + weights, with readable errors;
and the two descriptions every kind fills in for shared code: :class:`Reference` (how validate
and bench build its PyTorch model) and :class:`TrainSpec` (what ``edgepeft train`` does with it).

Nothing here knows an adapter kind; the kind modules (``lora.py``, ...) interpret what this reads.
"""

from __future__ import annotations

import contextlib
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from edgepeft.contract.names import read_json_file
from edgepeft.kinds import peft_rules
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
    config = read_json_file(path, MAX_CONFIG_BYTES, "an adapter config",
                            "Re-save the adapter with PeftModel.save_pretrained.")
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
    reserved: bool = False  # empty slots of ``export --slots`` (identity values), not an adapter

    def prefix_entry(self) -> dict | None:
        """The manifest's ``prefix`` of this adapter: ``{"length", "from_prompt"}``, None without a
        KV-cache seed."""
        if not self.prefix:
            return None
        return {"length": int(self.prefix[0][0].shape[2]), "from_prompt": self.prefix_from_prompt}

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


def is_conv1d(module: nn.Module) -> bool:
    """A GPT-2 ``Conv1D`` (weight stored ``(in, out)``). It is transformers' class, and no module is
    one before ``transformers.pytorch_utils`` is imported: so a tool that never imports
    transformers (``adapter add`` on the artifact's module table) does not import it for this."""
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return conv1d is not None and isinstance(module, conv1d)


def is_linear(module: nn.Module) -> bool:
    """A layer an adapter can target: ``nn.Linear`` or GPT-2's ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def peft_targets(config: dict, model: nn.Module, path: Path, what: str, regex_layers: bool = False) -> set[str]:
    """Module names PEFT would wrap for ``config`` (an ``adapter_config.json``) on ``model``, by
    PEFT's own rules (:mod:`edgepeft.kinds.peft_rules`, peft not imported): ``all-linear``
    expanded as PEFT expands it, then ``target_modules`` / ``layers_to_transform`` /
    ``exclude_modules`` / ``modules_to_save``. ``what``: the config's kind for the message
    (``LoRA``); ``regex_layers``: the config class allows a regex with layer indexes (LoHa).

    Raises:
        EdgepeftError: an empty ``target_modules``, or fields PEFT rejects (wrong types, a broken
            regex, contradicting fields).
    """
    if not config.get("target_modules"):
        raise EdgepeftError(f"{path}: target_modules is empty; PEFT records the adapted modules "
                            "there. Re-save the adapter with PEFT.")
    config_names(config, "target_modules", path)  # a name, a regex or a list of names
    # fields of an untrusted file: a wrong type or a broken regex means "PEFT rejects this config"
    try:
        peft_rules.check_target_fields(config, regex_layers)
        config = peft_rules.all_linear(config, model, [n for n, m in model.named_modules() if is_linear(m)])
        return {n for n, _ in model.named_modules() if peft_rules.target_match(config, n) is True}
    except (ValueError, TypeError, re.error) as e:
        raise EdgepeftError(f"{path}: PEFT rejects this {what} config ({type(e).__name__}: "
                            f"{str(e)[:200]}). Re-save the adapter with PEFT.") from None


def peft_pattern(patterns: dict, module: str, default):
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: a key matches a dotted suffix of the name."""
    return patterns.get(peft_rules.pattern_key(list(patterns), module), default)


def linear_modules(model: nn.Module, targets: tuple[str, ...], where: str) -> list[str]:
    """The linear layers ``targets`` name, in model order, by PEFT's rules for a list of names: a
    module matches a name it equals or ends with after a dot; ``("all-linear",)``: every linear
    layer of the base model but the output head (and a classifier's head, reserved on its own).

    Raises:
        EdgepeftError: a name that matches no linear layer (listing the ones there are).
    """
    head = model.get_output_embeddings()
    prefix = getattr(model, "base_model_prefix", "")
    linear = [n for n, m in model.named_modules() if is_linear(m) and m is not head
              and not (prefix and hasattr(model, prefix) and not n.startswith(prefix + "."))]
    if tuple(targets) == ("all-linear",):
        return linear
    found = []
    for t in targets:
        hits = [n for n in linear if n == t or n.endswith("." + t)]
        if not hits:
            raise EdgepeftError(f"{where}: {t!r} names no linear layer of the base model. Linear layers: "
                                f"{module_names_summary(linear)}.")
        found += hits
    return [n for n in linear if n in set(found)]


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor as the contiguous fp32 array the graph and the adapter files take."""
    return np.ascontiguousarray(t.detach().numpy(), dtype=np.float32)


def head_to_numpy(head: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {n: to_numpy(t) for n, t in head.items()}


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


# ---------------------------------------------------------------- descriptions for shared code
TRAIN_TASKS = ("causal-lm", "classification")


@dataclass(frozen=True)
class Reference:
    """How validate and bench build a kind's PyTorch (server) model: what an artifact is compared
    with. Each kind module sets ``REFERENCE = Reference(...)``; validate and bench read it through
    ``kind_module(entry["kind"]).REFERENCE`` and never name a kind.

    Attributes:
        load: ``(fresh base copy, adapter_dir, name) -> model``: the base with this one adapter,
            run the way its trainer runs it (PEFT's ``PeftModel.from_pretrained``, or the kind's
            own torch module); it may change the base copy in place, the caller sets eval mode.
            ``name`` is the adapter's name inside the model (what ``add``, ``select``, ``mix`` and
            ``combine`` refer to); None when the model holds this adapter alone (PEFT then uses
            its default name).
        add: ``(model, adapter_dir, name) -> None``: load one more adapter of this kind into a
            model made by ``load`` (PEFT's ``load_adapter``); None when a model holds one adapter.
        select: ``(model, name) -> None``: make an adapter loaded by ``load`` / ``add`` the
            active one (PEFT's ``set_adapter``); given exactly when ``add`` is.
        shared: validate loads every adapter of the kind into one model (``load`` + ``add``) and
            ``select``s one per case, which is cheap on memory (LoRA, DoRA). False: each adapter
            gets its own model on a fresh copy of the base. Needs ``add``.
        prompt_learning: a PEFT prompt-learning model (prefix, prompt, P-tuning): PEFT drops the
            given position ids, so a left-padded row's outputs depend on its padding; validate
            runs such a reference on each row unpadded.
        mix: ``(shared model, {name: weight}) -> context manager``: inside it, the model computes
            the base plus ``sum_i w_i delta_i`` of the named adapters (validate's reference for a
            weighted mix, which the artifact computes by the manifest's mix rules). None: the kind
            has no mix reference, so validate never mixes it. Needs ``shared`` (all the named
            adapters are in that one model).
        combine: ``(shared model, {name: weight}, new name) -> None``: add the weighted
            combination as a new adapter, unmerged, and select it (bench's PyTorch row for a mix;
            PEFT's ``add_weighted_adapter`` with ranks concatenated). None: bench runs no PyTorch
            row for a mix with this kind. Needs ``add``.
        seed_composes: the kind's KV-cache seed (``SideBranch.prefix``) stays exact next to other
            adapters' weight changes, so validate's reference for a composition "mix + this"
            seeds the cache with it (prefix tuning). False for kinds without a seed and for a
            seed computed through the base weights (prompt tuning on a decoder).
    """

    load: Callable
    add: Callable | None = None
    select: Callable | None = None
    shared: bool = False
    prompt_learning: bool = False
    mix: Callable | None = None
    combine: Callable | None = None
    seed_composes: bool = False

    def __post_init__(self):
        for name in ("load", "add", "select", "mix", "combine"):
            value = getattr(self, name)
            if not (callable(value) or (value is None and name != "load")):
                what = "a function" if name == "load" else "a function or None"
                raise ValueError(f"Reference.{name}: expected {what}, found {value!r}")
        for name in ("shared", "prompt_learning", "seed_composes"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Reference.{name}: expected True or False, found {getattr(self, name)!r}")
        if (self.add is None) != (self.select is None):
            raise ValueError("Reference: give add and select together (or neither)")
        if self.shared and self.add is None:
            raise ValueError("Reference: shared needs add and select (every adapter goes into one model)")
        if self.mix is not None and not self.shared:
            raise ValueError("Reference: mix needs shared (the mixed adapters must be in one model)")
        if self.combine is not None and self.add is None:
            raise ValueError("Reference: combine needs add and select (the combined adapters share one model)")


@dataclass(frozen=True)
class TrainSpec:
    """What ``edgepeft train --kind NAME`` does for one train kind. Each kind module sets
    ``TRAIN = {name: TrainSpec(...)}`` (``lora.py``: ``lora`` and ``dora``); ``edgepeft.train``
    and the CLI read them through ``edgepeft.kinds.TRAIN`` and never name a kind.

    The functions get ``cfg``, the ``edgepeft.train.TrainConfig`` (fields ``model``, ``r``,
    ``num_virtual_tokens``, ``reduction_factor``, ``target_modules`` (None: the model family's
    default), ...); they run after ``torch.manual_seed(cfg.seed)`` and the base model's load.

    Attributes:
        lr: default AdamW learning rate: trains the kind in a few hundred steps on small data.
        peft_config: ``(model, cfg, classification) -> PEFT config`` for ``get_peft_model``
            (``task_type`` SEQ_CLS or CAUSAL_LM from ``classification``); it draws no random
            numbers. None for a kind PEFT does not have: then ``add`` and ``save``.
        add: ``(model, cfg, heads) -> {parameter name: parameter}``: wrap ``model`` in place with
            the kind's own adapter modules and return what to train (the adapters and every
            parameter of the head modules ``heads``; train freezes the rest). With ``save``;
            exactly one of ``peft_config`` and ``add`` is given.
        save: ``(model, out_dir, cfg, classification, heads) -> None``: write the adapter folder
            (``adapter_config.json`` + weights, with the head modules ``heads`` carried; empty
            for a causal LM).
        target_modules: ``--target-modules`` applies (the kind adapts chosen layers).
        tasks: the tasks it trains on, among ``causal-lm`` and ``classification``.
        refusal: the message for a task not in ``tasks``: why, and what to use instead.
        embeds_input: PEFT runs the model on ``inputs_embeds`` (prompt tuning); a decoder
            classifier then pools the last position instead of the last real token, so train
            pads its rows on the left.
    """

    lr: float
    peft_config: Callable | None = None
    add: Callable | None = None
    save: Callable | None = None
    target_modules: bool = True
    tasks: tuple[str, ...] = TRAIN_TASKS
    refusal: str = ""
    embeds_input: bool = False

    def __post_init__(self):
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not 0 < self.lr < math.inf:
            raise ValueError(f"TrainSpec.lr: expected a positive number, found {self.lr!r}")
        for name in ("peft_config", "add", "save"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise ValueError(f"TrainSpec.{name}: expected a function or None, found {value!r}")
        if (self.add is None) != (self.save is None):
            raise ValueError("TrainSpec: give add and save together (a kind with its own format)")
        if (self.peft_config is None) == (self.add is None):
            raise ValueError("TrainSpec: give exactly one of peft_config (PEFT trains it) and add + save")
        if not self.tasks or not set(self.tasks) <= set(TRAIN_TASKS) or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"TrainSpec.tasks: expected distinct tasks of {TRAIN_TASKS}, found {self.tasks!r}")
        if (set(self.tasks) != set(TRAIN_TASKS)) != bool(self.refusal):
            raise ValueError("TrainSpec.refusal: give the message exactly when a task is refused")
        for name in ("target_modules", "embeds_input"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TrainSpec.{name}: expected True or False, found {getattr(self, name)!r}")


def peft_load(base: nn.Module, adapter_dir: Path, name: str | None) -> nn.Module:
    """``Reference.load`` of PEFT's kinds: ``PeftModel.from_pretrained`` (PEFT's default adapter
    name when ``name`` is None)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, adapter_dir, **({} if name is None else {"adapter_name": name}))


def peft_add(model: nn.Module, adapter_dir: Path, name: str) -> None:
    """``Reference.add`` of PEFT's kinds: ``load_adapter``."""
    model.load_adapter(adapter_dir, adapter_name=name)


def peft_select(model: nn.Module, name: str) -> None:
    """``Reference.select`` of PEFT's kinds: ``set_adapter``."""
    model.set_adapter(name)


def peft_task_type(classification: bool):
    """PEFT's ``TaskType`` for a classifier or a causal LM."""
    from peft import TaskType

    return TaskType.SEQ_CLS if classification else TaskType.CAUSAL_LM


def model_type(model: nn.Module) -> str:
    """``config.model_type`` ("" when unset): how PEFT keys its default target modules."""
    return getattr(model.config, "model_type", "") or ""


def prompt_dims(model: nn.Module) -> dict:
    """token_dim / num_layers / num_attention_heads read through the config's attribute map
    (peft reads the raw dict and misses e.g. DistilBERT's ``dim``, ``n_layers``, ``n_heads``):
    keyword arguments of PEFT's prompt-learning configs."""
    c = model.config
    c = c.get_text_config() if hasattr(c, "get_text_config") else c
    out = {}
    for key, attr in (("token_dim", "hidden_size"), ("num_layers", "num_hidden_layers"),
                      ("num_attention_heads", "num_attention_heads")):
        value = getattr(c, attr, None)
        if isinstance(value, int):
            out[key] = value
    return out


def peft_delta_mix(layer_class: Callable[[], type], holds: Callable[[nn.Module, str], bool]):
    """A ``Reference.mix`` for a PEFT kind whose layers give ``get_delta_weight(name)``.

    Args:
        layer_class: returns PEFT's layer class of the kind (imported when the mix runs).
        holds: whether a layer holds the named adapter (``name in layer.lora_A``).

    Returns:
        A context manager factory ``mix(model, {name: weight})`` under which ``model`` (a PeftModel
        holding the named adapters) runs as the base plus ``sum_i w_i delta_W_i``, each delta PEFT's own.
    """
    @contextlib.contextmanager
    def mix(model: nn.Module, weights: dict[str, float]):
        cls = layer_class()
        applied = []
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, cls):
                    deltas = [w * module.get_delta_weight(n) for n, w in weights.items() if holds(module, n)]
                    if deltas:
                        weight = module.get_base_layer().weight
                        applied.append((weight, weight.detach().clone()))
                        weight += sum(deltas)
        try:
            with model.disable_adapter():
                yield
        finally:
            with torch.no_grad():  # the saved weights: W + d - d is not W in floating point, and
                for weight, saved in applied:  # a case after the mix would see the difference
                    weight.copy_(saved)

    return mix
