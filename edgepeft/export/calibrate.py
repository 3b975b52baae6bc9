"""Calibration feeds for static int8: the base and every adapter in turn, one iterator.

onnxruntime's calibrators merge ranges over everything a ``CalibrationDataReader`` yields, so
yielding each text batch once per adapter choice (base, then each adapter's inputs / prefix)
makes the activation ranges cover every adapter: none clips because calibration saw only the
base.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np

from edgepeft.contract import past_names
from edgepeft.data import load_texts
from edgepeft.kinds import FEATURES
from edgepeft.runtime.batch import positions

BATCH = 4
PROBE_BATCHES = 4  # calibration batches (of 4 texts) run to measure each MatMul's sensitivity


def quantization_feeds(cfg, task: str, model, adapters, sides: dict, specs, cache, quiet: bool):
    """What ``cfg.quant`` needs to quantize a graph of ``model``: ``(feeds for int8-static or None,
    a few base feeds for --protect's sensitivity or None)``."""
    calibration = probe = None
    if cfg.quant.precision == "int8-static":
        calibration = calibration_feeds(cfg, task, model, adapters, sides, specs, cache, quiet)
    if cfg.quant.protect:  # the feeds come base first: the first batches run the base model
        probe = list(itertools.islice(calibration_feeds(cfg, task, model, [], {}, specs, cache, True),
                                      PROBE_BATCHES))
    return calibration, probe


def fused_probe_feeds(cfg, model, cache, defaults) -> list[dict[str, np.ndarray]] | None:
    """``--protect``'s probe for a fused graph (``edgepeft.export.fused``): calibration texts as
    that graph takes them (rows at the left edge, ``seqlens_k``, ``total_sequence_length``, zeroed
    KV buffers) with the base's adapter inputs ``defaults`` (``(name, array)``: no adapter).
    None unless ``cfg.quant.protect``."""
    if not cfg.quant.protect:
        return None
    rows = _token_rows(cfg, model, load_texts(cfg.quant.calibration), 128)[:PROBE_BATCHES * BATCH]
    feeds = []
    for i in range(0, len(rows), BATCH):
        batch = rows[i:i + BATCH]
        longest = max(len(r) for r in batch)
        ids = np.zeros((len(batch), longest), np.int64)  # (B, L), pads after each row
        for j, r in enumerate(batch):
            ids[j, :len(r)] = r
        feed = {"input_ids": ids, "seqlens_k": np.array([len(r) - 1 for r in batch], np.int32),
                "total_sequence_length": np.array(longest, np.int32), **dict(defaults)}
        for layer, (h, d) in enumerate(zip(cache.kv_heads, cache.head_dims)):
            for name in past_names(layer):
                feed[name] = np.zeros((len(batch), h, longest, d), np.float32)  # (B, H_kv, L, D)
        feeds.append(feed)
    return feeds


def _token_rows(cfg, model, texts: list[str], limit: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(cfg.base)
        rows = [tok(t, truncation=True, max_length=limit)["input_ids"] for t in texts]
    except (OSError, ValueError, KeyError, TypeError):  # no tokenizer: seeded random ids
        rng = np.random.default_rng(0)
        vocab = model.config.get_text_config().vocab_size
        rows = [rng.integers(0, vocab, min(limit, 8 + len(t) // 6)).tolist() for t in texts]
    return [r for r in rows if r]


def calibration_feeds(cfg, task: str, model, adapters, sides: dict, specs, cache,
                      quiet: bool) -> Iterator[dict[str, np.ndarray]]:
    """Feeds for ``quantize_static``: every text batch with no adapter, then with each adapter.

    Unless ``quiet``, a bar on stderr counts the batches as the quantizer takes them.
    """
    texts = load_texts(cfg.quant.calibration)
    names = {s.name for s in specs}
    rows = _token_rows(cfg, model, texts, 128)
    choices = [None] + [a.name for a in adapters]

    def feeds():
        from edgepeft.progress import bar

        with bar(total=len(choices) * -(-len(rows) // BATCH), desc="calibrate", unit="batch", quiet=quiet) as done:
            for feed in batches():
                yield feed
                done.update()

    def batches():
        for choice in choices:
            side = sides.get(choice) if choice else None
            graph = {k: v for k, v in side.arrays(FEATURES).items() if k in names} if side else {}
            for i in range(0, len(rows), BATCH):
                batch = rows[i:i + BATCH]
                longest = max(len(r) for r in batch)
                ids = np.zeros((len(batch), longest), np.int64)
                mask = np.zeros_like(ids)
                for j, r in enumerate(batch):
                    if task == "causal-lm":  # left padding, as generation does
                        ids[j, longest - len(r):], mask[j, longest - len(r):] = r, 1
                    else:
                        ids[j, :len(r)], mask[j, :len(r)] = r, 1
                feed = {"input_ids": ids, "attention_mask": mask, **graph}
                if task == "causal-lm":
                    b = len(batch)
                    prefix = side.prefix if side else None
                    for layer, (h, d) in enumerate(zip(cache.kv_heads, cache.head_dims)):
                        kn, vn = past_names(layer)
                        if prefix:
                            k, v = prefix[layer]
                            feed[kn] = np.ascontiguousarray(np.broadcast_to(k, (b, *k.shape[1:])))
                            feed[vn] = np.ascontiguousarray(np.broadcast_to(v, (b, *v.shape[1:])))
                        else:
                            feed[kn] = feed[vn] = np.zeros((b, h, 0, d), np.float32)
                    if prefix:
                        mask = np.concatenate([np.ones((b, prefix[0][0].shape[2]), np.int64), mask], 1)
                        feed["attention_mask"] = mask
                    feed["position_ids"] = positions(mask)[:, -ids.shape[1]:]
                yield feed

    return feeds()
