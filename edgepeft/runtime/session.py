"""onnxruntime sessions of an artifact: which execution providers, which file (``.onnx`` or
``.ort``), and the integrity checks a graph passes before and after onnxruntime opens it
(sha256, external data inside the artifact, KV cache / vocabulary / adapter inputs as the
manifest says). numpy + onnxruntime only.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnxruntime as ort

from edgepeft.contract import MANIFEST_NAME, inside, past_names, sha256_file, target_providers
from edgepeft.errors import EdgepeftError
from edgepeft.runtime.onnx_proto import external_data_locations, external_initializers

FORMATS = ("auto", "onnx", "ort")
# TensorProto.DataType -> numpy, for weights shared from a memory-mapped data file
_NP_TYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32, 7: np.int64,
             9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64}


class ProviderFallbackWarning(RuntimeWarning):
    """An execution provider the artifact's target (or the caller) asks for is not in this
    onnxruntime build; the model runs on the providers that are, CPU last."""


def choose_providers(root: Path, manifest: dict, providers: Sequence[str] | None) -> list[str]:
    """The wanted providers this build has, in order, CPU last; one warning for the rest.

    Called from ``Model.__init__``: the warning points at the line that made the Model.
    """
    wanted = list(providers) if providers else target_providers(manifest)
    available = ort.get_available_providers()
    chosen = [p for p in wanted if p in available and p != "CPUExecutionProvider"]
    chosen.append("CPUExecutionProvider")
    missing = [p for p in wanted if p not in available]
    if missing:
        source = "asked for" if providers else "the artifact's target asks for"
        warnings.warn(f"{root}: {source} {', '.join(missing)}, which this onnxruntime build "
                      f"does not have (it has {', '.join(available)}); running on "
                      f"{', '.join(chosen)}.", ProviderFallbackWarning, stacklevel=3)
    return chosen


class Opened(NamedTuple):
    """A checked session and what its graph says about the adapter inputs.

    ``shapes``: dynamic graphs: every overridable initializer's shape (a ``str`` dim varies per
    adapter, e.g. a rank); fixed-shape graphs: the fixed shape of each manifest adapter input.
    ``defaults``: the adapter inputs with an initializer default (the identity); the others must
    be fed.
    """

    session: ort.InferenceSession
    shapes: dict[str, Sequence]
    defaults: frozenset[str]


@functools.cache
def _register_env_arena() -> None:
    """Register onnxruntime's process-wide CPU arena, once per process. Sessions opened with
    ``session.use_env_allocators`` take their working memory (activations, scratch) from it rather
    than from an arena each: a static artifact's bucket sessions run one at a time, so one arena
    holds what the largest bucket needs instead of every bucket keeping its own (2 MB or so per
    MiniLM session, measured in ``benchmarks/bench_static_memory.py``). Once per process (cached)."""
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, None)  # None: onnxruntime's default arena settings


class SessionOpener:
    """Opens the graphs of one artifact with one set of providers and options.

    Args:
        root: the artifact directory.
        manifest: its manifest.
        providers: from :func:`choose_providers`.
        cache: ``[(kv_heads, head_dim)]`` per layer (causal LMs), checked against every graph.
        threads: intra-op threads, default onnxruntime's choice.
        format: one of :data:`FORMATS` (see ``Model``; checked there).

    ``format`` becomes ``"onnx"`` or ``"ort"``: what the last session was loaded from.
    """

    def __init__(self, root: Path, manifest: dict, providers: list[str], cache: list[tuple[int, int]],
                 threads: int | None, format: str):
        self.root, self.manifest, self.providers, self.cache = root, manifest, providers, cache
        self._want = format
        self._threads = threads
        self.format: str | None = None
        self.options = self._new_options()

    def _new_options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.log_severity_level = 3  # adapter defaults are overridable initializers by design
        if self._threads:
            options.intra_op_num_threads = self._threads
        return options

    def shared_weights(self, graphs: list[dict]) -> dict[str, ort.OrtValue] | None:
        """One copy of the weights for the sessions of ``graphs`` (a static artifact's bucket
        graphs, which keep their weights in one data file): every initializer the first graph
        stores there, as read-only views of one memory map of the file; None when the sessions
        are to load ``.ort`` files (``format="ort"``, or ``auto`` on a bundle of ``.ort`` files
        only: the weights are inside each file).

        :meth:`open` with these gives each session the same buffers (onnxruntime's
        ``add_initializer``) and turns prepacking off for it: a prepacked weight is a copy per
        session, and onnxruntime's Python API has no container to share those. Those sessions
        also share one CPU arena for their working memory (:func:`_register_env_arena`).

        Raises:
            EdgepeftError: the graph or its data file is missing, altered or inconsistent.
        """
        if self._want == "ort" or not graphs:
            return None
        where = f"{self.root / MANIFEST_NAME}"
        if self._want == "auto" and all(g.get("ort") for g in graphs) and not all(
                inside(self.root, f, where).is_file() for g in graphs for f in (g["file"], g["data_file"])):
            return None  # a bundle of .ort files only: auto loads those
        file = self._onnx_file(graphs[0], where)
        data = inside(self.root, graphs[0]["data_file"], where).resolve()
        tensors = [t for t in external_initializers(file) if (file.parent / t.location).resolve() == data]
        if not tensors:
            return None
        mapped = np.memmap(data, np.uint8, "r")
        values = {}
        for t in tensors:
            dtype = _NP_TYPES.get(t.data_type)
            if dtype is None:  # e.g. bfloat16: numpy has no type for it; that session loads it itself
                continue
            size = int(np.prod(t.dims, dtype=np.int64)) * np.dtype(dtype).itemsize
            if t.length not in (-1, size) or t.offset + size > mapped.size:
                raise EdgepeftError(f"{file}: initializer {t.name!r} does not fit {data.name} (offset {t.offset}, "
                                    f"{size} bytes of a {mapped.size}-byte file); the artifact is damaged. "
                                    "Export it again.")
            array = mapped[t.offset:t.offset + size].view(dtype).reshape(t.dims)
            values[t.name] = ort.OrtValue.ortvalue_from_numpy(array)  # no copy: a view of the map
        return values

    def open(self, graph: dict, adapter_inputs: Collection[str] | None = None, fixed: bool = False,
             shared: dict[str, ort.OrtValue] | None = None) -> Opened:
        """A session on one graph entry of the manifest, checked.

        Args:
            graph: ``{file, data_file, sha256, ort?, ...}`` from the manifest.
            adapter_inputs: the manifest's adapter input names, which the graph must take; None:
                not checked (merged graphs).
            fixed: the graph has fixed shapes (static targets): adapter inputs may be plain
                inputs, and none may have a symbolic dim.
            shared: weights from :meth:`shared_weights`: the session takes these buffers (its
                ``.onnx`` graph, not prepacked) instead of loading its own copy.

        Raises:
            EdgepeftError: a missing, altered or unloadable file, external data outside the
                artifact, or a graph that does not match the manifest.
        """
        where = f"{self.root / MANIFEST_NAME}"
        options = self.options
        if shared is not None:
            file = self._onnx_file(graph, where)
            options = self._new_options()
            options.add_session_config_entry("session.disable_prepacking", "1")
            _register_env_arena()  # one CPU arena for all sessions of the shared weights
            options.add_session_config_entry("session.use_env_allocators", "1")
            for name, value in shared.items():
                options.add_initializer(name, value)
        elif graph.get("ort") and self._want != "onnx":
            file = self._ort_file(graph, where)
        elif self._want == "ort":
            raise EdgepeftError(f"{self.root}: the artifact has no .ort graph for {graph['file']}; export "
                                "it with a target that has ort_format = true (e.g. --target cpu-arm64), "
                                "or load it with format='auto'.")
        else:
            file = self._onnx_file(graph, where)
        try:
            session = ort.InferenceSession(str(file), options, providers=self.providers)
        except Exception as e:  # onnxruntime's Fail, InvalidProtobuf, InvalidGraph, NoSuchFile, ...
            raise EdgepeftError(f"{file}: onnxruntime cannot load it ({type(e).__name__}: "
                                f"{str(e)[:300]}). Export the artifact again.") from None
        self._check_graph(file, session)
        return self._adapter_inputs(file, session, adapter_inputs, fixed)

    def _onnx_file(self, graph: dict, where: str) -> Path:
        """The ``.onnx`` file, once it and its data file are present, its sha256 matches and its
        external data stays inside the artifact."""
        file = inside(self.root, graph["file"], where)
        data = inside(self.root, graph["data_file"], where)
        for f in (file, data):
            if not f.is_file():
                raise EdgepeftError(f"{f}: missing from the artifact. Export it again.")
        # The graph proto is small (weights live in the data file), so checking it costs little and
        # keeps a damaged or edited graph from reaching onnxruntime. `edgepeft verify` checks all.
        if sha256_file(file) != graph["sha256"]:
            raise EdgepeftError(f"{file}: sha256 does not match the manifest ({where}); the file was "
                                "changed or damaged. Export the artifact again.")
        self.format = "onnx"
        for loc in external_data_locations(file):
            target = (file.parent / loc).resolve()
            if not loc or Path(loc).is_absolute() or not target.is_relative_to(self.root.resolve()):
                raise EdgepeftError(f"{file}: external data location {loc!r} points outside the "
                                    f"artifact directory {self.root}; the artifact is tampered with. "
                                    "Export it again.")
        return file

    def _ort_file(self, graph: dict, where: str) -> Path:
        """The graph's ``.ort`` file (weights inside it: no external data), sha256 checked."""
        file = inside(self.root, graph["ort"]["file"], where)
        if not file.is_file():
            raise EdgepeftError(f"{file}: missing from the artifact. Export it again.")
        # Weights live inside an .ort file, so this hashes the whole model once per load.
        if sha256_file(file) != graph["ort"]["sha256"]:
            raise EdgepeftError(f"{file}: sha256 does not match the manifest ({where}); the file was "
                                "changed or damaged. Export the artifact again.")
        self.format = "ort"
        return file

    def _check_graph(self, file: Path, session: ort.InferenceSession) -> None:
        """The manifest's KV cache and vocabulary must be the graph's own."""
        where = f"{self.root / MANIFEST_NAME}"
        causal = self.manifest["task"] == "causal-lm"
        inputs = {i.name: i.shape for i in session.get_inputs()}
        if causal:
            layers = sum(1 for n in inputs if n.startswith("past.") and n.endswith(".key"))
            bad = layers != len(self.cache) or any(
                inputs.get(past_names(i)[0], [None] * 4)[1::2] != [h, d] for i, (h, d) in enumerate(self.cache))
            if bad:
                raise EdgepeftError(f"{where}: kv_cache does not match the KV-cache inputs of {file} "
                                    f"({layers} layers); the manifest was edited. Export the artifact again.")
        outputs = {o.name: o.shape for o in session.get_outputs()}
        vocab = (outputs.get("logits") or [None])[-1]
        if causal and isinstance(vocab, int) and vocab != self.manifest["base"]["vocab_size"]:
            raise EdgepeftError(f"{where}: base.vocab_size is {self.manifest['base']['vocab_size']}, the "
                                f"graph {file} has {vocab}. Export the artifact again.")

    def _adapter_inputs(self, file: Path, session: ort.InferenceSession, names: Collection[str] | None,
                        fixed: bool) -> Opened:
        """The graph's adapter inputs, checked against the manifest's ``names``."""
        where = f"{self.root / MANIFEST_NAME}"
        overridable = {i.name: i.shape for i in session.get_overridable_initializers()}
        if names is None:
            return Opened(session, overridable, frozenset(overridable))
        if fixed:
            # Ranks are fixed at max_rank: those inputs have no default (the runtime feeds zeros).
            inputs = {i.name: i.shape for i in session.get_inputs()}
            shapes = {k: v for k, v in {**inputs, **overridable}.items() if k in names}
            missing = sorted(set(names) - set(shapes))
            if missing or any(isinstance(d, str) for v in shapes.values() for d in v):
                raise EdgepeftError(f"{where}: input {(missing or [next(iter(shapes))])[0]!r} is not a "
                                    f"fixed-shape adapter input of {file}. Export the artifact again.")
            return Opened(session, {k: tuple(v) for k, v in shapes.items()}, frozenset(overridable) & set(shapes))
        missing = sorted(set(names) - set(overridable))
        if missing:
            raise EdgepeftError(f"{where}: input {missing[0]!r} is not an adapter input of {file}. "
                                "Export the artifact again.")
        return Opened(session, overridable, frozenset(overridable))
