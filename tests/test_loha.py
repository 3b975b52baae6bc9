"""LoHa (PEFT ``peft_type`` LOHA): exported as an exact LoRA of rank r², against PEFT's own model.

Adapters are made by PEFT with ``init_weights=False`` (both Hadamard factors non-zero) and their
``w*_a`` factors enlarged, so a no-op export cannot pass. The budget is the issue's: max
|Δlogits| <= 1e-4 in fp32 at every real position, greedy tokens identical.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import VOCAB, make_adapter, make_base, make_encoder
from edgepeft.errors import EdgepeftError
from edgepeft.export import ExportConfig, export
from edgepeft.export.base import load_causal_lm
from edgepeft.kinds import loha, read_adapter
from edgepeft.quantize import QuantConfig
from edgepeft.runtime import Model
from edgepeft.validate import Budget, validate

TIGHT = Budget(max_abs_logits=1e-4)
# as tests/test_quantize.py: tiny random models have flat distributions, KL is the bound
LOOSE = Budget(max_abs_logits=None, min_top1=0.0, max_kl=1e-2, greedy_must_match=False)


def make_loha(base: Path, out: Path, seed: int = 1, task: str = "CAUSAL_LM", **kwargs) -> Path:
    """Save a PEFT LoHa adapter with random non-zero factors (w1_a, w2_a enlarged 3x: each delta 9x)
    and, for SEQ_CLS, a re-drawn head in ``modules_to_save``."""
    from peft import LoHaConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = (AutoModelForCausalLM.from_pretrained(base) if task == "CAUSAL_LM"
             else AutoModelForSequenceClassification.from_pretrained(base, num_labels=2))
    config = LoHaConfig(**{"r": 4, "alpha": 8, "init_weights": False, **kwargs})
    config.task_type = task
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "hada_w1_a" in n or "hada_w2_a" in n:
                p.mul_(3.0)
            elif "modules_to_save" in n and p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.5)
    peft_model.save_pretrained(out)
    return out


def _peft(base: Path, adapter: Path, task: str = "CAUSAL_LM"):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    model = (AutoModelForCausalLM.from_pretrained(base) if task == "CAUSAL_LM"
             else AutoModelForSequenceClassification.from_pretrained(base, num_labels=2))
    return PeftModel.from_pretrained(model, adapter).eval()


def _mixed(base: Path, weights: dict[Path, float]):
    """The base with ``sum_i w_i delta_W_i`` added, each delta from PEFT's own ``get_delta_weight``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = load_causal_lm(base)
    named = dict(model.named_modules())
    with torch.no_grad():
        for adapter, w in weights.items():
            for n, m in _peft(base, adapter).named_modules():
                if isinstance(m, BaseTunerLayer) and "default" in m.active_adapters:
                    named[n.removeprefix("base_model.model.")].weight += w * m.get_delta_weight("default")
    return model.eval()


def _positions(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.clip(mask.cumsum(-1) - 1, 0, None))


@torch.no_grad()
def _torch_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                 position_ids=_positions(mask)).logits.numpy()


@torch.no_grad()
def _torch_greedy(model, ids: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
    """Greedy tokens by full recomputation (no cache): the plainest reference."""
    new = []
    for _ in range(n):
        nxt = _torch_logits(model, ids, mask)[:, -1].argmax(-1)[:, None]
        new.append(nxt)
        ids, mask = np.concatenate([ids, nxt], 1), np.concatenate([mask, np.ones_like(nxt)], 1)
    return np.concatenate(new, 1)


def _ragged():
    ids = np.random.default_rng(5).integers(3, VOCAB, (3, 7))
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, :1] = 0
    return ids, mask


def _assert_matches(got: np.ndarray, want: np.ndarray, mask: np.ndarray, tol: float = 1e-4) -> None:
    for r in range(mask.shape[0]):
        real = mask[r] == 1
        np.testing.assert_allclose(got[r][real], want[r][real], atol=tol, rtol=0)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama, two LoHa adapters (ranks 4 and 8, other targets) and a LoRA."""
    root = tmp_path_factory.mktemp("loha")
    base = make_base("llama", root / "base", tokenizer=True)
    ads = {
        # r² = 16 (4 on down_proj) < min(in, out): the Khatri-Rao form; alpha_pattern on v_proj
        "hada": make_loha(base, root / "hada", r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                          rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3}),
        # r² = 64 >= min(in, out): the dense form; all-linear as PEFT expands it, minus exclusions;
        # use_effective_conv2d changes nothing on Linear layers
        "hada8": make_loha(base, root / "hada8", seed=2, r=8, alpha=4, target_modules="all-linear",
                           exclude_modules=["q_proj", "gate_proj"], rank_pattern={"o_proj": 3},
                           use_effective_conv2d=True),
        "lora": make_adapter(base, root / "lora", "lora", seed=3, target_modules=["q_proj", "k_proj"]),
    }
    return root, base, ads


@pytest.fixture(scope="module")
def side(llama):
    root, base, ads = llama
    export(ExportConfig(graph="generic", base=base, out=root / "side", adapters=tuple(ads.items())), quiet=True)
    return root / "side"


def test_factors_give_peft_delta(llama):
    """``B @ A`` of both forms equals PEFT's ``get_delta_weight`` (fp32), per layer."""
    from peft.tuners.loha import LoHaLayer

    _, base, ads = llama
    model = load_causal_lm(base)
    for name in ("hada", "hada8"):
        ours = read_adapter(name, ads[name], model)
        theirs = {n.removeprefix("base_model.model."): m.get_delta_weight("default")
                  for n, m in _peft(base, ads[name]).named_modules() if isinstance(m, LoHaLayer)}
        assert set(ours.modules) == set(theirs)
        for n, m in ours.modules.items():
            a, b = m.lora()
            assert a.shape[0] == b.shape[1] == min(m.rank ** 2, *theirs[n].shape), n
            torch.testing.assert_close(b @ a, theirs[n], atol=1e-6, rtol=0, msg=n)
    hada8 = read_adapter("hada8", ads["hada8"], model)
    assert not any(n.endswith(("q_proj", "gate_proj")) for n in hada8.modules) and len(hada8.modules) == 10
    assert {m.rank for n, m in hada8.modules.items() if n.endswith("o_proj")} == {3}


@pytest.mark.parametrize("name", ["hada", "hada8"])
def test_side_branch_equals_peft(side, llama, name):
    """Every real position of a left-padded batch within 1e-4, greedy tokens identical."""
    _, base, ads = llama
    ids, mask = _ragged()
    ref = _peft(base, ads[name])
    m = Model(side)
    want = _torch_logits(ref, ids, mask)
    _assert_matches(m.logits(ids, name, mask), want, mask)
    assert np.abs(want - _torch_logits(load_causal_lm(base), ids, mask)).max() > 1e-2  # not a no-op
    got = m.generate(ids, 6, name, mask, stop_at_eos=False)[:, ids.shape[1]:]
    np.testing.assert_array_equal(got, _torch_greedy(ref, ids, mask, 6))


def test_adapters_swap_per_call(side):
    """One model, adapters chosen per call: each answer is the adapter's alone."""
    m = Model(side)
    ids = np.array([[5, 9, 11, 40, 3, 7]])
    first = {n: m.logits(ids, adapter=n) for n in (None, "hada", "hada8", "lora")}
    for n in ("hada8", None, "hada", "lora", "hada"):
        np.testing.assert_array_equal(m.logits(ids, adapter=n), first[n])
    assert np.abs(first["hada"] - first["hada8"]).max() > 1e-2
    assert m.manifest["adapters"]["hada"]["kind"] == "loha"
    assert {f for s in m.manifest["slots"] for f in s["features"]} == {"lora"}


@pytest.mark.parametrize("weights", [{"hada": 0.7, "lora": 0.3}, {"hada": 0.6, "hada8": 0.4}], ids=str)
def test_mix_equals_sum_of_peft_deltas(side, llama, weights):
    _, base, ads = llama
    ids, mask = _ragged()
    want = _torch_logits(_mixed(base, {ads[n]: w for n, w in weights.items()}), ids, mask)
    _assert_matches(Model(side).logits(ids, weights, mask), want, mask)


def test_merged_equals_peft(llama):
    from peft import PeftModel

    root, base, ads = llama
    ours = load_causal_lm(base)
    loha.merge(ours, read_adapter("hada", ads["hada"], ours))
    theirs = PeftModel.from_pretrained(load_causal_lm(base), ads["hada"]).merge_and_unload()
    for (n, p), (_, q) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=n)
    out = root / "merged"
    export(ExportConfig(graph="generic", base=base, out=out, mode="merged", adapters=(("hada", ads["hada"]), ("hada8", ads["hada8"]))),
           quiet=True)
    ids, mask = _ragged()
    m = Model(out)
    for name in ("hada", "hada8"):
        _assert_matches(m.logits(ids, name, mask), _torch_logits(_peft(base, ads[name]), ids, mask), mask)


def test_verify_and_inspect(side, capsys):
    from edgepeft.cli import main
    from edgepeft.contract import verify

    assert verify(side) == []
    assert main(["verify", str(side)]) == 0 and capsys.readouterr().out.strip().endswith("OK")
    assert main(["inspect", str(side)]) == 0
    out = capsys.readouterr().out
    assert "fed as LoRA of ranks [4, 16]" in out and "fed as LoRA of ranks [9, 32, 64]" in out, out


def test_validate_passes(side, llama):
    """validate's PyTorch side is PEFT's (LoHa's REFERENCE): each adapter and a LoHa mix, 1e-4."""
    _, base, _ = llama
    result = validate(side, base, max_new_tokens=4, budget=TIGHT)
    cases = {c["case"]: c for c in result["cases"]}
    assert {"base", "hada", "hada8", "lora", "mix(hada=0.7,hada8=0.3)"} <= set(cases)
    assert result["passed"], result["cases"]
    for c in cases.values():
        assert c["max_abs_logits"] <= 1e-4 and c["greedy_mismatches"] == 0


@pytest.fixture(scope="module", params=["int8", "int4"])
def quantized(request, llama):
    root, base, ads = llama
    out = root / request.param
    export(ExportConfig(graph="generic", base=base, out=out, adapters=(("hada", ads["hada"]), ("lora", ads["lora"])),
                        quant=QuantConfig(precision=request.param)), quiet=True)
    return request.param, out


def test_quantized_base_keeps_the_adapter(quantized, side, llama):
    """As tests/test_quantize.py for LoRA: the quantized output is nearer the fp32 output with the
    adapter than without it, and validate's loose budget holds."""
    precision, out = quantized
    _, base, _ = llama
    q, ref = Model(out), Model(side)
    ids = np.array([[5, 9, 11, 40, 3, 7], [30, 31, 32, 33, 34, 35]])
    ref_base = ref.logits(ids)
    for choice in ["hada", {"hada": 0.7, "lora": 0.3}]:
        got, want = q.logits(ids, adapter=choice), ref.logits(ids, adapter=choice)
        assert np.abs(want - ref_base).max() > 1e-2
        assert np.linalg.norm(got - want) < 0.75 * np.linalg.norm(got - ref_base), (precision, choice)
    result = validate(out, base, max_new_tokens=4, budget=LOOSE)
    assert result["passed"], result["cases"]


def test_fused_graph_equals_peft(llama):
    """``--graph fused`` takes LoHa as the LoRA it is: single adapters and a LoHa + LoRA mix."""
    root, base, ads = llama
    out = root / "fused"
    export(ExportConfig(base=base, out=out, adapters=tuple(ads.items()), graph="fused"), quiet=True)
    m = Model(out)
    assert m.fused
    ids, mask = _ragged()
    for name in ("hada", "hada8"):
        ref = _peft(base, ads[name])
        _assert_matches(m.logits(ids, name, mask), _torch_logits(ref, ids, mask), mask)
        got = m.generate(ids, 6, name, mask, stop_at_eos=False)[:, ids.shape[1]:]
        np.testing.assert_array_equal(got, _torch_greedy(ref, ids, mask, 6))
    mix = {"hada": 0.7, "lora": 0.3}
    want = _torch_logits(_mixed(base, {ads[n]: w for n, w in mix.items()}), ids, mask)
    _assert_matches(m.logits(ids, mix, mask), want, mask)


def test_encoder_classifier_side_and_merged(tmp_path):
    """A BERT classifier: the LoHa adapter carries its head (modules_to_save), side and merged."""
    base = make_encoder("bert", tmp_path / "bert")
    ad = make_loha(base, tmp_path / "cls", task="SEQ_CLS", target_modules=["query", "value", "intermediate.dense"])
    assert json.loads((ad / "adapter_config.json").read_text())["modules_to_save"]
    rows = [[5, 9, 11, 40], [7, 8], [30, 31, 32, 33, 34, 35, 36]]
    ids = np.zeros((3, 7), np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):  # right padding, as the runtime pads
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    with torch.no_grad():
        want = _peft(base, ad, "SEQ_CLS")(input_ids=torch.from_numpy(ids),
                                           attention_mask=torch.from_numpy(mask)).logits.numpy()
    for mode in ("side", "merged"):
        out = tmp_path / mode
        export(ExportConfig(graph="generic", base=base, out=out, mode=mode, adapters=(("cls", ad),)), quiet=True)
        m = Model(out)
        np.testing.assert_allclose(m.classify_logits(rows, adapter="cls"), want, atol=1e-4, rtol=0)
        assert validate(out, base, budget=TIGHT)["passed"]
    assert Model(tmp_path / "side").manifest["adapters"]["cls"]["head"] == ["classifier.bias", "classifier.weight"]


# ---------------------------------------------------------------- edgepeft train --kind loha
def _jsonl(path: Path, classification: bool) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(16):
        ws = rng.integers(3, VOCAB, rng.integers(3, 10))
        row = {"text": " ".join(f"w{w}" for w in ws)}
        rows.append({**row, "label": "pos" if ws[0] % 2 else "neg"} if classification else row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_train_exports_and_validates(llama, tmp_path):
    """``train --kind loha`` writes a PEFT LoHa folder that exports and validates within 1e-4."""
    from edgepeft.train import TrainConfig, train

    _, base, _ = llama
    out = tmp_path / "trained"
    summary = train(TrainConfig("loha", base, _jsonl(tmp_path / "lm.jsonl", False), out, steps=3, batch_size=4),
                    quiet=True)
    assert summary["kind"] == "loha" and summary["trainable_params"] > 0
    assert summary["final_loss"] == summary["final_loss"]  # not NaN
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LOHA" and cfg["alpha"] == 2 * cfg["r"]
    assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]  # PEFT's LoHa default for Llama
    export(ExportConfig(graph="generic", base=base, out=tmp_path / "art", adapters=(("t", out),)), quiet=True)
    ids = np.array([[5, 9, 11, 40, 3, 7]])
    assert np.abs(Model(tmp_path / "art").logits(ids, "t") - Model(tmp_path / "art").logits(ids)).max() > 1e-6
    assert validate(tmp_path / "art", base, max_new_tokens=4, budget=TIGHT)["passed"]


def test_cli_trains_a_classifier(tmp_path, capsys):
    """The CLI offers ``--kind loha``; on BERT the head travels with the adapter and exports."""
    from edgepeft.cli import main

    base = make_encoder("bert", tmp_path / "bert", hidden=32)
    out = tmp_path / "cls"
    code = main(["train", str(base), "--data", str(_jsonl(tmp_path / "cls.jsonl", True)), "--kind", "loha",
                 "--out", str(out), "--steps", "2", "--batch-size", "4", "--quiet"])
    assert code == 0 and capsys.readouterr().out.startswith("trained loha (classification, labels neg, pos)")
    export(ExportConfig(graph="generic", base=base, out=tmp_path / "art", adapters=(("c", out),)), quiet=True)
    assert Model(tmp_path / "art").manifest["adapters"]["c"]["head"] == ["classifier.bias", "classifier.weight"]
    assert validate(tmp_path / "art", base, budget=TIGHT)["passed"]


# ---------------------------------------------------------------- refusals
def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ad"
    shutil.copytree(src, dst)
    return dst


def _edit_tensors(ad: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(ad / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, ad / "adapter_model.safetensors")


def _edit_config(ad: Path, **changes) -> None:
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg.update(changes)
    (ad / "adapter_config.json").write_text(json.dumps(cfg))


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def _nan(t):
    t[f"{Q0}.hada_w2_b"][0, 0] = float("nan")


@pytest.mark.parametrize("tensors, config, message", [
    (lambda t: t.update({f"{Q0}.hada_t1": torch.zeros(4, 4, 1, 1)}), {}, r"hada_t1.*convolution factor.*nn\.Linear"),
    (lambda t: t.update({f"{Q0}.lora_A.weight": torch.zeros(4, 64)}), {}, r"lora_A.weight' is not a LoHa factor"),
    (lambda t: t.pop(f"{Q0}.hada_w2_b"), {}, r"q_proj has hada_w1_a, hada_w1_b, hada_w2_a but needs"),
    (lambda t: t.update({f"{Q0}.hada_w1_b": torch.zeros(4, 32)}), {}, r"expected hada_w1_a / hada_w2_a \(64, r\)"),
    (_nan, {}, r"q_proj\.hada_w2_b contains NaN or Inf"),
    (None, {"r": 5}, r"config says rank 5 .* tensors have rank 4"),
    (None, {"target_modules": ["q_proj", "v_proj"]}, r"which target_modules does not name"),
    (None, {"target_modules": ["q_proj", "v_proj", "down_proj", "k_proj"]}, r"name 2 module\(s\) without weights"),
    (None, {"layers_pattern": "layers"}, r"PEFT rejects this LoHa config"),
    (lambda t: t.update({"base_model.model.lm_head.weight": torch.zeros(VOCAB, 64)}), {"modules_to_save": ["lm_head"]},
     r"lm_head.weight \(modules_to_save\); on a causal LM"),
])
def test_refusals_name_the_file(llama, tmp_path, tensors, config, message):
    _, base, ads = llama
    ad = _copy(ads["hada"], tmp_path)
    if tensors:
        _edit_tensors(ad, tensors)
    _edit_config(ad, **config)
    with pytest.raises(EdgepeftError, match=message) as e:
        read_adapter("hada", ad, load_causal_lm(base))
    assert str(ad) in str(e.value)


def test_other_bases_and_conv1d_are_refused(llama, tmp_path):
    """A LoHa made for wider layers; one claiming GPT-2's Conv1D (which PEFT's LoHa cannot adapt)."""
    _, base, _ = llama
    wider = make_base("llama", tmp_path / "wider", hidden_size=32, num_attention_heads=2, intermediate_size=64)
    ad = make_loha(wider, tmp_path / "ad", target_modules=["q_proj"])
    with pytest.raises(EdgepeftError, match=r"ad/adapter_model.safetensors: model\.layers\.0\.self_attn\.q_proj: "
                                            r"expected hada_w1_a / hada_w2_a \(64, r\).*found hada_w1_a \(32, 4\)"):
        read_adapter("ad", ad, load_causal_lm(base))
    gpt2 = make_base("gpt2", tmp_path / "gpt2")
    conv = _copy(ad, tmp_path / "conv")
    _edit_config(conv, target_modules=["c_attn"])
    key = "base_model.model.transformer.h.{}.attn.c_attn"
    _edit_tensors(conv, lambda t: (t.clear(), t.update({
        key.format(i) + "." + p: torch.ones((192, 4) if p.endswith("_a") else (4, 64))
        for i in range(2) for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")})))
    with pytest.raises(EdgepeftError, match=r"conv/ad/adapter_config.json: LoHa on 'transformer\.h\.0\.attn\.c_attn', "
                                            r"a Conv1D; edgepeft exports LoHa on nn\.Linear layers only"):
        read_adapter("conv", conv, load_causal_lm(gpt2))


def test_static_target_counts_the_exported_rank(llama, tmp_path):
    """A static target pads ranks to max_rank: LoHa's rank there is r², and it is checked as such."""
    from edgepeft.targets import load_target
    from test_targets import SMALL_NPU  # max_rank 10: r² = 16 does not fit

    _, base, ads = llama
    (tmp_path / "npu.toml").write_text(SMALL_NPU)
    with pytest.raises(EdgepeftError, match=r"has lora rank 16 as exported, above max_rank 10"):
        export(ExportConfig(graph="generic", base=base, out=tmp_path / "o", adapters=(("hada", ads["hada"]),),
                            target=load_target(tmp_path / "npu.toml")), quiet=True)
    assert not (tmp_path / "o").exists()


LOHA_KEYS = ["peft_type", "task_type", "r", "alpha", "target_modules", "exclude_modules", "rank_pattern",
             "alpha_pattern", "layers_to_transform", "layers_pattern", "modules_to_save", "use_effective_conv2d",
             "rank_dropout", "module_dropout", "init_weights", "inference_mode"]


@pytest.fixture(scope="module")
def scratch(llama, tmp_path_factory):
    """(base model, a scratch dir) for the fuzz cases."""
    _, base, _ = llama
    return load_causal_lm(base), tmp_path_factory.mktemp("fuzz-loha")


@settings(max_examples=120, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzzed_loha_config(llama, scratch, data):
    """Whatever adapter_config.json says, reading returns or raises EdgepeftError (as tests/test_fuzz.py)."""
    from test_fuzz import JSON, refused_or_ok

    _, _, ads = llama
    model, root = scratch
    ad = root / "ad"
    shutil.rmtree(ad, ignore_errors=True)
    shutil.copytree(ads["hada"], ad)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    for _ in range(data.draw(st.integers(1, 3), label="n")):
        key = data.draw(st.sampled_from(LOHA_KEYS), label="key")
        if data.draw(st.booleans(), label="delete"):
            cfg.pop(key, None)
        else:
            cfg[key] = data.draw(JSON, label="value")
    cfg["peft_type"] = "LOHA"
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    refused_or_ok(lambda: read_adapter("x", ad, model))
