"""What to export (:class:`ExportConfig`) and the checks that need no model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgepeft.errors import EdgepeftError
from edgepeft.quantize import QuantConfig
from edgepeft.targets import Target, load_target, quant_defaults

MODES = ("side", "merged")
GRAPHS = ("auto", "generic", "fused")
TASKS = ("auto", "causal-lm", "classification")


def parse_slots(spec: str) -> tuple[tuple[str | None, tuple[str, ...]], ...]:
    """``--slots SPEC`` as ``((kind, targets), ...)``; kind None: the default kind's (the kind module
    that declares ``DEFAULT_SLOTS``, LoRA).

    SPEC is ``all-linear`` or a comma list of module names (default-kind slots), optionally grouped
    by kind: ``lora:all-linear,ia3:k_proj,v_proj,down_proj`` (a ``kind:`` starts a group; the names
    after it, up to the next ``kind:``, are its targets).

    Raises:
        EdgepeftError: an empty group or name, or ``all-linear`` beside other names of one kind.
    """
    groups: list[tuple[str | None, list[str]]] = []
    for token in spec.split(","):
        kind, sep, name = token.strip().rpartition(":")
        if sep:
            groups.append((kind.strip().lower(), []))
        elif not groups:
            groups.append((None, []))
        if not name.strip() or (sep and not kind.strip()):
            raise EdgepeftError(f"--slots {spec!r}: an empty kind or module name. Expected e.g. all-linear, "
                                "q_proj,v_proj or lora:all-linear,ia3:k_proj,v_proj,down_proj.")
        groups[-1][1].append(name.strip())
    for kind, names in groups:
        if "all-linear" in names and len(names) > 1:
            raise EdgepeftError(f"--slots {spec!r}: all-linear already names every linear layer; "
                                "drop the other names.")
    if len({k for k, _ in groups}) != len(groups):
        raise EdgepeftError(f"--slots {spec!r}: a kind appears twice; list its modules in one group.")
    return tuple((k, tuple(n)) for k, n in groups)


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
        opset: ONNX opset for the exporter; None: the target's (and if it names none, the
            exporter's default).
        task: ``causal-lm`` (``AutoModelForCausalLM``, KV cache, generation), ``classification``
            (``AutoModelForSequenceClassification``), or ``auto``: the adapters' PEFT task_type,
            else the base's architecture.
        quant: precision of the graphs and adapter files (``edgepeft.quantize``); None: the
            target's default precision and schemes.
        allow_base_mismatch: export adapters that record another base (see
            :func:`edgepeft.export.base.binding_mismatch`) instead of refusing them.
        target: the deployment profile (``edgepeft.targets``): providers recorded for the
            runtime, opset, default precision, ORT-format bundle, partition report, max_rank;
            None: ``cpu-x86_64``.
        graph: ``fused`` (causal LMs of a family in ``edgepeft.families`` with LoRA, LoHa, DoRA, IA3
            adapters: a graph of onnxruntime's fused kernels, GroupQueryAttention with an in-place
            KV cache, q|k|v and gate|up packed; ``edgepeft.export.fused``; decodes several times
            faster on CPU), ``generic`` (the traced model: every architecture, adapter kind,
            target and precision), or ``auto`` (default): fused wherever the family, the adapter
            kinds, the target and the precision allow, else generic, with the reason
            (:func:`edgepeft.export.build.choose_graph`).
    """

    base: Path
    out: Path
    adapters: tuple[tuple[str, Path], ...] = field(default_factory=tuple)
    mode: str = "side"
    force: bool = False
    opset: int | None = None
    task: str = "auto"
    quant: QuantConfig | None = None
    allow_base_mismatch: bool = False
    target: Target | None = None
    graph: str = "auto"
    slots: str | None = None

    def __post_init__(self):
        self._fill_from_target()
        self._check_choices()
        if self.graph == "fused" and self.why_not_fused():
            raise EdgepeftError(f"--graph fused: {self.why_not_fused()}; use --graph generic for it.")
        self._check_adapters_and_out()

    def _fill_from_target(self) -> None:
        """target, quant and opset left None: the target's (``cpu-x86_64`` without a target)."""
        if self.target is None:
            object.__setattr__(self, "target", load_target(None))
        if self.quant is None:
            object.__setattr__(self, "quant", QuantConfig(**quant_defaults(self.target, None, None, None)))
        if self.opset is None:
            object.__setattr__(self, "opset", self.target.opset)

    def _check_choices(self) -> None:
        if self.task not in TASKS:
            raise EdgepeftError(f"--task {self.task!r}: choose one of {', '.join(TASKS)}.")
        if self.mode not in MODES:
            raise EdgepeftError(f"--mode {self.mode!r}: choose one of {', '.join(MODES)}.")
        if self.graph not in GRAPHS:
            raise EdgepeftError(f"--graph {self.graph!r}: choose one of {', '.join(GRAPHS)}.")

    def why_not_fused(self) -> str | None:
        """What of this config a fused graph cannot do, known before loading the model: static
        shapes, calibration feeds, fp16 (None: nothing)."""
        if self.target.static_shapes:
            return f"target {self.target.name!r} fixes every shape, and fused graphs have dynamic shapes"
        if self.quant.precision == "int8-static":
            return "int8-static calibrates on the generic graph's feeds"
        if self.quant.precision == "fp16":
            return "fp16 (the fused graph is fp32, int8 or int4)"
        return None

    def _check_adapters_and_out(self) -> None:
        names = [n for n, _ in self.adapters]
        if len(set(names)) != len(names):
            raise EdgepeftError(f"--adapter: names repeat ({', '.join(names)}); give each a new name.")
        if self.slots is not None:
            if self.mode == "merged":
                raise EdgepeftError("--slots reserves inputs of a side-branch graph; --mode merged has none. "
                                    "Drop --slots or use --mode side.")
            parse_slots(self.slots)
        if self.mode == "merged" and not self.adapters:
            raise EdgepeftError("--mode merged needs at least one --adapter NAME=DIR.")
        if self.out.exists() and not self.force:
            raise EdgepeftError(f"{self.out}: already exists. Pass --force to replace it, or "
                                "choose another --out.")
