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

from edgepeft import families
from edgepeft.export import ExportConfig, export
from edgepeft.validate import Budget, validate
from edgepeft.runtime import Model
from helpers import FAMILIES, linear_leaves, make_family_base as _base, make_lora

STRICT = Budget(max_abs_logits=1e-4, min_top1=1.0, max_kl=1e-6, greedy_must_match=True)


def test_every_family_is_tested():
    assert set(FAMILIES) == set(families.REGISTRY)


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
    assert set(cases) == {"a", "b", "base", "mix(a=0.7,b=0.3)", "per-row(base|a|b|mix(a=0.7,b=0.3))"}
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
