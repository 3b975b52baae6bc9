"""The adapters of a side-branch artifact: loaded from their files and checked against the graph,
added and removed while calls run, and turned into graph feeds per call (a name, or a mix by the
manifest's per-input rules, :mod:`edgepeft.runtime.mix`, with a small cache). numpy only.

The loaded adapters are one mapping that is replaced, never changed in place, and each call reads
it once, so a call sees an adapter either wholly or not at all.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from edgepeft.contract import MANIFEST_NAME, check_adapter_name, prefix_names, read_manifest
from edgepeft.contract.adapter_files import read_checked_adapter
from edgepeft.errors import EdgepeftError
from edgepeft.runtime.mix import Key, combine, row_weights, shared_by_rows, union_feeds

AdapterChoice = str | Mapping[str, float] | None
MIX_CACHE_SIZE = 8


class Adapter(NamedTuple):
    """A loaded side-branch adapter: its manifest entry, graph feeds and KV-cache seed."""

    entry: dict
    graph: dict[str, np.ndarray]
    prefix: list[tuple[np.ndarray, np.ndarray]] | None


class Feeding(NamedTuple):
    """What a graph layout asks of the adapter feeds.

    ``shapes``: the graph's shape of each adapter input (a ``str`` dim varies per adapter);
    adapter files are checked against it. ``base``: the feeds of ``adapter=None``. ``pad``: for
    fixed-shape graphs, ``pad(feeds, key)`` brings feeds to the fixed shapes; single adapters then
    go through the mix cache too, so each is padded once.
    """

    shapes: Mapping[str, Sequence]
    base: Mapping[str, np.ndarray]
    pad: Callable[[dict, Key], dict] | None = None


def case_name(choice) -> str:
    """How reports name an adapter choice: ``base``, the adapter's name, or ``mix(a=0.7,b=0.3)``."""
    if choice is None:
        return "base"
    if isinstance(choice, str):
        return choice
    return "mix(" + ",".join(f"{k}={v:g}" for k, v in choice.items()) + ")"


def check_names(names: list[str], have: Mapping, root: Path) -> None:
    """Every name must be in ``have``.

    Raises:
        EdgepeftError: naming the first unknown adapter and the ones there are.
    """
    unknown = [n for n in names if n not in have]
    if unknown:
        raise EdgepeftError(f"adapter {unknown[0]!r} is not in {root}; it has: "
                            f"{', '.join(have) or '(none)'}.")


class AdapterStore:
    """The loaded adapters of one side-branch artifact and the feeds of each choice.

    Args:
        root: the artifact directory.
        manifest: its manifest (adapters, inputs with their mix rules, base fingerprint).
        cache: ``[(kv_heads, head_dim)]`` per layer, for prefix checks.
        feeding: what the graph layout asks (:class:`Feeding`).

    Raises:
        EdgepeftError: an adapter file that is missing, altered or does not fit the graph.
    """

    def __init__(self, root: Path, manifest: dict, cache: list[tuple[int, int]], feeding: Feeding):
        self.root, self.manifest, self.cache, self.feeding = root, manifest, cache, feeding
        self._lock = threading.Lock()  # the mix cache
        self._edit = threading.Lock()  # add / remove, one at a time
        # key -> (the Adapter objects it was combined from, result): a hit must be the same objects
        self._mixes: OrderedDict[Key, tuple[tuple, tuple[dict, list | None]]] = OrderedDict()
        self._kept: tuple | None = None  # (key, adapters used, feeds): rows_parts(cache=False)'s last
        # name -> Adapter. Replaced as a whole on add / remove, never changed in place.
        self._loaded: dict[str, Adapter] = {name: self.load(name, entry)
                                            for name, entry in manifest["adapters"].items()}

    @property
    def loaded(self) -> Mapping[str, Adapter]:
        """The adapters loaded now (a snapshot: later adds and removes replace it)."""
        return self._loaded

    # ---------------------------------------------------------------- loading
    def load(self, name: str, entry: dict, root: Path | None = None) -> Adapter:
        """Read and check one adapter of the artifact at ``root`` (default: this one)."""
        root = self.root if root is None else root
        file, where, arrays = read_checked_adapter(root, name, entry, self.manifest["base"]["fingerprint"])
        return self.from_arrays(entry, arrays, file, where)

    def from_arrays(self, entry: dict, arrays: dict[str, np.ndarray], file: Path, where: str) -> Adapter:
        """An adapter from its arrays (as stored) and manifest entry, checked against the graph;
        ``file`` and ``where`` name it in messages."""
        # fp16 storage (--adapter-precision fp16) halves the file; the branch computes in fp32.
        arrays = {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in arrays.items()}
        graph = self._graph_arrays(file, where, arrays)
        listed = entry.get("inputs")
        if listed is not None and set(listed) != set(graph):
            odd = sorted(set(listed) ^ set(graph))[0]
            raise EdgepeftError(f"{file}: its inputs differ from the manifest's list (e.g. {odd!r}) "
                                f"({where}). Export the artifact again.")
        inputs = self.manifest.get("inputs", {})
        for k in entry.get("defaults", []):  # shared inputs whose value is the graph's default
            if k in graph or "default" not in inputs.get(k, {}):
                raise EdgepeftError(f"{file}: its manifest entry lists {k} under 'defaults', but "
                                    + ("the file holds it" if k in graph else "the graph has no shared default of that name")
                                    + f" ({where}). Export the artifact again.")
        prefix = self._prefix_arrays(file, where, arrays)
        if bool(prefix) != bool(entry.get("prefix")) or (
                prefix and entry["prefix"]["length"] != prefix[0][0].shape[2]):
            raise EdgepeftError(f"{file}: its prefix does not match the manifest's 'prefix' entry "
                                f"({where}). Export the artifact again.")
        return Adapter(entry, graph, prefix or None)

    def _graph_arrays(self, file: Path, where: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The arrays that are graph inputs, each of the graph's shape, ranks agreeing."""
        inputs, shapes = self.manifest.get("inputs", {}), self.feeding.shapes
        graph = {}
        sizes: dict[str, tuple[int, str]] = {}  # symbolic dim of the graph (a rank) -> (size, input)
        for k, v in arrays.items():
            spec = inputs.get(k)
            if spec is None:
                if k.startswith("prefix."):
                    continue
                raise EdgepeftError(f"{file}: input {k!r} is not an adapter input of this graph ({where}).")
            shape = shapes.get(k, spec["shape"])
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
        for k, shape in shapes.items():  # (per-row weights share a rank too, but adapters never feed them)
            if k in inputs and k not in graph and any(isinstance(e, str) and e in sizes for e in shape):
                raise EdgepeftError(f"{file}: has {sizes[next(e for e in shape if e in sizes)][1]} but "
                                    f"not {k}, which goes with it ({where}). Export the artifact again.")
        return graph

    def _prefix_arrays(self, file: Path, where: str, arrays: dict[str, np.ndarray]) -> list:
        """The KV-cache seed: ``[(key, value)]`` per layer, each ``(1, H, p, D)``; empty for none."""
        prefix = []
        for i, (h, d) in enumerate(self.cache):
            kn, vn = prefix_names(i)
            if kn in arrays or vn in arrays:
                k, v = arrays.get(kn), arrays.get(vn)
                if k is None or v is None or k.shape != v.shape or k.ndim != 4 or k.shape[:2] != (1, h) \
                        or k.shape[3] != d or k.dtype != np.float32 or v.dtype != np.float32:
                    raise EdgepeftError(f"{file}: prefix of layer {i} must be key and value of shape "
                                        f"(1, {h}, p, {d}) float32 ({where}).")
                prefix.append((k, v))
        if prefix and len(prefix) != len(self.cache):
            raise EdgepeftError(f"{file}: prefix covers {len(prefix)} of {len(self.cache)} layers ({where}).")
        stray = sorted(k for k in arrays if k.startswith("prefix.") and k not in
                       {n for i in range(len(prefix)) for n in prefix_names(i)})
        if stray:
            raise EdgepeftError(f"{file}: array {stray[0]!r} is not a KV-cache layer of this model ({where}).")
        if prefix and len({(k.shape[2], v.shape[2]) for k, v in prefix}) != 1:
            raise EdgepeftError(f"{file}: prefix layers have different lengths ({where}).")
        return prefix

    # ---------------------------------------------------------------- add / remove
    def read_other(self, path: Path, name: str | None, as_name: str | None) -> tuple[str, Adapter]:
        """An adapter of another side-branch artifact of the same base and task, loaded and checked
        against this graph (see ``Model.add_adapter``); not added yet.

        Returns:
            ``(the name to add it under, the adapter)``.
        """
        root, name = find_adapter(path, name)
        other = read_manifest(root)
        where = f"{root / MANIFEST_NAME}"
        ours = self.manifest["base"]["fingerprint"]
        if other["base"]["fingerprint"] != ours:
            raise EdgepeftError(f"{where}: exported from base {other['base']['fingerprint'][:23]}..., "
                                f"{self.root} from {ours[:23]}...: adapter {name!r} was made for other "
                                "weights. Export it with this artifact's base.")
        task = self.manifest["task"]
        if other["task"] != task or other["mode"] != "side":
            raise EdgepeftError(f"{where}: a {other['task']} {other['mode']} artifact; {self.root} is "
                                f"a {task} side artifact.")
        new = check_adapter_name(as_name or name, "add_adapter")
        entry = other["adapters"][name]
        for k in entry.get("defaults", []):
            theirs, ours = other["inputs"][k]["default"], self.manifest.get("inputs", {}).get(k, {}).get("default")
            if theirs != ours:
                raise EdgepeftError(f"{where}: adapter {name!r} leaves {k} to its graph's default (a part "
                                    "shared by the layers of one shape, stored once per graph), and "
                                    f"{self.root}'s graph has " + ("another value" if ours else "no such input")
                                    + ". Export the adapter into this artifact instead.")
        loaded = self.load(name, entry, root)
        return new, loaded._replace(entry={**entry, "artifact": str(root)})

    def add(self, name: str, adapter: Adapter, replace: bool = False) -> None:
        """Make ``adapter`` available as ``name``; calls already running do not see it. With
        ``replace``, it takes the place of the adapter of that name (its mixes are forgotten).

        Raises:
            EdgepeftError: the name is in use (and not ``replace``).
        """
        with self._edit:
            if name in self._loaded and not replace:
                raise EdgepeftError(f"adapter {name!r} is already in {self.root}; remove_adapter({name!r}) "
                                    "first, or pass as_name=.")
            self._loaded = {**self._loaded, name: adapter}
        if replace:
            self._forget(name)

    def remove(self, name: str) -> None:
        """Unload ``name`` (calls already running finish with it) and forget the mixes with it."""
        with self._edit:
            check_names([name], self._loaded, self.root)
            self._loaded = {k: v for k, v in self._loaded.items() if k != name}
        self._forget(name)

    def _forget(self, name: str) -> None:
        """Drop the cached mixes with ``name``."""
        with self._lock:
            for key in [k for k in self._mixes if name in _names_of(k)]:
                del self._mixes[key]
            if self._kept is not None and name in _names_of(self._kept[0]):
                self._kept = None

    def clear_mixes(self) -> None:
        """Empty the mix cache (benchmarks time uncached mixes)."""
        with self._lock:
            self._mixes.clear()
            self._kept = None

    # ---------------------------------------------------------------- feeds
    def rows_agree(self, choices: Sequence[AdapterChoice]) -> None:
        """Raise unless rows running ``choices`` can share one call (what every row shares must
        agree: :func:`~edgepeft.runtime.mix.shared_by_rows`); builds no feeds."""
        self._shared(choices, self._loaded)

    def _shared(self, choices, loaded) -> tuple[list, dict, list | None]:
        keys = [() if c is None else self._mix_key({c: 1.0} if isinstance(c, str) else c, loaded, f"row {b}: ")
                for b, c in enumerate(choices)]
        return (keys, *shared_by_rows(keys, loaded, self.manifest.get("inputs", {}), self.manifest.get("rows", {}),
                                      self.root / MANIFEST_NAME, self.manifest.get("row_values", {})))

    def rows_parts(self, choices: Sequence[AdapterChoice], union: Sequence[str] = (),
                   cache: bool = True) -> tuple[dict, dict, list | None]:
        """The feeds of a batch whose row ``b`` runs ``choices[b]`` (None, a name or a mix) in one
        session run, in two parts (:mod:`edgepeft.runtime.mix`, per-row batches):

        - ``fixed``: the adapters of the batch (and of ``union``, names a running batch keeps)
          concatenated along each slot's rank axis, with the inputs every row shares; one cached
          object per set of adapters (``cache=False``: only the last one is kept, outside the
          mix cache, so a running batch reuses its concatenation without the cache holding one
          per set of adapters it went through);
        - ``weights``: each slot's per-row weights ``(B, 1, R)`` and each scale's per-row offsets
          ``(B, 1, width)``, made per call (small);

        and the KV-cache seed the rows share.
        """
        loaded = self._loaded
        check_names(list(union), loaded, self.root)
        keys, shared, prefix = self._shared(choices, loaded)
        inputs, rows, manifest = self.manifest.get("inputs", {}), self.manifest.get("rows", {}), self.root / MANIFEST_NAME
        names = tuple(sorted({n for k in keys for n, _ in k} | set(union)))
        tag = tuple((k, hashlib.sha1(np.ascontiguousarray(v).tobytes()).hexdigest()) for k, v in sorted(shared.items()))
        pairs = [(n, 1.0) for n in names]  # how a static layout names them in errors
        def make():
            return {**shared, **union_feeds(names, loaded, inputs, rows, manifest)}, None

        key, used = ("rows", names, tag), tuple(loaded[n] for n in names)
        kept = self._kept
        if cache:
            fixed, _ = self._cached(key, used, pairs, make)
        elif kept is not None and kept[0] == key and all(x is y for x, y in zip(kept[1], used)):
            fixed = kept[2]
        else:
            self._kept = None  # the previous one can go before the next is built
            fixed = make()[0]
            fixed = fixed if self.feeding.pad is None else self.feeding.pad(fixed, pairs)
            self._kept = key, used, fixed
        weights = row_weights(keys, names, loaded, rows, self.manifest.get("row_values", {}))
        if self.feeding.pad is not None:
            weights = {k: v for k, v in self.feeding.pad(weights, pairs).items() if k in weights}
        return fixed, weights, prefix

    def feeds_rows(self, choices: Sequence[AdapterChoice]) -> tuple[dict[str, np.ndarray], list | None]:
        """Graph feeds and KV-cache seed of a batch whose row ``b`` runs ``choices[b]``, in one
        session run (:meth:`rows_parts`, joined)."""
        fixed, weights, prefix = self.rows_parts(choices)
        return {**fixed, **weights}, prefix

    def feeds(self, adapter: AdapterChoice) -> tuple[dict[str, np.ndarray], list | None]:
        """Graph feeds and KV-cache seed for None (base), a name, or ``{name: weight}``.

        A single adapter's arrays are fed as loaded (no copy); a mix is combined once by the
        manifest's mix rules (:func:`edgepeft.runtime.mix.combine`) and cached.
        """
        if adapter is None:
            return self.feeding.base, None
        loaded = self._loaded  # one snapshot per call: adapters added / removed meanwhile do not show
        if isinstance(adapter, str):
            a = loaded.get(adapter)
            if a is None:
                check_names([adapter], loaded, self.root)
            if self.feeding.pad is None:
                return a.graph, a.prefix
            adapter = {adapter: 1.0}  # padded to the fixed shapes once, cached with the mixes
        key = self._mix_key(adapter, loaded)
        return self._cached(key, tuple(loaded[n] for n, _ in key), key,
                            lambda: combine(key, loaded, self.manifest.get("inputs", {}), self.root / MANIFEST_NAME))

    def _mix_key(self, mix, loaded: Mapping, where: str = "") -> Key:
        """The cache key of a ``{name: weight}`` mix, its names checked."""
        if not isinstance(mix, Mapping) or not mix:
            raise EdgepeftError(f"adapter={where}{mix!r}: pass None, a name, or a non-empty "
                                "{name: weight} mix.")
        check_names(list(mix), loaded, self.root)
        return tuple(sorted((n, float(w)) for n, w in mix.items()))

    def _cached(self, key, used: tuple, names, make: Callable[[], tuple]) -> tuple[dict[str, np.ndarray], list | None]:
        """``make()``'s feeds (padded to the fixed shapes on a static artifact; ``names``: the
        adapters, for its errors) and KV-cache seed, cached under ``key`` while the adapters
        ``used`` stay loaded (a removed and re-added adapter is another object)."""
        with self._lock:
            hit = self._mixes.get(key)
            if hit is not None and all(x is y for x, y in zip(hit[0], used)):
                self._mixes.move_to_end(key)
                return hit[1]
        feeds, prefix = make()
        result = (feeds if self.feeding.pad is None else self.feeding.pad(feeds, names)), prefix
        with self._lock:
            self._mixes[key] = (used, result)
            while len(self._mixes) > MIX_CACHE_SIZE:
                self._mixes.popitem(last=False)
        return result


def _names_of(key) -> set[str]:
    """The adapter names of a mix-cache key: a mix's ``((name, weight), ...)`` or a batch's
    ``("rows", adapter names, shared inputs)``."""
    if key and key[0] == "rows":
        return set(key[1])
    return {n for n, _ in key}


def find_adapter(path: Path, name: str | None) -> tuple[Path, str]:
    """(artifact dir, adapter name) of an artifact directory or an adapter file inside one."""
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
