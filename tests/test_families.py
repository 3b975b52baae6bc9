"""The fused graph of every family in ``edgepeft.families`` against PyTorch + peft.

Per family: a tiny config with every feature the family description covers switched on (rope
scaling, biases, q/k norms, sandwich norms, partial rotary, NoPE layers, sliding windows shorter
than the prompts, soft caps) and every RMSNorm weight randomized (so a missing ``1 + w`` or q/k
norm shows); two LoRA adapters of different ranks and targets, exported once as a fused side
artifact. ``validate`` compares the base, each adapter and a 0.7/0.3 mix at every real position of
a left-padded batch (logits within 1e-4) and 32 greedy tokens, which run past the window.
"""

from __future__ import annotations

import pytest
import torch

from edgepeft import families
from edgepeft.export import ExportConfig, export
from edgepeft.validate import Budget, validate
from edgepeft.runtime import Model
from helpers import VOCAB, linear_leaves, make_lora

STRICT = Budget(max_abs_logits=1e-4, min_top1=1.0, max_kl=1e-6, greedy_must_match=True)
_ATTN = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128)
_GEMMA = dict(_ATTN, head_dim=16, num_hidden_layers=3, sliding_window=4, query_pre_attn_scalar=24,
              layer_types=["sliding_attention", "full_attention", "sliding_attention"])

# model_type -> tiny config: what each family's description must get right
FAMILIES = {
    "llama": dict(_ATTN, rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 16}),
    "qwen2": _ATTN,  # q/k/v biases
    "mistral": dict(_ATTN, sliding_window=4),
    "qwen3": dict(_ATTN, head_dim=16),  # q/k norm
    "smollm3": dict(_ATTN, num_hidden_layers=4, no_rope_layer_interval=2, pad_token_id=0),  # NoPE layers 1, 3
    "phi3": dict(_ATTN, hidden_size=128, pad_token_id=0, partial_rotary_factor=0.5),  # packed, rotary 16 of 32
    "gemma3_text": dict(_GEMMA, rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                 "full_attention": {"rope_type": "default", "rope_theta": 1e6}}),
    "gemma2": dict(_GEMMA, attn_logit_softcapping=3.0, final_logit_softcapping=2.0,
                   attn_implementation="eager"),
}


def test_every_family_is_tested():
    assert set(FAMILIES) == set(families.REGISTRY)


def _base(arch: str, path):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(arch, **FAMILIES[arch])
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norms (and biases): away from their init, so each one counts
                p.copy_(torch.randn_like(p) * 0.3 + (0.0 if "gemma" in arch else 1.0) * ("norm" in name))
    model.save_pretrained(path)
    return path


_BUILT: dict = {}


def _artifact(arch: str, tmp_path_factory):
    if arch not in _BUILT:
        root = tmp_path_factory.mktemp(arch)
        base = _base(arch, root / "base")
        leaves = linear_leaves(base)
        adapters = {"a": make_lora(base, root / "a", r=4, lora_alpha=8, target_modules=leaves[:3]),
                    "b": make_lora(base, root / "b", seed=2, r=6, lora_alpha=12, use_rslora=True,
                                   target_modules="all-linear", rank_pattern={leaves[-1]: 3})}
        out = root / "fused"
        export(ExportConfig(base=base, out=out, adapters=tuple(adapters.items()), graph="fused"), quiet=True)
        _BUILT[arch] = base, out
    return _BUILT[arch]


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_fused_family_matches_peft(arch, tmp_path_factory):
    base, out = _artifact(arch, tmp_path_factory)
    assert Model(out).fused
    result = validate(out, base, max_new_tokens=32, budget=STRICT)
    cases = {c["case"]: c for c in result["cases"]}
    assert set(cases) == {"a", "b", "base", "mix(a=0.7,b=0.3)"}
    for name, c in cases.items():
        assert not c["failures"], f"{arch} {name}: {c['failures']}"
        assert c["greedy_tokens"] == 4 * 32
    assert result["passed"]
