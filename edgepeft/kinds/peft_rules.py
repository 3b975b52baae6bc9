"""PEFT 0.21's rules for which modules an adapter config targets, without importing peft.

``import peft`` imports transformers' model code: about 5 s on a 2-core machine, most of
``edgepeft adapter add``'s time, for a few small functions. These are copies of them, kept equal to
PEFT's by ``tests/test_add_light.py``, which runs both on a grid of configs and module names
(``edgepeft.kinds.common.peft_targets`` applies them):

- :func:`target_match`: ``peft.tuners.tuners_utils.check_target_module_exists`` on a config
  normalized as ``LoraConfig.__post_init__`` does (lists become sets);
- :func:`check_target_fields`: the ``LoraConfig.__post_init__`` checks of those fields (a regex
  with ``layers_to_transform`` or ``layers_pattern``; ``layers_pattern`` without
  ``layers_to_transform``), plus the types PEFT's code assumes;
- :func:`pattern_key`: ``peft.utils.other.get_pattern_key`` (``rank_pattern`` / ``alpha_pattern``);
- :func:`all_linear`: ``peft.tuners.tuners_utils._maybe_include_all_linear_layers``, which turns
  ``target_modules="all-linear"`` into module names.

``LoraConfig`` refuses a regex ``target_modules`` with ``layers_to_transform`` or
``layers_pattern``; ``LoHaConfig`` does not (``check_target_fields(..., regex_layers=True)``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

EXCLUDED = "excluded"  # check_target_module_exists's _ExcludedModule: matched, but excluded


def _str_or_names(config: dict, key: str) -> str | list[str] | None:
    v = config.get(key)
    if v is None or isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v)):
        return v
    raise ValueError(f"{key} must be a string, a list of strings or null, not {v!r}")


def check_target_fields(config: dict, regex_layers: bool = False) -> None:
    """What ``LoraConfig(**config)`` (``regex_layers``: ``LoHaConfig``) refuses about the target
    fields.

    Raises:
        ValueError: the reason, in PEFT's words where PEFT has them.
    """
    target = _str_or_names(config, "target_modules")
    _str_or_names(config, "exclude_modules")
    pattern = _str_or_names(config, "layers_pattern")
    saved = config.get("modules_to_save")
    if saved is not None and not (isinstance(saved, list) and all(isinstance(x, str) for x in saved)):
        raise ValueError(f"modules_to_save must be a list of strings or null, not {saved!r}")
    layers = config.get("layers_to_transform")
    if layers is not None and not (isinstance(layers, int) and not isinstance(layers, bool)
                                   or isinstance(layers, list) and all(isinstance(x, int) and not isinstance(x, bool)
                                                                       for x in layers)):
        raise ValueError(f"layers_to_transform must be an integer, a list of integers or null, not {layers!r}")
    if isinstance(target, str) and layers is not None and not regex_layers:
        raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
    if isinstance(target, str) and pattern is not None and not regex_layers:
        raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str.")
    if pattern and layers is None:
        raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. ")


def target_match(config: dict, key: str) -> bool | str:
    """Whether PEFT wraps the module named ``key`` for ``config`` (an ``adapter_config.json``, its
    fields checked by :func:`check_target_fields`): True, False, or :data:`EXCLUDED` (named by
    ``exclude_modules`` or ``modules_to_save``)."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return EXCLUDED
        elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
            return EXCLUDED
    saved = config.get("modules_to_save")
    if saved and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in saved):
        return EXCLUDED
    target = config.get("target_modules")
    if target is None and config.get("target_parameters") is not None:
        return False
    if isinstance(target, str):
        return re.fullmatch(target, key) is not None
    if key in target:
        return True
    found = any(key.endswith(f".{t}") for t in target)
    layers, pattern = config.get("layers_to_transform"), config.get("layers_pattern")
    using_layers = layers is not None and (len(layers) != 0 if isinstance(layers, list) else True)
    if not (using_layers and found):
        return found
    match = None
    if pattern is None or len(pattern) == 0:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)  # the first numbered segment
    else:
        for p in [pattern] if isinstance(pattern, str) else pattern:
            match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    index = match.groupdict().get("idx") if match else None
    if index is None:
        return False
    return int(index) == layers if isinstance(layers, int) else int(index) in layers


def pattern_key(keys: Sequence[str], name: str) -> str:
    """The key of ``rank_pattern`` / ``alpha_pattern`` that applies to module ``name`` (the first
    that matches a dotted suffix), else ``name`` itself."""
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return name


SEQ_CLS_HEAD_NAMES = ("score", "classifier")  # peft.utils.constants.SEQ_CLS_HEAD_NAMES


def all_linear(config: dict, model, linear: list[str]) -> dict:
    """``config`` with ``target_modules="all-linear"`` (any case) replaced by the names PEFT
    expands it to: the linear layers ``linear`` (the base's ``nn.Linear`` / ``Conv1D`` names) but
    the output embeddings, or, on a classifier without them (``task_type`` SEQ_CLS), its head
    (``score`` / ``classifier``). ``model``: the base (a transformers model or the skeleton of
    one); other configs are returned as they are."""
    target = config.get("target_modules")
    if not (isinstance(target, str) and target.lower() == "all-linear"):
        return config
    names = dict(model.named_modules())
    head = model.get_output_embeddings()
    if head is None and config.get("task_type") == "SEQ_CLS":
        head = next((getattr(model, n) for n in SEQ_CLS_HEAD_NAMES if getattr(model, n, None) is not None), None)
    skip = {n for n, m in names.items() if head is not None and m is head}
    return {**config, "target_modules": [n for n in linear if n not in skip]}
