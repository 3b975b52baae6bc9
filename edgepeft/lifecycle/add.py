"""``edgepeft adapter add``: convert one PEFT adapter against an existing side-branch artifact,
without exporting a graph.

A side-branch graph depends on which layers have slots and of which feature, never on an adapter's
values or rank (``../shared/DESIGN.md``). So adding an adapter is reading its PEFT tensors against
the base's module tree, folding its scale as an export does (the kind's ``side``), packing the
arrays as the graph's layout takes them and writing the adapter file. The module tree is the one
the artifact recorded (:mod:`edgepeft.export.module_table`), rebuilt on the meta device with
torch alone: names and shapes, no weights, no transformers. A kind whose arrays depend on the
base weights (DoRA's row norms) needs ``--base``. LoRA, DoRA and LoHa adapters are read with
edgepeft's copy of PEFT's target matching (:mod:`edgepeft.kinds.peft_rules`), so adding a LoRA
or IA3 adapter imports neither transformers nor peft.

Refused, with the reason: an adapter that needs slots, features, ranks or a head the graph lacks
(with the ``--slots`` to export with), one trained on another base (``edgepeft.json``, PEFT's
``base_model_name_or_path``), a name that is taken or not a plain file name, a classifier adapter
without a head on a base without a trained one, and any adapter on an int8-static artifact unless
``--validate`` (its activation ranges were calibrated without it).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from edgepeft import kinds
from edgepeft.contract import BASE_CONFIG, MANIFEST_NAME, PROMPT_INPUT, value_digest
from edgepeft.contract.entries import adapter_entry
from edgepeft.contract.features import table_parts
from edgepeft.errors import EdgepeftError
from edgepeft.kinds import kind_module, read_adapter
from edgepeft.export.slots import pad_axis
from edgepeft.kinds.common import SideBranch
from edgepeft.export.module_table import MODULE_TABLE, skeleton
from edgepeft.lifecycle.edit import editing, new_adapter_files, new_name, remove_adapter, side_artifact, write_manifest_atomic
from edgepeft.progress import log


def add_adapter(root: Path, name: str, adapter_dir: Path, *, base: Path | None = None,
                allow_base_mismatch: bool = False, validate: bool = False, reference: Path | None = None,
                quiet: bool = True) -> dict:
    """Add the PEFT adapter in ``adapter_dir`` to the artifact at ``root`` as ``name``.

    Args:
        root: a side-branch artifact (traced or fused graph).
        name: the adapter's name in the artifact.
        adapter_dir: PEFT's ``save_pretrained`` folder.
        base: the base model folder; only needed by kinds whose arrays depend on the base weights
            (DoRA). Its fingerprint must be the artifact's.
        allow_base_mismatch: add an adapter that records another base anyway.
        validate: compare the artifact with PyTorch on this adapter afterwards (``reference``
            needed); the adapter is removed again if a budget breaks.
        reference: the base model folder or GGUF file for ``validate``.

    Returns:
        ``{"entry": the manifest entry, "seconds": time to add, "report": validate's report or None}``.

    Raises:
        EdgepeftError: see the module docstring; the artifact is left as it was.
    """
    t0 = time.perf_counter()
    root = Path(root)
    where = f"adapter add {name}={adapter_dir}"
    with editing(root) as manifest:
        side_artifact(root, manifest, "edgepeft adapter add")
        new_name(root, manifest, name, where)
        if manifest["precision"] == "int8-static" and not validate:
            raise EdgepeftError(f"{root}: an int8-static artifact; its activation ranges were calibrated without "
                                f"{name!r}, so an added adapter may clip. Pass --validate --reference BASE to add it "
                                "only if it stays within the budget.")
        if validate and reference is None:
            raise EdgepeftError("--validate compares the artifact with PyTorch: pass --reference BASE (the base "
                                "model folder or GGUF file used at export).")
        model, fp = _base_model(root, manifest, base)
        a = read_adapter(name, adapter_dir, model, manifest["task"])
        _check_binding(adapter_dir, manifest, where, allow_base_mismatch)  # after the shapes: more precise
        side = _side(a, model, skeleton=base is None, where=where)
        if manifest["task"] == "classification" and not manifest["base"].get("head_trained", True) and not side.head:
            raise EdgepeftError(f"{where}: the artifact's base has no trained classification head and the adapter "
                                "does not carry one. Train it with PEFT's task_type SEQ_CLS (which saves the head via "
                                "modules_to_save).")
        max_rank = manifest["target"].get("max_rank")
        if max_rank is not None:
            from edgepeft.targets import check_ranks

            check_ranks(SimpleNamespace(name=manifest["target"]["name"], max_rank=max_rank), {name: side})
        graph = manifest["graph"] or {}
        if graph.get("layout") == "fused" or graph.get("kernels") == "fused":
            arrays, prefix, defaults = _fused_arrays(manifest, model, a.kind, side, where), None, []
        else:
            arrays, prefix, defaults = _traced_arrays(manifest, a.kind, side, where)
        inputs = sorted(n for n in arrays if n in manifest["inputs"])
        with new_adapter_files(root, name, arrays, manifest, where) as files:
            kind_fields = kind_module(a).manifest_entry(a)
            kind_fields["summary"] = kind_module(a).describe(kind_fields).strip()
            entry = {**adapter_entry(kind_fields, files, fp, inputs, prefix, a.source, defaults),
                     "added": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            write_manifest_atomic(root, {**manifest, "adapters": {**manifest["adapters"], name: entry}})
    seconds = time.perf_counter() - t0
    log(f"added {name} to {root} in {seconds:.2f}s", quiet)
    report = None
    if validate:
        from edgepeft.validate import validate as run_validate

        report = run_validate(root, Path(reference), choices=[name], quiet=quiet,
                              report=root / f"report-{name}.json")
        if not report["passed"]:
            remove_adapter(root, name)
    return {"entry": entry, "seconds": seconds, "report": report}


def _base_model(root: Path, manifest: dict, base: Path | None) -> tuple[torch.nn.Module, str]:
    """The base's module tree and the fingerprint to tag the file with: the tree the artifact
    recorded (meta tensors: names and shapes, no weights; an older artifact: built by transformers
    from ``base_config.json``), or ``base`` loaded and checked against the artifact."""
    fp = manifest["base"]["fingerprint"]
    task = manifest["task"]
    if base is not None:
        from edgepeft.export.base import fingerprint, load_causal_lm, load_classifier
        from edgepeft.gguf import resolve_base

        folder = resolve_base(base, True).folder
        if task == "causal-lm":
            model, fresh = load_causal_lm(folder), []
        else:
            model, fresh = load_classifier(folder, manifest["base"]["num_labels"])
        got = fingerprint(model, fresh)
        if got != fp:
            raise EdgepeftError(f"--base {base}: its weights (fingerprint {got[:23]}...) are not the ones {root} "
                                f"was exported from ({fp[:23]}...). Pass the base the artifact was exported from.")
        return model, fp
    model = skeleton(root, manifest)  # the module tree export recorded: no transformers needed
    if model is not None:
        return model, fp
    config_file = root / manifest["base"].get("config", BASE_CONFIG)
    if not config_file.is_file():
        raise EdgepeftError(f"{config_file}: missing; {root} was exported before edgepeft kept the base's config. "
                            "Pass --base DIR (the base it was exported from), or export the artifact again.")
    log(f"{root} was exported before edgepeft kept the base's module tree ({MODULE_TABLE}); building it "
        "with transformers (a few seconds more)", False)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    try:
        config = AutoConfig.from_pretrained(str(config_file))
    except (OSError, ValueError, KeyError) as e:
        raise EdgepeftError(f"{config_file}: transformers cannot read it ({e}). Export the artifact again.") from None
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    with torch.device("meta"):
        model = auto.from_config(config)
    return model.eval(), fp


def _check_binding(adapter_dir: Path, manifest: dict, where: str, allow: bool) -> None:
    """Refuse an adapter that records another base (as ``export`` does)."""
    from edgepeft.export.base import binding_mismatch

    why = binding_mismatch(Path(adapter_dir), Path(manifest["base"]["source"]), manifest["base"]["fingerprint"])
    if why and not allow:
        raise EdgepeftError(f"{where}: {why}. An adapter applied to weights it was not trained on gives wrong "
                            "outputs without any error. Add it to an artifact of the base it was trained on, or "
                            "pass --allow-base-mismatch if this base is the right one.")


def _side(a, model: torch.nn.Module, skeleton: bool, where: str) -> SideBranch:
    """The kind's side branch; on the meta module tree, a kind that reads base weights is refused."""
    try:
        return kind_module(a).side(a, model)
    except (NotImplementedError, RuntimeError) as e:
        if skeleton and "meta" in str(e):
            raise EdgepeftError(f"{where}: a {a.kind} adapter's arrays depend on the base weights (e.g. DoRA's "
                                "row norms), which the artifact does not keep. Pass --base DIR, the base model "
                                "folder it was exported from.") from None
        raise


def _slots_hint(kind: str, modules: list[str]) -> str:
    """What to export with so that ``modules`` have slots for ``kind``."""
    leaves = sorted({m.rsplit(".", 1)[-1] for m in modules})
    if not hasattr(kind_module(kind), "reserve"):
        return f"export the artifact again with this adapter (--adapter); {kind} slots cannot be reserved empty"
    return f"export with --slots {kind}:{','.join(leaves)} (or --slots {kind}:all-linear)"


def _traced_arrays(manifest: dict, kind: str, side: SideBranch, where: str
                   ) -> tuple[dict[str, np.ndarray], dict | None, list[str]]:
    """The adapter's arrays for the traced graph: every (layer, feature) a slot of the graph, fixed
    ranks padded to the graph's, shared parts equal to the graph's default left out.

    Returns:
        ``(arrays, prefix entry or None, shared inputs left to their default)``.
    """
    slots = {s["module"]: s for s in manifest.get("slots", [])}
    missing = sorted(m for m, f in side.layers if f not in slots.get(m, {}).get("features", ()))
    if missing:
        feats = sorted({f for m, f in side.layers if m in missing})
        raise EdgepeftError(f"{where}: the graph has no {'/'.join(feats)} slot on {len(missing)} layer(s) the adapter "
                            f"changes (e.g. {missing[0]}); {_slots_hint(kind, missing)}.")
    tables = manifest.get("features", {})
    layers = {}
    for (module, f), parts in side.layers.items():  # fixed-rank features: padded to the graph's rank
        feature, slot = kinds.feature(f), slots[module]
        rank = feature.fixed_rank_of(parts)
        fixed = None
        if rank is not None:
            shapes = {p: shape for p, shape, _ in table_parts(tables[f], slot["in"], slot["out"])}
            fixed = next(shapes[p.name][p.fixed_rank_axis] for p in feature.parts if p.name in parts
                         and p.fixed_rank_axis is not None)
            if rank > fixed:
                raise EdgepeftError(f"{where}: layer {module} has {f} rank {rank}, above the graph's fixed {fixed}. "
                                    "Export the artifact again with this adapter.")
        layers[(module, f)] = {p: pad_axis(v, feature.part(p).fixed_rank_axis, fixed) for p, v in parts.items()}
    side = dataclasses.replace(side, layers=layers)
    try:
        arrays = side.arrays(kinds.FEATURES)
    except ValueError as e:
        raise EdgepeftError(f"{where}: {e}") from None
    inputs = manifest["inputs"]
    defaults = sorted(n for n, v in arrays.items()
                      if n in inputs and inputs[n].get("default") == value_digest(v))
    arrays = {n: v for n, v in arrays.items() if n not in defaults}
    kv = manifest.get("kv_cache") or {}
    for layer, (k, _) in enumerate(side.prefix or ()):
        if (k.shape[1], k.shape[3]) != (kv["kv_heads"][layer], kv["head_dims"][layer]):
            raise EdgepeftError(f"{where}: its prefix of layer {layer} has shape {list(k.shape)}, the graph's KV "
                                "cache another; it was made for another base.")
    stray = sorted(n for n in arrays if n not in inputs and not n.startswith("prefix."))
    if stray:
        raise EdgepeftError(f"{where}: the graph has no input {stray[0]!r} ({len(stray)} missing: "
                            + ("a classification head" if stray[0].startswith("head.") else
                               "an encoder prompt" if stray[0] == PROMPT_INPUT else "a slot")
                            + "). Export the artifact again with this adapter"
                            + (", or with --slots (a classifier reserves its head)" if stray[0].startswith("head.") else "")
                            + ".")
    _check_shapes(arrays, inputs, where)
    return arrays, side.prefix_entry(), defaults


def _fused_arrays(manifest: dict, model: torch.nn.Module, kind: str, side: SideBranch, where: str
                  ) -> dict[str, np.ndarray]:
    """The adapter packed for the fused graph's groups, each group and place it feeds an input of
    the graph (and, on an encoder, the head it carries as ``head.{param}``)."""
    from edgepeft.export import fused_layout as layout

    decoder = manifest["task"] == "causal-lm"
    why = (layout.unsupported if decoder else layout.encoder_unsupported)(model, {kind: side})
    if why:
        raise EdgepeftError(f"{where}: the fused graph cannot take it: {why}. Export with --graph generic.")
    used = [(s["layer"], s["group"]) for s in manifest.get("slots", [])]
    inputs = manifest["inputs"]
    lacking = [(layer, group, place) for (layer, group), places in layout.group_inputs(model, {kind: side}).items()
               for place in places if layout.fused_input_name(layer, group, place) not in inputs]
    if lacking:
        layer, group, place = lacking[0]
        mods = sorted({m for m, _ in side.layers if m in layout.group_table(model).get((layer, group), [])})
        raise EdgepeftError(f"{where}: the fused graph has no {place!r} input on layer {layer}'s {group} group, which "
                            f"the adapter changes ({len(lacking)} such inputs, e.g. {', '.join(mods)}); "
                            f"{_slots_hint(kind, [m for m, _ in side.layers])}.")
    arrays = (layout.pack_adapter if decoder else layout.encoder_adapter_arrays)(model, side, used)
    missing = sorted(n for n in arrays if n not in inputs)  # an encoder's head or prompt (groups: checked above)
    if missing:
        what = "a prompt" if missing[0] == PROMPT_INPUT else f"a classification head ({missing[0]})"
        raise EdgepeftError(f"{where}: the adapter carries {what} the fused graph has no input for: no adapter "
                            "exported with it carried one. Export the artifact again with this adapter.")
    _check_shapes(arrays, inputs, where)
    return arrays


def _check_shapes(arrays: dict[str, np.ndarray], inputs: dict, where: str) -> None:
    """Every array that feeds a graph input has its shape (None: any size, a rank)."""
    for n, v in arrays.items():
        if n not in inputs:
            continue
        shape = inputs[n]["shape"]
        if len(shape) != v.ndim or any(s is not None and s != d for s, d in zip(shape, v.shape)):
            raise EdgepeftError(f"{where}: {n} has shape {list(v.shape)}, the graph's input {shape}; the adapter "
                                f"was made for another base (see {MANIFEST_NAME}).")
