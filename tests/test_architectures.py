"""Every decoder family we claim: side and merged artifacts agree with peft's PyTorch model.

Per family: two adapters (different ranks and targets; one rsLoRA with rank/alpha patterns),
exported once as a side-branch artifact (and merged, for MERGED_ARCHS); ``validate`` compares each adapter, a
0.7/0.3 mix and the base model at every real-token position of a left-padded batch, plus 32 greedy
tokens (the torch side without a cache).
"""

from __future__ import annotations

import pytest

from helpers import ARCHS, MERGED_ARCHS, linear_leaves, make_base, make_lora
from edgepeft.export import ExportConfig, export
from edgepeft.validate import Budget, validate

STRICT = Budget(max_abs_logits=1e-4, min_top1=1.0, max_kl=1e-6, greedy_must_match=True)


_BUILT: dict = {}


def _artifact(arch: str, mode: str, tmp_path_factory):
    """(base, artifact) for a family and mode; adapters and exports are built once per run."""
    if arch not in _BUILT:
        root = tmp_path_factory.mktemp(arch)
        base = make_base(arch, root / "base")
        leaves = linear_leaves(base)
        extra = {"fan_in_fan_out": True} if arch == "gpt2" else {}
        adapters = {
            "a": make_lora(base, root / "a", r=4, lora_alpha=8, target_modules=leaves[:2], **extra),
            "b": make_lora(base, root / "b", seed=2, r=6, lora_alpha=12, use_rslora=True,
                           target_modules="all-linear", rank_pattern={leaves[-1]: 3},
                           alpha_pattern={leaves[0]: 5}, **extra),
        }
        _BUILT[arch] = (root, base, adapters, {})
    root, base, adapters, outs = _BUILT[arch]
    if mode not in outs:
        outs[mode] = root / mode
        export(ExportConfig(graph="generic", base=base, out=outs[mode], adapters=tuple(adapters.items()), mode=mode),
               quiet=True)
    return base, outs[mode]


@pytest.mark.parametrize("arch, mode", [(a, "side") for a in ARCHS] + [(a, "merged") for a in MERGED_ARCHS])
def test_artifact_matches_peft(arch, mode, tmp_path_factory):
    base, out = _artifact(arch, mode, tmp_path_factory)
    result = validate(out, base, max_new_tokens=32, budget=STRICT)
    cases = {c["case"]: c for c in result["cases"]}
    expected = {"a", "b"} | ({"base", "mix(a=0.7,b=0.3)", "per-row(base|a|b|mix(a=0.7,b=0.3))"}
                             if mode == "side" else set())
    assert set(cases) == expected
    for name, c in cases.items():
        assert not c["failures"], f"{arch} {mode} {name}: {c['failures']}"
        assert c["greedy_tokens"] == 4 * 32
    assert result["passed"]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_adapters_change_the_output(arch, tmp_path_factory):
    """Guard against a no-op: each adapter moves the logits well beyond the tolerance."""
    import numpy as np

    from edgepeft.runtime import Model

    _, out = _artifact(arch, "side", tmp_path_factory)
    m = Model(out)
    ids = np.arange(3, 15).reshape(2, 6)
    base = m.logits(ids)
    for name in m.adapters:
        assert np.abs(m.logits(ids, adapter=name) - base).max() > 1e-2
