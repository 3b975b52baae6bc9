"""The static-shape layout (targets with ``static_shapes``: NNAPI, Core ML, QNN): one session per
sequence bucket, a fixed batch, adapter inputs at fixed shapes (ranks padded to ``max_rank``) and a
fixed window of KV cache that slides. What it is given is padded to those shapes, so calls look
the same as on a dynamic artifact. numpy + onnxruntime only.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np

from edgepeft.contract import past_names
from edgepeft.errors import EdgepeftError
from edgepeft.runtime.adapters import Feeding
from edgepeft.runtime.batch import positions
from edgepeft.runtime.session import SessionOpener


class StaticLayout:
    """Runs the bucket graphs of a static-shape artifact (:class:`~edgepeft.runtime.layout.Layout`).

    Args:
        opener: opens and checks each bucket's graph.
        manifest: the artifact's manifest (``static``, ``graph.buckets``, ``graph.inputs``).
        adapter_inputs: the manifest's adapter input names.
        cache: ``[(kv_heads, head_dim)]`` per layer (empty for classifiers).
        share_weights: with several buckets, their sessions share one memory-mapped copy of the
            weights (:meth:`SessionOpener.shared_weights`: the ``.onnx`` graphs, not prepacked);
            False: each session loads and prepacks its own copy (faster calls on CPU, one copy of
            the weights per bucket). ``.ort`` files (``format="ort"``) carry their own copy.
    """

    def __init__(self, opener: SessionOpener, manifest: dict, adapter_inputs: Collection[str],
                 cache: list[tuple[int, int]], share_weights: bool = True):
        self.root = opener.root
        self.static = manifest["static"]  # batch, max_rank, context (causal LMs)
        # per-row weights (batch, 1, max_rank), default ones, and offsets (batch, 1, width), default zeros
        self.manifest_rows = frozenset(manifest.get("rows", {})) | frozenset(manifest.get("row_values", {}))
        self.cache = cache
        self.pad_id = (manifest.get("tokenizer") or {}).get("pad_token_id") or 0
        self.buckets = {}
        entries = manifest["graph"]["buckets"]
        # kept here: the sessions read these buffers (onnxruntime holds no reference to them)
        self.shared = opener.shared_weights(entries) if share_weights and len(entries) > 1 else None
        for entry in entries:
            opened = opener.open(entry, adapter_inputs, fixed=True, shared=self.shared)
            self.buckets[entry["seq"]] = opened.session
        self.longest = max(self.buckets)  # the longest fixed-shape graph
        self.fixed = dict(opened.shapes)  # each adapter input's fixed shape
        rows = self.manifest_rows
        graph_inputs = opened.session.get_inputs() + opened.session.get_overridable_initializers()
        self.fixed.update({i.name: tuple(i.shape) for i in graph_inputs if i.name in rows})
        zeros = {k: np.zeros(v, np.float32) for k, v in self.fixed.items()
                 if k not in opened.defaults and k not in rows}  # rows: their defaults
        # Adapter files are checked against the dynamic graph's shapes (ranks vary there).
        shapes = {i["name"]: i["shape"] for i in manifest["graph"]["inputs"] if i["name"] in adapter_inputs}
        self.feeding = Feeding(shapes=shapes, base=zeros, pad=self.pad)

    # ---------------------------------------------------------------- fixed shapes
    def pad(self, feeds: dict[str, np.ndarray], key) -> dict[str, np.ndarray]:
        """Zero-pad every feed to its fixed shape (ranks to max_rank) and add zeros for the rest:
        zero rows of A / columns of B add nothing, so the result is exact."""
        out = dict(self.feeding.base)
        for k, v in feeds.items():
            shape = self.fixed[k]
            if k in self.manifest_rows and v.shape[0] != shape[0]:
                if v.shape[0] > shape[0]:
                    raise EdgepeftError(f"{v.shape[0]} rows with different adapters: this static-shape "
                                        f"artifact runs {shape[0]} rows per call (its fixed batch). Pass at "
                                        "most that many rows per call, or export with a profile with a larger batch.")
                v = np.concatenate([v, np.repeat(v[-1:], shape[0] - v.shape[0], 0)])  # as row_groups fills
            if v.shape == shape:
                out[k] = v
                continue
            if len(v.shape) != len(shape) or any(d > e for d, e in zip(v.shape, shape)):
                names = " + ".join(f"{n}" for n, _ in key)
                raise EdgepeftError(
                    f"{names}: input {k} needs shape {v.shape}, above the fixed {shape} of this "
                    f"static-shape artifact (ranks of a mix add up; max_rank {self.static['max_rank']}). "
                    "Mix fewer adapters, or export with a profile with a larger max_rank.")
            z = np.zeros(shape, np.float32)
            z[tuple(slice(0, d) for d in v.shape)] = v
            out[k] = z
        return out

    def row_groups(self, ids: np.ndarray, mask: np.ndarray):
        """``(ids, mask)`` in groups of the fixed batch; the last group is filled up with copies of
        its last row (their outputs are dropped)."""
        b = self.static["batch"]
        for g in range(0, ids.shape[0], b):
            i, m = ids[g:g + b], mask[g:g + b]
            if i.shape[0] < b:
                fill = b - i.shape[0]
                i = np.concatenate([i, np.repeat(i[-1:], fill, 0)])
                m = np.concatenate([m, np.repeat(m[-1:], fill, 0)])
            yield i, m

    def chunks(self, length: int) -> list[int]:
        """Bucket sizes that cover ``length`` prompt tokens: the longest bucket while it fits,
        then the shortest one that holds the rest (left-padded)."""
        buckets = sorted(self.buckets)
        out, left = [], length
        while left > 0:
            s = buckets[-1] if left >= buckets[-1] else next(b for b in buckets if b >= left)
            out.append(s)
            left -= min(s, left)
        return out

    # ---------------------------------------------------------------- causal LM
    def _window_chunks(self, length: int, prefix, new_tokens: int) -> list[int]:
        """:meth:`chunks` of a prompt of ``length`` tokens, once it fits the KV window with the
        prefix and ``new_tokens`` decode steps.

        Raises:
            EdgepeftError: prompt (in padded chunks), prefix and new tokens do not fit the window.
        """
        c = self.static["context"]
        chunks = self.chunks(length)
        p = 0 if prefix is None else prefix[0][0].shape[2]
        need = p + sum(chunks) + new_tokens * min(self.buckets)
        if need > c:
            raise EdgepeftError(
                f"{self.root}: a prompt of {length} tokens (run as bucket(s) {chunks})"
                + (f", a prefix of {p}" if p else "") + (f" and {new_tokens} new tokens" if new_tokens else "")
                + f" take {need} slots of the fixed KV cache, which has context_length {c}. Shorten "
                "the prompt, generate fewer tokens, or export with a profile with a larger context_length.")
        return chunks

    def prefill(self, feeds: dict, ids: np.ndarray, mask: np.ndarray, prefix,
                new_tokens: int = 0) -> tuple[np.ndarray, list]:
        """Run a prompt through the bucket graphs on a fixed KV window.

        The window holds ``C = static.context`` positions per layer, newest last, with a 0/1 mask
        of which slots hold a token: a call of bucket ``S`` takes the window's last ``C - S``
        slots as past and appends ``S`` new ones; a prompt chunk shorter than its bucket is
        left-padded with masked slots. A prefix adapter's keys / values start the window.

        Args:
            ids, mask: ``(B, L)`` with ``B`` the fixed batch.
            new_tokens: slots to keep free for decoding.

        Returns:
            ``logits (B, L, V)`` of the real positions and the window ``[kv dict, mask (B, C)]``.

        Raises:
            EdgepeftError: prompt (in padded chunks), prefix and new tokens do not fit the window.
        """
        c, b = self.static["context"], ids.shape[0]
        chunks = self._window_chunks(ids.shape[1], prefix, new_tokens)
        p = 0 if prefix is None else prefix[0][0].shape[2]
        kv = {}
        for i, (h, d) in enumerate(self.cache):
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
            out.append(self.step(feeds, step_ids, step_mask, window)[:, pad:])
            at += real
        return np.concatenate(out, axis=1), window

    def step(self, feeds: dict, ids: np.ndarray, mask: np.ndarray, window: list) -> np.ndarray:
        """One call of the graph of bucket ``S = ids.shape[1]``; slides ``window`` in place."""
        s = ids.shape[1]
        kv, wmask = window
        full = np.concatenate([wmask[:, s:], mask], axis=1)  # (B, C): the slots the past keeps + new
        logits, *present = self.buckets[s].run(None, {
            "input_ids": ids, "attention_mask": full, "position_ids": positions(full)[:, -s:],
            **{n: v[:, :, s:] for n, v in kv.items()}, **feeds})  # past: (B, H, C - S, D)
        window[0] = {n: v for i in range(len(self.cache))
                     for n, v in zip(past_names(i), present[2 * i:2 * i + 2])}  # (B, H, C, D)
        window[1] = full
        return logits

    def logits(self, feeds: dict, prefix, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return np.concatenate([self.prefill(feeds, i, m, prefix)[0]
                               for i, m in self.row_groups(ids, mask)])[:ids.shape[0]]

    def decodings(self, feeds: dict, prefix, ids: np.ndarray, mask: np.ndarray, new_tokens: int) -> list:
        """One generation per group of the fixed batch."""
        self._window_chunks(ids.shape[1], prefix, new_tokens)
        return [_Decoding(self, feeds, prefix, i, m, new_tokens) for i, m in self.row_groups(ids, mask)]

    # ---------------------------------------------------------------- classifiers
    def classify(self, feeds: dict, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Right-pad to the shortest bucket that holds the longest row, in groups of the fixed batch."""
        s = next(b for b in sorted(self.buckets) if b >= ids.shape[1])
        ids = np.pad(ids, ((0, 0), (0, s - ids.shape[1])), constant_values=self.pad_id)  # (B, S)
        mask = np.pad(mask, ((0, 0), (0, s - mask.shape[1])))
        return np.concatenate([self.buckets[s].run(["logits"], {"input_ids": i, "attention_mask": m, **feeds})[0]
                               for i, m in self.row_groups(ids, mask)])[:ids.shape[0]]


class _Decoding:
    """A generation of one fixed-batch group: each step is a call of the shortest bucket with the
    new token last (left-padded with masked slots)."""

    def __init__(self, layout: StaticLayout, feeds: dict, prefix, ids: np.ndarray, mask: np.ndarray,
                 new_tokens: int):
        self.rows = ids.shape[0]
        self._layout, self._feeds, self._prefix = layout, feeds, prefix
        self._ids, self._mask, self._new = ids, mask, new_tokens
        self._window: list | None = None
        first = min(layout.buckets)
        self._step_ids = np.zeros((self.rows, first), np.int64)  # (B, S_min), the new token last
        self._step_mask = np.zeros((self.rows, first), np.int64)
        self._step_mask[:, -1] = 1

    def prefill(self) -> np.ndarray:
        logits, self._window = self._layout.prefill(self._feeds, self._ids, self._mask, self._prefix, self._new)
        return logits[:, -1]

    def step(self, tokens: np.ndarray) -> np.ndarray:
        self._step_ids[:, -1] = tokens  # the call reads it before returning: rewritten in place
        return self._layout.step(self._feeds, self._step_ids, self._step_mask, self._window)[:, -1]
