"""Step 3 of an export: plan the adapter slots of a side-branch graph.

Which layers get a side branch of which feature, the graph inputs that feed them (and the
classification head and encoder prompt the adapters carry), from the adapters' side branches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgepeft.kinds import FEATURES, kind_module, reserved_side
from edgepeft.kinds.common import SideBranch
from edgepeft.errors import EdgepeftError
from edgepeft.export.config import ExportConfig, parse_slots
from edgepeft.export.load import Base
from edgepeft.export.slots import (InputSpec, Slot, fix_ranks, head_rows_specs, input_specs, plan_slots, rows_specs,
                                   shared_defaults)
from edgepeft.targets import check_ranks


@dataclass(frozen=True)
class Plan:
    """The slots of a traced side-branch graph.

    Attributes:
        sides: ``{adapter name: SideBranch}``, every adapter's run-time arrays (fixed ranks padded).
        slots: the adapted layers with their features, in module order.
        specs: the graph's adapter inputs (layer features, head parameters, encoder prompt).
        head_params: parameter names of the classification head the adapters carry.
        arrays: ``{adapter name: {graph input: array}}`` (``SideBranch.arrays``).
        fixed: the fixed rank of each fixed-rank feature.
        shared: the default of each shared input (the value most adapters have).
        rows: the per-row weight inputs (``slots.rows_specs``): graph inputs, not adapter inputs.
    """

    sides: dict[str, SideBranch]
    slots: list[Slot]
    specs: list[InputSpec]
    head_params: list[str]
    arrays: dict[str, dict[str, np.ndarray]]
    fixed: dict[str, int]
    shared: dict[str, np.ndarray]
    rows: list[InputSpec]


RESERVED = "(--slots)"  # the key of the reserved slots among the sides: no adapter can have it


def side_branches(cfg: ExportConfig, base: Base, adapters: list) -> dict[str, SideBranch]:
    """Every adapter as a side branch, checked against the target's ``max_rank`` (before the slow
    graph export), and the empty slots of ``--slots`` under :data:`RESERVED`."""
    sides = {a.name: kind_module(a).side(a, base.model) for a in adapters}
    check_ranks(cfg.target, sides)
    if cfg.slots:
        sides[RESERVED] = reserved_side(parse_slots(cfg.slots), base.model, base.task)
    return sides


def plan_traced(cfg: ExportConfig, base: Base, adapters: list) -> Plan:
    """The slots and inputs of the traced side-branch graph that runs every adapter in ``adapters``.

    Raises:
        EdgepeftError: a rank above the target's ``max_rank``, or encoder prompt tuning for a
            static-shape target.
    """
    model = base.model
    sides, fixed = fix_ranks(side_branches(cfg, base, adapters))
    slots = plan_slots(model, list(sides.values()))
    arrays = {name: side.arrays(FEATURES) for name, side in sides.items()}
    shared = shared_defaults(slots, arrays)
    head_modules = {p.rpartition(".")[0] for s in sides.values() for p in s.head}
    head_params = sorted(n for n, _ in model.named_parameters() if n.rpartition(".")[0] in head_modules)
    prompt_width = (int(model.get_input_embeddings().weight.shape[1])
                    if any(s.prompt is not None for s in sides.values()) else None)
    if cfg.target.static_shapes and prompt_width is not None and base.task == "classification":
        raise EdgepeftError(f"target {cfg.target.name!r} fixes every shape, but prompt tuning on an "
                            "encoder puts a prompt of the adapter's own length before the tokens. "
                            "Export prompt-tuning adapters with a target without static_shapes "
                            "(e.g. --target cpu-arm64).")
    specs = input_specs(slots, model, head_params, prompt_width, fixed=fixed, shared=shared)
    return Plan(sides, slots, specs, head_params, arrays, fixed, shared,
                rows_specs(slots) + head_rows_specs(model, head_params))
