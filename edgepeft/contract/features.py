"""How a kind describes what it feeds an adapted linear layer at run time. torch-free.

An adapted linear layer (a *slot*) of the side-branch graph composes *features*; a kind declares
its features in its own file (``edgepeft/kinds/<kind>.py``) with the classes here, and export,
the manifest, verify and static targets read those declarations without naming a kind.

A feature adds graph inputs named ``{feature}.{module}.{part}``. Each :class:`Part` states

- its shape in the layer's symbols: ``"in"``, ``"out"`` (the layer's widths) and ``"r"`` (a rank
  axis: dynamic in the graph, padded to ``max_rank`` on static targets, concatenated in a mix);
- its identity value (what the graph computes when nothing is fed: rank axes have size 0, the
  other axes are filled with ``identity``);
- its mix rule when several adapters are active:

  ====== ==================================================================================
  cat0   concatenate along axis 0 (A, down-projections: the rank axis)
  cat1w  concatenate along axis 1 after multiplying by the adapter's weight (B, up-projections)
  cat1   concatenate along axis 1 (A^T of the fused graph: its rank axis is the last)
  cat0w  concatenate along axis 0 after multiplying by the adapter's weight (B^T of the fused graph)
  sumw   weighted sum (up-projection biases)
  one    at most one active adapter may feed it, with weight 1 (non-linear in the weights)
  ====== ==================================================================================

The manifest records each exported feature's parts (``manifest["features"]``, see :meth:`Feature.table`)
and each input's rule, so the runtimes (Python and JavaScript) and ``verify`` need no copy of them.

The torch maths of a feature (``on_input`` before the base layer, ``on_output`` after it) lives
with the kind; it is held here only as callables, so this module never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

MIX_RULES = ("cat0", "cat1w", "cat1", "cat0w", "sumw", "one")
SYMBOLS = ("in", "out", "r")
RANK = "r"


@dataclass(frozen=True)
class Part:
    """One graph input of a feature, per adapted layer.

    Attributes:
        name: the part's name (the last component of the input name).
        shape: symbols of :data:`SYMBOLS`, e.g. ``("r", "in")``.
        identity: fill value of the identity default (0 or 1); rank axes are empty.
        mix: the mixing rule, one of :data:`MIX_RULES`.
    """

    name: str
    shape: tuple[str, ...]
    identity: float
    mix: str

    def __post_init__(self):
        if self.mix not in MIX_RULES:
            raise ValueError(f"part {self.name}: mix {self.mix!r} is not one of {MIX_RULES}")
        if not self.shape or any(s not in SYMBOLS for s in self.shape):
            raise ValueError(f"part {self.name}: shape {self.shape} must use {SYMBOLS}")
        if self.shape.count(RANK) > 1:
            raise ValueError(f"part {self.name}: at most one rank axis")

    def dims(self, in_features: int, out_features: int, rank: int | None) -> list[int | None]:
        """The concrete shape on a layer ``in -> out``; ``rank`` None leaves rank axes None."""
        sizes = {"in": in_features, "out": out_features, RANK: rank}
        return [sizes[s] for s in self.shape]

    @property
    def rank_axis(self) -> int | None:
        return self.shape.index(RANK) if RANK in self.shape else None


@dataclass(frozen=True)
class Feature:
    """A run-time feature of an adapted linear layer, declared by one kind.

    Attributes:
        name: feature name, the first component of its input names (``lora``, ``ia3_in``, ...).
        parts: its graph inputs per layer.
        order: its place in a slot's composition (lower runs first; see ``edgepeft/export/slots.py``).
        on_input: ``(h, parts) -> h``, applied to the layer's input before the base layer, or None.
        on_output: ``(y, h, base, parts) -> y``, applied to the output (``base`` is the wrapped
            layer, ``h`` its input), or None. ``parts`` maps part name -> fed tensor.
        fused: the feature's form in the fused graph (``edgepeft/export/fused.py``), None if the
            fused graph cannot take it.
    """

    name: str
    parts: tuple[Part, ...]
    order: int
    on_input: Callable | None = None
    on_output: Callable | None = None
    fused: str | None = None

    def __post_init__(self):
        if (self.on_input is None) == (self.on_output is None):
            raise ValueError(f"feature {self.name}: exactly one of on_input / on_output")
        names = [p.name for p in self.parts]
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"feature {self.name}: part names must be distinct and non-empty")

    def part(self, name: str) -> Part:
        return next(p for p in self.parts if p.name == name)

    def rank_of(self, arrays: dict) -> int | None:
        """The rank of one adapter's arrays ``{part: array}`` on this feature (None: no rank axis)."""
        for p in self.parts:
            if p.rank_axis is not None and p.name in arrays:
                return int(arrays[p.name].shape[p.rank_axis])
        return None

    def table(self) -> list[list]:
        """What the manifest records: ``[[part, [symbols], mix], ...]``."""
        return [[p.name, list(p.shape), p.mix] for p in self.parts]


def table_shapes(table: list[list], in_features: int, out_features: int) -> dict[str, list[int | None]]:
    """Part name -> shape (None on rank axes) from a manifest's feature table (see :meth:`Feature.table`)."""
    sizes = {"in": in_features, "out": out_features, RANK: None}
    return {name: [sizes[s] for s in shape] for name, shape, _ in table}
