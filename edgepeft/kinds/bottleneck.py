"""edgepeft's own bottleneck adapters (Houlsby / Pfeiffer), PyTorch side: add, save, load.

An adapter wraps the *output projection* of a block and adds a small residual MLP to its output::

    y = base(x)                              (B, T, d)
    y + up(act(down(y)))                     down: d -> r (bias), up: r -> d (bias)

Houlsby puts one after the attention output projection and one after the feed-forward output
projection of every layer; Pfeiffer only after the feed-forward one. With ``up = 0`` (the default
init) the wrapped model is exactly the base model. The branch is non-linear, so it is never merged
into the weights: the export feeds ``down``/``up`` as side-branch inputs
(``edgepeft/export/slots.py``, feature ``bottleneck_<act>``).

PEFT has no bottleneck adapter, so the directory format is edgepeft's own, shaped like PEFT's:
``adapter_config.json`` with ``"peft_type": "BOTTLENECK"`` and ``adapter_model.safetensors`` with
``base_model.model.{module}.adapter_down.weight (r, d)``, ``...adapter_down.bias (r,)``,
``...adapter_up.weight (d, r)``, ``...adapter_up.bias (d,)`` per wrapped module, plus
``base_model.model.{param}`` for every parameter of the ``modules_to_save`` (a classification head).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from edgepeft.kinds.common import (CONFIG_NAME, Reference, SAFETENSORS_NAME, TrainSpec, config_names, is_conv1d,
                                   is_linear, module_names_summary, read_config, read_tensors)
from edgepeft.contract.features import Feature, Part
from edgepeft.errors import EdgepeftError

KIND = "bottleneck"
NAMES = (KIND,)
MERGEABLE = False
PEFT_TYPE = "BOTTLENECK"
CONFIGS = ("houlsby", "pfeiffer")
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}  # gelu: exact (erf), as in export
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS")
KEY_PREFIX = "base_model.model."

# (family, attention output projection, feed-forward output projection): regexes over full module
# names. The first family whose feed-forward pattern matches a module of the model is used.
_FAMILIES = (
    ("llama-like", r"\.self_attn\.o_proj$", r"\.mlp\.down_proj$"),
    ("gpt2", r"\.attn\.c_proj$", r"\.mlp\.c_proj$"),
    ("bert/roberta", r"\.attention\.output\.dense$", r"\.layer\.\d+\.output\.dense$"),
    ("distilbert", r"\.attention\.out_lin$", r"\.ffn\.lin2$"),
    ("gpt-neox/falcon", r"\.(attention|self_attention)\.dense$", r"\.mlp\.dense_4h_to_h$"),
    ("phi", r"\.self_attn\.dense$", r"\.mlp\.fc2$"),
)


def _bottleneck_out(act, y: torch.Tensor, h: torch.Tensor, base: nn.Module, p: dict) -> torch.Tensor:
    """``y + up(act(down(y)))`` on the layer's output; a mix concatenates hidden units."""
    z = act(F.linear(y, p["down"], p["down_bias"]))  # (B, S, out) -> (B, S, r)
    return y + F.linear(z, p["up"], p["up_bias"])  # (B, S, out)


# One feature per activation (the graph has no switch for it): down (r, out), down_bias (r,),
# up (out, r), up_bias (out,).
FEATURES = tuple(
    Feature(f"bottleneck_{name}", (Part("down", ("r", "out"), 0.0, "cat0"), Part("down_bias", ("r",), 0.0, "cat0"),
                                   Part("up", ("out", "r"), 0.0, "cat1w"), Part("up_bias", ("out",), 0.0, "sumw")),
            order=50, on_output=lambda y, h, base, p, act=act: _bottleneck_out(act, y, h, base, p),
            fused=f"bottleneck_{name}")
    for name, act in ACTIVATIONS.items())


@dataclass(frozen=True)
class BottleneckConfig:
    """How to add bottleneck adapters to a model.

    Attributes:
        config: ``houlsby`` (after the attention and the feed-forward output projections of every
            layer) or ``pfeiffer`` (after the feed-forward output projection only).
        reduction_factor: bottleneck size ``r = max(1, d // reduction_factor)`` with ``d`` the
            wrapped layer's output features; ignored when ``bottleneck_size`` is given.
        bottleneck_size: explicit ``r``; None derives it from ``reduction_factor``.
        non_linearity: ``relu``, ``gelu`` (exact, erf) or ``silu``.
        target_modules: module names to wrap (full names, or dotted suffixes such as
            ``mlp.down_proj``); None uses :func:`default_targets` for ``config``.
    """

    config: str = "houlsby"
    reduction_factor: int = 16
    bottleneck_size: int | None = None
    non_linearity: str = "relu"
    target_modules: tuple[str, ...] | None = None

    def __post_init__(self):
        where = "BottleneckConfig"
        if not isinstance(self.config, str) or self.config not in CONFIGS:
            raise EdgepeftError(f"{where}: config={self.config!r} is not one of {', '.join(CONFIGS)}.")
        if isinstance(self.reduction_factor, bool) or not isinstance(self.reduction_factor, int) \
                or self.reduction_factor < 1:
            raise EdgepeftError(f"{where}: reduction_factor={self.reduction_factor!r}: expected an "
                                "integer >= 1 (e.g. 16: r = d // 16).")
        if self.bottleneck_size is not None and (isinstance(self.bottleneck_size, bool) or
                                                 not isinstance(self.bottleneck_size, int) or
                                                 self.bottleneck_size < 1):
            raise EdgepeftError(f"{where}: bottleneck_size={self.bottleneck_size!r}: expected an "
                                "integer >= 1, or None to derive it from reduction_factor.")
        if not isinstance(self.non_linearity, str) or self.non_linearity not in ACTIVATIONS:
            raise EdgepeftError(f"{where}: non_linearity={self.non_linearity!r} is not one of "
                                f"{', '.join(ACTIVATIONS)}.")
        if self.target_modules is not None:
            targets = (self.target_modules,) if isinstance(self.target_modules, str) else self.target_modules
            targets = tuple(targets)
            if not targets or not all(isinstance(t, str) and t for t in targets):
                raise EdgepeftError(f"{where}: target_modules={self.target_modules!r}: expected a "
                                    "non-empty list of module names, or None for the defaults.")
            object.__setattr__(self, "target_modules", targets)

    def rank(self, d: int) -> int:
        """The bottleneck size for a layer with ``d`` output features."""
        return self.bottleneck_size if self.bottleneck_size is not None else max(1, d // self.reduction_factor)


class BottleneckAdapter(nn.Module):
    """A linear (or GPT-2 ``Conv1D``) layer followed by a residual bottleneck MLP.

    ``forward(x) = y + adapter_up(act(adapter_down(y)))`` with ``y = base(x)``.
    """

    def __init__(self, base: nn.Module, r: int, non_linearity: str = "relu", init_up_std: float = 0.0):
        super().__init__()
        d = out_features(base)
        self.base = base
        self.non_linearity = non_linearity
        w = base.weight
        self.adapter_down = nn.Linear(d, r, bias=True, device=w.device, dtype=w.dtype)
        self.adapter_up = nn.Linear(r, d, bias=True, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            nn.init.normal_(self.adapter_down.weight, std=1e-2)
            nn.init.zeros_(self.adapter_down.bias)
            nn.init.zeros_(self.adapter_up.bias)
            if init_up_std:
                nn.init.normal_(self.adapter_up.weight, std=init_up_std)
            else:
                nn.init.zeros_(self.adapter_up.weight)  # identity at start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (B, T, d)
        z = ACTIVATIONS[self.non_linearity](self.adapter_down(y))  # (B, T, r)
        return y + self.adapter_up(z)  # (B, T, d)


def out_features(module: nn.Module) -> int:
    """Output features ``d`` of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (weight stored ``(in, out)``)."""
    if is_conv1d(module):
        return int(module.weight.shape[1])
    return int(module.weight.shape[0])


def _linears(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if is_linear(m)}


def default_targets(model: nn.Module, config: str) -> list[str]:
    """The output projections a Houlsby / Pfeiffer adapter wraps, found by module-name rules.

    Families: llama-like (``self_attn.o_proj`` / ``mlp.down_proj``), GPT-2 (``attn.c_proj`` /
    ``mlp.c_proj``), BERT and RoBERTa (``attention.output.dense`` / ``layer.N.output.dense``),
    DistilBERT (``attention.out_lin`` / ``ffn.lin2``), GPT-NeoX / Falcon, Phi.

    Args:
        model: the base model (no adapters yet).
        config: ``houlsby`` (attention + feed-forward) or ``pfeiffer`` (feed-forward only).

    Returns:
        Full module names in model order.

    Raises:
        EdgepeftError: an unknown ``config``, or no module (or, for Houlsby, no attention output
            projection) matches; the message lists the layers that exist.
    """
    if config not in CONFIGS:
        raise EdgepeftError(f"bottleneck config {config!r} is not one of {', '.join(CONFIGS)}.")
    linears = _linears(model)
    names = ["." + n for n in linears]  # rules start with "."; top-level names match too
    for family, attn, ffn in _FAMILIES:
        ffn_hits = [n[1:] for n in names if re.search(ffn, n)]
        if not ffn_hits:
            continue
        attn_hits = [n[1:] for n in names if re.search(attn, n)]
        if config == "pfeiffer":
            return ffn_hits
        if not attn_hits:
            break
        wanted = set(ffn_hits) | set(attn_hits)
        return [n for n in linears if n in wanted]
    raise EdgepeftError(
        f"{type(model).__name__}: no {config} bottleneck targets found (known families: "
        f"{', '.join(f[0] for f in _FAMILIES)}). Pass target_modules explicitly; linear layers that "
        f"exist: {module_names_summary(list(linears))}.")


def resolve_targets(model: nn.Module, cfg: BottleneckConfig) -> list[str]:
    """Full names of the modules ``cfg`` wraps on ``model``, in model order.

    Args:
        model: the base model.
        cfg: its ``target_modules`` entries match a module by full name or dotted suffix.

    Returns:
        Module names (each an ``nn.Linear`` or ``Conv1D``).

    Raises:
        EdgepeftError: an entry matches nothing, or matches a module that is not a linear layer.
    """
    if cfg.target_modules is None:
        return default_targets(model, cfg.config)
    modules = dict(model.named_modules())
    linears = _linears(model)
    found: set[str] = set()
    for t in cfg.target_modules:
        hits = [n for n in modules if n == t or n.endswith("." + t)]
        if not hits:
            raise EdgepeftError(f"bottleneck target_modules: {t!r} matches no module of "
                                f"{type(model).__name__}. Linear layers that exist: "
                                f"{module_names_summary(list(linears))}.")
        odd = [n for n in hits if n not in linears]
        if odd:
            raise EdgepeftError(f"bottleneck target_modules: {t!r} matches {odd[0]!r}, a "
                                f"{type(modules[odd[0]]).__name__}; bottleneck adapters wrap nn.Linear / "
                                "Conv1D layers only.")
        found.update(hits)
    return [n for n in modules if n in found]


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def add_bottleneck(model: nn.Module, cfg: BottleneckConfig, init_up_std: float = 0.0) -> list[str]:
    """Wrap the target layers of ``model`` in :class:`BottleneckAdapter`, in place.

    Nothing is frozen here; use :func:`bottleneck_parameters` to pick what to train.

    Args:
        model: the base model (not wrapped yet).
        cfg: which layers, size and activation.
        init_up_std: 0 (default) initialises ``up`` to zero, so the model is unchanged; > 0 draws it
            from ``normal(std=init_up_std)`` (tests: a non-identity adapter).

    Returns:
        The wrapped module names, in model order.

    Raises:
        EdgepeftError: no targets, or the model already has bottleneck adapters.
    """
    present = wrapped_modules(model)
    if present:
        raise EdgepeftError(f"{type(model).__name__} already has bottleneck adapters (e.g. on "
                            f"{next(iter(present))!r}); add adapters to a fresh base model.")
    targets = resolve_targets(model, cfg)
    modules = dict(model.named_modules())
    for name in targets:
        base = modules[name]
        _set_module(model, name, BottleneckAdapter(base, cfg.rank(out_features(base)), cfg.non_linearity,
                                                   init_up_std))
    return targets


def wrapped_modules(model: nn.Module) -> dict[str, BottleneckAdapter]:
    """``{module name: wrapper}`` of every bottleneck adapter in ``model``, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, BottleneckAdapter)}


def bottleneck_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter parameters (``adapter_down`` / ``adapter_up`` weights and biases) of ``model``.

    Returns:
        ``{full parameter name: parameter}``; the base layers' parameters are not included.
    """
    out = {}
    for name, m in wrapped_modules(model).items():
        for part in ("adapter_down", "adapter_up"):
            for p_name, p in getattr(m, part).named_parameters():
                out[f"{name}.{part}.{p_name}"] = p
    return out


def head_parameters(model: nn.Module, modules_to_save: list[str] | tuple[str, ...]) -> dict[str, nn.Parameter]:
    """Every parameter of the modules named in ``modules_to_save`` (full name or dotted suffix).

    Raises:
        EdgepeftError: an entry that names no module of ``model``.
    """
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    out = {}
    for entry in modules_to_save:
        hits = [n for n in modules if n and (n == entry or n.endswith("." + entry))]
        if not hits:
            raise EdgepeftError(f"modules_to_save: {entry!r} names no module of {type(model).__name__} "
                                f"(top-level modules: {', '.join(n for n, _ in model.named_children())}).")
        for h in hits:
            out.update({n: p for n, p in params.items() if n.startswith(h + ".")})
    return out


def save_bottleneck(model: nn.Module, out_dir: Path, cfg: BottleneckConfig, task_type: str,
                    base_model_name_or_path: str, modules_to_save: list[str] | None = None) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` for the adapters in ``model``.

    The files are written into a temporary sibling folder first; ``out_dir`` then appears whole
    (renamed) or, if it already exists, each file is replaced atomically (weights first, config last).

    Args:
        model: a model wrapped by :func:`add_bottleneck` (or :func:`load_bottleneck`).
        out_dir: the adapter folder to write.
        cfg: the config the adapters were added with (recorded as is; ``bottleneck_size`` is
            written resolved).
        task_type: ``CAUSAL_LM`` or ``SEQ_CLS``.
        base_model_name_or_path: recorded for the reader (e.g. the base model folder).
        modules_to_save: fully trained modules carried in the adapter (a classification head such
            as ``["classifier"]``), or None.

    Returns:
        ``out_dir``.

    Raises:
        EdgepeftError: no adapters in ``model``, an unknown task type, or a ``modules_to_save`` entry
            that names no module.
    """
    import edgepeft
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if task_type not in TASK_TYPES:
        raise EdgepeftError(f"save_bottleneck: task_type={task_type!r} is not one of {', '.join(TASK_TYPES)}.")
    wrapped = wrapped_modules(model)
    if not wrapped:
        raise EdgepeftError(f"save_bottleneck: {type(model).__name__} has no bottleneck adapters; "
                            "call add_bottleneck first.")
    ranks = {m.adapter_down.out_features for m in wrapped.values()}
    tensors: dict[str, torch.Tensor] = {}
    for name, m in wrapped.items():
        for part in ("adapter_down", "adapter_up"):
            for p_name, p in getattr(m, part).named_parameters():
                tensors[f"{KEY_PREFIX}{name}.{part}.{p_name}"] = p.detach().float().contiguous().clone()
    to_save = list(modules_to_save) if modules_to_save else None
    if to_save:
        for name, p in head_parameters(model, to_save).items():
            tensors[f"{KEY_PREFIX}{name}"] = p.detach().float().contiguous().clone()
    config = {
        "peft_type": PEFT_TYPE,
        "task_type": task_type,
        "base_model_name_or_path": str(base_model_name_or_path),
        "config": cfg.config,
        "reduction_factor": cfg.reduction_factor,
        # The resolved r when every layer has the same one (all supported families); else null and
        # each layer's r = max(1, d // reduction_factor).
        "bottleneck_size": ranks.pop() if len(ranks) == 1 else None,
        "non_linearity": cfg.non_linearity,
        "target_modules": list(wrapped),
        "modules_to_save": to_save,
        "edgepeft_version": edgepeft.__version__,
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        save_file(tensors, str(tmp / SAFETENSORS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        if out_dir.exists():
            if not out_dir.is_dir():
                raise EdgepeftError(f"{out_dir}: exists and is not a folder; pick another output path.")
            for f in (SAFETENSORS_NAME, CONFIG_NAME):
                os.replace(tmp / f, out_dir / f)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def config_from_json(config: dict, path: Path) -> BottleneckConfig:
    """The :class:`BottleneckConfig` recorded in a parsed ``adapter_config.json`` at ``path``.

    Raises:
        EdgepeftError: not a bottleneck adapter, or a field missing or out of range.
    """
    if config.get("peft_type") != PEFT_TYPE:
        raise EdgepeftError(f"{path}: peft_type is {config.get('peft_type')!r}, not {PEFT_TYPE!r}: this "
                            "is not an edgepeft bottleneck adapter.")
    targets = config.get("target_modules")
    if not isinstance(targets, list) or not targets:
        raise EdgepeftError(f"{path}: target_modules must be a non-empty list of module names. Save the "
                            "adapter again with edgepeft (save_bottleneck or edgepeft train).")
    try:
        return BottleneckConfig(config=config.get("config", "houlsby"),
                                reduction_factor=config.get("reduction_factor", 16),
                                bottleneck_size=config.get("bottleneck_size"),
                                non_linearity=config.get("non_linearity", "relu"),
                                target_modules=tuple(targets))
    except EdgepeftError as e:
        raise EdgepeftError(f"{path}: {e}") from None


def _parse(model: nn.Module, adapter_dir: Path):
    """Read and check a bottleneck directory against ``model`` (not modified).

    Returns:
        (config, weights file, ``{module: {part: tensor}}``, ``{head param: tensor}``).

    Raises:
        EdgepeftError: missing or unreadable files, target modules the model does not have (the
            message lists some that exist), tensors missing, unexpected or of the wrong shape.
    """
    adapter_dir = Path(adapter_dir)
    config = read_config(adapter_dir)
    cfg_path = adapter_dir / CONFIG_NAME
    cfg = config_from_json(config, cfg_path)
    weights_file, tensors = read_tensors(adapter_dir)

    modules = dict(model.named_modules())
    linears = _linears(model)
    unknown = [t for t in cfg.target_modules if t not in modules]
    if unknown:
        raise EdgepeftError(
            f"{cfg_path}: target_modules name {len(unknown)} module(s) {type(model).__name__} does not "
            f"have (e.g. {unknown[0]!r}): the adapter was made for another base model. Linear layers "
            f"that exist: {module_names_summary(list(linears))}.")
    not_linear = [t for t in cfg.target_modules if t not in linears]
    if not_linear:
        raise EdgepeftError(f"{cfg_path}: target {not_linear[0]!r} is a "
                            f"{type(modules[not_linear[0]]).__name__}, not a linear layer (or it "
                            "already has an adapter: load into a fresh base model).")

    params = dict(model.named_parameters())
    head: dict[str, torch.Tensor] = {}
    to_save = config_names(config, "modules_to_save", cfg_path)
    if to_save:
        try:
            wanted_head = head_parameters(model, to_save)
        except EdgepeftError as e:
            raise EdgepeftError(f"{cfg_path}: {e} The adapter was made for another model class or base.") from None
        for name in wanted_head:
            key = KEY_PREFIX + name
            if key not in tensors:
                raise EdgepeftError(f"{weights_file}: modules_to_save parameter {key!r} is missing. The "
                                    "file is incomplete; save the adapter again.")
            t = tensors.pop(key)
            if tuple(t.shape) != tuple(params[name].shape):
                raise EdgepeftError(f"{weights_file}: {key} has shape {tuple(t.shape)}, the model's "
                                    f"{name} is {tuple(params[name].shape)} (another number of labels?). "
                                    "Load with a model of the same num_labels.")
            if not torch.isfinite(t).all():
                raise EdgepeftError(f"{weights_file}: {key} contains NaN or Inf.")
            head[name] = t

    layers: dict[str, dict[str, torch.Tensor]] = {}
    for name in cfg.target_modules:
        d = out_features(linears[name])
        r = cfg.rank(d)
        want = {"adapter_down.weight": (r, d), "adapter_down.bias": (r,),
                "adapter_up.weight": (d, r), "adapter_up.bias": (d,)}
        layers[name] = {}
        for part, shape in want.items():
            key = f"{KEY_PREFIX}{name}.{part}"
            if key not in tensors:
                raise EdgepeftError(f"{weights_file}: {key!r} is missing. The file is incomplete; save "
                                    "the adapter again.")
            t = tensors.pop(key)
            if tuple(t.shape) != shape:
                raise EdgepeftError(f"{weights_file}: {key} has shape {tuple(t.shape)}, expected {shape} "
                                    f"(d = {d} output features of {name}, r = {r}): the adapter was made "
                                    "for a base model with other layer sizes, or its config was edited.")
            if not torch.isfinite(t).all():
                raise EdgepeftError(f"{weights_file}: {key} contains NaN or Inf.")
            layers[name][part] = t
    if tensors:
        extra = sorted(tensors)
        raise EdgepeftError(f"{weights_file}: {len(extra)} tensor(s) the config does not account for "
                            f"(e.g. {extra[0]!r}); target_modules and modules_to_save in {CONFIG_NAME} "
                            "must name every saved module.")
    return cfg, weights_file, layers, head


@torch.no_grad()
def load_bottleneck(model: nn.Module, adapter_dir: Path) -> nn.Module:
    """Wrap ``model`` as the adapter directory says and load its weights: the PyTorch reference.

    Args:
        model: a fresh base model (no adapters), of the class the adapter was trained with
            (a sequence-classification model when the adapter carries a head).
        adapter_dir: written by :func:`save_bottleneck` / ``edgepeft train --kind bottleneck``.

    Returns:
        ``model``, wrapped in place and in eval mode.

    Raises:
        EdgepeftError: as :func:`_parse`.
    """
    cfg, _, layers, head = _parse(model, Path(adapter_dir))
    linears = _linears(model)
    params = dict(model.named_parameters())
    for name in cfg.target_modules:
        base = linears[name]
        wrapper = BottleneckAdapter(base, cfg.rank(out_features(base)), cfg.non_linearity)
        sd = {k: v.to(base.weight.dtype) for k, v in layers[name].items()}
        wrapper.adapter_down.weight.copy_(sd["adapter_down.weight"])
        wrapper.adapter_down.bias.copy_(sd["adapter_down.bias"])
        wrapper.adapter_up.weight.copy_(sd["adapter_up.weight"])
        wrapper.adapter_up.bias.copy_(sd["adapter_up.bias"])
        _set_module(model, name, wrapper)
    for name, t in head.items():
        params[name].copy_(t.to(params[name].dtype))
    return model.eval()


# ---------------------------------------------------------------- export side (kind interface)
@dataclass(frozen=True)
class BottleneckRead:
    """A bottleneck adapter read for export: per module ``down (r, d)``, ``down_bias (r,)``,
    ``up (d, r)``, ``up_bias (d,)``, fp32, and a carried head."""

    name: str
    source: Path
    weights_file: Path
    config: BottleneckConfig
    modules: dict[str, dict[str, torch.Tensor]]
    head: dict[str, torch.Tensor]
    kind: str = KIND


def read(name: str, adapter_dir: Path, config: dict, model: nn.Module,
         task: str = "causal-lm") -> BottleneckRead:
    """Read an edgepeft bottleneck directory and check it against ``model``.

    Raises:
        EdgepeftError: as :func:`load_bottleneck`; a head on a causal LM.
    """
    cfg, weights_file, layers, head = _parse(model, Path(adapter_dir))
    if head and task != "classification":
        raise EdgepeftError(f"{weights_file}: carries a head ({', '.join(sorted(head))}); on a causal LM "
                            "that is not exported. Save it without modules_to_save.")
    modules = {m: {"down": t["adapter_down.weight"].float(), "down_bias": t["adapter_down.bias"].float(),
                   "up": t["adapter_up.weight"].float(), "up_bias": t["adapter_up.bias"].float()}
               for m, t in layers.items()}
    return BottleneckRead(name, Path(adapter_dir), weights_file, cfg, modules,
                          {n: t.float() for n, t in head.items()})


def merge(model: nn.Module, adapter: BottleneckRead, weight: float = 1.0) -> None:
    """A bottleneck is non-linear in its weights: there is nothing to merge."""
    raise EdgepeftError(f"adapter {adapter.name!r} is a bottleneck adapter: its branch is non-linear "
                        "(an activation between two projections), so it cannot be merged. Export it "
                        "with --mode side.")


def side(adapter: BottleneckRead, model: nn.Module):
    """Graph inputs ``bottleneck_<act>.{module}.down|down_bias|up|up_bias``."""
    import numpy as np

    from edgepeft.kinds.common import SideBranch, head_to_numpy

    feature = f"bottleneck_{adapter.config.non_linearity}"
    layers = {(m, feature): {k: np.ascontiguousarray(v.numpy(), np.float32) for k, v in parts.items()}
              for m, parts in adapter.modules.items()}
    return SideBranch(layers=layers, head=head_to_numpy(adapter.head))


def manifest_entry(adapter: BottleneckRead) -> dict:
    """What the manifest records for this adapter (besides file and checksum)."""
    c = adapter.config
    ranks = sorted({int(p["down"].shape[0]) for p in adapter.modules.values()})
    return {"kind": KIND, "config": c.config, "reduction_factor": c.reduction_factor, "ranks": ranks,
            "non_linearity": c.non_linearity, "targets": sorted(adapter.modules),
            "head": sorted(adapter.head)}


def describe(entry: dict) -> str:
    """``edgepeft inspect``'s summary of a manifest entry."""
    return f" reduction {entry['reduction_factor']}, {entry['non_linearity']}"


# ---------------------------------------------------------------- PyTorch reference (validate, bench)
def _reference_load(base: nn.Module, adapter_dir: Path, name: str | None) -> nn.Module:
    """``Reference.load``: :func:`load_bottleneck` (one adapter per model; ``name`` unused)."""
    return load_bottleneck(base, adapter_dir)


REFERENCE = Reference(load=_reference_load)


# ---------------------------------------------------------------- edgepeft train
def _train_bottleneck_config(cfg) -> BottleneckConfig:
    """Houlsby layout, ``d // cfg.reduction_factor`` hidden units, on ``cfg.target_modules`` or the
    family's default layers."""
    return BottleneckConfig(config="houlsby", reduction_factor=cfg.reduction_factor,
                            target_modules=cfg.target_modules)


def _train_add(model: nn.Module, cfg, heads: list[str]) -> dict[str, nn.Parameter]:
    """``TrainSpec.add``: wrap the target layers and return the adapters' and heads' parameters."""
    add_bottleneck(model, _train_bottleneck_config(cfg))
    return {**bottleneck_parameters(model), **(head_parameters(model, heads) if heads else {})}


def _train_save(model: nn.Module, out_dir: Path, cfg, classification: bool, heads: list[str]) -> None:
    """``TrainSpec.save``: :func:`save_bottleneck` with the heads as ``modules_to_save``."""
    task_type = "SEQ_CLS" if classification else "CAUSAL_LM"
    save_bottleneck(model, out_dir, _train_bottleneck_config(cfg), task_type, str(cfg.model),
                    modules_to_save=heads or None)


TRAIN = {"bottleneck": TrainSpec(lr=1e-3, add=_train_add, save=_train_save)}
