"""Encoder classifiers (BERT, RoBERTa, DistilBERT): every kind, the head swapped with the adapter.

The bases are saved without a classification head (like a sentence encoder such as MiniLM), so
each adapter must carry its own (PEFT ``modules_to_save``) and a test cannot pass on the base's.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import CLASSIFIER_HEADS, ENCODER_ARCHS, make_adapter, make_bottleneck, make_encoder, write_labelled
from edgepeft.errors import EdgepeftError
from edgepeft.export import ExportConfig, export
from edgepeft.runtime import Model
from edgepeft.validate import Budget, validate

TIGHT = Budget(max_abs_logits=1e-4)
# PEFT has no default targets for DistilBERT; prompt tuning cannot read its config names either.
EXTRA = {"distilbert": {"lora": {"target_modules": ["q_lin", "v_lin"]},
                        "dora": {"target_modules": ["q_lin", "v_lin", "lin2"]},
                        "ia3": {"target_modules": ["q_lin", "v_lin", "lin2"], "feedforward_modules": ["lin2"]},
                        "prompt": {"token_dim": 64, "num_layers": 2, "num_attention_heads": 4},
                        "p_tuning": {"token_dim": 64, "num_layers": 2, "num_attention_heads": 4}}}


@pytest.fixture(scope="module", params=ENCODER_ARCHS)
def encoder(request, tmp_path_factory):
    """(arch, base dir, adapters, side artifact, labelled jsonl) for one encoder family."""
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    base = make_encoder(arch, root / "base")
    ads = {k: make_adapter(base, root / k, k, seed=i + 1, task="SEQ_CLS", **EXTRA.get(arch, {}).get(k, {}))
           for i, k in enumerate(("lora", "dora", "ia3", "prompt", "p_tuning"))}
    ads["bottleneck"] = make_bottleneck(base, root / "bottleneck", task="SEQ_CLS", heads=CLASSIFIER_HEADS[arch],
                                        seed=7)
    side = root / "side"
    export(ExportConfig(graph="generic", base=base, out=side, adapters=tuple(ads.items())), quiet=True)
    labelled = write_labelled(root / "labelled.jsonl")
    return arch, base, ads, side, labelled


def test_every_kind_matches_pytorch_with_accuracy(encoder):
    arch, base, ads, side, labelled = encoder
    result = validate(side, base, budget=TIGHT, labelled=labelled)
    cases = {c["case"]: c for c in result["cases"]}
    assert set(cases) == set(ads)  # no "base": it has no trained head
    assert result["passed"], {n: c["failures"] for n, c in cases.items()}
    for c in cases.values():
        assert c["positions"] == 40 and c["max_abs_logits"] <= 1e-4
        assert c["accuracy_torch"] == c["accuracy_artifact"]


def test_heads_swap_with_adapters(encoder):
    """Each adapter brings its own head: same inputs, different class probabilities."""
    _, _, ads, side, _ = encoder
    m = Model(side)
    texts = ["w5 w9 w11", "w40 w41 w42 w43 w44 w45 w46", "w7"]
    probs = {name: m.classify(texts, adapter=name) for name in ads}
    for p in probs.values():
        assert p.shape == (3, 2) and np.allclose(p.sum(-1), 1, atol=1e-5) and (p >= 0).all()
    names = list(probs)
    for a, b in zip(names, names[1:]):
        assert np.abs(probs[a] - probs[b]).max() > 1e-3
    with pytest.raises(EdgepeftError, match="no trained classification head"):
        m.classify(texts)
    with pytest.raises(EdgepeftError, match=r"both set head\."):
        m.classify(texts, adapter={"lora": 1.0, "ia3": 1.0})
    with pytest.raises(EdgepeftError, match=r"classification artifact: generate\(\)"):
        m.generate([[5, 6]])


def test_padding_does_not_change_a_row(encoder):
    _, _, ads, side, _ = encoder
    m = Model(side)
    rows = [[5, 9, 11, 40], [7, 8], [30, 31, 32, 33, 34, 35, 36]]
    for name in ads:
        together = m.classify_logits(rows, adapter=name)
        alone = np.concatenate([m.classify_logits([r], adapter=name) for r in rows])
        np.testing.assert_allclose(together, alone, atol=1e-5)


def test_merged_classifiers_match_pytorch(encoder, tmp_path):
    arch, base, ads, _, labelled = encoder
    out = tmp_path / "merged"
    export(ExportConfig(graph="generic", base=base, out=out, mode="merged",
                        adapters=tuple((k, ads[k]) for k in ("lora", "dora", "ia3"))), quiet=True)
    result = validate(out, base, budget=TIGHT, labelled=labelled)
    assert [c["case"] for c in result["cases"]] == ["lora", "dora", "ia3"]
    assert result["passed"], result["cases"]


def test_encoder_prefix_and_headless_adapters_are_refused(tmp_path):
    base = make_encoder("bert", tmp_path / "base", seed=None, tokenizer=False)  # not re-seeded
    prefix = make_adapter(base, tmp_path / "prefix", "prefix", task="SEQ_CLS")
    with pytest.raises(EdgepeftError, match="prefix tuning is exported for decoders only"):
        export(ExportConfig(graph="generic", base=base, out=tmp_path / "o1", adapters=(("p", prefix),)), quiet=True)
    headless = make_adapter(base, tmp_path / "headless", "lora", task="SEQ_CLS", modules_to_save=None)
    cfg = json.loads((headless / "adapter_config.json").read_text())
    if cfg.get("modules_to_save"):  # PEFT adds the head for SEQ_CLS; drop it from the file
        from safetensors.torch import load_file, save_file

        t = {k: v for k, v in load_file(headless / "adapter_model.safetensors").items() if "classifier" not in k}
        save_file(t, headless / "adapter_model.safetensors")
    with pytest.raises(EdgepeftError, match="has no trained classification head .* does not carry one"):
        export(ExportConfig(graph="generic", base=base, out=tmp_path / "o2", adapters=(("h", headless),)), quiet=True)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_long_texts_leave_room_for_virtual_tokens(encoder):
    """Texts are truncated to the model's length minus a prompt adapter's virtual tokens."""
    _, _, _, side, _ = encoder
    m = Model(side)
    long = " ".join(f"w{3 + i % 90}" for i in range(300))
    for name in ("prompt", "lora"):
        p = m.classify([long, "w5"], adapter=name)
        assert p.shape == (2, 2) and np.isfinite(p).all()
    with pytest.raises(EdgepeftError, match="exceed the model's"):
        m.classify_logits(np.ones((1, 200), np.int64) * 5, adapter="prompt")


def test_tokenizer_json_padding_is_ignored(encoder, tmp_path):
    """sentence-transformers ship tokenizer.json with fixed padding (MiniLM: 128, pads marked
    real by a naive caller); the runtime pads itself, so texts give the same result as their ids."""
    import shutil

    from tokenizers import Tokenizer

    _, _, _, side, _ = encoder
    copy = tmp_path / "art"
    shutil.copytree(side, copy)
    path = copy / "tokenizer" / "tokenizer.json"
    tok = Tokenizer.from_file(str(path))
    tok.enable_padding(length=40, pad_id=0, pad_token="<pad>")
    tok.enable_truncation(max_length=40)
    tok.save(str(path))
    m = Model(copy)
    texts = ["w5 w9 w11", "w40 w41 w42 w43 w44 w45 w46"]
    ids = [[5, 9, 11], [40, 41, 42, 43, 44, 45, 46]]
    for name in ("lora", "prompt"):
        np.testing.assert_allclose(m.classify_logits(texts, adapter=name), m.classify_logits(ids, adapter=name),
                                   atol=1e-6)
