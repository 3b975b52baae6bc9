"""``Model``: an edgepeft artifact in an app. onnxruntime + numpy (+ tokenizers for text) only.

A side-branch artifact is one onnxruntime session; an adapter is a set of graph inputs. Choosing
an adapter per call only changes which arrays are fed: no session is rebuilt, no base weight is
copied, and concurrent calls with different adapters do not interfere (each call builds its own
feed dict; ``InferenceSession.run`` is thread-safe).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgepeft.errors import EdgepeftError
from edgepeft.runtime.manifest import (inside, lora_input_names, past_names, read_manifest,
                                       sha256_file)

AdapterChoice = str | Mapping[str, float] | None
_MIX_CACHE_SIZE = 8


def _read_adapter_file(path: Path, where: str) -> dict[str, np.ndarray]:
    """Arrays of an ``.onnx_adapter`` file as numpy (copies, so the file can be closed)."""
    try:
        params = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
    except Exception as e:  # onnxruntime raises its own Fail / RuntimeError types
        raise EdgepeftError(f"{path}: cannot read adapter file ({e}); {where}") from None
    return {k: np.array(v.numpy(), copy=True) for k, v in params.items()}


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
        providers: onnxruntime execution providers, default CPU.
        threads: intra-op threads, default onnxruntime's choice.

    Raises:
        EdgepeftError: a missing or altered file (checksums), an adapter whose shapes do not match
            the graph, or a manifest from another format version.
    """

    def __init__(self, path: str | Path, providers: Sequence[str] | None = None,
                 threads: int | None = None):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if self.manifest["task"] != "causal-lm":
            raise EdgepeftError(f"{self.path}: task {self.manifest['task']!r} is not supported by "
                                "this runtime version.")
        self._providers = list(providers or ["CPUExecutionProvider"])
        self._options = ort.SessionOptions()
        self._options.log_severity_level = 3  # the LoRA defaults are overridable initializers by design
        if threads:
            self._options.intra_op_num_threads = threads
        self._lock = threading.Lock()
        self._mixes: OrderedDict[tuple, dict[str, np.ndarray]] = OrderedDict()
        self._tokenizer = None
        kv = self.manifest["kv_cache"]
        self._cache = list(zip(kv["kv_heads"], kv["head_dims"]))
        self.merged = self.manifest["mode"] == "merged"
        self._sessions: dict[str | None, ort.InferenceSession] = {}
        self._arrays: dict[str, dict[str, np.ndarray]] = {}
        if self.merged:
            for name, entry in self.manifest["adapters"].items():
                self._sessions[name] = self._session(entry["graph"])
        else:
            self._sessions[None] = self._session(self.manifest["graph"])
            self._slot_shapes = {}
            for slot in self.manifest["lora_slots"]:
                a, b = lora_input_names(slot["module"])
                self._slot_shapes[a] = (None, slot["in"])
                self._slot_shapes[b] = (slot["out"], None)
            self._empty = {n: np.zeros([0 if d is None else d for d in shape], np.float32)
                           for n, shape in self._slot_shapes.items()}
            for name, entry in self.manifest["adapters"].items():
                self._arrays[name] = self._load_adapter(name, entry)

    # ---------------------------------------------------------------- loading
    def _session(self, graph: dict) -> ort.InferenceSession:
        where = f"{self.path / 'manifest.json'}"
        file = inside(self.path, graph["file"], where)
        data = inside(self.path, graph["data_file"], where)
        for f in (file, data):
            if not f.is_file():
                raise EdgepeftError(f"{f}: missing from the artifact. Export it again.")
        return ort.InferenceSession(str(file), self._options, providers=self._providers)

    def _load_adapter(self, name: str, entry: dict) -> dict[str, np.ndarray]:
        where = f"adapter {name!r} of {self.path / 'manifest.json'}"
        file = inside(self.path, entry["file"], where)
        if not file.is_file():
            raise EdgepeftError(f"{file}: missing ({where}). Export the artifact again.")
        if sha256_file(file) != entry["sha256"]:
            raise EdgepeftError(f"{file}: sha256 does not match the manifest ({where}); the file "
                                "was changed or damaged. Export the artifact again.")
        if entry.get("base_fingerprint") != self.manifest["base"]["fingerprint"]:
            raise EdgepeftError(f"{file}: made for base {entry.get('base_fingerprint')}, this "
                                f"artifact's base is {self.manifest['base']['fingerprint']} ({where}).")
        arrays = _read_adapter_file(file, where)
        for k, v in arrays.items():
            shape = self._slot_shapes.get(k)
            if shape is None:
                raise EdgepeftError(f"{file}: input {k!r} is not a LoRA slot of this graph ({where}).")
            if v.ndim != 2 or v.dtype != np.float32 or any(e is not None and e != d
                                                           for e, d in zip(shape, v.shape)):
                raise EdgepeftError(f"{file}: {k} has shape {v.shape} {v.dtype}, the graph takes "
                                    f"{tuple('r' if d is None else d for d in shape)} float32 ({where}).")
        return arrays

    # ---------------------------------------------------------------- adapters
    @property
    def adapters(self) -> list[str]:
        """Names of the adapters in the artifact."""
        return list(self.manifest["adapters"])

    def _lora_feeds(self, adapter: AdapterChoice) -> dict[str, np.ndarray]:
        """LoRA inputs for a choice: None (base), a name, or ``{name: weight}`` (a weighted mix).

        A mix concatenates along the rank axis: ``[A_1; A_2]`` and ``[w_1 B_1 | w_2 B_2]``
        (``B`` already carries the scale), which computes ``sum_i w_i s_i B_i A_i`` exactly.
        """
        if adapter is None:
            return self._empty
        if isinstance(adapter, str):
            self._check_names([adapter])
            return {**self._empty, **self._arrays[adapter]}
        if not isinstance(adapter, Mapping) or not adapter:
            raise EdgepeftError(f"adapter={adapter!r}: pass None, a name, or a non-empty "
                                "{name: weight} mix.")
        self._check_names(list(adapter))
        key = tuple(sorted((n, float(w)) for n, w in adapter.items()))
        with self._lock:
            if key in self._mixes:
                self._mixes.move_to_end(key)
                return self._mixes[key]
        feeds = dict(self._empty)
        for a_name, b_name in (lora_input_names(s["module"]) for s in self.manifest["lora_slots"]):
            parts = [(self._arrays[n][a_name], w * self._arrays[n][b_name])
                     for n, w in key if a_name in self._arrays[n]]
            if parts:
                feeds[a_name] = np.concatenate([a for a, _ in parts], axis=0)  # (sum r, in)
                feeds[b_name] = np.concatenate([b for _, b in parts], axis=1)  # (out, sum r)
        with self._lock:
            self._mixes[key] = feeds
            while len(self._mixes) > _MIX_CACHE_SIZE:
                self._mixes.popitem(last=False)
        return feeds

    def _check_names(self, names: list[str]) -> None:
        unknown = [n for n in names if n not in self.manifest["adapters"]]
        if unknown:
            raise EdgepeftError(f"adapter {unknown[0]!r} is not in {self.path}; it has: "
                                f"{', '.join(self.adapters) or '(none)'}.")

    def _session_for(self, adapter: AdapterChoice) -> tuple[ort.InferenceSession, dict]:
        if not self.merged:
            return self._sessions[None], self._lora_feeds(adapter)
        if isinstance(adapter, str):
            self._check_names([adapter])
            return self._sessions[adapter], {}
        raise EdgepeftError(f"{self.path} is a merged artifact: one graph per adapter, so only "
                            f"adapter=<name> works (one of {', '.join(self.adapters)}). Export with "
                            "--mode side for the base model and weighted mixes.")

    # ---------------------------------------------------------------- running
    def _empty_past(self, batch: int) -> dict[str, np.ndarray]:
        feeds = {}
        for i, (h, d) in enumerate(self._cache):
            for n in past_names(i):
                feeds[n] = np.zeros((batch, h, 0, d), np.float32)
        return feeds

    def _run(self, session, lora, ids, mask, past) -> list[np.ndarray]:
        pos = positions(mask)[:, -ids.shape[1]:]  # (B, S)
        return session.run(None, {"input_ids": ids, "attention_mask": mask, "position_ids": pos,
                                  **past, **lora})

    def logits(self, input_ids, adapter: AdapterChoice = None, attention_mask=None) -> np.ndarray:
        """Next-token logits for every position.

        Args:
            input_ids: ``(B, S)`` ints, or a list of lists (ragged rows are left-padded).
            adapter: None (base), an adapter name, or ``{name: weight}``.
            attention_mask: ``(B, S)`` 0/1, left or right padding; default all ones.

        Returns:
            ``(B, S, vocab)`` float32.
        """
        session, lora = self._session_for(adapter)
        ids, mask = batch_inputs(input_ids, attention_mask, self.manifest["base"]["vocab_size"])
        return self._run(session, lora, ids, mask, self._empty_past(ids.shape[0]))[0]

    def generate(self, input_ids, max_new_tokens: int = 32, adapter: AdapterChoice = None,
                 attention_mask=None, stop_at_eos: bool = True) -> np.ndarray:
        """Greedy decoding with the KV cache.

        Args:
            input_ids: ``(B, S)`` ints or ragged lists (left-padded).
            max_new_tokens: tokens to add at most.
            adapter: as in :meth:`logits`.
            attention_mask: as in :meth:`logits`.
            stop_at_eos: stop a row at the base model's EOS (later positions repeat EOS).

        Returns:
            ``(B, S + n)`` int64: the (padded) prompt followed by ``n <= max_new_tokens`` tokens.
        """
        session, lora = self._session_for(adapter)
        ids, mask = batch_inputs(input_ids, attention_mask, self.manifest["base"]["vocab_size"])
        eos = self.manifest["base"].get("eos_token_id") if stop_at_eos else None
        eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        out = [ids]
        done = np.zeros(ids.shape[0], bool)
        past = self._empty_past(ids.shape[0])
        step = ids
        for _ in range(max_new_tokens):
            logits, *present = self._run(session, lora, step, mask, past)
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

            self._tokenizer = Tokenizer.from_file(str(inside(self.path, f"{tok['dir']}/tokenizer.json",
                                                             str(self.path / "manifest.json"))))
        return self._tokenizer

    def generate_text(self, prompt: str, max_new_tokens: int = 32, adapter: AdapterChoice = None) -> str:
        """Tokenize ``prompt``, :meth:`generate`, and decode only the new tokens."""
        ids = self.tokenizer.encode(prompt).ids
        out = self.generate([ids], max_new_tokens=max_new_tokens, adapter=adapter)
        return self.tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)
