"""Target profiles: ``edgepeft/targets/profiles/NAME.toml`` (package data) -> :class:`Target` (providers, opset, precision, shapes, format).

A profile is data. ``edgepeft export --target NAME_OR_FILE`` applies one (``cpu-x86_64`` by
default); the manifest records the resolved fields, and what of them this version does not apply
yet (``not_applied``: the accelerator's fp16 compute, static shapes of merged graphs; see the
README's Targets section). torch-free: the runtime and ``edgepeft targets`` use it too.
"""

from __future__ import annotations

import tomllib
from importlib import resources
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from edgepeft.errors import EdgepeftError

# The shipped profiles, inside the package (a wheel carries them); a profile file by path works too.
TARGETS_DIR = Path(str(resources.files("edgepeft.targets") / "profiles"))
DEFAULT_TARGET = "cpu-x86_64"
PLATFORMS = {"x86_64": "amd64", "arm64": "arm", "wasm": None}  # -> convert_onnx_models_to_ort --target_platform
ORT_OPTIMIZATIONS = ("fixed", "runtime")
FP16_POLICIES = ("off", "accelerator")
ACCELERATORS = ("nnapi", "coreml", "coreml-nn")  # what the partition report can estimate


def _f(help: str, default=MISSING):
    return field(default=default, metadata={"help": help}) if default is not MISSING else field(
        metadata={"help": help})


@dataclass(frozen=True)
class Target:
    """A deployment target. Each field's help is in its metadata (``edgepeft targets NAME``)."""

    name: str = _f("profile name (default: the file name without .toml)")
    description: str = _f("one line shown by `edgepeft targets`", "")
    providers: tuple[str, ...] = _f("onnxruntime execution providers in order of preference; the "
                                    "runtime uses those this onnxruntime build has, else CPU",
                                    ("CPUExecutionProvider",))
    platform: str = _f(f"instruction set of the device: {', '.join(PLATFORMS)} (ORT-format "
                       "conversion: QDQ int8 kernels allowed on arm64, x86-only layouts only on x86_64)",
                       "x86_64")
    opset: int | None = _f("ONNX opset of the exported graph (absent: the exporter's default, 20)", None)
    precision: str = _f("default --precision: fp32, fp16, int8, int8-static, int4 (an explicit "
                        "--precision wins)", "fp32")
    int8_scheme: str = _f("default --int8-scheme for int8: weight-only or dynamic", "weight-only")
    static_activations: str = _f("default --static-activations for int8-static: int16 or int8", "int16")
    fp16: str = _f("fp16 policy: off (fp32 compute), accelerator (the accelerator may compute an "
                   "fp32 graph in fp16; recorded for the app, not applied by this version)", "off")
    ort_format: bool = _f("also write model.ort (onnxruntime's mobile format) + "
                          "required_operators_and_types.config for a minimal build", False)
    ort_optimization: str = _f("ORT-format optimization style: fixed (all optimizations baked in, "
                               "for CPU) or runtime (basic ones baked in, the rest replayed at "
                               "load: for NNAPI / Core ML, which take whole subgraphs)", "fixed")
    partition_report: tuple[str, ...] = _f(
        f"accelerators whose node coverage and partitions are estimated into partitions.json "
        f"({', '.join(ACCELERATORS)})", ())
    static_shapes: bool = _f("the accelerator needs fixed shapes: side-branch artifacts get a graph "
                             "per sequence bucket with fixed batch, a fixed KV cache of "
                             "context_length (decoders) and LoRA ranks padded to max_rank; the "
                             "runtime pads and slides the cache (merged artifacts stay dynamic)", False)
    batch: int = _f("static shapes: batch size", 1)
    sequence_buckets: tuple[int, ...] = _f("static shapes: the sequence lengths a graph is built "
                                           "for (prompts are padded up to the next one)", ())
    context_length: int | None = _f("static shapes, decoders: size of the fixed KV cache "
                                    "(prompt + generated tokens)", None)
    max_rank: int | None = _f("largest LoRA / DoRA rank (bottleneck size) per adapted layer; export "
                              "refuses an adapter above it (absent: no limit)", None)

    def __post_init__(self):
        where = f"target {self.name!r}"
        types = {"name": str, "description": str, "platform": str, "precision": str, "int8_scheme": str,
                 "static_activations": str, "fp16": str, "ort_optimization": str, "ort_format": bool,
                 "static_shapes": bool, "batch": int, "opset": (int, type(None)),
                 "context_length": (int, type(None)), "max_rank": (int, type(None))}
        for key, t in types.items():
            v = getattr(self, key)
            if not isinstance(v, t) or (t is int and isinstance(v, bool)) or (
                    isinstance(v, bool) and t is not bool):
                raise EdgepeftError(f"{where}: {key} = {v!r}: expected {_type_name(t)}.")
        for key, item in (("providers", str), ("partition_report", str), ("sequence_buckets", int)):
            v = getattr(self, key)
            if not isinstance(v, (list, tuple)) or not all(
                    isinstance(x, item) and not isinstance(x, bool) for x in v):
                raise EdgepeftError(f"{where}: {key} = {v!r}: expected a list of "
                                    f"{'strings' if item is str else 'integers'}.")
            object.__setattr__(self, key, tuple(v))
        from edgepeft.contract.names import INT8_SCHEMES, PRECISIONS, STATIC_ACTIVATIONS

        for key, allowed in (("platform", tuple(PLATFORMS)), ("precision", PRECISIONS),
                             ("int8_scheme", INT8_SCHEMES), ("static_activations", STATIC_ACTIVATIONS),
                             ("fp16", FP16_POLICIES), ("ort_optimization", ORT_OPTIMIZATIONS)):
            if getattr(self, key) not in allowed:
                raise EdgepeftError(f"{where}: {key} = {getattr(self, key)!r}: choose one of "
                                    f"{', '.join(allowed)}.")
        if not self.providers:
            raise EdgepeftError(f"{where}: providers is empty; list at least CPUExecutionProvider.")
        import onnxruntime as ort

        known = ort.get_all_providers()
        for p in self.providers:
            if p not in known:
                raise EdgepeftError(f"{where}: provider {p!r} is not an onnxruntime execution provider "
                                    f"(known: {', '.join(known)}).")
        if self.providers[-1] != "CPUExecutionProvider":
            raise EdgepeftError(f"{where}: providers must end with CPUExecutionProvider (it runs what "
                                f"the accelerator cannot); got {', '.join(self.providers)}.")
        for a in self.partition_report:
            if a not in ACCELERATORS:
                raise EdgepeftError(f"{where}: partition_report {a!r}: choose from {', '.join(ACCELERATORS)}.")
        if self.opset is not None and not 17 <= self.opset <= 23:
            raise EdgepeftError(f"{where}: opset {self.opset}: the exporter writes opsets 17 to 23.")
        for key in ("batch", "context_length", "max_rank"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise EdgepeftError(f"{where}: {key} = {v}: must be >= 1.")
        if any(s < 1 for s in self.sequence_buckets) or list(self.sequence_buckets) != sorted(set(self.sequence_buckets)):
            raise EdgepeftError(f"{where}: sequence_buckets {list(self.sequence_buckets)}: distinct "
                                "lengths >= 1 in increasing order.")
        if self.static_shapes and not self.sequence_buckets:
            raise EdgepeftError(f"{where}: static_shapes needs sequence_buckets (e.g. [1, 64, 128]).")
        if self.static_shapes and (self.context_length is None or self.max_rank is None):
            raise EdgepeftError(f"{where}: static_shapes needs context_length (the fixed KV cache of "
                                "decoders) and max_rank (the fixed LoRA rank).")
        if self.context_length is not None and self.sequence_buckets and self.context_length <= self.sequence_buckets[-1]:
            raise EdgepeftError(f"{where}: context_length {self.context_length} must be longer than "
                                f"the longest sequence bucket {self.sequence_buckets[-1]} (the past "
                                "tokens need room).")

    def not_applied(self, mode: str = "side") -> dict[str, str]:
        """Fields this version records but does not apply to a ``mode`` export, with why (the
        manifest keeps this)."""
        out = {}
        if self.static_shapes and mode == "merged":
            out["static_shapes"] = ("merged graphs are exported with dynamic shapes (static shapes "
                                    "apply to side-branch artifacts); accelerators that need fixed "
                                    "shapes run only what partitions.json counts as supported")
        if self.fp16 == "accelerator":
            out["fp16"] = "fp16 compute on the accelerator is a provider option the app sets; not set by the runtime"
        return out

    def manifest(self, mode: str = "side") -> dict:
        """The resolved fields, as the manifest of a ``mode`` export records them."""
        d = asdict(self)
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        d["not_applied"] = self.not_applied(mode)
        return d

    def line(self) -> str:
        """One line for ``edgepeft targets``."""
        eps = ", ".join(p.removesuffix("ExecutionProvider") for p in self.providers)
        shapes = (f"wants static b{self.batch} s{'/'.join(map(str, self.sequence_buckets))}"
                  + (f" c{self.context_length}" if self.context_length else "")) if self.static_shapes else "dynamic"
        rank = f"rank<={self.max_rank}" if self.max_rank else "any rank"
        return (f"{self.name:<14} {eps:<13} {self.precision:<11} {'+ort' if self.ort_format else 'onnx':<4} "
                f"{shapes:<27} {rank:<9} {self.description}")


def _type_name(t) -> str:
    names = {str: "a string", bool: "true or false", int: "an integer", type(None): "absent"}
    return " or ".join(names[x] for x in (t if isinstance(t, tuple) else (t,)))


def field_help() -> list[tuple[str, str]]:
    """(key, help) of every profile key, in file order."""
    return [(f.name, f.metadata["help"]) for f in fields(Target)]


def parse_target(data: dict, source: Path) -> Target:
    """A :class:`Target` from a parsed TOML table; errors name ``source``.

    Raises:
        EdgepeftError: an unknown key (with the valid ones), a value of the wrong type or out of range.
    """
    keys = [f.name for f in fields(Target)]
    for key in data:
        if key not in keys:
            raise EdgepeftError(f"{source}: unknown key {key!r}. Valid keys: {', '.join(keys)} "
                                "(`edgepeft targets cpu-x86_64` shows what each means).")
    data = {"name": source.stem, **data}
    try:
        return Target(**data)
    except EdgepeftError as e:
        raise EdgepeftError(f"{source}: {e} Fix the profile.") from None


def load_target(name_or_file: str | Path | None = None) -> Target:
    """A shipped profile by name, or a profile file (``.toml``); None: ``cpu-x86_64``.

    Raises:
        EdgepeftError: no such profile or file, not TOML, or a bad profile.
    """
    value = str(name_or_file) if name_or_file else DEFAULT_TARGET
    path = Path(value)
    if not (path.suffix == ".toml" or path.is_file() or "/" in value):
        path = TARGETS_DIR / f"{value}.toml"
        if not path.is_file():
            raise EdgepeftError(f"--target {value}: no such packaged profile (profiles: "
                                f"{', '.join(shipped_names()) or 'none'}), and no such file. Pass a "
                                "profile name or a .toml file.")
    if not path.is_file():
        raise EdgepeftError(f"--target {value}: file not found. Pass a profile name "
                            f"({', '.join(shipped_names())}) or an existing .toml file.")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise EdgepeftError(f"{path}: not valid TOML ({e}). Fix the profile.") from None
    return parse_target(data, path)


def shipped_names() -> list[str]:
    """Names of the packaged profiles."""
    return sorted(p.stem for p in TARGETS_DIR.glob("*.toml")) if TARGETS_DIR.is_dir() else []


def shipped() -> list[Target]:
    """Every shipped profile, loaded (the default first)."""
    names = shipped_names()
    names.sort(key=lambda n: n != DEFAULT_TARGET)
    return [load_target(n) for n in names]


def quant_defaults(target: Target, precision: str | None, int8_scheme: str | None,
                   static_activations: str | None) -> dict:
    """QuantConfig fields: the explicit options, else the target's defaults (schemes only where
    they apply to the precision chosen)."""
    p = precision or target.precision
    return {"precision": p,
            "int8_scheme": int8_scheme or (target.int8_scheme if p == "int8" else "weight-only"),
            "static_activations": static_activations or (
                target.static_activations if p == "int8-static" else "int16")}


def check_ranks(target: Target, sides: dict) -> None:
    """Refuse an adapter with a rank (any part's rank axis: LoRA's r, a bottleneck's hidden size) above
    ``max_rank``.

    Args:
        sides: ``{adapter name: SideBranch}`` of the export.

    Raises:
        EdgepeftError: naming adapter, layer, rank, max_rank and the profile.
    """
    from edgepeft import kinds

    if target.max_rank is None:
        return
    for name, side in sides.items():
        for (module, feature), parts in side.layers.items():
            rank = kinds.feature(feature).rank_of(parts)
            if rank is not None and rank > target.max_rank:
                raise EdgepeftError(
                    f"adapter {name!r}: layer {module} has {feature} rank {rank} as exported, above "
                    f"max_rank {target.max_rank} of target {target.name!r}. Retrain it so that its "
                    f"exported rank is at most {target.max_rank} (`edgepeft inspect` shows it), or use a profile with a larger max_rank (a copy of "
                    f"targets/{target.name}.toml with max_rank raised, passed as --target FILE).")
