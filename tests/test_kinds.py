"""Every adapter kind on a decoder: side branch and merged, against PEFT's own model.

The budget here is the issue's: max |Δlogits| <= 1e-4 in fp32 at real-token positions, greedy
generations identical, for each kind, a LoRA mix and a LoRA + prefix composition.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import make_adapter, make_base, make_bottleneck
from edgepeft.errors import EdgepeftError
from edgepeft.export import ExportConfig, export
from edgepeft.runtime import Model
from edgepeft.validate import Budget, validate

TIGHT = Budget(max_abs_logits=1e-4)
PEFT_KINDS = ("lora", "dora", "ia3", "prefix", "prompt", "p_tuning")


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    """A tiny Llama and one adapter of every kind (+ a second LoRA and bottleneck for mixes)."""
    root = tmp_path_factory.mktemp("kinds")
    base = make_base("llama", root / "base", tokenizer=True)
    targets = {"lora": {"target_modules": ["q_proj", "v_proj", "down_proj"]},
               "dora": {"target_modules": ["q_proj", "o_proj", "up_proj"], "use_rslora": True}}
    ads = {k: make_adapter(base, root / k, k, seed=i + 1, **targets.get(k, {}))
           for i, k in enumerate(PEFT_KINDS)}
    ads["lora2"] = make_adapter(base, root / "lora2", "lora", seed=11, r=6, target_modules=["q_proj", "k_proj"])
    ads["houlsby"] = make_bottleneck(base, root / "houlsby")
    ads["pfeiffer"] = make_bottleneck(base, root / "pfeiffer", config="pfeiffer", act="relu", seed=6)
    return base, ads


@pytest.fixture(scope="module")
def side(kinds, tmp_path_factory):
    base, ads = kinds
    out = tmp_path_factory.mktemp("kinds-side") / "out"
    export(ExportConfig(graph="generic", base=base, out=out, adapters=tuple(ads.items())), quiet=True)
    return out


def test_every_kind_mix_and_composition_match_pytorch(side, kinds):
    base, ads = kinds
    result = validate(side, base, max_new_tokens=6, budget=TIGHT)
    cases = {c["case"]: c for c in result["cases"]}
    assert set(ads) | {"base"} <= set(cases)
    assert "mix(lora=0.7,lora2=0.3)" in cases  # a LoRA mix
    assert "mix(lora=1,prefix=1)" in cases  # LoRA + prefix composition
    bad = {n: c["failures"] for n, c in cases.items() if c["failures"]}
    assert not bad and result["passed"]
    for c in cases.values():
        assert c["max_abs_logits"] <= 1e-4 and c["greedy_mismatches"] == 0


@pytest.mark.parametrize("kind", PEFT_KINDS)
def test_side_branch_equals_peft_forward(side, kinds, kind):
    """Directly against PeftModel's forward (no edgepeft code on the torch side)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, ads = kinds
    ids = np.array([[5, 9, 11, 40, 3, 7], [30, 31, 32, 33, 34, 35]])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), ads[kind]).eval()
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids)).logits[:, -ids.shape[1]:].numpy()
        plain = AutoModelForCausalLM.from_pretrained(base)(input_ids=torch.from_numpy(ids)).logits.numpy()
    got = Model(side).logits(ids, adapter=kind)
    assert np.abs(got - ref).max() <= 1e-4
    assert np.abs(ref - plain).max() > 1e-2  # the adapter really changes the output


def test_every_kind_changes_the_output(side):
    m = Model(side)
    ids = np.array([[5, 9, 11, 40, 3, 7]])
    base = m.logits(ids)
    for name in m.adapters:
        assert np.abs(m.logits(ids, adapter=name) - base).max() > 1e-2, name


def test_bottleneck_mixes_by_concatenation(side):
    """Bottleneck deltas are linear in the up-projection: weight 0 is the base, 1 the adapter,
    and a 50/50 mix of one adapter with itself under two names is the adapter."""
    m = Model(side)
    ids = np.array([[5, 9, 11, 40, 3, 7]])
    np.testing.assert_allclose(m.logits(ids, adapter={"houlsby": 0.0}), m.logits(ids), atol=1e-5)
    np.testing.assert_allclose(m.logits(ids, adapter={"houlsby": 1.0}), m.logits(ids, adapter="houlsby"), atol=1e-5)
    both = m.logits(ids, adapter={"houlsby": 1.0, "pfeiffer": 1.0})
    assert np.abs(both - m.logits(ids, adapter="houlsby")).max() > 1e-3


@pytest.mark.parametrize("choice, message", [
    ({"ia3": 0.5}, r"ia3_(in|out)\..* does not scale linearly; give it weight 1"),
    ({"dora": 1.0, "ia3": 1.0, "prompt": 1.0}, r"prompt tuning on a decoder.*cannot be combined"),
    ({"prefix": 1.0, "prompt": 1.0}, r"both prefixes"),
    ({"prefix": 0.5}, r"is a prefix .*give it weight 1"),
    ({"lora": 1.0, "nope": 1.0}, r"adapter 'nope' is not in"),
])
def test_compositions_that_have_no_meaning_are_refused(side, choice, message):
    with pytest.raises(EdgepeftError, match=message):
        Model(side).logits([[5, 6, 7]], adapter=choice)


def test_generation_with_prefix_kinds_pads_and_decodes(side):
    """Ragged rows (left padding) give the same tokens as each row alone, for every prefix kind."""
    m = Model(side)
    rows = [[5, 9, 11, 40], [7, 8]]
    for name in ("prefix", "prompt", "p_tuning"):
        together = m.generate(rows, max_new_tokens=5, adapter=name, stop_at_eos=False)[:, -5:]
        alone = [m.generate([r], max_new_tokens=5, adapter=name, stop_at_eos=False)[0, -5:] for r in rows]
        np.testing.assert_array_equal(together, np.stack(alone))


@pytest.fixture(scope="module")
def merged(kinds, tmp_path_factory):
    base, ads = kinds
    out = tmp_path_factory.mktemp("kinds-merged") / "out"
    pick = ("lora", "dora", "ia3")
    export(ExportConfig(graph="generic", base=base, out=out, adapters=tuple((k, ads[k]) for k in pick), mode="merged"),
           quiet=True)
    return out


def test_merged_kinds_match_pytorch(merged, kinds):
    base, _ = kinds
    result = validate(merged, base, max_new_tokens=6, budget=TIGHT)
    assert [c["case"] for c in result["cases"]] == ["lora", "dora", "ia3"]
    assert result["passed"], result["cases"]


@pytest.mark.parametrize("kind", ["prefix", "prompt", "houlsby"])
def test_merging_a_non_linear_kind_is_refused(kinds, tmp_path, kind):
    base, ads = kinds
    with pytest.raises(EdgepeftError, match=r"cannot be merged.*--mode side"):
        export(ExportConfig(graph="generic", base=base, out=tmp_path / "m", adapters=((kind, ads[kind]),), mode="merged"),
               quiet=True)
    assert not (tmp_path / "m").exists()


def test_conv1d_family_kinds(tmp_path):
    """GPT-2 stores weights transposed (Conv1D): IA3, DoRA, prefix and bottleneck still match."""
    base = make_base("gpt2", tmp_path / "base")
    ads = {"ia3": make_adapter(base, tmp_path / "ia3", "ia3", seed=1),
           "dora": make_adapter(base, tmp_path / "dora", "dora", seed=2, target_modules=["c_attn", "c_proj"],
                                fan_in_fan_out=True),
           "prefix": make_adapter(base, tmp_path / "prefix", "prefix", seed=3),
           "bottleneck": make_bottleneck(base, tmp_path / "bn", config="pfeiffer", act="silu", seed=4)}
    export(ExportConfig(graph="generic", base=base, out=tmp_path / "side", adapters=tuple(ads.items())), quiet=True)
    assert validate(tmp_path / "side", base, max_new_tokens=4, budget=TIGHT)["passed"]
    export(ExportConfig(graph="generic", base=base, out=tmp_path / "merged", mode="merged",
                        adapters=(("ia3", ads["ia3"]), ("dora", ads["dora"]))), quiet=True)
    assert validate(tmp_path / "merged", base, max_new_tokens=4, budget=TIGHT)["passed"]
