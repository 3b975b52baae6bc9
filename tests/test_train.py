"""edgepeft train and bottleneck adapters: every kind trains, loads where it should, fails readably.

Tiny models built from configs (no downloads): a Llama and a GPT-2 (causal LM), BERT, RoBERTa and
DistilBERT encoders (classification, head drawn after ``torch.manual_seed(0)`` as train does).
"""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch
from safetensors.torch import load_file

from helpers import ENCODER_ARCHS, VOCAB, make_base, make_encoder
from edgepeft.kinds.bottleneck import (BottleneckConfig, add_bottleneck, bottleneck_parameters,
                                          default_targets, load_bottleneck, save_bottleneck)
from edgepeft.errors import EdgepeftError
from edgepeft.train import TrainConfig, read_data, train

PEFT_KINDS = ("lora", "dora", "ia3", "prompt", "prefix")
X = torch.tensor([[5, 9, 17, 33, 2], [40, 41, 8, 3, 7]])  # (B, T) token ids of a fixed probe batch


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    from transformers.utils import logging

    logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("train-bases")
    out = {"llama": make_base("llama", root / "llama", tokenizer=True),
           "gpt2": make_base("gpt2", root / "gpt2", tokenizer=True)}
    for arch in ENCODER_ARCHS:
        out[arch] = make_encoder(arch, root / arch, hidden=32)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-data")
    rng = random.Random(0)

    def words():
        return [rng.randrange(3, VOCAB) for _ in range(rng.randrange(3, 10))]

    lm = [{"text": " ".join(f"w{w}" for w in words())} for _ in range(16)]
    cls = []
    for _ in range(16):
        ws = words()
        cls.append({"text": " ".join(f"w{w}" for w in ws), "label": "pos" if ws[0] % 2 else "neg"})
    return {"lm": _write_jsonl(root / "lm.jsonl", lm), "cls": _write_jsonl(root / "cls.jsonl", cls)}


def _causal(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def _classifier(path, num_labels=2):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)  # the head as train draws it
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels).eval()


@torch.no_grad()
def _last_logits(model) -> torch.Tensor:
    """Logits of the last position (B, V) or the class logits (B, C)."""
    logits = model(input_ids=X, attention_mask=torch.ones_like(X)).logits
    return logits[:, -1] if logits.ndim == 3 else logits


def _train(kind, model, data_file, out, **kw):
    summary = train(TrainConfig(kind, model, data_file, out, steps=3, batch_size=4, **kw), quiet=True)
    assert summary["steps"] == 3 and summary["kind"] == kind
    assert summary["trainable_params"] > 0 and summary["final_loss"] == summary["final_loss"]  # not NaN
    log = json.loads((out / "train_log.json").read_text())
    assert len(log["losses"]) == 3 and log["config"]["kind"] == kind
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no temp left
    return summary


# ---------------------------------------------------------------- causal LM, every kind


@pytest.mark.parametrize("kind", PEFT_KINDS)
def test_causal_peft_kinds_train_and_load_in_peft(bases, data, tmp_path, kind):
    from peft import PeftModel

    out = tmp_path / kind
    summary = _train(kind, bases["llama"], data["lm"], out)
    assert summary["task"] == "causal-lm" and summary["labels"] is None
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM"
    base = _last_logits(_causal(bases["llama"]))
    adapted = _last_logits(PeftModel.from_pretrained(_causal(bases["llama"]), out).eval())
    assert (adapted - base).abs().max() > 1e-5  # trained, so not a no-op


def test_causal_bottleneck_trains_and_loads(bases, data, tmp_path):
    out = tmp_path / "bn"
    _train("bottleneck", bases["llama"], data["lm"], out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "BOTTLENECK" and cfg["modules_to_save"] is None
    assert len(cfg["target_modules"]) == 4  # Houlsby: o_proj + down_proj of 2 layers
    base = _last_logits(_causal(bases["llama"]))
    adapted = _last_logits(load_bottleneck(_causal(bases["llama"]), out))
    assert (adapted - base).abs().max() > 1e-5


def test_training_is_deterministic(bases, data, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _train("lora", bases["llama"], data["lm"], a)
    _train("lora", bases["llama"], data["lm"], b)
    ta, tb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


# ---------------------------------------------------------------- classification


CLS_CASES = [(arch, kind) for arch in ("bert", "distilbert") for kind in ("lora", "dora", "ia3", "prompt")] + \
    [("roberta", "lora"), ("roberta", "prompt")]


@pytest.mark.parametrize("arch, kind", CLS_CASES)
def test_classification_peft_kinds_train_and_load_in_peft(bases, data, tmp_path, arch, kind):
    from peft import PeftModel

    out = tmp_path / kind
    summary = _train(kind, bases[arch], data["cls"], out)
    assert summary["task"] == "classification" and summary["labels"] == ["neg", "pos"]
    log = json.loads((out / "train_log.json").read_text())
    assert log["label2id"] == {"neg": 0, "pos": 1}
    tensors = load_file(out / "adapter_model.safetensors")
    assert any("classifier" in k for k in tensors)  # the head travels with the adapter
    if kind in ("lora", "dora"):
        assert all(t.abs().max() > 0 for k, t in tensors.items() if "lora_B" in k)
    base = _last_logits(_classifier(bases[arch]))
    adapted = _last_logits(PeftModel.from_pretrained(_classifier(bases[arch]), out).eval())
    assert adapted.shape == (2, 2) and (adapted - base).abs().max() > 1e-5


@pytest.mark.parametrize("arch, heads", [("bert", {"classifier"}), ("roberta", {"classifier"}),
                                         ("distilbert", {"pre_classifier", "classifier"})])
def test_classification_bottleneck_trains_head_and_round_trips(bases, data, tmp_path, arch, heads):
    out = tmp_path / "bn"
    _train("bottleneck", bases[arch], data["cls"], out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and set(cfg["modules_to_save"]) == heads
    tensors = load_file(out / "adapter_model.safetensors")
    saved_heads = {k.removeprefix("base_model.model.").split(".")[0] for k in tensors if "adapter_" not in k}
    assert saved_heads == heads  # peft's suffix rule: DistilBERT's pre_classifier is saved, as peft does
    base = _last_logits(_classifier(bases[arch]))
    adapted = _last_logits(load_bottleneck(_classifier(bases[arch]), out))
    assert (adapted - base).abs().max() > 1e-5


def test_prefix_refused_for_classification(bases, data, tmp_path):
    with pytest.raises(EdgepeftError, match="prefix tuning trains on causal LMs only"):
        train(TrainConfig("prefix", bases["bert"], data["cls"], tmp_path / "p", steps=1), quiet=True)
    with pytest.raises(EdgepeftError, match="prefix tuning trains on causal LMs only"):
        TrainConfig("prefix", bases["bert"], data["cls"], tmp_path / "p", task="classification")
    assert not (tmp_path / "p").exists()


# ---------------------------------------------------------------- bottleneck module


@pytest.mark.parametrize("arch, config, act, heads", [
    ("llama", "houlsby", "relu", None),
    ("gpt2", "pfeiffer", "gelu", None),  # Conv1D output projections
    ("bert", "houlsby", "silu", ["classifier"]),
    ("roberta", "pfeiffer", "relu", ["classifier"]),  # a head module with dense + out_proj
    ("distilbert", "houlsby", "gelu", ["pre_classifier", "classifier"]),
])
def test_bottleneck_save_load_round_trip(bases, tmp_path, arch, config, act, heads):
    load = _classifier if heads else _causal
    model = load(bases[arch])
    base = _last_logits(model)
    cfg = BottleneckConfig(config=config, non_linearity=act, bottleneck_size=3)
    torch.manual_seed(1)
    names = add_bottleneck(model, cfg, init_up_std=0.1)
    assert names == default_targets(load(bases[arch]), config)
    assert len(names) == (4 if config == "houlsby" else 2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if heads and n.split(".")[0] in heads:
                p.add_(0.1)  # a trained head differs from the base's
    want = _last_logits(model.eval())
    assert (want - base).abs().max() > 1e-3
    out = save_bottleneck(model, tmp_path / "ad", cfg, "SEQ_CLS" if heads else "CAUSAL_LM", str(bases[arch]),
                          modules_to_save=heads)
    got = _last_logits(load_bottleneck(load(bases[arch]), out))
    assert torch.equal(got, want)


def test_bottleneck_format_exactly(bases, tmp_path):
    import edgepeft

    model = _causal(bases["llama"])
    cfg = BottleneckConfig()  # houlsby, reduction 16: r = 64 // 16 = 4
    add_bottleneck(model, cfg)
    assert all(float(p.detach().abs().max()) == 0 for n, p in bottleneck_parameters(model).items()
               if "adapter_up" in n)  # identity at start
    out = save_bottleneck(model, tmp_path / "ad", cfg, "CAUSAL_LM", "my/base")
    targets = [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.o_proj", "mlp.down_proj")]
    assert json.loads((out / "adapter_config.json").read_text()) == {
        "peft_type": "BOTTLENECK", "task_type": "CAUSAL_LM", "base_model_name_or_path": "my/base",
        "config": "houlsby", "reduction_factor": 16, "bottleneck_size": 4, "non_linearity": "relu",
        "target_modules": targets, "modules_to_save": None, "edgepeft_version": edgepeft.__version__}
    shapes = {k: tuple(v.shape) for k, v in load_file(out / "adapter_model.safetensors").items()}
    assert shapes == {f"base_model.model.{t}.{k}": s for t in targets for k, s in (
        ("adapter_down.weight", (4, 64)), ("adapter_down.bias", (4,)),
        ("adapter_up.weight", (64, 4)), ("adapter_up.bias", (64,)))}
    with torch.no_grad():
        assert torch.equal(_last_logits(model.eval()), _last_logits(_causal(bases["llama"])))


def test_default_targets_name_what_exists():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    with pytest.raises(EdgepeftError, match=r"no houlsby bottleneck targets.*exist: 0 \(x1\)"):
        default_targets(model, "houlsby")


@pytest.mark.parametrize("kwargs, words", [
    (dict(config="lora"), "config='lora' is not one of houlsby, pfeiffer"),
    (dict(reduction_factor=0), "reduction_factor=0"),
    (dict(bottleneck_size=0), "bottleneck_size=0"),
    (dict(non_linearity="tanh"), "non_linearity='tanh'"),
    (dict(target_modules=[]), "target_modules"),
])
def test_bottleneck_config_checks(kwargs, words):
    with pytest.raises(EdgepeftError, match=words.replace("(", r"\(")):
        BottleneckConfig(**kwargs)


@pytest.fixture(scope="module")
def bn_adapter(bases, tmp_path_factory):
    model = _causal(bases["llama"])
    cfg = BottleneckConfig(config="pfeiffer")
    add_bottleneck(model, cfg, init_up_std=0.1)
    return save_bottleneck(model, tmp_path_factory.mktemp("bn") / "ad", cfg, "CAUSAL_LM", "x")


def _broken(src, tmp_path, edit):
    import shutil

    ad = tmp_path / "broken"
    shutil.copytree(src, ad)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    edit(ad, cfg)
    if (ad / "adapter_config.json").exists():
        (ad / "adapter_config.json").write_text(json.dumps(cfg))
    return ad


@pytest.mark.parametrize("edit, words", [
    (lambda ad, c: (ad / "adapter_model.safetensors").unlink(), "no adapter_model.safetensors"),
    (lambda ad, c: (ad / "adapter_config.json").unlink(), "adapter_config.json: missing"),
    (lambda ad, c: c.update(target_modules=["model.layers.7.mlp.down_proj"]),
     "does not have .*'model.layers.7.mlp.down_proj'.*exist: .*down_proj"),
    (lambda ad, c: c.update(bottleneck_size=5), r"adapter_down.weight has shape \(4, 64\), expected \(5, 64\)"),
    (lambda ad, c: c.update(peft_type="LORA"), "not an edgepeft bottleneck adapter"),
    (lambda ad, c: c.update(target_modules=c["target_modules"][:1]), "tensor.*the config does not account for"),
])
def test_load_bottleneck_errors(bases, bn_adapter, tmp_path, edit, words):
    ad = _broken(bn_adapter, tmp_path, edit)
    with pytest.raises(EdgepeftError, match=words):
        load_bottleneck(_causal(bases["llama"]), ad)


# ---------------------------------------------------------------- data and config checks


@pytest.mark.parametrize("lines, words", [
    (['{"text": "w3 w4"}', '{"txt": "w5"}'], r":2: has no \"text\" key"),
    (['{"text": "w3", "label": "a"}', '{"text": "w4", "label": "b"}', '{"text": "w5"}'],
     r":3: has no \"label\" but line 1 has one"),
    (['{"text": "w3"}', '{"text": "w4", "label": 1}'], r":2: has \"label\" but line 1 has none"),
    ([], "no rows"),
    (['{"text": "w3"}', "", "{not json"], r":3: not valid JSON"),
    (['{"text": "w3", "label": 1}', '{"text": "w4", "label": "b"}'], r":2: label 'b' is a str"),
    (['{"text": "w3", "label": "a"}', '{"text": "w4", "label": "a"}'], "at least two labels"),
    (['["w3"]'], r":1: expected a JSON object"),
])
def test_bad_data_names_the_line(tmp_path, lines, words):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(EdgepeftError, match=words) as e:
        read_data(path)
    assert str(e.value).startswith(str(path))  # the file (and line) first


def test_bad_data_stops_train_before_any_output(bases, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "w3 w4"}\n{"label": 1}\n')
    with pytest.raises(EdgepeftError, match=r"d\.jsonl:2: has no \"text\" key"):
        train(TrainConfig("lora", bases["llama"], path, tmp_path / "out"), quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]


def test_labels_int_and_string(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": "w3", "label": 2}, {"text": "w4", "label": 0}])
    assert read_data(path).names == ["0", "1", "2"] and read_data(path).labels == [2, 0]
    path = _write_jsonl(tmp_path / "e.jsonl", [{"text": "w3", "label": "z"}, {"text": "w4", "label": "a"}])
    assert read_data(path).names == ["a", "z"] and read_data(path).labels == [1, 0]


def test_train_config_checks(bases, data, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(EdgepeftError, match="already exists. Pass --force"):
        TrainConfig("lora", bases["llama"], data["lm"], tmp_path / "out")
    with pytest.raises(EdgepeftError, match="--kind 'lokr' is not one of"):
        TrainConfig("lokr", bases["llama"], data["lm"], tmp_path / "new")
    with pytest.raises(EdgepeftError, match="no config.json"):
        TrainConfig("lora", tmp_path, data["lm"], tmp_path / "new")
    with pytest.raises(EdgepeftError, match="--batch-size 0"):
        TrainConfig("lora", bases["llama"], data["lm"], tmp_path / "new", batch_size=0)
    with pytest.raises(EdgepeftError, match="prompt tuning adapts no layers"):
        TrainConfig("prompt", bases["llama"], data["lm"], tmp_path / "new", target_modules=["q_proj"])
    cfg = TrainConfig("ia3", bases["llama"], data["lm"], tmp_path / "out", force=True)
    assert cfg.learning_rate == 3e-3 and dataclasses.replace(cfg, kind="prompt").learning_rate == 3e-2


def test_force_replaces_out(bases, data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    _train("ia3", bases["llama"], data["lm"], out, force=True)
    assert not (out / "stale.txt").exists() and (out / "adapter_config.json").is_file()


# ---------------------------------------------------------------- CLI


def test_cli_train(bases, data, tmp_path, capsys):
    from edgepeft.cli import main

    out = tmp_path / "out"
    code = main(["train", "--model", str(bases["bert"]), "--data", str(data["cls"]), "--kind", "bottleneck",
                 "--out", str(out), "--steps", "2", "--batch-size", "4", "--quiet"])
    stdout, _ = capsys.readouterr()
    assert code == 0
    assert stdout.startswith("trained bottleneck (classification, labels neg, pos): ")
    assert f"wrote {out}" in stdout and (out / "adapter_model.safetensors").is_file()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "w3"}\n\n{"text": 5}\n')
    code = main(["train", str(bases["llama"]), "--data", str(bad), "--kind", "lora", "--out", str(tmp_path / "o2")])
    _, err = capsys.readouterr()
    assert code == 2 and err.startswith(f"edgepeft train: error: {bad}:3: ") and "Traceback" not in err
    assert not (tmp_path / "o2").exists()
    code = main(["train", str(bases["llama"]), "--model", str(bases["llama"]), "--data", str(bad), "--kind", "lora",
                 "--out", str(tmp_path / "o3")])
    _, err = capsys.readouterr()
    assert code == 2 and "give the base model once" in err
