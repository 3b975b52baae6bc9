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
    "gemma3": dict(text_config=dict(_GEMMA, vocab_size=VOCAB + 4), mm_tokens_per_image=4,  # text tower
                   vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, image_size=28, patch_size=14),
                   boi_token_index=VOCAB, eoi_token_index=VOCAB + 1, image_token_index=VOCAB + 2),
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
        some, every = leaves[:3], "all-linear"
        if arch == "gemma3":  # the text tower's projections only (the vision tower is not exported)
            leaves = [x for x in leaves if x.endswith("_proj") and x != "out_proj"]
            some, every = rf".*language_model.*\.({'|'.join(leaves[:3])})", rf".*language_model.*\.({'|'.join(leaves)})"
        adapters = {"a": make_lora(base, root / "a", r=4, lora_alpha=8, target_modules=some),
                    "b": make_lora(base, root / "b", seed=2, r=6, lora_alpha=12, use_rslora=True,
                                   target_modules=every, rank_pattern={leaves[-1]: 3})}
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


# ------------------------------------------------------------------ --graph auto (the default)
def _export_cli(capsys, *argv) -> tuple[int, str]:
    from edgepeft.cli import main

    code = main(["export", *map(str, argv)])
    return code, capsys.readouterr().err


def test_auto_picks_fused_for_lora(llama_base, llama_adapters, tmp_path, capsys):
    """The default builds the fused graph for LoRA on a known family, and says so."""
    code, err = _export_cli(capsys, llama_base, "--adapter", f"chat={llama_adapters['chat']}", "--out", tmp_path / "o")
    assert code == 0 and "[edgepeft] graph: fused" in err
    assert Model(tmp_path / "o").fused


@pytest.mark.parametrize("case", ["prefix", "static", "fp16", "int8-static"])
def test_auto_falls_back_to_traced_and_says_why(case, llama_base, llama_adapters, tmp_path, capsys):
    """A kind, target or precision the fused graph cannot take: the traced graph, with one line
    that names the reason."""
    from helpers import make_adapter

    adapter = (make_adapter(llama_base, tmp_path / "p", "prefix") if case == "prefix" else llama_adapters["chat"])
    extra = {"prefix": [], "static": ["--target", "android-nnapi"], "fp16": ["--precision", "fp16"],
             "int8-static": ["--precision", "int8-static"]}[case]
    code, err = _export_cli(capsys, llama_base, "--adapter", f"a={adapter}", "--out", tmp_path / "o", *extra)
    assert code == 0, err
    line = next(x for x in err.splitlines() if "graph:" in x)
    want = {"prefix": "adapter 'a' has a prompt, prefix", "static": "fixes every shape", "fp16": "fp16",
            "int8-static": "int8-static"}[case]
    assert line.startswith("[edgepeft] graph: generic (the traced model; not fused: ") and want in line, line
    assert not Model(tmp_path / "o").fused


def test_auto_traces_other_families(tmp_path, capsys):
    """A family without a description (GPT-2) is traced, and the line names the families it knows."""
    from helpers import make_base

    base = make_base("gpt2", tmp_path / "gpt2", tokenizer=True)
    code, err = _export_cli(capsys, base, "--out", tmp_path / "o")
    assert code == 0 and "not fused: model_type 'gpt2' (the fused graph knows llama" in err


def test_cli_graph_choices_are_the_configs():
    import argparse

    from edgepeft.cli import _export_args
    from edgepeft.export.config import GRAPHS

    p = argparse.ArgumentParser()
    _export_args(p)
    action = next(a for a in p._actions if a.dest == "graph")
    assert tuple(action.choices) == GRAPHS and action.default == "auto"
