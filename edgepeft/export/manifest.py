"""The artifact's ``manifest.json``: its head (format, precision, target, budget, base, KV cache),
the tokenizer it names, and writing it (last, so a manifest means a complete artifact).

The graph, slot, input and adapter parts come from the build step (``edgepeft.export.build``);
each adapter's entry from :mod:`edgepeft.contract.entries`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import edgepeft
from edgepeft.contract import BASE_CONFIG, FORMAT, FORMAT_VERSION, MANIFEST_NAME
from edgepeft.export.base import save_tokenizer
from edgepeft.export.config import ExportConfig
from edgepeft.export.load import Base
from edgepeft.export.module_table import MODULE_TABLE, write_module_table
from edgepeft.quantize.budgets import BUDGETS


def manifest_head(cfg: ExportConfig, base: Base) -> dict:
    """The manifest with everything but the graphs, adapters and tokenizer (None / empty until
    the build step fills them: the keys keep this order in the file)."""
    model, quant = base.model, cfg.quant
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "edgepeft_version": edgepeft.__version__,
        "task": base.task, "mode": cfg.mode, "precision": quant.precision,
        "adapter_precision": quant.adapter_precision, "target": cfg.target.manifest(cfg.mode),
        "quantization": asdict(quant), "budget": asdict(BUDGETS[quant.precision]),
        "base": {"source": str(cfg.base), "model_type": model.config.model_type,
                 "fingerprint": base.fingerprint,
                 **({"gguf": base.gguf} if base.gguf else {}),  # the GGUF file the weights came from
                 "vocab_size": int(model.config.get_text_config().vocab_size),
                 "config": BASE_CONFIG,  # its config and module tree: ``edgepeft adapter add``
                 "modules": MODULE_TABLE},
        "graph": None, "slots": [], "inputs": {}, "adapters": {}, "tokenizer": None,
    }
    if cfg.slots:
        manifest["reserved"] = cfg.slots  # the --slots spec the graph was exported with
    if base.task == "causal-lm":
        cache = base.cache
        manifest["base"]["eos_token_id"] = getattr(model.generation_config, "eos_token_id", None)
        manifest["kv_cache"] = {"layers": cache.layers, "kv_heads": list(cache.kv_heads),
                                "head_dims": list(cache.head_dims)}
        if cfg.graph == "fused":
            manifest["kv_cache"]["buffer"] = "shared"  # past and present are one preallocated buffer
    else:
        manifest["base"].update({"num_labels": int(model.config.num_labels), "head_trained": not base.fresh,
                                 "max_length": _max_length(model),
                                 "id2label": {str(k): v for k, v in model.config.id2label.items()}})
    return manifest


def write_tokenizer(base_dir: Path, root: Path) -> dict | None:
    """Copy the base's tokenizer to ``root/tokenizer``; its manifest entry, None if it has none."""
    tok = save_tokenizer(base_dir, root / "tokenizer")
    if tok is None:
        shutil.rmtree(root / "tokenizer", ignore_errors=True)
    return tok


def write_base_config(base: Base, root: Path) -> None:
    """``root/base_config.json``: the base model's config, and ``root/base_modules.json``: its
    module tree (:mod:`edgepeft.export.module_table`), from which ``edgepeft adapter add`` reads an
    adapter against the graph without the base folder and without transformers."""
    base.model.config.to_json_file(str(root / BASE_CONFIG))
    write_module_table(base.model, root)


def write_manifest(manifest: dict, root: Path) -> None:
    """``root/manifest.json``: indented JSON, one trailing newline."""
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _max_length(model) -> int:
    n = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    if model.config.model_type in ("roberta", "xlm-roberta"):
        n -= 2  # positions start after padding_idx
    return n or 512
