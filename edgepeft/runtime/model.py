"""``Model``: an edgepeft artifact in an app. onnxruntime + numpy (+ tokenizers for text) only.

A side-branch artifact is one onnxruntime session; an adapter is a set of graph inputs (and, for
prefix / decoder prompt tuning, a KV-cache seed). Choosing an adapter per call only changes which
arrays are fed: no session is rebuilt, no base weight is copied, and concurrent calls with
different adapters do not interfere (each call builds its own feed dict;
``InferenceSession.run`` is thread-safe). Inputs an adapter does not feed keep their default
initializer, the identity, so ``adapter=None`` is the base model.

A static-shape artifact (a target with ``static_shapes``: NNAPI, Core ML, QNN) has one session per
sequence bucket; the runtime pads what it is given to the fixed shapes and slides a fixed window
of KV cache (see :meth:`Model._static_prefill`), so calls look the same as on a dynamic artifact.

Adapters can be added (:meth:`Model.add_adapter`, from another artifact of the same base) and
removed (:meth:`Model.remove_adapter`) while other threads run: the loaded adapters are one
mapping that is replaced, never changed in place, and each call reads it once, so a call sees an
adapter either wholly or not at all (a call that started before a removal finishes with it).
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnxruntime as ort

from edgepeft.errors import EdgepeftError
from edgepeft.runtime import fused
from edgepeft.contract import (MANIFEST_NAME, PROMPT_INPUT, UNTAGGED, base_tag,
                                       check_adapter_name, inside, past_names, prefix_names,
                                       read_manifest, sha256_file, target_providers)

AdapterChoice = str | Mapping[str, float] | None
FORMATS = ("auto", "onnx", "ort")
_MIX_CACHE_SIZE = 8


class ProviderFallbackWarning(RuntimeWarning):
    """An execution provider the artifact's target (or the caller) asks for is not in this
    onnxruntime build; the model runs on the providers that are, CPU last."""


def _read_adapter_file(path: Path, where: str) -> tuple[dict[str, np.ndarray], int]:
    """Arrays of an ``.onnx_adapter`` file as numpy (copies, so the file can be closed), and its
    base tag (``adapter_version``)."""
    try:
        fmt = ort.AdapterFormat.read_adapter(str(path))
        params = fmt.get_parameters()
        return {k: np.array(v.numpy(), copy=True) for k, v in params.items()}, fmt.get_adapter_version()
    except Exception as e:  # onnxruntime raises its own Fail / RuntimeError types
        raise EdgepeftError(f"{path}: cannot read adapter file ({e}); {where}. Export the artifact "
                            "again.") from None


class _Adapter(NamedTuple):
    """A loaded side-branch adapter: its manifest entry, graph feeds and KV-cache seed."""

    entry: dict
    graph: dict[str, np.ndarray]
    prefix: list[tuple[np.ndarray, np.ndarray]] | None


# Protobuf field numbers (onnx.proto) of the messages that can hold a TensorProto, for
# :func:`external_data_locations`: {message: {field: sub-message}}.
_PB_MESSAGES = {
    "model": {7: "graph", 25: "function"},  # ModelProto.graph, .functions
    "function": {7: "node"},  # FunctionProto.node
    "graph": {1: "node", 5: "tensor", 15: "sparse"},  # GraphProto.node, .initializer, .sparse_initializer
    "node": {5: "attr"},  # NodeProto.attribute
    "attr": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},  # SparseTensorProto.values, .indices
}
_PB_TENSOR_EXTERNAL_DATA = 13  # TensorProto.external_data: repeated {key = 1, value = 2}


def _pb_fields(buf: memoryview, path: Path):
    """(field number, value) of one protobuf message; value is a memoryview for length-delimited."""
    def varint(i: int) -> tuple[int, int]:
        out = shift = 0
        while True:
            if i >= len(buf) or shift > 63:
                raise EdgepeftError(f"{path}: not a valid ONNX file (truncated or damaged). Export the "
                                    "artifact again.")
            b = buf[i]
            out |= (b & 0x7F) << shift
            i, shift = i + 1, shift + 7
            if b < 0x80:
                return out, i

    i = 0
    while i < len(buf):
        key, i = varint(i)
        wire, value = key & 7, None
        if wire == 0:
            value, i = varint(i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            size, i = varint(i)
            value, i = buf[i:i + size], i + size
        else:
            i = len(buf) + 1
        if i > len(buf):
            raise EdgepeftError(f"{path}: not a valid ONNX file (truncated or damaged). Export the "
                                "artifact again.")
        yield key >> 3, value


def external_data_locations(path: Path) -> list[str]:
    """The ``location`` of every tensor stored outside the ``.onnx`` file, read without onnx.

    Walks initializers, sparse initializers and tensors in node attributes, subgraphs (If / Loop /
    Scan bodies) and functions included.

    Raises:
        EdgepeftError: the file is not a parseable ONNX protobuf.
    """
    locations = []
    stack = [("model", memoryview(path.read_bytes()), 0)]
    while stack:
        kind, buf, depth = stack.pop()
        if depth > 64:
            raise EdgepeftError(f"{path}: ONNX graph nested more than 64 levels deep; refused.")
        for field, value in _pb_fields(buf, path):
            if not isinstance(value, memoryview):
                continue
            if kind == "tensor":
                if field == _PB_TENSOR_EXTERNAL_DATA:
                    entry = dict(_pb_fields(value, path))
                    if isinstance(entry.get(1), memoryview) and bytes(entry[1]) == b"location":
                        loc = entry.get(2)
                        locations.append(bytes(loc).decode("utf-8", "replace") if isinstance(loc, memoryview) else "")
            elif field in _PB_MESSAGES[kind]:
                stack.append((_PB_MESSAGES[kind][field], value, depth + 1))
    return locations


def case_name(choice) -> str:
    """How reports name an adapter choice: ``base``, the adapter's name, or ``mix(a=0.7,b=0.3)``."""
    if choice is None:
        return "base"
    if isinstance(choice, str):
        return choice
    return "mix(" + ",".join(f"{k}={v:g}" for k, v in choice.items()) + ")"


def batch_inputs(input_ids, attention_mask=None, vocab: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Normalize ids to ``(B, S)`` int64 ids and mask; ragged lists of rows are left-padded.

    Args:
        input_ids: ``(S,)`` / ``(B, S)`` ints or a list of (possibly ragged) lists.
        attention_mask: 0/1 of the same shape, only with rectangular ids; default all ones.
        vocab: when given, ids must lie in ``[0, vocab)``.

    Returns:
        ``ids (B, S)`` and ``mask (B, S)``, both int64.

    Raises:
        EdgepeftError: empty or mis-shaped input, ids out of range.
    """
    if isinstance(input_ids, np.ndarray) or (len(input_ids) and isinstance(input_ids[0], (int, np.integer))):
        ids = np.asarray(input_ids, dtype=np.int64)
        ids = ids[None] if ids.ndim == 1 else ids
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int64)
    else:
        if attention_mask is not None:
            raise EdgepeftError("attention_mask goes with a rectangular input_ids array; for a "
                                "ragged list of sequences leave it out (they are left-padded).")
        longest = max((len(r) for r in input_ids), default=0)
        ids = np.zeros((len(input_ids), longest), np.int64)
        mask = np.zeros_like(ids)
        for i, row in enumerate(input_ids):
            if len(row):
                ids[i, longest - len(row):] = row
                mask[i, longest - len(row):] = 1
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0 or mask.shape != ids.shape:
        raise EdgepeftError(f"input_ids must be (batch, seq) with batch, seq >= 1 and attention_mask "
                            f"the same shape; got {ids.shape} and {mask.shape}.")
    if vocab is not None and (ids.min() < 0 or ids.max() >= vocab):
        raise EdgepeftError(f"input_ids must lie in [0, {vocab}); got {ids.min()}..{ids.max()}.")
    return ids, mask


def positions(mask: np.ndarray) -> np.ndarray:
    """Position ids as transformers' ``generate`` makes them: count of real tokens before.

    Args:
        mask: ``(B, T)`` 0/1.

    Returns:
        ``(B, T)`` int64; padded slots get 1 (never attended to).
    """
    pos = np.cumsum(mask, axis=-1) - 1
    return np.where(mask == 0, 1, pos).astype(np.int64)


class Model:
    """An exported artifact, ready to run.

    Args:
        path: the artifact directory written by ``edgepeft export``.
        providers: onnxruntime execution providers in order; None: the artifact's target's
            (manifest). Those this onnxruntime build lacks are dropped with one
            :class:`ProviderFallbackWarning`; CPU always comes last.
        threads: intra-op threads, default onnxruntime's choice.
        format: ``auto`` (default: the ``.ort`` graph when the artifact has one, else ``.onnx``),
            ``onnx``, or ``ort`` (an error if the artifact has no ``.ort``).

    Raises:
        EdgepeftError: a missing or altered file (checksums), an adapter whose shapes do not match
            the graph, or a manifest from another format version.
    """

    def __init__(self, path: str | Path, providers: Sequence[str] | None = None,
                 threads: int | None = None, format: str = "auto"):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.task = self.manifest["task"]
        if self.task not in ("causal-lm", "classification"):
            raise EdgepeftError(f"{self.path}: task {self.task!r} is not supported by this runtime "
                                "version.")
        if format not in FORMATS:
            raise EdgepeftError(f"format={format!r}: choose one of {', '.join(FORMATS)}.")
        self._format = format
        self.format = None  # "onnx" or "ort": what the sessions were loaded from
        self.providers = self._choose_providers(providers)
        self._providers = self.providers
        self._options = ort.SessionOptions()
        self._options.log_severity_level = 3  # adapter defaults are overridable initializers by design
        if threads:
            self._options.intra_op_num_threads = threads
        self._lock = threading.Lock()  # the mix cache
        self._edit = threading.Lock()  # add_adapter / remove_adapter, one at a time
        # key -> (the _Adapter objects it was combined from, result): a hit must be the same objects
        self._mixes: OrderedDict[tuple, tuple[tuple, tuple[dict, list | None]]] = OrderedDict()
        self._tokenizer = None
        self._ort_values: dict[int, tuple[dict, dict]] = {}  # id(feeds) -> (feeds, OrtValues): fused graphs
        kv = self.manifest.get("kv_cache") or {"kv_heads": [], "head_dims": []}
        self._cache = list(zip(kv["kv_heads"], kv["head_dims"]))
        self.merged = self.manifest["mode"] == "merged"
        # fused layout (edgepeft.export.fused): right padding, seqlens_k, one in-place KV buffer
        self.fused = self.manifest["graph"].get("layout") == "fused"
        self._sessions: dict[str | None, ort.InferenceSession] = {}
        self._inputs: dict[str, dict] = self.manifest.get("inputs", {})
        self._identity = {k: np.zeros([d or 0 for d in v["shape"]], np.float32) for k, v in self._inputs.items()}
        # name -> _Adapter (side mode). Replaced as a whole on add / remove, never changed in place.
        self._loaded: dict[str, _Adapter] = {}
        self._graph_inputs: dict[str, list] = {}  # adapter inputs of the side graph: name -> shape
        # Static shapes: {seq: session}, the fixed shape of each adapter input, zeros for the unfed.
        self._static = None if self.merged else self.manifest.get("static")
        self._buckets: dict[int, ort.InferenceSession] = {}
        self._fixed: dict[str, tuple[int, ...]] = {}
        self._zeros: dict[str, np.ndarray] = {}
        if self.merged:
            for name, entry in self.manifest["adapters"].items():
                self._sessions[name] = self._session(entry["graph"])
        elif self._static:
            for entry in self.manifest["graph"]["buckets"]:
                self._buckets[entry["seq"]] = self._session(entry)
            self._sessions[None] = self._buckets[max(self._buckets)]
        else:
            self._sessions[None] = self._session(self.manifest["graph"])
        if not self.merged:
            self._loaded = {name: self._load_adapter(name, entry)
                            for name, entry in self.manifest["adapters"].items()}

    # ---------------------------------------------------------------- loading
    def _choose_providers(self, providers: Sequence[str] | None) -> list[str]:
        """The wanted providers this build has, in order, CPU last; one warning for the rest."""
        wanted = list(providers) if providers else target_providers(self.manifest)
        available = ort.get_available_providers()
        chosen = [p for p in wanted if p in available and p != "CPUExecutionProvider"]
        chosen.append("CPUExecutionProvider")
        missing = [p for p in wanted if p not in available]
        if missing:
            source = "asked for" if providers else "the artifact's target asks for"
            warnings.warn(f"{self.path}: {source} {', '.join(missing)}, which this onnxruntime build "
                          f"does not have (it has {', '.join(available)}); running on "
                          f"{', '.join(chosen)}.", ProviderFallbackWarning, stacklevel=3)
        return chosen

    def _session(self, graph: dict) -> ort.InferenceSession:
        where = f"{self.path / 'manifest.json'}"
        if graph.get("ort") and self._format != "onnx":
            return self._ort_session(graph, where)
        if self._format == "ort":
            raise EdgepeftError(f"{self.path}: the artifact has no .ort graph for {graph['file']}; export "
                                "it with a target that has ort_format = true (e.g. --target cpu-arm64), "
                                "or load it with format='auto'.")
        file = inside(self.path, graph["file"], where)
        data = inside(self.path, graph["data_file"], where)
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
            if not loc or Path(loc).is_absolute() or not target.is_relative_to(self.path.resolve()):
                raise EdgepeftError(f"{file}: external data location {loc!r} points outside the "
                                    f"artifact directory {self.path}; the artifact is tampered with. "
                                    "Export it again.")
        try:
            session = ort.InferenceSession(str(file), self._options, providers=self._providers)
        except Exception as e:  # onnxruntime's Fail, InvalidProtobuf, InvalidGraph, NoSuchFile, ...
            raise EdgepeftError(f"{file}: onnxruntime cannot load it ({type(e).__name__}: "
                                f"{str(e)[:300]}). Export the artifact again.") from None
        self._check_graph(file, session)
        return session

    def _ort_session(self, graph: dict, where: str) -> ort.InferenceSession:
        """A session on the graph's ``.ort`` file (weights inside it: no external data)."""
        file = inside(self.path, graph["ort"]["file"], where)
        if not file.is_file():
            raise EdgepeftError(f"{file}: missing from the artifact. Export it again.")
        # Weights live inside an .ort file, so this hashes the whole model once per load.
        if sha256_file(file) != graph["ort"]["sha256"]:
            raise EdgepeftError(f"{file}: sha256 does not match the manifest ({where}); the file was "
                                "changed or damaged. Export the artifact again.")
        self.format = "ort"
        try:
            session = ort.InferenceSession(str(file), self._options, providers=self._providers)
        except Exception as e:
            raise EdgepeftError(f"{file}: onnxruntime cannot load it ({type(e).__name__}: "
                                f"{str(e)[:300]}). Export the artifact again.") from None
        self._check_graph(file, session)
        return session

    def _check_graph(self, file: Path, session: ort.InferenceSession) -> None:
        """The manifest's KV cache, vocabulary and adapter inputs must be the graph's own."""
        where = f"{self.path / 'manifest.json'}"
        inputs = {i.name: i.shape for i in session.get_inputs()}
        overridable = {i.name: i.shape for i in session.get_overridable_initializers()}
        if self.task == "causal-lm":
            layers = sum(1 for n in inputs if n.startswith("past.") and n.endswith(".key"))
            bad = layers != len(self._cache) or any(
                inputs.get(past_names(i)[0], [None] * 4)[1::2] != [h, d] for i, (h, d) in enumerate(self._cache))
            if bad:
                raise EdgepeftError(f"{where}: kv_cache does not match the KV-cache inputs of {file} "
                                    f"({layers} layers); the manifest was edited. Export the artifact again.")
        outputs = {o.name: o.shape for o in session.get_outputs()}
        vocab = (outputs.get("logits") or [None])[-1]
        if self.task == "causal-lm" and isinstance(vocab, int) and vocab != self.manifest["base"]["vocab_size"]:
            raise EdgepeftError(f"{where}: base.vocab_size is {self.manifest['base']['vocab_size']}, the "
                                f"graph {file} has {vocab}. Export the artifact again.")
        if not self.merged and self._static:
            # Ranks are fixed at max_rank: those inputs have no default (the runtime feeds zeros).
            fixed = {k: v for k, v in {**inputs, **overridable}.items() if k in self._inputs}
            missing = sorted(set(self._inputs) - set(fixed))
            if missing or any(isinstance(d, str) for v in fixed.values() for d in v):
                raise EdgepeftError(f"{where}: input {(missing or [next(iter(fixed))])[0]!r} is not a "
                                    f"fixed-shape adapter input of {file}. Export the artifact again.")
            self._fixed = {k: tuple(v) for k, v in fixed.items()}
            self._zeros = {k: np.zeros(v, np.float32) for k, v in self._fixed.items() if k not in overridable}
            # Adapter files are checked against the dynamic graph's shapes (ranks vary there).
            self._graph_inputs = {i["name"]: i["shape"] for i in self.manifest["graph"]["inputs"]
                                  if i["name"] in self._inputs}
        elif not self.merged:
            missing = sorted(set(self._inputs) - set(overridable))
            if missing:
                raise EdgepeftError(f"{where}: input {missing[0]!r} is not an adapter input of {file}. "
                                    "Export the artifact again.")
            self._graph_inputs = overridable

    def _load_adapter(self, name: str, entry: dict, root: Path | None = None) -> _Adapter:
        """Read and check one adapter of the artifact at ``root`` (default: this one)."""
        root = self.path if root is None else root
        where = f"adapter {name!r} of {root / MANIFEST_NAME}"
        file = inside(root, entry["file"], where)
        if not file.is_file():
            raise EdgepeftError(f"{file}: missing ({where}). Export the artifact again.")
        if sha256_file(file) != entry["sha256"]:
            raise EdgepeftError(f"{file}: sha256 does not match the manifest ({where}); the file "
                                "was changed or damaged. Export the artifact again.")
        ours = self.manifest["base"]["fingerprint"]
        if entry.get("base_fingerprint") != ours:
            raise EdgepeftError(f"{file}: made for base {entry.get('base_fingerprint')}, this "
                                f"artifact's base is {ours} ({where}).")
        arrays, tag = _read_adapter_file(file, where)
        if tag not in UNTAGGED and tag != base_tag(ours):
            raise EdgepeftError(f"{file}: the file was exported for another base model (its tag "
                                f"{tag} is not {base_tag(ours)}, from {ours[:23]}...) ({where}). "
                                "Export the adapter with this artifact's base.")
        # fp16 storage (--adapter-precision fp16) halves the file; the branch computes in fp32.
        arrays = {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in arrays.items()}
        graph, prefix = {}, []
        sizes: dict[str, tuple[int, str]] = {}  # symbolic dim of the graph (a rank) -> (size, input)
        for k, v in arrays.items():
            spec = self._inputs.get(k)
            if spec is None:
                if k.startswith("prefix."):
                    continue
                raise EdgepeftError(f"{file}: input {k!r} is not an adapter input of this graph ({where}).")
            shape = self._graph_inputs.get(k, spec["shape"])
            if v.dtype != np.float32 or v.ndim != len(shape) or any(
                    isinstance(e, int) and e != d for e, d in zip(shape, v.shape)):
                raise EdgepeftError(f"{file}: {k} has shape {v.shape} {v.dtype}, the graph takes "
                                    f"{tuple(d if isinstance(d, int) else 'n' for d in shape)} float32 ({where}).")
            for e, d in zip(shape, v.shape):
                if isinstance(e, str):
                    seen = sizes.setdefault(e, (d, k))
                    if seen[0] != d:
                        raise EdgepeftError(f"{file}: {k} has {d} along {e}, {seen[1]} has {seen[0]}; "
                                            f"they must agree ({where}). Export the artifact again.")
            graph[k] = v
        # Inputs that share a rank (LoRA A and B, a bottleneck's four parts) come together or not at all.
        for k, shape in self._graph_inputs.items():
            if k not in graph and any(isinstance(e, str) and e in sizes for e in shape):
                raise EdgepeftError(f"{file}: has {sizes[next(e for e in shape if e in sizes)][1]} but "
                                    f"not {k}, which goes with it ({where}). Export the artifact again.")
        listed = entry.get("inputs")
        if listed is not None and set(listed) != set(graph):
            odd = sorted(set(listed) ^ set(graph))[0]
            raise EdgepeftError(f"{file}: its inputs differ from the manifest's list (e.g. {odd!r}) "
                                f"({where}). Export the artifact again.")
        for k in entry.get("defaults", []):  # shared inputs whose value is the graph's default
            if k in graph or "default" not in self._inputs.get(k, {}):
                raise EdgepeftError(f"{file}: its manifest entry lists {k} under 'defaults', but "
                                    + ("the file holds it" if k in graph else "the graph has no shared default of that name")
                                    + f" ({where}). Export the artifact again.")
        for i, (h, d) in enumerate(self._cache):
            kn, vn = prefix_names(i)
            if kn in arrays or vn in arrays:
                k, v = arrays.get(kn), arrays.get(vn)
                if k is None or v is None or k.shape != v.shape or k.ndim != 4 or k.shape[:2] != (1, h) \
                        or k.shape[3] != d or k.dtype != np.float32 or v.dtype != np.float32:
                    raise EdgepeftError(f"{file}: prefix of layer {i} must be key and value of shape "
                                        f"(1, {h}, p, {d}) float32 ({where}).")
                prefix.append((k, v))
        if prefix and len(prefix) != len(self._cache):
            raise EdgepeftError(f"{file}: prefix covers {len(prefix)} of {len(self._cache)} layers ({where}).")
        stray = sorted(k for k in arrays if k.startswith("prefix.") and k not in
                       {n for i in range(len(prefix)) for n in prefix_names(i)})
        if stray:
            raise EdgepeftError(f"{file}: array {stray[0]!r} is not a KV-cache layer of this model ({where}).")
        if prefix and len({(k.shape[2], v.shape[2]) for k, v in prefix}) != 1:
            raise EdgepeftError(f"{file}: prefix layers have different lengths ({where}).")
        if bool(prefix) != bool(entry.get("prefix")) or (
                prefix and entry["prefix"]["length"] != prefix[0][0].shape[2]):
            raise EdgepeftError(f"{file}: its prefix does not match the manifest's 'prefix' entry "
                                f"({where}). Export the artifact again.")
        return _Adapter(entry, graph, prefix or None)

    # ---------------------------------------------------------------- adapters
    @property
    def adapters(self) -> list[str]:
        """Names of the adapters in the artifact (and added ones, less removed ones)."""
        return list(self.manifest["adapters"])

    @property
    def _graph_arrays(self) -> dict[str, dict[str, np.ndarray]]:
        return {n: a.graph for n, a in self._loaded.items()}

    @property
    def _prefix(self) -> dict[str, list | None]:
        return {n: a.prefix for n, a in self._loaded.items()}

    def add_adapter(self, path: str | Path, name: str | None = None, *, as_name: str | None = None) -> str:
        """Load an adapter exported into another side-branch artifact of the same base model.

        The adapter is taken with its manifest entry, so ``path`` is either that artifact's
        directory (``name`` picks the adapter; optional when it holds one) or its
        ``adapters/NAME.onnx_adapter`` file. The other artifact must have this one's base
        fingerprint and task, and every input the adapter feeds must be an input of this graph
        with the shape it has here (adapter files are checked as at load: sha256, base, shapes).
        Nothing is copied into this artifact's directory. Safe while other threads run calls.

        Args:
            path: artifact directory or ``.onnx_adapter`` file inside one.
            name: the adapter's name in that artifact.
            as_name: its name here (default: ``name``).

        Returns:
            The name it is available under.

        Raises:
            EdgepeftError: a merged artifact, another base, an input this graph lacks or shapes
                that do not fit, a name already in use, or a missing or damaged file.
        """
        if self.merged:
            raise EdgepeftError(f"{self.path} is a merged artifact (one graph per adapter); "
                                "add_adapter needs a side-branch artifact (--mode side).")
        root, name = self._find_adapter(Path(path), name)
        other = read_manifest(root)
        where = f"{root / MANIFEST_NAME}"
        ours = self.manifest["base"]["fingerprint"]
        if other["base"]["fingerprint"] != ours:
            raise EdgepeftError(f"{where}: exported from base {other['base']['fingerprint'][:23]}..., "
                                f"{self.path} from {ours[:23]}...: adapter {name!r} was made for other "
                                "weights. Export it with this artifact's base.")
        if other["task"] != self.task or other["mode"] != "side":
            raise EdgepeftError(f"{where}: a {other['task']} {other['mode']} artifact; {self.path} is "
                                f"a {self.task} side artifact.")
        new = check_adapter_name(as_name or name, "add_adapter")
        entry = other["adapters"][name]
        for k in entry.get("defaults", []):
            theirs, ours = other["inputs"][k]["default"], self._inputs.get(k, {}).get("default")
            if theirs != ours:
                raise EdgepeftError(f"{where}: adapter {name!r} leaves {k} to its graph's default (a part "
                                    "shared by the layers of one shape, stored once per graph), and "
                                    f"{self.path}'s graph has " + ("another value" if ours else "no such input")
                                    + ". Export the adapter into this artifact instead.")
        loaded = self._load_adapter(name, entry, root)
        with self._edit:
            if new in self.manifest["adapters"]:
                raise EdgepeftError(f"adapter {new!r} is already in {self.path}; remove_adapter({new!r}) "
                                    "first, or pass as_name=.")
            self._loaded = {**self._loaded, new: loaded._replace(entry={**entry, "artifact": str(root)})}
            self.manifest = {**self.manifest, "adapters": {**self.manifest["adapters"],
                                                            new: self._loaded[new].entry}}
        return new

    def _find_adapter(self, path: Path, name: str | None) -> tuple[Path, str]:
        """(artifact dir, adapter name) for :meth:`add_adapter`."""
        if path.is_dir():
            root = path
            names = list(read_manifest(root)["adapters"])
            if name is None:
                if len(names) != 1:
                    raise EdgepeftError(f"{path} holds adapters {', '.join(names) or '(none)'}; "
                                        "pass name= to pick one.")
                name = names[0]
        elif path.is_file():
            root = next((d for d in (path.parent, path.parent.parent) if (d / MANIFEST_NAME).is_file()), None)
            if root is None:
                raise EdgepeftError(f"{path}: no {MANIFEST_NAME} beside it or one level up; an adapter "
                                    "file is added with its artifact's manifest entry.")
            found = [n for n, e in read_manifest(root)["adapters"].items()
                     if "file" in e and (root / e["file"]).resolve() == path.resolve()]
            if not found or (name is not None and name not in found):
                raise EdgepeftError(f"{path}: not an adapter file listed in {root / MANIFEST_NAME}"
                                    + (f" under the name {name!r}" if name else "") + ".")
            name = found[0]
        else:
            raise EdgepeftError(f"{path}: not found; pass an artifact directory or an .onnx_adapter file.")
        adapters = read_manifest(root)["adapters"]
        if name not in adapters:
            raise EdgepeftError(f"adapter {name!r} is not in {root}; it has: {', '.join(adapters) or '(none)'}.")
        return root, name

    def remove_adapter(self, name: str) -> None:
        """Unload an adapter: later calls that name it raise EdgepeftError; calls already running
        finish with it. Safe while other threads run calls (the artifact's files are not touched).

        Raises:
            EdgepeftError: no adapter of that name.
        """
        with self._edit:
            self._check_names([name])
            if self.merged:
                self._sessions = {k: v for k, v in self._sessions.items() if k != name}
            self._loaded = {k: v for k, v in self._loaded.items() if k != name}
            self.manifest = {**self.manifest, "adapters": {k: v for k, v in self.manifest["adapters"].items()
                                                           if k != name}}
        with self._lock:
            for key in [k for k in self._mixes if any(n == name for n, _ in k)]:
                del self._mixes[key]

    def _feeds(self, adapter: AdapterChoice) -> tuple[dict[str, np.ndarray], list | None]:
        """Graph feeds and KV-cache seed for None (base), a name, or ``{name: weight}``.

        A mix follows each input's rule (manifest ``inputs``): LoRA ``A`` / ``B`` concatenate
        along the rank axis, ``[A_1; A_2]`` and ``[w_1 B_1 | w_2 B_2]`` (``B`` already carries
        the scale), which computes ``sum_i w_i s_i B_i A_i`` exactly; bottleneck adapters
        concatenate their hidden units the same way; inputs that do not mix linearly (IA3, DoRA,
        heads, prompts, prefixes) take one adapter at weight 1.
        """
        if adapter is None:
            return self._zeros, None
        loaded = self._loaded  # one snapshot per call: adapters added / removed meanwhile do not show
        if isinstance(adapter, str):
            a = loaded.get(adapter)
            if a is None:
                self._check_names([adapter], loaded)
            if not self._static:
                return a.graph, a.prefix
            adapter = {adapter: 1.0}  # padded to the fixed ranks once, cached with the mixes
        if not isinstance(adapter, Mapping) or not adapter:
            raise EdgepeftError(f"adapter={adapter!r}: pass None, a name, or a non-empty "
                                "{name: weight} mix.")
        self._check_names(list(adapter), loaded)
        key = tuple(sorted((n, float(w)) for n, w in adapter.items()))
        used = tuple(loaded[n] for n, _ in key)
        with self._lock:
            hit = self._mixes.get(key)
            if hit is not None and all(x is y for x, y in zip(hit[0], used)):
                self._mixes.move_to_end(key)
                return hit[1]
        result = self._combine(key, loaded)
        with self._lock:
            self._mixes[key] = (used, result)
            while len(self._mixes) > _MIX_CACHE_SIZE:
                self._mixes.popitem(last=False)
        return result

    def _combine(self, key: tuple[tuple[str, float], ...], loaded: Mapping[str, _Adapter]) -> tuple[dict, list | None]:
        for n, _ in key:  # a shared input one adapter leaves to the graph's default, another replaces
            for k in loaded[n].entry.get("defaults", ()):
                other = next((m for m, _ in key if k in loaded[m].graph), None)
                if other is not None:
                    raise EdgepeftError(f"adapter {other!r} sets {k}, a part shared by the layers of one "
                                        f"shape, and adapter {n!r} uses the graph's default for it; "
                                        "combine them in separate calls.")
        parts: dict[str, list[tuple[str, float, np.ndarray]]] = {}
        for n, w in key:
            for k, v in loaded[n].graph.items():
                parts.setdefault(k, []).append((n, w, v))
        feeds = {}
        for k, group in parts.items():
            rule = self._inputs[k]["mix"]
            if rule == "one":
                if len(group) > 1:
                    raise EdgepeftError(f"adapters {group[0][0]!r} and {group[1][0]!r} both set {k}, "
                                        "which does not mix (IA3 / DoRA / head / prompt); combine "
                                        "at most one of them per call.")
                if group[0][1] != 1.0:
                    raise EdgepeftError(f"adapter {group[0][0]!r} sets {k}, which does not scale "
                                        "linearly; give it weight 1.")
                feeds[k] = group[0][2]
            elif rule == "cat0":
                feeds[k] = np.concatenate([v for _, _, v in group], axis=0)  # (sum r, ...)
            elif rule == "cat1":
                feeds[k] = np.concatenate([v for _, _, v in group], axis=1)  # (in, sum r)
            elif rule == "cat0w":
                feeds[k] = np.concatenate([np.float32(w) * v for _, w, v in group], axis=0)  # (sum r, out)
            elif rule == "cat1w":
                feeds[k] = np.concatenate([np.float32(w) * v for _, w, v in group], axis=1)  # (out, sum r)
            elif rule == "sumw":
                feeds[k] = sum(np.float32(w) * v for _, w, v in group).astype(np.float32)
            else:
                raise EdgepeftError(f"{self.path / 'manifest.json'}: input {k} has unknown mix rule {rule!r}.")
        seeded = [(n, w) for n, w in key if loaded[n].prefix is not None]
        prefix = None
        if seeded:
            if len(seeded) > 1:
                raise EdgepeftError(f"adapters {seeded[0][0]!r} and {seeded[1][0]!r} are both prefixes "
                                    "(prefix / prompt tuning); combine at most one per call.")
            n, w = seeded[0]
            if w != 1.0:
                raise EdgepeftError(f"adapter {n!r} is a prefix (prefix / prompt tuning); give it weight 1.")
            others = [m for m, _ in key if m != n and loaded[m].graph]
            if loaded[n].entry["prefix"]["from_prompt"] and others:
                raise EdgepeftError(
                    f"adapter {n!r} is prompt tuning on a decoder: its virtual tokens were run through "
                    f"the base weights at export, so it cannot be combined with {others[0]!r}, which "
                    "changes those weights (PEFT would run the prompt through them too).")
            prefix = loaded[n].prefix
        return (self._pad(feeds, key) if self._static else feeds), prefix

    def _pad(self, feeds: dict[str, np.ndarray], key) -> dict[str, np.ndarray]:
        """Zero-pad every feed to its fixed shape (ranks to max_rank) and add zeros for the rest:
        zero rows of A / columns of B add nothing, so the result is exact."""
        out = dict(self._zeros)
        for k, v in feeds.items():
            shape = self._fixed[k]
            if v.shape == shape:
                out[k] = v
                continue
            if len(v.shape) != len(shape) or any(d > e for d, e in zip(v.shape, shape)):
                names = " + ".join(f"{n}" for n, _ in key)
                raise EdgepeftError(
                    f"{names}: input {k} needs shape {v.shape}, above the fixed {shape} of this "
                    f"static-shape artifact (ranks of a mix add up; max_rank {self._static['max_rank']}). "
                    "Mix fewer adapters, or export with a profile with a larger max_rank.")
            z = np.zeros(shape, np.float32)
            z[tuple(slice(0, d) for d in v.shape)] = v
            out[k] = z
        return out

    def _values(self, feeds: dict[str, np.ndarray]) -> dict[str, ort.OrtValue]:
        """OrtValues over ``feeds`` (an adapter's or a cached mix's arrays), made once per feeds
        object: binding them later copies nothing. Kept while the feeds object is cached."""
        with self._lock:
            hit = self._ort_values.get(id(feeds))
            if hit is not None and hit[0] is feeds:
                return hit[1]
            # every adapter input, the unfed ones rank-0 (the identity): a reused binding keeps no
            # input of the previous choice
            values = fused.ort_values({**self._identity, **feeds})
            self._ort_values[id(feeds)] = (feeds, values)  # holds feeds: its id stays unique
            while len(self._ort_values) > 2 * _MIX_CACHE_SIZE + len(self._loaded) + 1:
                self._ort_values.pop(next(iter(self._ort_values)))
            return values

    def _check_names(self, names: list[str], loaded: Mapping | None = None) -> None:
        have = self.manifest["adapters"] if loaded is None else loaded
        unknown = [n for n in names if n not in have]
        if unknown:
            raise EdgepeftError(f"adapter {unknown[0]!r} is not in {self.path}; it has: "
                                f"{', '.join(have) or '(none)'}.")

    def _session_for(self, adapter: AdapterChoice) -> tuple[ort.InferenceSession, dict, list | None]:
        if not self.merged:
            return (self._sessions[None], *self._feeds(adapter))
        if isinstance(adapter, str):
            sessions = self._sessions
            if adapter not in sessions:
                self._check_names([adapter], sessions)
            return sessions[adapter], {}, None
        raise EdgepeftError(f"{self.path} is a merged artifact: one graph per adapter, so only "
                            f"adapter=<name> works (one of {', '.join(self.adapters)}). Export with "
                            "--mode side for the base model and weighted mixes.")

    def _need(self, task: str, method: str) -> None:
        if self.task != task:
            other = "classify()" if self.task == "classification" else "logits() / generate()"
            raise EdgepeftError(f"{self.path} is a {self.task} artifact: {method} needs a {task} "
                                f"artifact; use {other}.")

    # ---------------------------------------------------------------- running
    def _start(self, batch: int, mask: np.ndarray, prefix) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Initial past (empty, or the adapter's prefix for every row) and the mask it needs."""
        feeds = {}
        for i, (h, d) in enumerate(self._cache):
            names = past_names(i)
            if prefix is None:
                feeds[names[0]] = feeds[names[1]] = np.zeros((batch, h, 0, d), np.float32)
            else:
                for n, v in zip(names, prefix[i]):
                    feeds[n] = np.ascontiguousarray(np.broadcast_to(v, (batch, *v.shape[1:])))
        if prefix is not None:
            p = prefix[0][0].shape[2]
            mask = np.concatenate([np.ones((batch, p), np.int64), mask], axis=1)  # (B, p + S)
        return feeds, mask

    def _run(self, session, lora, ids, mask, past) -> list[np.ndarray]:
        pos = positions(mask)[:, -ids.shape[1]:]  # (B, S)
        return session.run(None, {"input_ids": ids, "attention_mask": mask, "position_ids": pos,
                                  **past, **lora})

    def logits(self, input_ids, adapter: AdapterChoice = None, attention_mask=None) -> np.ndarray:
        """Next-token logits for every position (causal LM artifacts).

        Args:
            input_ids: ``(B, S)`` ints, or a list of lists (ragged rows are left-padded).
            adapter: None (base), an adapter name, or ``{name: weight}``.
            attention_mask: ``(B, S)`` 0/1, left or right padding; default all ones.

        Returns:
            ``(B, S, vocab)`` float32 (a prefix adapter's virtual tokens are not included).
        """
        self._need("causal-lm", "logits()")
        session, feeds, prefix = self._session_for(adapter)
        ids, mask = batch_inputs(input_ids, attention_mask, self.manifest["base"]["vocab_size"])
        if self._static:
            return np.concatenate([self._static_prefill(feeds, i, m, prefix)[0]
                                   for i, m in self._row_groups(ids, mask)])[:ids.shape[0]]
        if self.fused:
            return fused.logits(session, self._cache, self._values(feeds), ids, mask)
        past, mask = self._start(ids.shape[0], mask, prefix)
        return self._run(session, feeds, ids, mask, past)[0]

    # ---------------------------------------------------------------- static shapes
    def _row_groups(self, ids: np.ndarray, mask: np.ndarray):
        """``(ids, mask)`` in groups of the fixed batch; the last group is filled up with copies of
        its last row (their outputs are dropped)."""
        b = self._static["batch"]
        for g in range(0, ids.shape[0], b):
            i, m = ids[g:g + b], mask[g:g + b]
            if i.shape[0] < b:
                fill = b - i.shape[0]
                i = np.concatenate([i, np.repeat(i[-1:], fill, 0)])
                m = np.concatenate([m, np.repeat(m[-1:], fill, 0)])
            yield i, m

    def _chunks(self, length: int) -> list[int]:
        """Bucket sizes that cover ``length`` prompt tokens: the longest bucket while it fits,
        then the shortest one that holds the rest (left-padded)."""
        buckets = sorted(self._buckets)
        out, left = [], length
        while left > 0:
            s = buckets[-1] if left >= buckets[-1] else next(b for b in buckets if b >= left)
            out.append(s)
            left -= min(s, left)
        return out

    def _static_prefill(self, feeds: dict, ids: np.ndarray, mask: np.ndarray, prefix,
                        new_tokens: int = 0) -> tuple[np.ndarray, list]:
        """Run a prompt through the bucket graphs on a fixed KV window.

        The window holds ``C = static.context`` positions per layer, newest last, with a 0/1 mask
        of which slots hold a token: a call of bucket ``S`` takes the window's last ``C - S``
        slots as past and appends ``S`` new ones; a prompt chunk shorter than its bucket is
        left-padded with masked slots. A prefix adapter's keys / values start the window.

        Args:
            ids, mask: ``(B, L)`` with ``B`` the fixed batch.
            new_tokens: slots to keep free for :meth:`generate`.

        Returns:
            ``logits (B, L, V)`` of the real positions and the window ``[kv dict, mask (B, C)]``.

        Raises:
            EdgepeftError: prompt (in padded chunks), prefix and new tokens do not fit the window.
        """
        c, b = self._static["context"], ids.shape[0]
        chunks = self._chunks(ids.shape[1])
        p = 0 if prefix is None else prefix[0][0].shape[2]
        need = p + sum(chunks) + new_tokens * min(self._buckets)
        if need > c:
            raise EdgepeftError(
                f"{self.path}: a prompt of {ids.shape[1]} tokens (run as bucket(s) {chunks})"
                + (f", a prefix of {p}" if p else "") + (f" and {new_tokens} new tokens" if new_tokens else "")
                + f" take {need} slots of the fixed KV cache, which has context_length {c}. Shorten "
                "the prompt, generate fewer tokens, or export with a profile with a larger context_length.")
        kv = {}
        for i, (h, d) in enumerate(self._cache):
            for j, n in enumerate(past_names(i)):
                kv[n] = np.zeros((b, h, c, d), np.float32)
                if p:
                    kv[n][:, :, c - p:] = prefix[i][j]  # (1, h, p, d) broadcast over rows
        window = [kv, np.zeros((b, c), np.int64)]
        window[1][:, c - p:] = 1 if p else 0
        out, at = [], 0
        for s in chunks:
            real = min(s, ids.shape[1] - at)
            pad = s - real
            step_ids = np.concatenate([np.zeros((b, pad), np.int64), ids[:, at:at + real]], 1)  # (B, S)
            step_mask = np.concatenate([np.zeros((b, pad), np.int64), mask[:, at:at + real]], 1)
            out.append(self._static_step(feeds, step_ids, step_mask, window)[:, pad:])
            at += real
        return np.concatenate(out, axis=1), window

    def _static_step(self, feeds: dict, ids: np.ndarray, mask: np.ndarray, window: list) -> np.ndarray:
        """One call of the graph of bucket ``S = ids.shape[1]``; slides ``window`` in place."""
        s = ids.shape[1]
        kv, wmask = window
        full = np.concatenate([wmask[:, s:], mask], axis=1)  # (B, C): the slots the past keeps + new
        logits, *present = self._buckets[s].run(None, {
            "input_ids": ids, "attention_mask": full, "position_ids": positions(full)[:, -s:],
            **{n: v[:, :, s:] for n, v in kv.items()}, **feeds})  # past: (B, H, C - S, D)
        window[0] = {n: v for i in range(len(self._cache))
                     for n, v in zip(past_names(i), present[2 * i:2 * i + 2])}  # (B, H, C, D)
        window[1] = full
        return logits

    def _static_generate(self, feeds, ids, mask, prefix, max_new_tokens, eos) -> np.ndarray:
        """:meth:`generate` on the bucket graphs, one group of the fixed batch at a time."""
        groups = []
        first = min(self._buckets)
        for gi, gm in self._row_groups(ids, mask):
            logits, window = self._static_prefill(feeds, gi, gm, prefix, max_new_tokens)
            out, done = [gi], np.zeros(gi.shape[0], bool)
            for step in range(max_new_tokens):
                nxt = logits[:, -1].argmax(-1).astype(np.int64)  # (B,)
                if eos:
                    nxt = np.where(done, next(iter(eos)), nxt)
                    done |= np.isin(nxt, list(eos))
                out.append(nxt[:, None])
                if done.all() or step == max_new_tokens - 1:
                    break
                pad = np.zeros((gi.shape[0], first - 1), np.int64)
                one = np.ones((gi.shape[0], 1), np.int64)
                logits = self._static_step(feeds, np.concatenate([pad, nxt[:, None]], 1),
                                           np.concatenate([pad, one], 1), window)
            groups.append(np.concatenate(out, axis=1))
        width = max(g.shape[1] for g in groups)
        fill = next(iter(eos)) if eos else 0
        groups = [np.pad(g, ((0, 0), (0, width - g.shape[1])), constant_values=fill) for g in groups]
        return np.concatenate(groups)[:ids.shape[0]]

    def generate(self, input_ids, max_new_tokens: int = 32, adapter: AdapterChoice = None,
                 attention_mask=None, stop_at_eos: bool = True) -> np.ndarray:
        """Greedy decoding with the KV cache (causal LM artifacts).

        Args:
            input_ids: ``(B, S)`` ints or ragged lists (left-padded).
            max_new_tokens: tokens to add at most.
            adapter: as in :meth:`logits`.
            attention_mask: as in :meth:`logits`.
            stop_at_eos: stop a row at the base model's EOS (later positions repeat EOS).

        Returns:
            ``(B, S + n)`` int64: the (padded) prompt followed by ``n <= max_new_tokens`` tokens.
        """
        self._need("causal-lm", "generate()")
        session, feeds, prefix = self._session_for(adapter)
        ids, mask = batch_inputs(input_ids, attention_mask, self.manifest["base"]["vocab_size"])
        eos = self.manifest["base"].get("eos_token_id") if stop_at_eos else None
        eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if self._static:
            return self._static_generate(feeds, ids, mask, prefix, max_new_tokens, eos)
        if self.fused:
            return fused.generate(session, self._cache, self._values(feeds), ids, mask, max_new_tokens, eos)
        out = [ids]
        done = np.zeros(ids.shape[0], bool)
        past, mask = self._start(ids.shape[0], mask, prefix)
        step = ids
        for _ in range(max_new_tokens):
            logits, *present = self._run(session, feeds, step, mask, past)
            nxt = logits[:, -1].argmax(-1).astype(np.int64)  # (B,)
            if eos:
                nxt = np.where(done, next(iter(eos)), nxt)
                done |= np.isin(nxt, list(eos))
            out.append(nxt[:, None])
            if done.all():
                break
            step = nxt[:, None]  # (B, 1)
            mask = np.concatenate([mask, np.ones_like(step)], axis=1)  # (B, P+1)
            past = {n: v for i in range(len(self._cache)) for n, v in zip(past_names(i), present[2 * i:2 * i + 2])}
        return np.concatenate(out, axis=1)

    def classify(self, texts_or_ids, adapter: AdapterChoice = None, attention_mask=None) -> np.ndarray:
        """Class probabilities (classification artifacts).

        Args:
            texts_or_ids: a string, a list of strings (tokenized with the artifact's tokenizer,
                truncated to the model's length, right-padded), ``(B, S)`` ints, or ragged lists of
                ids (right-padded).
            adapter: None (the base head; only when the base has a trained one), an adapter name,
                or ``{name: weight}`` (at most one of them may carry a head).
            attention_mask: ``(B, S)`` 0/1 with a rectangular ids array; default all ones.

        Returns:
            ``(B, num_labels)`` float32 probabilities (softmax of the logits).
        """
        logits = self.classify_logits(texts_or_ids, adapter, attention_mask)
        z = np.exp(logits - logits.max(-1, keepdims=True))
        return (z / z.sum(-1, keepdims=True)).astype(np.float32)

    def classify_logits(self, texts_or_ids, adapter: AdapterChoice = None, attention_mask=None) -> np.ndarray:
        """Like :meth:`classify`, but the raw logits ``(B, num_labels)``."""
        self._need("classification", "classify()")
        base = self.manifest["base"]
        if adapter is None and not base.get("head_trained", True):
            raise EdgepeftError(f"{self.path}: the base model has no trained classification head; "
                                f"choose an adapter ({', '.join(self.adapters)}).")
        session, feeds, _ = self._session_for(adapter)
        if not self.merged and not any(k.startswith("head.") for k in feeds) and not base.get("head_trained", True):
            raise EdgepeftError(f"adapter={adapter!r} carries no classification head and the base has "
                                "no trained one; include an adapter with a head.")
        prompt = feeds.get(PROMPT_INPUT)
        ids, mask = self._encode(texts_or_ids, attention_mask, 0 if prompt is None else prompt.shape[0])
        if not self._static:
            return session.run(["logits"], {"input_ids": ids, "attention_mask": mask, **feeds})[0]
        # Right-pad to the shortest bucket that holds the longest row, in groups of the fixed batch.
        s = next(b for b in sorted(self._buckets) if b >= ids.shape[1])
        pad = (self.manifest.get("tokenizer") or {}).get("pad_token_id") or 0
        ids = np.pad(ids, ((0, 0), (0, s - ids.shape[1])), constant_values=pad)  # (B, S)
        mask = np.pad(mask, ((0, 0), (0, s - mask.shape[1])))
        return np.concatenate([self._buckets[s].run(["logits"], {"input_ids": i, "attention_mask": m, **feeds})[0]
                               for i, m in self._row_groups(ids, mask)])[:ids.shape[0]]

    def _encode(self, texts_or_ids, attention_mask, reserved: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Right-padded ids and mask; texts truncated to the model's length minus ``reserved``
        positions (a prompt adapter's virtual tokens)."""
        limit = self.manifest["base"].get("max_length", 512) - reserved
        if self._static:
            limit = min(limit, max(self._buckets))  # the longest fixed-shape graph
        if isinstance(texts_or_ids, str):
            texts_or_ids = [texts_or_ids]
        if len(texts_or_ids) and isinstance(texts_or_ids[0], str):
            if attention_mask is not None:
                raise EdgepeftError("attention_mask goes with token ids; texts are padded here.")
            rows = [e.ids for e in self.tokenizer.encode_batch(list(texts_or_ids))]
            rows = [r[:limit - 1] + r[-1:] if len(r) > limit else r for r in rows]  # keep [SEP]/</s>
        elif isinstance(texts_or_ids, np.ndarray) or (len(texts_or_ids) and isinstance(texts_or_ids[0], (int, np.integer))):
            ids, mask = batch_inputs(texts_or_ids, attention_mask, self.manifest["base"]["vocab_size"])
            if ids.shape[1] > limit:
                raise EdgepeftError(f"sequences of {ids.shape[1]} tokens exceed the model's {limit} "
                                    f"(after {reserved} virtual tokens); shorten them.")
            return ids, mask
        else:
            if attention_mask is not None:
                raise EdgepeftError("attention_mask goes with a rectangular ids array; ragged lists "
                                    "are padded here.")
            rows = [list(r) for r in texts_or_ids]
        if not rows or not all(rows):
            raise EdgepeftError("classify() needs at least one non-empty text or id sequence.")
        pad = (self.manifest.get("tokenizer") or {}).get("pad_token_id") or 0
        longest = max(len(r) for r in rows)
        ids = np.full((len(rows), longest), pad, np.int64)
        mask = np.zeros_like(ids)
        for i, r in enumerate(rows):  # right padding, as encoder tokenizers do
            ids[i, :len(r)] = r
            mask[i, :len(r)] = 1
        vocab = self.manifest["base"]["vocab_size"]
        if ids.min() < 0 or ids.max() >= vocab:
            raise EdgepeftError(f"input ids must lie in [0, {vocab}); got {ids.min()}..{ids.max()}.")
        if longest > limit:
            raise EdgepeftError(f"sequences of {longest} tokens exceed the model's {limit} (after "
                                f"{reserved} virtual tokens); shorten them.")
        return ids, mask

    # ---------------------------------------------------------------- text
    @property
    def tokenizer(self):
        """The artifact's ``tokenizers.Tokenizer`` (loaded on first use)."""
        if self._tokenizer is None:
            tok = self.manifest.get("tokenizer")
            if not tok:
                raise EdgepeftError(f"{self.path}: the artifact has no tokenizer (the base model "
                                    "had no fast tokenizer); pass token ids instead.")
            from tokenizers import Tokenizer

            file = inside(self.path, f"{tok['dir']}/tokenizer.json", str(self.path / "manifest.json"))
            if not file.is_file():
                raise EdgepeftError(f"{file}: missing from the artifact. Export it again.")
            try:
                tokenizer = Tokenizer.from_file(str(file))
            except Exception as e:  # tokenizers raises a bare Exception on bad JSON
                raise EdgepeftError(f"{file}: cannot read the tokenizer ({str(e)[:200]}). Export the "
                                    "artifact again.") from None
            # A tokenizer.json may carry fixed padding / truncation (sentence-transformers ship
            # MiniLM padded to 128): the runtime pads and truncates itself, with a mask that marks
            # pads as pads, so both are switched off here.
            tokenizer.no_padding()
            tokenizer.no_truncation()
            self._tokenizer = tokenizer
        return self._tokenizer

    def generate_text(self, prompt: str, max_new_tokens: int = 32, adapter: AdapterChoice = None) -> str:
        """Tokenize ``prompt``, :meth:`generate`, and decode only the new tokens."""
        ids = self.tokenizer.encode(prompt).ids
        out = self.generate([ids], max_new_tokens=max_new_tokens, adapter=adapter)
        return self.tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)
