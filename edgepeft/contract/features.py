"""How a kind describes what it feeds an adapted linear layer at run time. torch-free.

An adapted linear layer (a *slot*) of the side-branch graph composes *features*; a kind declares
its features in its own file (``edgepeft/kinds/<kind>.py``) with the classes here, and export,
the manifest, verify and static targets read those declarations without naming a kind.

A feature adds graph inputs named ``{feature}.{module}.{part}``. Each :class:`Part` states

- its shape in the layer's symbols: ``"in"``, ``"out"`` (the layer's widths) and ``"r"`` (a rank
  axis: dynamic in the graph, padded to ``max_rank`` on static targets, concatenated in a mix),
  or ``"R"`` (a rank fixed per artifact: the largest among the exported adapters, the others
  zero-padded to it at export, so the feature must make zero padding exact);
- its identity value (what the graph computes when nothing is fed: rank axes have size 0, the
  other axes are filled with ``identity``);
- whether it is *shared*: one graph input per distinct layer shape, named
  ``{feature}.shared.{widths}.{part}`` (e.g. ``x.shared.64.A`` for a part ``("R", "in")`` on
  layers with 64 inputs), instead of one per layer. Its default is not an identity but a value:
  the one most exported adapters have (they leave it out of their files and list it under their
  manifest entry's ``defaults``; the others store their own). A shared part has no ``identity``
  and a fixed rank ``"R"``; the feature's identity comes from its other parts;
- its mix rule when several adapters are active:

  ====== ==================================================================================
  cat0   concatenate along axis 0 (A, down-projections: the rank axis)
  cat1w  concatenate along axis 1 after multiplying by the adapter's weight (B, up-projections)
  cat1   concatenate along axis 1 (A^T of the fused graph: its rank axis is the last)
  cat0w  concatenate along axis 0 after multiplying by the adapter's weight (B^T of the fused graph)
  sumw   weighted sum (up-projection biases)
  one    at most one active adapter may feed it, with weight 1 (non-linear in the weights)
  ====== ==================================================================================

A feature the fused graph (``edgepeft/export/fused.py``) can compute names its *fused form*
(:data:`FUSED_FORMS`): which of the fused graph's per-group inputs each of its parts feeds. The
fused graph packs the projections that read one input (q|k|v, gate|up) into one MatMul and
computes, per packed group (``x (B, S, in)``, ``y (B, S, out)``, ``out`` the group's total)::

    x = x * (1 + scale.in)              in     a per-channel scale of the input   (in,)
    y = x W^T                           the packed base MatMul
    y = y * (1 + scale.mag)             mag    a per-output scale, before the bias (out,)
    y = y + b                           the base bias, if any
    y = y + (x AT) BT                   AT/BT  the low-rank branch, ranks concatenated
    y = y * (1 + scale.out)             out    a per-output scale of the whole output (out,)
    y = y + act(y DT + db) UT + ub      {act}_DT / _db / _UT / _ub: a residual bottleneck MLP on
                                               the output, per activation, hidden units concatenated

so a fused scale input holds its part's value *minus the part's identity*: zero is the identity
of every fused input (what a group an adapter does not touch, or a projection of the group it
does not touch, is fed). ``AT``/``BT`` mix by ``cat1``/``cat0w``; the scales by their part's rule,
which must be ``one`` (a product of scales is not a weighted sum). The low-rank places take the
part values as they are (``B`` carries every scale), so a feature whose low-rank parts are ``one``
in the traced graph (DoRA) relies on its ``mag`` scale to refuse what does not mix.

A feature may declare ``rows``, so one run can give each row of a batch its own adapter or mix.
Its rank parts (if any) must concatenate (``cat*`` rules: the feature is linear in its rank
columns) and its other parts must be per-layer ``one`` parts (scales):

- the graph gives the slot one more input, ``{feature}.{slot}.rows (N, 1, r)``, that weights the
  rank columns per row (``N`` is 1 or the batch; its default ``(1, 1, 1)`` ones is the identity):
  the adapters of the batch are concatenated along the rank axis as in a mix, and row ``b``
  weights the columns of adapter ``a`` by its weight ``w_{b,a}`` (zero for the adapters it does
  not use). The manifest's ``rows`` maps each such input to the inputs whose rank columns it
  weights;
- each scale part ``p`` gets a per-row *offset* ``{input of p}.rows (N, 1, width)``, default zeros:
  the graph uses ``p + offset`` where it used ``p``. A per-row batch feeds ``p`` nothing (its
  identity) and row ``b``'s offset is its adapter's value minus the identity (zeros for a row
  whose adapter does not set ``p``). The manifest's ``row_values`` maps each offset input to
  ``{"input": p's input, "identity": its identity}``.

(see :func:`edgepeft.contract.names.rows_input_name`).

The manifest records each exported feature's parts (``manifest["features"]``, see :meth:`Feature.table`)
and each input's rule, so the runtimes (Python and JavaScript) and ``verify`` need no copy of them.

The torch maths of a feature (``on_input`` before the base layer, ``on_output`` after it) lives
with the kind; it is held here only as callables, so this module never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

MIX_RULES = ("cat0", "cat1w", "cat1", "cat0w", "sumw", "one")
SYMBOLS = ("in", "out", "r", "R")
RANK = "r"
FIXED_RANK = "R"
WIDTHS = ("in", "out")
# The fused graph's per-group inputs (see the module docstring): low-rank A^T / B^T and three scales.
FUSED_LOW_RANK = ("AT", "BT")
FUSED_SCALES = ("in", "mag", "out")
# The residual bottleneck on a group's output, one set of inputs per activation: down^T (out, r),
# its bias (r,), up^T (r, out), its bias (out,).
FUSED_BOTTLENECK_ACTS = ("relu", "gelu", "silu")
FUSED_BOTTLENECK = tuple(f"{act}_{p}" for act in FUSED_BOTTLENECK_ACTS for p in ("DT", "db", "UT", "ub"))
# the shape of the part that feeds each fused input (AT / BT / DT / UT are A / B / down / up transposed)
_FUSED_PART_SHAPES = {"AT": (RANK, "in"), "BT": ("out", RANK), "in": ("in",), "mag": ("out",), "out": ("out",),
                      **{f"{a}_{p}": shape for a in FUSED_BOTTLENECK_ACTS
                         for p, shape in (("DT", (RANK, "out")), ("db", (RANK,)), ("UT", ("out", RANK)),
                                          ("ub", ("out",)))}}
# each fused input's mix rule and rank axis (None: no rank) in the graph's (transposed) layout
FUSED_MIX = {"AT": ("cat1", 1), "BT": ("cat0w", 0), **{s: ("one", None) for s in FUSED_SCALES},
             **{f"{a}_{p}": rule for a in FUSED_BOTTLENECK_ACTS
                for p, rule in (("DT", ("cat1", 1)), ("db", ("cat0", 0)), ("UT", ("cat0w", 0)), ("ub", ("sumw", None)))}}
# fused form -> {part name: the fused input it feeds}; a feature's parts must match its form's.
FUSED_FORMS = {
    "low_rank": {"A": "AT", "B": "BT"},  # LoRA
    "low_rank+mag": {"A": "AT", "B": "BT", "mag": "mag"},  # DoRA: low rank and a scale before the bias
    "in_scale": {"scale": "in"},  # a scale of the input
    "out_scale": {"scale": "out"},  # a scale of the output, bias and low rank included
    **{f"bottleneck_{a}": {"down": f"{a}_DT", "down_bias": f"{a}_db", "up": f"{a}_UT", "up_bias": f"{a}_ub"}
       for a in FUSED_BOTTLENECK_ACTS},  # a residual bottleneck MLP on the output
}


@dataclass(frozen=True)
class Part:
    """One graph input of a feature, per adapted layer.

    Attributes:
        name: the part's name (the last component of the input name).
        shape: symbols of :data:`SYMBOLS`, e.g. ``("r", "in")``.
        identity: fill value of the identity default (0 or 1); rank axes are empty. None for a
            shared part (its default is a value taken from the adapters).
        mix: the mixing rule, one of :data:`MIX_RULES`.
        shared: one graph input per distinct layer shape instead of one per layer (see the
            module docstring).
    """

    name: str
    shape: tuple[str, ...]
    identity: float | None
    mix: str
    shared: bool = False

    def __post_init__(self):
        if self.mix not in MIX_RULES:
            raise ValueError(f"part {self.name}: mix {self.mix!r} is not one of {MIX_RULES}")
        if not self.shape or any(s not in SYMBOLS for s in self.shape):
            raise ValueError(f"part {self.name}: shape {self.shape} must use {SYMBOLS}")
        if self.shape.count(RANK) + self.shape.count(FIXED_RANK) > 1:
            raise ValueError(f"part {self.name}: at most one rank axis")
        if self.shared and (RANK in self.shape or self.identity is not None):
            raise ValueError(f"part {self.name}: a shared part has a real default, so no identity and "
                             f"no dynamic rank {RANK!r} (use {FIXED_RANK!r})")
        if FIXED_RANK in self.shape and self.mix.startswith("cat"):
            raise ValueError(f"part {self.name}: a fixed rank cannot grow by concatenation ({self.mix})")
        if self.shared and self.mix != "one":
            raise ValueError(f"part {self.name}: a shared part mixes by 'one' (an adapter that leaves it "
                             "to the default has no value to combine)")
        if not self.shared and self.identity is None:
            raise ValueError(f"part {self.name}: an identity value is needed (only shared parts have none)")

    def dims(self, in_features: int, out_features: int, rank: int | None,
             fixed_rank: int | None = None) -> list[int | None]:
        """The concrete shape on a layer ``in -> out``; ``rank`` None leaves rank axes None."""
        sizes = {"in": in_features, "out": out_features, RANK: rank, FIXED_RANK: fixed_rank}
        return [sizes[s] for s in self.shape]

    @property
    def rank_axis(self) -> int | None:
        return self.shape.index(RANK) if RANK in self.shape else None

    @property
    def fixed_rank_axis(self) -> int | None:
        return self.shape.index(FIXED_RANK) if FIXED_RANK in self.shape else None


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
        fused: the feature's form in the fused graph (a key of :data:`FUSED_FORMS`, see the
            module docstring), None if the fused graph cannot take it.
        rows: each row of a batch may run its own adapter (see the module docstring): the graph
            weights the rank columns per row (its torch maths then receives ``parts["rows"]``
            ``(N, 1, r)`` too) and offsets its scales per row (the maths receives ``p + offset``,
            ``(N, 1, width)``, in place of the part ``p``).
    """

    name: str
    parts: tuple[Part, ...]
    order: int
    on_input: Callable | None = None
    on_output: Callable | None = None
    fused: str | None = None
    rows: bool = False

    def __post_init__(self):
        if (self.on_input is None) == (self.on_output is None):
            raise ValueError(f"feature {self.name}: exactly one of on_input / on_output")
        names = [p.name for p in self.parts]
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"feature {self.name}: part names must be distinct and non-empty")
        symbols = {s for p in self.parts for s in p.shape}
        if RANK in symbols and FIXED_RANK in symbols:
            raise ValueError(f"feature {self.name}: its rank is either dynamic ({RANK!r}) or fixed "
                             f"({FIXED_RANK!r}), not both")
        if self.fused is not None:
            self._check_fused()
        if self.rows and (FIXED_RANK in symbols or any(
                p.mix not in ("cat0", "cat1", "cat0w", "cat1w") for p in self.parts if p.rank_axis is not None)
                or any(p.mix != "one" or p.shared or len(p.shape) != 1 for p in self.row_valued)):
            raise ValueError(f"feature {self.name}: per-row adapters need rank parts that concatenate (cat "
                             "rules: linear in the rank columns) and other parts that are per-layer 'one' vectors (scales)")

    def _check_fused(self) -> None:
        """The fused form exists, places every part, and its scales are identity-shifted ``one`` parts."""
        if self.fixed_rank:
            raise ValueError(f"feature {self.name}: the fused graph takes dynamic ranks only")
        form = FUSED_FORMS.get(self.fused)
        if form is None:
            raise ValueError(f"feature {self.name}: fused form {self.fused!r} is not one of {list(FUSED_FORMS)}")
        if set(form) != {p.name for p in self.parts}:
            raise ValueError(f"feature {self.name}: fused form {self.fused!r} places parts {sorted(form)}, "
                             f"the feature has {sorted(p.name for p in self.parts)}")
        for part, place in form.items():
            p, want = self.part(part), _FUSED_PART_SHAPES[place]
            if p.shape != want:
                raise ValueError(f"feature {self.name}: part {part} feeds the fused {place}, so its shape "
                                 f"is {want}, not {p.shape}")
            if place in FUSED_SCALES and p.mix != "one":
                raise ValueError(f"feature {self.name}: part {part} is a fused scale, so it mixes by 'one'")
        low_rank_one = any(self.part(n).mix == "one" for n, place in form.items() if place in FUSED_LOW_RANK)
        if low_rank_one and not any(place in FUSED_SCALES for place in form.values()):
            raise ValueError(f"feature {self.name}: its low-rank parts mix by 'one', which the fused graph's "
                             "concatenated AT / BT cannot enforce without a scale part that mixes by 'one'")

    @property
    def row_weighted(self) -> bool:
        """Whether the feature has rank columns a per-row weights input weights (``rows`` and a rank)."""
        return self.rows and any(p.rank_axis is not None for p in self.parts)

    @property
    def row_valued(self) -> tuple[Part, ...]:
        """The parts that take a per-row offset (``rows``: the parts without a rank axis)."""
        return tuple(p for p in self.parts if p.rank_axis is None) if self.rows else ()

    @property
    def fixed_rank(self) -> bool:
        """Whether the feature's rank is fixed per artifact (``"R"``, see the module docstring)."""
        return any(p.fixed_rank_axis is not None for p in self.parts)

    def part(self, name: str) -> Part:
        return next(p for p in self.parts if p.name == name)

    def rank_of(self, arrays: dict) -> int | None:
        """The rank of one adapter's arrays ``{part: array}`` on this feature (None: no rank axis)."""
        for p in self.parts:
            if p.rank_axis is not None and p.name in arrays:
                return int(arrays[p.name].shape[p.rank_axis])
        return None

    def fixed_rank_of(self, arrays: dict) -> int | None:
        """The fixed rank (``"R"``) of one adapter's arrays ``{part: array}`` (None: not a fixed-rank feature)."""
        for p in self.parts:
            if p.fixed_rank_axis is not None and p.name in arrays:
                return int(arrays[p.name].shape[p.fixed_rank_axis])
        return None

    def table(self, fixed_rank: int | None = None) -> list[list]:
        """What the manifest records: ``[[part, [symbols], mix], ...]``, a shared part with a
        fourth entry ``"shared"``; the fixed rank ``"R"`` is written as its size ``fixed_rank``."""
        if self.fixed_rank and fixed_rank is None:
            raise ValueError(f"feature {self.name}: the table of a fixed-rank feature needs its rank")
        return [[p.name, [fixed_rank if s == FIXED_RANK else s for s in p.shape], p.mix]
                + (["shared"] if p.shared else []) for p in self.parts]


def widths(shape, in_features: int, out_features: int) -> list[int]:
    """The layer widths a part's shape names (its ``"in"`` / ``"out"`` axes, in order): what tells
    the shared inputs of one part apart (see :func:`edgepeft.contract.names.shared_input_name`)."""
    return [in_features if s == "in" else out_features for s in shape if s in WIDTHS]


def table_parts(table: list[list], in_features: int, out_features: int) -> list[tuple[str, list[int | None], bool]]:
    """``(part, shape, shared)`` from a manifest's feature table (see :meth:`Feature.table`): None on
    dynamic rank axes, fixed ranks as written."""
    sizes = {"in": in_features, "out": out_features, RANK: None}
    return [(entry[0], [s if isinstance(s, int) else sizes[s] for s in entry[1]], entry[3:] == ["shared"])
            for entry in table]
