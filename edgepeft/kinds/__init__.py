"""Adapter kinds: one file per kind, dispatched through :data:`REGISTRY` (PEFT's ``peft_type`` -> module).

A kind module owns everything about its kind and exposes these names (shared code reads them and
never names a kind; see ``lora.py`` for the fullest example):

    NAMES                           the ``kind`` strings its manifest entries carry ("lora", "dora")
    FEATURES                        tuple of ``contract.features.Feature``: the graph inputs it feeds an
                                    adapted linear layer (parts, shapes, identity, mix rules) and their
                                    torch maths; empty for kinds that feed none (prefix)
    read(name, dir, config, model, task) -> adapter    parse PEFT's files, check against the base
    merge(model, adapter, weight)   fold into the weights in place (raises if the kind cannot merge)
    MERGEABLE                       whether ``merge`` can succeed (merged mode, bench's merged rows)
    side(adapter, model) -> SideBranch   the arrays the side-branch graph and runtime are fed
    manifest_entry(adapter) -> dict what ``manifest.json`` records (``kind`` among ``NAMES``)
    describe(entry) -> str          how ``edgepeft inspect`` summarizes a manifest entry
    REFERENCE                       ``common.Reference``: how validate and bench build the PyTorch model
    TRAIN                           ``{train kind: common.TrainSpec}`` for ``edgepeft train --kind``
                                    (empty for a kind ``edgepeft train`` does not offer)
    reserve(kind, modules, model) -> {module: features}   optional: the empty slots ``export
                                    --slots kind:...`` reserves; a kind without it has a graph that
                                    depends on the adapter (prefix or prompt length, bottleneck size)
    DEFAULT_SLOTS                   optional, True in one kind: whose slots ``--slots q_proj,...``
                                    (no ``kind:``) reserves

An unknown ``peft_type`` or ``kind`` is an error that lists the known ones, never a fallthrough.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from edgepeft.contract import check_adapter_name, mixes
from edgepeft.contract.features import Feature
from edgepeft.errors import EdgepeftError
from edgepeft.kinds import bottleneck, ia3, loha, lora, prefix, prompt, vera
from edgepeft.kinds.common import Reference, SideBranch, TrainSpec, linear_modules, read_config

REGISTRY = {
    "LORA": lora,
    "IA3": ia3,
    "PROMPT_TUNING": prompt,
    "P_TUNING": prompt,
    "PREFIX_TUNING": prefix,
    "BOTTLENECK": bottleneck,
    "LOHA": loha,
    "VERA": vera,
}

# Derived from the registry (never edited by hand): manifest kind -> module, feature -> Feature,
# train kind -> TrainSpec. Registry order is the order features are listed on a slot and the
# order of ``edgepeft train --kind``'s choices.
_MODULES = list(dict.fromkeys(REGISTRY.values()))
BY_NAME = {n: m for m in _MODULES for n in m.NAMES}
FEATURES: dict[str, Feature] = {f.name: f for m in _MODULES for f in m.FEATURES}
TRAIN: dict[str, TrainSpec] = {k: spec for m in _MODULES for k, spec in m.TRAIN.items()}
if len(TRAIN) != sum(len(m.TRAIN) for m in _MODULES):
    raise ValueError("two kind modules offer the same train kind; give each a name of its own")


def kind_module(adapter_or_kind):
    """The kind module of an adapter read by :func:`read_adapter`, or of a manifest ``kind`` string.

    Raises:
        EdgepeftError: a kind no module declares.
    """
    kind = adapter_or_kind if isinstance(adapter_or_kind, str) else adapter_or_kind.kind
    if kind not in BY_NAME:
        raise EdgepeftError(f"adapter kind {kind!r} is not known to this edgepeft (known: "
                            f"{', '.join(BY_NAME)}). Use the edgepeft version that wrote the artifact.")
    return BY_NAME[kind]


def reference(entry: dict) -> Reference:
    """The PyTorch reference of a manifest adapter entry (validate, bench).

    Raises:
        EdgepeftError: a kind no module declares.
    """
    return kind_module(entry["kind"]).REFERENCE


def mix_group(manifest: dict) -> list[str]:
    """The adapters validate and bench mix by default, in manifest order: those the manifest's
    rules let mix (:func:`edgepeft.contract.mixes`) whose kind has a PyTorch mix reference, all
    of the first one's kind (one reference model holds the adapters of a mix). May carry heads.
    """
    entries = manifest["adapters"]
    names = [n for n in entries if mixes(manifest, n) and reference(entries[n]).mix is not None
             and not entries[n].get("mix_of")]  # a written mix (edgepeft adapter mix) is not mixed again
    first = kind_module(entries[names[0]]["kind"]) if names else None
    return [n for n in names if kind_module(entries[n]["kind"]) is first]


def feature(name: str) -> Feature:
    """A feature by name.

    Raises:
        EdgepeftError: a feature no kind declares.
    """
    if name not in FEATURES:
        raise EdgepeftError(f"adapter feature {name!r} is not known to this edgepeft (known: "
                            f"{', '.join(FEATURES)}).")
    return FEATURES[name]


def reserved_side(slots: tuple[tuple[str, tuple[str, ...]], ...], model: nn.Module, task: str) -> SideBranch:
    """The empty slots of ``export --slots``, as a side branch of identity values (rank 1 where a
    part has a rank): planned like an adapter's, written to no file. A classifier also reserves
    its head (every parameter outside the base model), so an added adapter can carry its own.

    Args:
        slots: ``((kind or None, targets), ...)`` (:func:`edgepeft.export.config.parse_slots`).
        model: the base model.
        task: ``causal-lm`` or ``classification``.

    Raises:
        EdgepeftError: an unknown kind, a kind whose graph depends on the adapter, or a target that
            names no linear layer.
    """
    import numpy as np

    dims = {n: (m.weight.shape[1], m.weight.shape[0]) if isinstance(m, nn.Linear) else tuple(m.weight.shape)
            for n, m in model.named_modules() if hasattr(m, "weight") and getattr(m.weight, "ndim", 0) == 2}
    layers = {}
    for kind, targets in slots:
        kind = kind or next(m for m in _MODULES if getattr(m, "DEFAULT_SLOTS", False)).NAMES[0]
        where = f"--slots {kind}:{','.join(targets)}"
        module = kind_module(kind)
        if not hasattr(module, "reserve"):
            raise EdgepeftError(f"{where}: a {kind} adapter shapes the graph itself (its prefix or prompt "
                                "length, or bottleneck size), so its slots cannot be reserved empty. "
                                f"Export the {kind} adapter with --adapter; kinds with reserved slots: "
                                + ", ".join(n for n in BY_NAME if hasattr(BY_NAME[n], "reserve")) + ".")
        for m, features in module.reserve(kind, linear_modules(model, targets, where), model).items():
            in_f, out_f = (int(d) for d in dims[m])
            for f in features:
                layers[(m, f)] = {p.name: np.full(p.dims(in_f, out_f, 1, 1), p.identity, np.float32)
                                  for p in feature(f).parts}
    head = {}
    prefix = getattr(model, "base_model_prefix", "")
    if task == "classification":
        head = {n: p.detach().numpy().astype(np.float32) for n, p in model.named_parameters()
                if not n.startswith(prefix + ".")}
    return SideBranch(layers=layers, head=head, reserved=True)


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
    if not isinstance(peft_type, str) or peft_type not in REGISTRY:
        raise EdgepeftError(f"{adapter_dir / 'adapter_config.json'}: peft_type {peft_type!r} is not "
                            f"supported. Supported: {', '.join(REGISTRY)}.")
    return REGISTRY[peft_type].read(name, adapter_dir, config, model, task)
