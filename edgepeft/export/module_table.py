"""The base's module tree as an artifact records it (``base_modules.json``), and the model
skeleton ``edgepeft adapter add`` reads adapters against.

Reading a PEFT adapter checks it against the base's modules: their names (PEFT's target
matching), which are linear layers, their weight shapes, the output head, the classifier's head
parameters. Building that tree with transformers (``from_config`` on the meta device) imports
transformers' model code, and with it most of torch: about 3 s, more than the whole add on a
2-core machine. So export records the tree, and ``adapter add`` rebuilds it with torch alone:

- every module of ``named_modules()``, in order, with its class name, its own parameters'
  shapes and which of ``nn.Linear`` / ``nn.Embedding`` / GPT-2 ``Conv1D`` it is (kinds test
  ``isinstance``): those rebuilt as that class (a subclass of the recorded name), every other
  module as an empty ``nn.Module`` subclass of the recorded name;
- tied parameters (a head sharing the embeddings) tied again, so ``named_parameters()`` lists
  what the real model lists;
- ``base_model_prefix``, the input / output embeddings' module names;
- the config as the artifact recorded it (``base_config.json``: transformers writes every
  attribute), with the config class's attribute map, so ``cfg.hidden_size`` reads DistilBERT's
  ``dim``.

All on the meta device: names and shapes, no weights. A kind whose arrays depend on the base
weights (DoRA's row norms) fails there and is refused with ``--base`` as the way out.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from edgepeft.contract.names import read_json_file
from edgepeft.errors import EdgepeftError

MODULE_TABLE = "base_modules.json"
TABLE_VERSION = 1


def write_module_table(model: nn.Module, root: Path) -> None:
    """``root/base_modules.json`` of ``model`` (see the module docstring)."""
    first: dict[int, str] = {}
    ties = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        key = id(p)
        if key in first:
            ties[name] = first[key]
        else:
            first[key] = name
    modules = [[name, type(m).__name__, {p: list(t.shape) for p, t in m.named_parameters(recurse=False,
                                                                                         remove_duplicate=False)},
                _layer_kind(m)]
               for name, m in model.named_modules()]

    def embeddings(get) -> str | None:
        try:
            m = get()
        except (NotImplementedError, AttributeError):  # a model class without that accessor
            return None
        return next((n for n, x in model.named_modules() if x is m), None) if m is not None else None

    config = model.config
    text = config.get_text_config()
    table = {"version": TABLE_VERSION, "modules": modules, "ties": ties,
             "base_model_prefix": getattr(model, "base_model_prefix", ""),
             "input_embeddings": embeddings(model.get_input_embeddings),
             "output_embeddings": embeddings(model.get_output_embeddings),
             "attribute_map": dict(getattr(config, "attribute_map", {})),
             "text_attribute_map": dict(getattr(text, "attribute_map", {})) if text is not config else None}
    (root / MODULE_TABLE).write_text(json.dumps(table, separators=(",", ":")) + "\n", encoding="utf-8")


def _layer_kind(m: nn.Module) -> str | None:
    """Which layer class the kinds test ``m`` against (subclasses included), or None."""
    from edgepeft.kinds.common import is_conv1d

    if is_conv1d(m):
        return "Conv1D"
    return next((k for k in ("Linear", "Embedding") if isinstance(m, getattr(nn, k))), None)


class RecordedConfig:
    """A model config as the artifact recorded it: attribute access over the JSON, through the
    config class's attribute map; a nested config (``text_config``) is one as well."""

    def __init__(self, values: dict, attribute_map: dict | None = None, text_map: dict | None = None):
        self._values = values
        self._map = attribute_map or {}
        self._text_map = text_map

    def __getattr__(self, name: str):
        values = self.__dict__.get("_values", {})
        key = self.__dict__.get("_map", {}).get(name, name)
        if key not in values:
            raise AttributeError(name)
        v = values[key]
        if isinstance(v, dict) and "model_type" in v:
            return RecordedConfig(v, self._text_map if key == "text_config" else None)
        return v

    def get_text_config(self, *args, **kwargs) -> "RecordedConfig":
        return self.text_config if "text_config" in self._values and self._text_map is not None else self


class Skeleton(nn.Module):
    """The base's module tree rebuilt from ``base_modules.json`` (meta tensors)."""

    def __init__(self, table: dict, config: RecordedConfig):
        super().__init__()
        self.config = config
        self.base_model_prefix = table.get("base_model_prefix", "")
        self._embeddings = (table.get("input_embeddings"), table.get("output_embeddings"))

    def get_input_embeddings(self) -> nn.Module | None:
        return self.get_submodule(self._embeddings[0]) if self._embeddings[0] is not None else None

    def get_output_embeddings(self) -> nn.Module | None:
        return self.get_submodule(self._embeddings[1]) if self._embeddings[1] is not None else None


def _module(cls: str, params: dict[str, list[int]], layer: str | None, classes: dict) -> nn.Module:
    """One module of the tree: a layer the kinds test by class (``nn.Linear``, ``nn.Embedding``,
    GPT-2's ``Conv1D``, or a subclass) as that class (a subclass of the recorded name), any other
    as an empty module of the recorded class name; its own parameters as meta tensors of the
    recorded shapes. Built without the classes' ``__init__``, whose weight initialization on the
    meta device alone imports torch's compiler (about 1 s)."""
    if layer == "Conv1D":
        from transformers.pytorch_utils import Conv1D  # GPT-2's (in, out) linear; only its bases import it

        base = Conv1D
    else:
        base = getattr(nn, layer) if layer in ("Linear", "Embedding") else nn.Module
    if cls != base.__name__:
        base = classes.setdefault((cls, base), type(cls, (base,), {}))
    m = base.__new__(base)
    nn.Module.__init__(m)
    w = params.get("weight", [0, 0])
    if layer == "Linear":
        m.out_features, m.in_features = w
    elif layer == "Embedding":
        m.num_embeddings, m.embedding_dim = w
        m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq, m.sparse = None, None, 2.0, False, False
    elif layer == "Conv1D":
        m.nx, m.nf = w
    for p, shape in params.items():
        m.register_parameter(p, nn.Parameter(torch.empty(shape, device="meta"), requires_grad=False))
    if layer == "Linear" and "bias" not in params:
        m.register_parameter("bias", None)
    return m


def skeleton(root: Path, manifest: dict) -> Skeleton | None:
    """The recorded module tree of the artifact at ``root``; None for an artifact exported before
    the table was kept.

    Raises:
        EdgepeftError: a table or config that cannot be read (the artifact is damaged).
    """
    names = manifest["base"]
    if "modules" not in names:
        return None
    table_file, config_file = root / names["modules"], root / names["config"]
    fix = "The artifact is damaged: export it again, or pass --base DIR."
    for f in (table_file, config_file):
        if not f.is_file():
            raise EdgepeftError(f"{f}: missing, though {root / 'manifest.json'} names it. {fix}")
    table = read_json_file(table_file, 64 << 20, "a module table", fix)
    values = read_json_file(config_file, 16 << 20, "a model config", fix)
    try:
        if table.get("version") != TABLE_VERSION:
            raise ValueError(f"version {table.get('version')!r}, this edgepeft reads {TABLE_VERSION}")
        model = Skeleton(table, RecordedConfig(values, table.get("attribute_map"), table.get("text_attribute_map")))
        classes: dict = {}
        for name, cls, params, layer in table["modules"]:
            if not name:
                continue
            parent, _, leaf = name.rpartition(".")
            model.get_submodule(parent).add_module(leaf, _module(cls, params, layer, classes))
        for name, source in table["ties"].items():
            owner, _, leaf = name.rpartition(".")
            src_owner, _, src_leaf = source.rpartition(".")
            setattr(model.get_submodule(owner), leaf, getattr(model.get_submodule(src_owner), src_leaf))
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise EdgepeftError(f"{table_file}: not a module table this edgepeft reads ({type(e).__name__}: {e}); "
                            "the artifact is damaged. Export it again, or pass --base DIR.") from None
    return model.eval()
