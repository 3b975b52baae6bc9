"""Steps 1 and 2 of an export: load the base model, read the adapters and check they belong to it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from edgepeft.kinds import read_adapter, task_of
from edgepeft.kinds.common import peft_key, read_config, read_tensors
from edgepeft.errors import EdgepeftError
from edgepeft.export.base import (binding_mismatch, detect_task, fingerprint, load_causal_lm,
                                  load_classifier)
from edgepeft.kinds.common import CacheShape, probe_cache
from edgepeft.export.config import ExportConfig
from edgepeft.progress import log


@dataclass(frozen=True)
class Base:
    """The loaded base model, as every later step reads it.

    Attributes:
        task: ``causal-lm`` or ``classification``.
        model: the PyTorch model, fp32, eval mode.
        fresh: parameters the base does not have and the loader initialized (an untrained
            classification head); excluded from the fingerprint.
        fingerprint: ``sha256:...`` of the base weights (:func:`edgepeft.export.base.fingerprint`).
        cache: a causal LM's KV cache geometry (probed with one forward pass); None: a classifier.
        gguf: ``{"file", "sha256"}`` of the GGUF file the base folder was dequantized from
            (:meth:`edgepeft.gguf.BaseSource.manifest`), None for a base given as a folder.
    """

    task: str
    model: torch.nn.Module
    fresh: tuple[str, ...]
    fingerprint: str
    cache: CacheShape | None
    gguf: dict | None = None


def load_base(cfg: ExportConfig, gguf: dict | None = None) -> Base:
    """Load the base model for the task (the adapters' PEFT task_type or the base's architecture,
    unless ``cfg.task`` names it), with as many labels as the adapters' heads have.

    ``cfg.base`` is a model folder (a GGUF file was resolved to one before); ``gguf``: the GGUF it
    came from, kept for the manifest."""
    for _, path in cfg.adapters:
        read_config(path)  # a readable error for a missing adapter dir before loading anything
    task = cfg.task if cfg.task != "auto" else detect_task(cfg.base, [task_of(p) for _, p in cfg.adapters])
    if task == "causal-lm":
        model, fresh = load_causal_lm(cfg.base), []
    else:
        model, fresh = load_classifier(cfg.base)
        labels = _adapter_num_labels(model, cfg.adapters)
        if labels and labels != model.config.num_labels:
            model, fresh = load_classifier(cfg.base, labels)
    base_fp = fingerprint(model, fresh)
    cache = probe_cache(model) if task == "causal-lm" else None
    return Base(task, model, tuple(fresh), base_fp, cache, gguf)


def read_adapters(cfg: ExportConfig, base: Base, quiet: bool) -> list:
    """Read every adapter of ``cfg`` against ``base`` (its shapes), then check each was trained on
    this base (unless ``cfg.allow_base_mismatch``) and that each carries the classification head
    the base lacks.

    Raises:
        EdgepeftError: an unreadable adapter, one of another base, or a missing head.
    """
    adapters = [read_adapter(name, path, base.model, base.task) for name, path in cfg.adapters]
    for name, path in cfg.adapters:  # after the shapes: a wrong shape has the more precise message
        _check_binding(cfg, name, path, base.fingerprint, quiet)
    for a in adapters if base.fresh else ():
        missing = sorted(set(base.fresh) - set(getattr(a, "head", {})))
        if missing:
            raise EdgepeftError(
                f"{a.source}: the base model {cfg.base} has no trained classification head "
                f"({', '.join(missing)} are freshly initialized) and adapter {a.name!r} does not "
                "carry one. Train it with PEFT's task_type SEQ_CLS (which saves the head via "
                "modules_to_save), or use a base with a trained head.")
    return adapters


def _check_binding(cfg: ExportConfig, name: str, path: Path, base_fp: str, quiet: bool) -> None:
    """Refuse (or with --allow-base-mismatch, warn about) an adapter that records another base."""
    why = binding_mismatch(path, cfg.base, base_fp)
    if why and not cfg.allow_base_mismatch:
        raise EdgepeftError(
            f"--adapter {name}={path}: {why}. An adapter applied to weights it was not trained "
            "on gives wrong outputs without any error. Export it with the base it was trained "
            "on, or pass --allow-base-mismatch if this base is the right one (e.g. the same "
            "model saved again).")
    if why:
        log(f"warning: --adapter {name}: {why} (exported anyway: --allow-base-mismatch)", quiet)


def _final_head_param(model) -> str | None:
    """The weight of the classifier's last linear layer (its rows are the labels), if any."""
    n = model.config.num_labels
    names = [name for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and m.out_features == n and not name.startswith(
                 model.base_model_prefix + ".")]
    return f"{names[-1]}.weight" if names else None


def _adapter_num_labels(model, adapters: tuple[tuple[str, Path], ...]) -> int | None:
    """num_labels of the head the adapters carry (they must agree), None if none carries one."""
    param = _final_head_param(model)
    if param is None:
        return None
    found = {}
    for name, path in adapters:
        _, tensors = read_tensors(path) if (path / "adapter_config.json").is_file() else (None, {})
        for key, t in tensors.items():
            if peft_key(key) == param and t.ndim == 2:
                found[name] = int(t.shape[0])
    if len(set(found.values())) > 1:
        raise EdgepeftError("the adapters' classification heads have different numbers of labels ("
                            + ", ".join(f"{n}: {k}" for n, k in found.items())
                            + "); export them into separate artifacts.")
    return next(iter(found.values()), None)
