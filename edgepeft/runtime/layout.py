"""The one interface every graph layout offers the ``Model``; the layout is chosen once, at load,
from the manifest (:func:`edgepeft.runtime.model.open_layouts`).

Layouts: :class:`~edgepeft.runtime.traced.TracedLayout` (the traced graph: mask, positions and a
growing KV cache), :class:`~edgepeft.runtime.fused.FusedLayout` (onnxruntime's fused kernels:
right padding, one KV buffer written in place) and :class:`~edgepeft.runtime.static.StaticLayout`
(fixed-shape bucket graphs on a sliding KV window). The ``Model`` resolves the adapter choice to
``feeds`` and ``prefix`` (the KV-cache seed or None) and hands them over as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from edgepeft.runtime.adapters import Feeding


class Decoding(Protocol):
    """One generation over ``rows`` rows: the prompt, then one token per row at a time."""

    rows: int

    def prefill(self) -> np.ndarray:
        """Run the prompt; ``(rows, V)`` logits of each row's next token."""

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Append ``tokens (rows,)``; ``(rows, V)`` logits of the next ones."""


class Layout(Protocol):
    """How the graph(s) of an artifact are run.

    ``feeding``: what the layout needs of the adapter feeds (shapes to check adapter files
    against, the base feeds, padding to fixed shapes). ``longest``: the longest sequence one
    graph call takes, or None when only the model's own limit applies.
    """

    feeding: Feeding
    longest: int | None

    def logits(self, feeds: dict, prefix: list | None, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """``(B, S, V)`` logits of every position of ``ids (B, S)`` (causal LMs)."""

    def decodings(self, feeds: dict, prefix: list | None, ids: np.ndarray, mask: np.ndarray,
                  new_tokens: int) -> Sequence[Decoding]:
        """Generations that cover the rows of ``ids`` in order, checked and ready to prefill.

        Each covers consecutive rows; the last may hold extra rows (dropped by the caller).
        """

    def classify(self, feeds: dict, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """``(B, num_labels)`` logits of right-padded ``ids (B, S)`` (classifiers)."""
