"""``edgepeft export``: base model + PEFT adapters -> an artifact directory.

The artifact is written to a temporary sibling directory and renamed into place at the end, so
OUT is either absent or complete; on any error the temporary directory is removed.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

import edgepeft
from edgepeft.adapters import kind_module, read_adapter
from edgepeft.errors import EdgepeftError
from edgepeft.export.base import fingerprint, load_causal_lm, save_tokenizer
from edgepeft.export.causal_lm import export_graph, lora_slots, probe_cache
from edgepeft.runtime.manifest import FORMAT, FORMAT_VERSION, MANIFEST_NAME, sha256_file

MODES = ("side", "merged")


@dataclass(frozen=True)
class ExportConfig:
    """What to export.

    Attributes:
        base: Hugging Face model folder of the base model.
        adapters: ``(name, PEFT adapter dir)`` pairs, at least one for ``merged``.
        out: artifact directory to create.
        mode: ``side`` (one base graph, adapters as run-time inputs) or ``merged`` (one graph per
            adapter with its delta folded into the weights).
        force: replace an existing OUT.
        opset: ONNX opset for the exporter, None for its default.
    """

    base: Path
    out: Path
    adapters: tuple[tuple[str, Path], ...] = field(default_factory=tuple)
    mode: str = "side"
    force: bool = False
    opset: int | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise EdgepeftError(f"--mode {self.mode!r}: choose one of {', '.join(MODES)}.")
        names = [n for n, _ in self.adapters]
        if len(set(names)) != len(names):
            raise EdgepeftError(f"--adapter: names repeat ({', '.join(names)}); give each a new name.")
        if self.mode == "merged" and not self.adapters:
            raise EdgepeftError("--mode merged needs at least one --adapter NAME=DIR.")
        if self.out.exists() and not self.force:
            raise EdgepeftError(f"{self.out}: already exists. Pass --force to replace it, or "
                                "choose another --out.")


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"[edgepeft] {msg}", file=sys.stderr, flush=True)


def _save_graph(proto: onnx.ModelProto, root: Path, rel: str) -> dict:
    """Write a graph to ``root/rel`` with its weights as external data beside it.

    Returns:
        Its manifest entry: files (relative to the artifact root), checksums, inputs, outputs.
    """
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)

    def io(values):
        return [{"name": v.name, "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
                 "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name}
                for v in values]

    return {"file": rel, "data_file": f"{rel}.data",
            "sha256": sha256_file(path), "data_sha256": sha256_file(data),
            "inputs": io(proto.graph.input), "outputs": io(proto.graph.output),
            "opset": max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))}


def _save_adapter(arrays: dict[str, np.ndarray], path: Path) -> None:
    """Write an onnxruntime ``.onnx_adapter`` file (AdapterFormat) with the given inputs."""
    import onnxruntime as ort

    values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in arrays.items()}  # alive until export
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(FORMAT_VERSION)
    fmt.set_parameters(values)
    fmt.export_adapter(str(path))


def export(cfg: ExportConfig, quiet: bool = False) -> dict:
    """Export per ``cfg``; returns the manifest written to ``cfg.out``.

    Raises:
        EdgepeftError: bad base model, adapters, or an OUT that exists.
    """
    t0 = time.perf_counter()
    _log(f"loading base model {cfg.base}", quiet)
    model = load_causal_lm(cfg.base)
    base_fp = fingerprint(model)
    adapters = [read_adapter(name, path, model) for name, path in cfg.adapters]
    cache = probe_cache(model)

    parent = cfg.out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cfg.out.name}.tmp-", dir=parent))
    try:
        manifest = _write(cfg, model, adapters, cache, base_fp, tmp, quiet)
        if cfg.out.exists():  # --force: swap the old one out only once the new one is complete
            old = Path(tempfile.mkdtemp(prefix=f".{cfg.out.name}.old-", dir=parent))
            os.replace(cfg.out, old / "x")
            os.replace(tmp, cfg.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, cfg.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _log(f"wrote {cfg.out} in {time.perf_counter() - t0:.1f}s", quiet)
    return manifest


def _write(cfg, model, adapters, cache, base_fp, tmp: Path, quiet: bool) -> dict:
    """Write graphs, adapter files, tokenizer and manifest into ``tmp``."""
    text_cfg = model.config.get_text_config()
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "edgepeft_version": edgepeft.__version__,
        "task": "causal-lm", "mode": cfg.mode, "precision": "fp32", "target": "cpu",
        "base": {"source": str(cfg.base), "model_type": model.config.model_type,
                 "fingerprint": base_fp, "vocab_size": int(text_cfg.vocab_size),
                 "eos_token_id": getattr(model.generation_config, "eos_token_id", None)},
        "kv_cache": {"layers": cache.layers, "kv_heads": list(cache.kv_heads),
                     "head_dims": list(cache.head_dims)},
        "graph": None, "lora_slots": [], "adapters": {}, "tokenizer": None,
    }
    tok = save_tokenizer(cfg.base, tmp / "tokenizer")
    if tok is None:
        shutil.rmtree(tmp / "tokenizer", ignore_errors=True)
    manifest["tokenizer"] = tok

    if cfg.mode == "side":
        modules = set().union(*(set(a.modules) for a in adapters)) if adapters else set()
        slots = lora_slots(model, modules)
        _log(f"exporting side-branch graph ({len(slots)} LoRA slots, {cache.layers} layers)", quiet)
        manifest["graph"] = _save_graph(export_graph(model, slots, cache, cfg.opset), tmp, "model.onnx")
        manifest["lora_slots"] = [{"module": s.module, "in": s.in_features, "out": s.out_features}
                                  for s in slots]
        (tmp / "adapters").mkdir()
        for a in adapters:
            path = tmp / "adapters" / f"{a.name}.onnx_adapter"
            kind = kind_module(a)
            _save_adapter(kind.side_arrays(a), path)
            manifest["adapters"][a.name] = {**kind.manifest_entry(a), "file": f"adapters/{path.name}",
                                            "sha256": sha256_file(path), "base_fingerprint": base_fp,
                                            "source": str(a.source.resolve())}
    else:
        for i, a in enumerate(adapters):
            _log(f"exporting merged graph {i + 1}/{len(adapters)}: {a.name}", quiet)
            merged = copy.deepcopy(model)
            kind_module(a).merge(merged, a)
            graph = _save_graph(export_graph(merged, [], cache, cfg.opset), tmp, f"merged/{a.name}.onnx")
            del merged
            manifest["adapters"][a.name] = {**kind_module(a).manifest_entry(a), "graph": graph,
                                            "base_fingerprint": base_fp,
                                            "source": str(a.source.resolve())}
        manifest["graph"] = {"per_adapter": True}
    (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
