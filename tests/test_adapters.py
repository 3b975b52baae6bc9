"""Reading PEFT LoRA dirs: PEFT's own semantics (scales, patterns, Conv1D) and clear refusals."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch

from helpers import make_base, make_lora
from edgepeft.kinds import lora, read_adapter
from edgepeft.errors import EdgepeftError
from edgepeft.export.base import load_causal_lm


@pytest.fixture(scope="module")
def llama(llama_base):
    return load_causal_lm(llama_base)


def _copy(src, tmp_path, name="ad"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _edit_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def test_scales_follow_peft(llama, llama_base, llama_adapters):
    """Per-layer scales (rsLoRA, rank_pattern, alpha_pattern) equal peft's own ``scaling``."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(load_causal_lm(llama_base), llama_adapters["sql"], adapter_name="sql")
    ours = read_adapter("sql", llama_adapters["sql"], llama)
    from peft.tuners.lora import LoraLayer

    theirs = {n.removeprefix("base_model.model."): m.scaling["sql"] for n, m in peft_model.named_modules()
              if isinstance(m, LoraLayer)}
    assert set(ours.modules) == set(theirs)
    for name, m in ours.modules.items():
        assert m.scale == pytest.approx(theirs[name]), name
    assert {m.A.shape[0] for n, m in ours.modules.items() if n.endswith("o_proj")} == {2}
    assert len({m.scale for m in ours.modules.values()}) == 3  # default, o_proj rank, down_proj alpha


def test_layers_to_transform_and_regex_targets(llama, llama_base, llama_adapters, tmp_path):
    code = read_adapter("code", llama_adapters["code"], llama)
    assert sorted(code.modules) == ["model.layers.1.mlp.up_proj", "model.layers.1.self_attn.k_proj"]
    assert {m.scale for m in code.modules.values()} == {1.5}
    ad = make_lora(llama_base, tmp_path / "re", target_modules=r"model\.layers\.0\..*(q_proj|down_proj)")
    regex = read_adapter("re", ad, llama)
    assert sorted(regex.modules) == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj"]


def test_merge_equals_peft_merge_for_conv1d(tmp_path):
    """GPT-2 Conv1D stores (in, out): the merged weights equal peft's merge_and_unload."""
    from peft import PeftModel

    base = make_base("gpt2", tmp_path / "base")
    ad = make_lora(base, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                   fan_in_fan_out=True)
    ours = load_causal_lm(base)
    lora.merge(ours, read_adapter("ad", ad, ours))
    theirs = PeftModel.from_pretrained(load_causal_lm(base), ad).merge_and_unload()
    for (n, p), (_, q) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=n)
    assert not torch.equal(ours.state_dict()["transformer.h.0.attn.c_attn.weight"],
                           load_causal_lm(base).state_dict()["transformer.h.0.attn.c_attn.weight"])


def test_legacy_bin_is_read_with_weights_only(llama, llama_adapters, tmp_path):
    from safetensors.torch import load_file

    ad = _copy(llama_adapters["chat"], tmp_path)
    st = ad / "adapter_model.safetensors"
    torch.save(load_file(st), ad / "adapter_model.bin")
    st.unlink()
    got = read_adapter("chat", ad, llama)
    ref = read_adapter("chat", llama_adapters["chat"], llama)
    for n in ref.modules:
        assert torch.equal(got.modules[n].A, ref.modules[n].A)


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("touch /tmp/edgepeft-pwned",))


def test_malicious_pickle_runs_nothing(llama, llama_adapters, tmp_path):
    import os

    ad = _copy(llama_adapters["chat"], tmp_path)
    (ad / "adapter_model.safetensors").unlink()
    with open(ad / "adapter_model.bin", "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    if os.path.exists("/tmp/edgepeft-pwned"):
        os.unlink("/tmp/edgepeft-pwned")
    with pytest.raises(EdgepeftError, match="adapter_model.bin: refused to load"):
        read_adapter("chat", ad, llama)
    assert not os.path.exists("/tmp/edgepeft-pwned")


@pytest.mark.parametrize("change, message", [
    ({"peft_type": "LOKR"}, r"peft_type 'LOKR' is not supported\. Supported: LORA"),
    ({"bias": "all"}, r"bias='all'.*Retrain with bias='none'"),
    ({"use_dora": True}, r"has A, B but needs A, B, m .*DoRA's lora_magnitude_vector"),
    ({"target_modules": ["qq_proj"]}, r"matches no module of the base model\. Modules that exist: q_proj \(x2\), k_proj"),
    ({"target_modules": ["q_proj", "v_proj", "k_proj"]}, r"name 2 module\(s\) without weights"),
    ({"r": 5}, r"config says rank 5 .* tensors have rank 4"),
])
def test_config_refusals(llama, llama_adapters, tmp_path, change, message):
    ad = _copy(llama_adapters["chat"], tmp_path)
    _edit_config(ad, **change)
    with pytest.raises(EdgepeftError, match=message) as e:
        read_adapter("chat", ad, llama)
    assert str(ad) in str(e.value)


def test_file_refusals(llama, llama_adapters, tmp_path):
    ad = _copy(llama_adapters["chat"], tmp_path)
    st = ad / "adapter_model.safetensors"
    st.write_bytes(st.read_bytes()[:100])
    with pytest.raises(EdgepeftError, match=r"adapter_model.safetensors: cannot read safetensors file"):
        read_adapter("chat", ad, llama)
    st.unlink()
    with pytest.raises(EdgepeftError, match=r"no adapter_model.safetensors"):
        read_adapter("chat", ad, llama)
    (ad / "adapter_config.json").write_text("{not json")
    with pytest.raises(EdgepeftError, match=r"adapter_config.json: not valid JSON"):
        read_adapter("chat", ad, llama)
    with pytest.raises(EdgepeftError, match=r"adapter directory not found"):
        read_adapter("chat", tmp_path / "missing", llama)
    with pytest.raises(EdgepeftError, match=r"adapter name '\.\./x' is not allowed"):
        read_adapter("../x", llama_adapters["chat"], llama)


def test_adapter_for_another_base_is_refused(llama, tmp_path):
    wider = make_base("llama", tmp_path / "wider", hidden_size=32, num_attention_heads=2, intermediate_size=64)
    ad = make_lora(wider, tmp_path / "ad", target_modules=["q_proj"])
    with pytest.raises(EdgepeftError, match=r"model\.layers\.0\.self_attn\.q_proj: expected lora_A \(r, 64\) "
                                            r"and lora_B \(64, r\), found \(4, 32\) and \(32, 4\)"):
        read_adapter("ad", ad, llama)
    gpt2 = make_base("gpt2", tmp_path / "gpt2")
    ad = make_lora(gpt2, tmp_path / "ad2", target_modules=["c_attn"], fan_in_fan_out=True)
    with pytest.raises(EdgepeftError, match=r"made for another base model"):
        read_adapter("ad2", ad, llama)


def test_nan_weights_are_refused(llama, llama_adapters, tmp_path):
    from safetensors.torch import load_file, save_file

    ad = _copy(llama_adapters["chat"], tmp_path)
    st = ad / "adapter_model.safetensors"
    tensors = load_file(st)
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, st)
    with pytest.raises(EdgepeftError, match="NaN or Inf"):
        read_adapter("chat", ad, llama)


def test_causal_lm_head_copies_are_refused(llama, llama_adapters, tmp_path):
    """modules_to_save on a causal LM (a full lm_head copy) is not exported: say so, don't drop it."""
    from safetensors.torch import load_file, save_file

    ad = _copy(llama_adapters["chat"], tmp_path)
    _edit_config(ad, modules_to_save=["lm_head"])
    tensors = load_file(ad / "adapter_model.safetensors")
    tensors["base_model.model.lm_head.weight"] = llama.lm_head.weight.detach().clone()
    save_file(tensors, ad / "adapter_model.safetensors")
    with pytest.raises(EdgepeftError, match=r"lm_head.weight \(modules_to_save\); on a causal LM"):
        read_adapter("chat", ad, llama)
