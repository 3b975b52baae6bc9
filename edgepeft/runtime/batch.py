"""Token batches as the graphs take them: ``(B, S)`` int64 ids with a 0/1 mask, and the
position ids transformers derives from the mask. numpy only.
"""

from __future__ import annotations

import numpy as np

from edgepeft.errors import EdgepeftError


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
