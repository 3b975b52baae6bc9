"""Gemma 3 (``gemma3_text``) and Gemma 2 on the traced graph, every adapter kind, against PyTorch.

Tiny configs built here: three layers, sliding / full / sliding, with a sliding window of 4, so
the longest prompt (9 tokens) and the 10 greedy tokens after it cross the window; Gemma 3 has its
own rotary base per layer type and ``query_pre_attn_scalar`` != ``head_dim``; Gemma 2 has
attention-logit and final-logit soft-capping set low enough to bite. The budget is the issue's:
max |Δlogits| <= 1e-4 in fp32 at every real position of a left-padded batch, greedy tokens
identical. The PyTorch side is PEFT's ``PeftModel`` (edgepeft's own module for bottleneck
adapters) run without a cache, and run on each row unpadded for the prompt-learning kinds (PEFT
drops given position ids for them, so its padded rows are not a reference).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import VOCAB, make_adapter, make_bottleneck, make_tokenizer
from test_loha import make_loha
from edgepeft.export import ExportConfig, export
from edgepeft.export.base import load_causal_lm
from edgepeft.runtime import Model
from edgepeft.validate import Budget, validate

TIGHT = Budget(max_abs_logits=1e-4)
WINDOW = 4
ROWS = [[5, 9, 11, 40, 3, 7, 21, 50, 8], [30, 31, 32], [60, 61, 62, 63, 64, 65]]  # left-padded
NEW = 10
# validate's inputs (word-level tokenizer, "wN" is token N): short, two of them past the window
PROMPTS = ["w5 w9 w11 w40 w3 w7 w21", "w30 w31"]
TEXTS = ["w60 w61 w62 w63 w64 w65 w66 w67", "w70 w71 w72"]
PROMPT_KINDS = ("prefix", "prompt", "p_tuning")
TARGETS = ["q_proj", "v_proj", "down_proj"]
KINDS = ("lora", "dora", "ia3", "prefix", "prompt", "p_tuning", "bottleneck", "loha", "vera")


def _config(family: str):
    """A tiny Gemma 3 text / Gemma 2 config with sliding and full layers."""
    from transformers import Gemma2Config, Gemma3TextConfig

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=128,
                  sliding_window=WINDOW, query_pre_attn_scalar=24,
                  layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    if family == "gemma3":
        return Gemma3TextConfig(**common)
    # caps low enough that tanh is far from linear on this model's scores and logits
    return Gemma2Config(**common, attn_logit_softcapping=1.0, final_logit_softcapping=2.0,
                        initializer_range=0.1)


def _adapters(base: Path, root: Path) -> dict[str, Path]:
    """One adapter of every kind in the registry, each with non-zero (randomized) weights."""
    targets = {"lora": {"target_modules": TARGETS},
               "dora": {"target_modules": ["q_proj", "o_proj", "up_proj"], "use_rslora": True},
               "ia3": {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
               "vera": {"target_modules": TARGETS}}
    ads = {k: make_adapter(base, root / k, k, seed=i + 1, **targets.get(k, {}))
           for i, k in enumerate(("lora", "dora", "ia3", "prefix", "prompt", "p_tuning", "vera"))}
    ads["bottleneck"] = make_bottleneck(base, root / "bottleneck")
    ads["loha"] = make_loha(base, root / "loha", seed=9, target_modules=TARGETS)
    return ads


@pytest.fixture(scope="module", params=["gemma3", "gemma2"])
def family(request, tmp_path_factory):
    """(family, base, adapters, side artifact with every adapter), exported once per family."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_config(request.param)).save_pretrained(root / "base")
    make_tokenizer(root / "base")
    ads = _adapters(root / "base", root)
    export(ExportConfig(graph="generic", base=root / "base", out=root / "side", adapters=tuple(ads.items())), quiet=True)
    return request.param, root / "base", ads, root / "side"


def _reference(base: Path, kind: str | None, adapter: Path | None):
    """The PyTorch model of one adapter (PeftModel; bottleneck: edgepeft's torch module)."""
    from peft import PeftModel

    from edgepeft.kinds import kind_module

    model = load_causal_lm(base)
    if kind is None:
        return model
    if kind == "bottleneck":
        return kind_module(kind).REFERENCE.load(model, adapter, None).eval()
    return PeftModel.from_pretrained(model, adapter).eval()


@torch.no_grad()
def _ref_rows(model, rows: list[list[int]], per_row: bool) -> list[np.ndarray]:
    """PyTorch logits ``(len(row), V)`` of each row: unpadded one by one, or as a left-padded batch."""
    if per_row:
        return [model(input_ids=torch.tensor([r])).logits[0, -len(r):].numpy() for r in rows]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])  # (B, S)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.numpy()  # (B, S, V)
    return [logits[i, width - len(r):] for i, r in enumerate(rows)]


def _ref_greedy(model, rows: list[list[int]], per_row: bool) -> np.ndarray:
    """Greedy tokens by full recomputation (no cache): the plain definition. -> (B, NEW)"""
    rows = [list(r) for r in rows]
    for _ in range(NEW):
        for r, logits in zip(rows, _ref_rows(model, rows, per_row)):
            r.append(int(logits[-1].argmax()))
    return np.array([r[-NEW:] for r in rows])


def _max_diff(got: np.ndarray, want: list[np.ndarray]) -> float:
    """Max |Δ| over the real positions of the runtime's left-padded ``(B, S, V)`` logits."""
    return max(float(np.abs(got[i, got.shape[1] - len(w):] - w).max()) for i, w in enumerate(want))


@pytest.mark.parametrize("kind", (None, *KINDS))
def test_side_artifact_matches_pytorch(family, kind):
    """Logits at every real position of a left-padded batch and 10 greedy tokens, per kind."""
    _, base, ads, side = family
    per_row = kind in PROMPT_KINDS
    model = _reference(base, kind, ads.get(kind))
    want = _ref_rows(model, ROWS, per_row)
    m = Model(side)
    assert _max_diff(m.logits(ROWS, adapter=kind), want) <= 1e-4
    if kind is not None:  # the adapter really changes the output
        assert _max_diff(m.logits(ROWS), want) > 1e-2
    got = m.generate(ROWS, max_new_tokens=NEW, adapter=kind, stop_at_eos=False)[:, -NEW:]
    np.testing.assert_array_equal(got, _ref_greedy(model, ROWS, per_row))


def test_window_hides_old_keys(family):
    """Guard against a graph that ignores the window: the same weights with a window wider than
    every sequence give other logits past the window, and the artifact matches only the real one."""
    from transformers import AutoModelForCausalLM

    name, base, _, side = family
    wide = AutoModelForCausalLM.from_pretrained(base, sliding_window=64).eval()
    got = Model(side).logits(ROWS)
    assert _max_diff(got, _ref_rows(wide, ROWS, False)) > 1e-3, name
    assert _max_diff(got, _ref_rows(_reference(base, None, None), ROWS, False)) <= 1e-4


def test_gemma2_soft_capping_is_in_the_graph(family):
    """Gemma 2's attention and final logit soft-capping change its output here, and the graph
    keeps both (one tanh per layer and one on the logits)."""
    import onnx
    from transformers import AutoModelForCausalLM

    name, base, _, side = family
    if name != "gemma2":
        pytest.skip("Gemma 3 has no soft-capping")
    uncapped = AutoModelForCausalLM.from_pretrained(base, attn_logit_softcapping=None,
                                                    final_logit_softcapping=None).eval()
    got = Model(side).logits(ROWS)
    assert _max_diff(got, _ref_rows(uncapped, ROWS, False)) > 1e-2
    assert np.abs(got).max() <= 2.0  # the final cap
    graph = onnx.load(side / "model.onnx", load_external_data=False).graph
    assert sum(n.op_type == "Tanh" for n in graph.node) == 3 + 1


def test_padding_and_decoding_with_a_prefix_cross_the_window(family):
    """A prefix adapter's keys sit before a row's left padding: rows decoded together give the
    same tokens as each row alone, as the window counts positions, not cache slots."""
    _, _, _, side = family
    m = Model(side)
    for name in PROMPT_KINDS:
        together = m.generate(ROWS, max_new_tokens=NEW, adapter=name, stop_at_eos=False)[:, -NEW:]
        alone = [m.generate([r], max_new_tokens=NEW, adapter=name, stop_at_eos=False)[0, -NEW:] for r in ROWS]
        np.testing.assert_array_equal(together, np.stack(alone))


def test_validate_passes_on_gemma3(family):
    """``edgepeft validate``'s Python entry point: every kind, the mixes and compositions it
    builds, and the base."""
    name, base, ads, side = family
    if name != "gemma3":
        pytest.skip("validate runs on the Gemma 3 artifact")
    result = validate(side, base, PROMPTS, TEXTS, max_new_tokens=NEW, budget=TIGHT, quiet=True)
    cases = {c["case"]: c for c in result["cases"]}
    assert set(ads) | {"base"} <= set(cases)
    assert not {n: c["failures"] for n, c in cases.items() if c["failures"]} and result["passed"]


def test_merged_export_matches_pytorch(family, tmp_path):
    """A merged artifact (the DoRA adapter folded into the weights): logits and greedy tokens."""
    name, base, ads, _ = family
    if name != "gemma3":
        pytest.skip("one merged export, on Gemma 3")
    out = tmp_path / "merged"
    export(ExportConfig(graph="generic", base=base, out=out, mode="merged", adapters=(("dora", ads["dora"]),)), quiet=True)
    model = _reference(base, "dora", ads["dora"])
    m = Model(out)
    assert _max_diff(m.logits(ROWS, adapter="dora"), _ref_rows(model, ROWS, False)) <= 1e-4
    got = m.generate(ROWS, max_new_tokens=NEW, adapter="dora", stop_at_eos=False)[:, -NEW:]
    np.testing.assert_array_equal(got, _ref_greedy(model, ROWS, False))
