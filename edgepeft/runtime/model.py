"""``Model``: an edgepeft artifact in an app. onnxruntime + numpy (+ tokenizers for text) only.

A side-branch artifact is one onnxruntime session; an adapter is a set of graph inputs (and, for
prefix / decoder prompt tuning, a KV-cache seed). Choosing an adapter per call only changes which
arrays are fed: no session is rebuilt, no base weight is copied, and concurrent calls with
different adapters do not interfere (each call builds its own feed dict;
``InferenceSession.run`` is thread-safe). Inputs an adapter does not feed keep their default
initializer, the identity, so ``adapter=None`` is the base model.

A static-shape artifact (a target with ``static_shapes``: NNAPI, Core ML, QNN) has one session per
sequence bucket; the runtime pads what it is given to the fixed shapes and slides a fixed window
of KV cache (:mod:`edgepeft.runtime.static`), so calls look the same as on a dynamic artifact.

Adapters can be added (:meth:`Model.add_adapter`: an adapter pack, or one from another artifact of
the same base) and removed (:meth:`Model.remove_adapter`) while other threads run: see
:mod:`edgepeft.runtime.adapters`. Packs (:mod:`edgepeft.contract.packs`) are checked against the
graph they were made for and, with ``trusted_keys``, against pinned Ed25519 keys.

The parts: :mod:`~edgepeft.runtime.session` (providers, files, integrity checks),
:mod:`~edgepeft.runtime.adapters` and :mod:`~edgepeft.runtime.mix` (adapter feeds), the layouts
(:mod:`~edgepeft.runtime.layout`: traced, fused, static), :mod:`~edgepeft.runtime.decode`
(greedy decoding) and :mod:`~edgepeft.runtime.text` (tokenizer). ``Model`` holds them together.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from edgepeft.contract import PROMPT_INPUT, check_adapter_name, read_manifest
from edgepeft.contract.packs import PACK_SUFFIX, key_id, public_key, read_pack
from edgepeft.errors import EdgepeftError
from edgepeft.runtime import decode, text
from edgepeft.runtime.adapters import MIX_CACHE_SIZE, AdapterChoice, AdapterStore, case_name, check_names
from edgepeft.runtime.batch import batch_inputs, positions
from edgepeft.runtime.fused import FusedLayout
from edgepeft.runtime.layout import Layout
from edgepeft.runtime.onnx_proto import external_data_locations
from edgepeft.runtime.session import FORMATS, ProviderFallbackWarning, SessionOpener, choose_providers
from edgepeft.runtime.static import StaticLayout
from edgepeft.runtime.traced import TracedLayout

# Importable from here as before: other code and apps use these names.
__all__ = ["AdapterChoice", "Model", "ProviderFallbackWarning", "batch_inputs", "case_name",
           "external_data_locations", "positions"]


def open_layouts(opener: SessionOpener, manifest: dict, cache: list[tuple[int, int]],
                 keep: Callable[[], int], share_weights: bool = True) -> dict[str | None, Layout]:
    """The layout of each graph, chosen once from the manifest: ``{None: layout}`` for a
    side-branch artifact, ``{adapter: layout}`` for a merged one (one graph per adapter).

    Args:
        opener: opens and checks the sessions.
        manifest: ``mode``, ``static``, ``graph.layout``, ``inputs``.
        cache: ``[(kv_heads, head_dim)]`` per layer.
        keep: how many adapter bindings a fused layout keeps.
        share_weights: see :class:`StaticLayout`.
    """
    inputs = manifest.get("inputs", {})
    fused = manifest["graph"].get("layout") == "fused"

    def one(graph: dict, adapter_inputs) -> Layout:
        opened = opener.open(graph, adapter_inputs)
        return (FusedLayout(opened, cache, inputs, keep, graph.get("positions"), manifest.get("rows", {}),
                            manifest.get("row_values", {})) if fused
                else TracedLayout(opened, cache))

    if manifest["mode"] == "merged":
        return {name: one(entry["graph"], None) for name, entry in manifest["adapters"].items()}
    if manifest.get("static"):
        return {None: StaticLayout(opener, manifest, list(inputs), cache, share_weights)}
    return {None: one(manifest["graph"], list(inputs))}


class Model:
    """An exported artifact, ready to run.

    Args:
        path: the artifact directory written by ``edgepeft export``.
        providers: onnxruntime execution providers in order; None: the artifact's target's
            (manifest). Those this onnxruntime build lacks are dropped with one
            :class:`ProviderFallbackWarning`; CPU always comes last.
        threads: intra-op threads, default onnxruntime's choice.
        format: ``auto`` (default: the ``.ort`` graph when the artifact has one, else ``.onnx``;
            but a static-shape artifact of several buckets loads its ``.onnx`` graphs when they
            are there and ``share_weights``), ``onnx``, or ``ort`` (an error if the artifact has
            no ``.ort``).
        trusted_keys, revoked: which signed adapter packs :meth:`add_adapter` accepts.
        share_weights: a static-shape artifact of several sequence buckets opens one session per
            bucket; True (default): they share one memory-mapped copy of the weights, which
            onnxruntime then does not prepack (on CPU a call takes longer:
            ``docs/targets.md``, "Memory at run time"); False: each session holds its own prepacked
            copy. With ``format="ort"`` each session loads its ``.ort`` file's own copy.

    Raises:
        EdgepeftError: a missing or altered file (checksums), an adapter whose shapes do not match
            the graph, or a manifest from another format version.
    """

    def __init__(self, path: str | Path, providers: Sequence[str] | None = None,
                 threads: int | None = None, format: str = "auto", *,
                 trusted_keys: Sequence[str | Path] | None = None, revoked: Sequence[str] = (),
                 share_weights: bool = True):
        self.path = Path(path)
        # adapter packs: None accepts unsigned packs; a list accepts only packs signed by one of these
        # keys (each "ed25519:BASE64" or a KEY.pub file), none of them revoked (key ids or keys)
        self._trusted = None if trusted_keys is None else [public_key(k) for k in trusted_keys]
        self._revoked = {r if str(r).startswith("sha256:") else key_id(public_key(r)) for r in revoked}
        self._versions: dict[str, int] = {}  # adapter name -> version of the pack it was loaded from
        self.manifest = read_manifest(self.path)
        self.task = self.manifest["task"]
        if self.task not in ("causal-lm", "classification"):
            raise EdgepeftError(f"{self.path}: task {self.task!r} is not supported by this runtime "
                                "version.")
        if format not in FORMATS:
            raise EdgepeftError(f"format={format!r}: choose one of {', '.join(FORMATS)}.")
        self.providers = choose_providers(self.path, self.manifest, providers)
        self.merged = self.manifest["mode"] == "merged"
        # fused layout (edgepeft.export.fused): right padding, seqlens_k, one in-place KV buffer
        self.fused = self.manifest["graph"].get("layout") == "fused"
        self._edit = threading.Lock()  # add_adapter / remove_adapter, one at a time
        self._tokenizer = None
        kv = self.manifest.get("kv_cache") or {"kv_heads": [], "head_dims": []}
        cache = list(zip(kv["kv_heads"], kv["head_dims"]))
        self._opener = SessionOpener(self.path, self.manifest, self.providers, cache, threads, format)
        # adapter=None / a name / a mix -> (layout, feeds, KV-cache seed): see _choose
        self._layouts = open_layouts(self._opener, self.manifest, cache,
                                     lambda: 2 * MIX_CACHE_SIZE + len(self.manifest["adapters"]) + 1,
                                     share_weights)
        self._store = None if self.merged else AdapterStore(self.path, self.manifest, cache,
                                                             self._layouts[None].feeding)
        self.format = self._opener.format  # "onnx" or "ort": what the sessions were loaded from
        self._longest = min((lay.longest for lay in self._layouts.values() if lay.longest), default=None)

    # ---------------------------------------------------------------- adapters
    @property
    def adapters(self) -> list[str]:
        """Names of the adapters in the artifact (and added ones, less removed ones)."""
        return list(self.manifest["adapters"])

    def add_adapter(self, path: str | Path, name: str | None = None, *, as_name: str | None = None) -> str:
        """Load an adapter pack, or an adapter exported into another side-branch artifact of the
        same base model.

        A pack (``edgepeft adapter pack``, a ``.edgepeft-pack`` file) must fit this graph: its base
        fingerprint and slot schema are this artifact's, every array matches its checksum, and,
        when the model was opened with ``trusted_keys``, it is signed by one of them and by no
        ``revoked`` key. Its name may already be loaded only from an older version of the pack
        (or from the artifact itself): a newer version replaces it, calls running finish with
        the old one.

        Otherwise the adapter is taken with its manifest entry from another artifact: ``path`` is
        that artifact's directory (``name`` picks the adapter; optional when it holds one) or its
        ``adapters/NAME.onnx_adapter`` file. That artifact must have this one's base fingerprint and
        task, and every input the adapter feeds must be an input of this graph with the shape it
        has here (adapter files are checked as at load: sha256, base, shapes).

        Nothing is copied into this artifact's directory. Safe while other threads run calls.

        Args:
            path: a pack file, or an artifact directory or ``.onnx_adapter`` file inside one.
            name: the adapter's name in that artifact (not for packs: they carry their name).
            as_name: its name here (default: its own).

        Returns:
            The name it is available under.

        Raises:
            EdgepeftError: a merged artifact, another base or graph, a damaged or altered file, a
                missing, untrusted or revoked signature, a version not newer than the loaded one,
                a name already in use, or shapes that do not fit; the model is left as it was.
        """
        if self._store is None:
            raise EdgepeftError(f"{self.path} is a merged artifact (one graph per adapter); "
                                "add_adapter needs a side-branch artifact (--mode side).")
        path = Path(path)
        if path.is_file() and path.name.endswith(PACK_SUFFIX):
            return self._add_pack(path, as_name)
        new, adapter = self._store.read_other(path, name, as_name)
        with self._edit:
            self._store.add(new, adapter)
            self.manifest = {**self.manifest, "adapters": {**self.manifest["adapters"], new: adapter.entry}}
        return new

    def _add_pack(self, path: Path, as_name: str | None) -> str:
        header, arrays = read_pack(path, manifest=self.manifest, trusted=self._trusted, revoked=self._revoked)
        name = check_adapter_name(as_name or header["name"], f"{path}")
        version = header["version"]
        entry = {**header["entry"], "pack": {"file": str(path), "version": version}}
        adapter = self._store.from_arrays(entry, arrays, path, f"adapter pack {name!r}")
        with self._edit:
            loaded = self._versions.get(name, 0 if name in self.manifest["adapters"] else None)
            if loaded is not None and version <= loaded:
                raise EdgepeftError(f"{path}: version {version} of adapter {name!r}, but version {loaded} is "
                                    "loaded; a pack replaces only an older version. Pack it with a higher "
                                    "--version, or remove_adapter first.")
            self._store.add(name, adapter, replace=loaded is not None)
            self._versions[name] = version
            self.manifest = {**self.manifest, "adapters": {**self.manifest["adapters"], name: entry}}
        return name

    def remove_adapter(self, name: str) -> None:
        """Unload an adapter: later calls that name it raise EdgepeftError; calls already running
        finish with it. Safe while other threads run calls (the artifact's files are not touched).

        Raises:
            EdgepeftError: no adapter of that name.
        """
        with self._edit:
            check_names([name], self.manifest["adapters"], self.path)
            self._layouts = {k: v for k, v in self._layouts.items() if k != name}  # merged graphs
            if self._store is not None:
                self._store.remove(name)
            self.manifest = {**self.manifest, "adapters": {k: v for k, v in self.manifest["adapters"].items()
                                                           if k != name}}
            self._versions.pop(name, None)

    def _choose(self, adapter: AdapterChoice) -> tuple[Layout, dict, list | None]:
        """The layout to run, its adapter feeds and KV-cache seed for ``adapter``."""
        if self._store is not None:
            return (self._layouts[None], *self._store.feeds(adapter))
        if isinstance(adapter, str):
            layouts = self._layouts
            if adapter not in layouts:
                check_names([adapter], layouts, self.path)
            return layouts[adapter], {}, None
        raise EdgepeftError(f"{self.path} is a merged artifact: one graph per adapter, so only "
                            f"adapter=<name> works (one of {', '.join(self.adapters)}). Export with "
                            "--mode side for the base model and weighted mixes.")

    def _groups(self, adapter: AdapterChoice | Sequence[AdapterChoice], rows: int) -> list[tuple]:
        """``[(rows, layout, feeds, KV-cache seed)]``: the calls that run a batch of ``rows`` rows
        with ``adapter``, one choice for every row (``rows``: ``slice(None)``) or a list of one per
        row.

        A side-branch artifact runs a list in one call (:meth:`AdapterStore.feeds_rows`: each row
        weights its own adapters' rank columns); a merged one has a graph per adapter, so its rows
        run in one call per distinct adapter."""
        everyone = slice(None)
        if not isinstance(adapter, (list, tuple)):
            return [(everyone, *self._choose(adapter))]
        if len(adapter) != rows:
            raise EdgepeftError(f"adapter= lists {len(adapter)} choices for a batch of {rows} rows: pass "
                                "one per row (None, a name or a {name: weight} mix), or one choice for all rows.")
        if all(a == adapter[0] for a in adapter):
            return [(everyone, *self._choose(adapter[0]))]
        if self._store is not None:
            return [(everyone, self._layouts[None], *self._store.feeds_rows(adapter))]
        for a in adapter:  # a merged artifact runs names only: a mix or the base is refused with the reason
            if not isinstance(a, str):
                self._choose(a)
        order = list(dict.fromkeys(adapter))  # distinct choices, first seen first
        return [(np.array([b for b, a in enumerate(adapter) if a == choice]), *self._choose(choice))
                for choice in order]

    def _need(self, task: str, method: str) -> None:
        if self.task != task:
            other = "classify()" if self.task == "classification" else "logits() / generate()"
            raise EdgepeftError(f"{self.path} is a {self.task} artifact: {method} needs a {task} "
                                f"artifact; use {other}.")

    # ---------------------------------------------------------------- causal LM
    def logits(self, input_ids, adapter: AdapterChoice = None, attention_mask=None) -> np.ndarray:
        """Next-token logits for every position (causal LM artifacts).

        Args:
            input_ids: ``(B, S)`` ints, or a list of lists (ragged rows are left-padded).
            adapter: None (base), an adapter name, or ``{name: weight}``; or a list of those, one
                per row (per-row adapters, see :meth:`_groups`: rows that differ in LoRA-type
                adapters share one call, IA3 / DoRA scales and heads included; prompts and prefixes must agree).
            attention_mask: ``(B, S)`` 0/1, left or right padding; default all ones.

        Returns:
            ``(B, S, vocab)`` float32 (a prefix adapter's virtual tokens are not included).
        """
        self._need("causal-lm", "logits()")
        ids, mask = batch_inputs(input_ids, attention_mask, self.manifest["base"]["vocab_size"])
        groups = self._groups(adapter, ids.shape[0])
        if len(groups) == 1:
            _, layout, feeds, prefix = groups[0]
            return layout.logits(feeds, prefix, ids, mask)
        return _scatter(ids.shape[0], [(rows, layout.logits(feeds, prefix, ids[rows], mask[rows]))
                                       for rows, layout, feeds, prefix in groups])

    def generate(self, input_ids, max_new_tokens: int = 32, adapter: AdapterChoice = None,
                 attention_mask=None, stop_at_eos: bool = True, *, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
                 stop_token_ids: Sequence[int] = ()) -> np.ndarray:
        """Decoding with the KV cache (causal LM artifacts): greedy by default, or sampled.

        Args:
            input_ids: ``(B, S)`` ints or ragged lists (left-padded).
            max_new_tokens: tokens to add at most.
            adapter: as in :meth:`logits` (per-row lists too; on a merged artifact each adapter's
                rows are their own generation, so a seeded sample differs from one batch's).
            attention_mask: as in :meth:`logits`.
            stop_at_eos: stop a row at the base model's EOS (later positions repeat EOS).
            temperature, top_k, top_p, repetition_penalty, seed: how the next token is chosen
                (:class:`edgepeft.runtime.decode.Sampling`; temperature 0 is greedy).
            stop_token_ids: more tokens that end a row, as EOS does.

        Returns:
            ``(B, S + n)`` int64: the (padded) prompt followed by ``n <= max_new_tokens`` tokens.
        """
        self._need("causal-lm", "generate()")
        sampling = decode.Sampling(temperature, top_k, top_p, repetition_penalty, seed)
        ids, mask = batch_inputs(input_ids, attention_mask, self.manifest["base"]["vocab_size"])
        eos = decode.eos_ids(self.manifest, stop_at_eos, stop_token_ids)
        parts = [(rows, decode.generate(ids[rows], mask[rows], layout.decodings(feeds, prefix, ids[rows], mask[rows],
                                                                               max_new_tokens),
                                        max_new_tokens, eos, sampling))
                 for rows, layout, feeds, prefix in self._groups(adapter, ids.shape[0])]
        width = max(p.shape[1] for _, p in parts)  # groups that stop early end in EOS, as rows do
        fill = next(iter(eos)) if eos else 0
        return _scatter(ids.shape[0], [(rows, np.pad(p, ((0, 0), (0, width - p.shape[1])), constant_values=fill))
                                       for rows, p in parts])

    def _decodings(self, input_ids, attention_mask, adapter: AdapterChoice, max_new_tokens: int,
                   stop_at_eos: bool, stop_token_ids: Sequence[int]) -> tuple:
        """``(ids, mask, runs, eos)`` of a generation: the batch, its row groups' decodings and the
        tokens that end a row (what :meth:`generate` and :meth:`stream_text` share)."""
        ids, mask = batch_inputs(input_ids, attention_mask, self.manifest["base"]["vocab_size"])
        eos = decode.eos_ids(self.manifest, stop_at_eos, stop_token_ids)
        _, layout, feeds, prefix = self._groups(adapter, ids.shape[0])[0]  # one row: one group
        return ids, mask, layout.decodings(feeds, prefix, ids, mask, max_new_tokens), eos

    def batcher(self, capacity: int = 8, context: int | None = None):
        """A running batch that generations join and leave between decode steps, each with its
        own adapter and sampling, one session run per step
        (:class:`edgepeft.runtime.batching.Batcher`: fused and traced side-branch artifacts)."""
        from edgepeft.runtime.batching import Batcher

        return Batcher(self, capacity, context)

    # ---------------------------------------------------------------- classification
    def classify(self, texts_or_ids, adapter: AdapterChoice = None, attention_mask=None) -> np.ndarray:
        """Class probabilities (classification artifacts).

        Args:
            texts_or_ids: a string, a list of strings (tokenized with the artifact's tokenizer,
                truncated to the model's length, right-padded), ``(B, S)`` ints, or ragged lists of
                ids (right-padded).
            adapter: None (the base head; only when the base has a trained one), an adapter name,
                or ``{name: weight}`` (at most one of them may carry a head); or a list, one per row
                (as in :meth:`logits`: each row runs its own adapter's head on a side-branch artifact).
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
        if not base.get("head_trained", True) and any(
                a is None for a in (adapter if isinstance(adapter, (list, tuple)) else [adapter])):
            raise EdgepeftError(f"{self.path}: the base model has no trained classification head; "
                                f"choose an adapter ({', '.join(self.adapters)}) for every row.")
        groups = self._groups(adapter, _rows_of(texts_or_ids))
        for _, _, feeds, _ in groups:
            if not self.merged and not any(k.startswith("head.") for k in feeds) and not base.get("head_trained", True):
                raise EdgepeftError(f"adapter={adapter!r} carries no classification head and the base has "
                                    "no trained one; include an adapter with a head.")
        reserved = max(0 if feeds.get(PROMPT_INPUT) is None else feeds[PROMPT_INPUT].shape[0]
                       for _, _, feeds, _ in groups)
        ids, mask = self._encode(texts_or_ids, attention_mask, reserved)
        if len(groups) == 1:
            _, layout, feeds, _ = groups[0]
            return layout.classify(feeds, ids, mask)
        return _scatter(ids.shape[0], [(r, layout.classify(feeds, ids[r], mask[r])) for r, layout, feeds, _ in groups])

    def _encode(self, texts_or_ids, attention_mask, reserved: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Right-padded ids and mask; texts truncated to the model's length minus ``reserved``
        positions (a prompt adapter's virtual tokens) and to the longest graph call."""
        limit = self.manifest["base"].get("max_length", 512) - reserved
        if self._longest is not None:
            limit = min(limit, self._longest)
        return text.encode(texts_or_ids, attention_mask, self.manifest, lambda: self.tokenizer, limit, reserved)

    # ---------------------------------------------------------------- text
    @property
    def tokenizer(self):
        """The artifact's ``tokenizers.Tokenizer`` (loaded on first use)."""
        if self._tokenizer is None:
            self._tokenizer = text.load_tokenizer(self.path, self.manifest)
        return self._tokenizer

    def chat_prompt(self, messages: Sequence[dict]) -> str:
        """``[{role, content}, ...]`` rendered by the tokenizer's chat template, ending where the
        assistant's answer starts (:func:`edgepeft.runtime.text.chat_prompt`; needs jinja2)."""
        return text.chat_prompt(self.path, self.manifest, list(messages))

    def generate_text(self, prompt: str, max_new_tokens: int = 32, adapter: AdapterChoice = None, *,
                      stop: Sequence[str] = (), **sampling) -> str:
        """The continuation of ``prompt`` (its new tokens decoded), ended by EOS, a ``stop``
        string (not included) or ``max_new_tokens``; ``sampling``: the keyword options of
        :meth:`generate` (temperature, top_k, top_p, repetition_penalty, seed, stop_token_ids)."""
        return "".join(self.stream_text(prompt, max_new_tokens, adapter, stop=stop, **sampling))

    def stream_text(self, prompt: str, max_new_tokens: int = 32, adapter: AdapterChoice = None, *,
                    stop: Sequence[str] = (), temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                    repetition_penalty: float = 1.0, seed: int | None = None,
                    stop_token_ids: Sequence[int] = ()) -> Iterator[str]:
        """:meth:`generate_text` piece by piece, as the tokens come: each yield is new text.
        Text that could be the start of a ``stop`` string, or an unfinished UTF-8 character, is
        held back until the next tokens decide; the pieces join to :meth:`generate_text`'s result."""
        self._need("causal-lm", "stream_text()")
        out = text.TextStream(self.tokenizer, stop)
        sampling = decode.Sampling(temperature, top_k, top_p, repetition_penalty, seed)
        prompt_ids = self.tokenizer.encode(prompt).ids
        _, _, (run,), eos = self._decodings([prompt_ids], None, adapter, max_new_tokens, True, stop_token_ids)
        pick = decode.Picker(sampling, [prompt_ids])
        for nxt in decode.steps(run, max_new_tokens, eos, pick, slice(0, run.rows)):
            t = int(nxt[0])
            if t in eos:
                break
            piece = out.push(t)
            if piece:
                yield piece
            if out.stopped:
                return
        piece = out.flush()
        if piece:
            yield piece


def _rows_of(texts_or_ids) -> int:
    """How many rows ``classify`` gets: one for a string or a flat list of ids, else one per entry."""
    if isinstance(texts_or_ids, str):
        return 1
    if isinstance(texts_or_ids, np.ndarray):
        return 1 if texts_or_ids.ndim == 1 else len(texts_or_ids)
    flat = len(texts_or_ids) > 0 and isinstance(texts_or_ids[0], (int, np.integer))
    return 1 if flat else len(texts_or_ids)


def _scatter(rows: int, parts: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """One array of ``rows`` rows from ``[(row indices, their rows)]`` (the groups of a batch)."""
    first = parts[0][1]
    out = np.empty((rows, *first.shape[1:]), first.dtype)
    for index, part in parts:
        out[index] = part
    return out
