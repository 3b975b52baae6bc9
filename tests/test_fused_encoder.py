"""The fused encoder (``edgepeft.export.fused_encoder``): BERT, RoBERTa and DistilBERT classifiers
built from onnxruntime's fused kernels on packed tokens, against PyTorch + peft and the traced graph.

Tiny bases without a head (each adapter carries its own); LoRA adapters of different ranks and
targets (one on BERT's pooler), DoRA, IA3, prompt tuning, P-tuning and a Houlsby bottleneck; every
case of ``validate`` (each adapter with its head) within 1e-4 of PyTorch; each row its own adapter,
rows padded either side, against the traced graph; a mask row of zeros refused; ``--graph auto``
picks it and falls back (reserved slots) with the reason.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import CLASSIFIER_HEADS, VOCAB, make_adapter, make_bottleneck, make_encoder, write_labelled
from edgepeft.errors import EdgepeftError
from edgepeft.export import ExportConfig, export
from edgepeft.quantize import QuantConfig
from edgepeft.runtime import Model
from edgepeft.validate import Budget, validate

TIGHT = Budget(max_abs_logits=1e-4)


# per family: the "wide" LoRA's targets (every attention projection, and BERT's pooler dense) and
# the other kinds' (PEFT has no DistilBERT defaults)
WIDE = {"bert": ["query", "key", "value", "dense"], "roberta": ["query", "key", "value", "dense"],
        "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"]}
KINDS = {"distilbert": {"lora": {"target_modules": ["q_lin", "v_lin"]},
                        "dora": {"target_modules": ["q_lin", "v_lin", "lin2"]},
                        "ia3": {"target_modules": ["q_lin", "v_lin", "lin2"], "feedforward_modules": ["lin2"]},
                        "prompt": {"token_dim": 64, "num_layers": 2, "num_attention_heads": 4},
                        "p_tuning": {"token_dim": 64, "num_layers": 2, "num_attention_heads": 4}}}


@pytest.fixture(scope="module", params=["bert", "roberta", "distilbert"])
def fused(request, tmp_path_factory):
    """(arch, base, adapters, fused artifact, traced artifact, labelled jsonl)."""
    arch = request.param
    root = tmp_path_factory.mktemp(f"fused-{arch}")
    base = make_encoder(arch, root / "base")
    kw = KINDS.get(arch, {})
    ads = {"qv": make_adapter(base, root / "qv", "lora", seed=1, task="SEQ_CLS", **kw.get("lora", {})),
           "wide": make_adapter(base, root / "wide", "lora", seed=2, task="SEQ_CLS", r=8, target_modules=WIDE[arch]),
           "dora": make_adapter(base, root / "dora", "dora", seed=3, task="SEQ_CLS", **kw.get("dora", {})),
           "ia3": make_adapter(base, root / "ia3", "ia3", seed=4, task="SEQ_CLS", **kw.get("ia3", {})),
           "prompt": make_adapter(base, root / "prompt", "prompt", seed=5, task="SEQ_CLS", **kw.get("prompt", {})),
           "p_tuning": make_adapter(base, root / "p_tuning", "p_tuning", seed=6, task="SEQ_CLS",
                                    **kw.get("p_tuning", {})),
           "bottleneck": make_bottleneck(base, root / "bottleneck", task="SEQ_CLS", heads=CLASSIFIER_HEADS[arch],
                                         seed=7)}
    side, traced = root / "fused", root / "traced"
    export(ExportConfig(base=base, out=side, adapters=tuple(ads.items())), quiet=True)  # --graph auto
    export(ExportConfig(graph="generic", base=base, out=traced, adapters=tuple(ads.items())), quiet=True)
    labelled = write_labelled(root / "labelled.jsonl")
    return arch, base, ads, side, traced, labelled


def test_auto_builds_the_fused_encoder(fused):
    arch, _, _, side, _, _ = fused
    m = json.loads((side / "manifest.json").read_text())
    assert m["graph"]["kernels"] == "fused"
    ops = set(m["graph"]["ops"])
    assert {"MultiHeadAttention", "BiasGelu", "NonZero", "ScatterND"} <= ops and "Softmax" not in ops
    assert m["inputs"]["prompt.embeds"] == {"shape": [None, 64], "mix": "one"}
    assert {"gelu_DT", "gelu_db", "gelu_UT", "gelu_ub"} <= {n.rpartition(".")[2] for n in m["inputs"]}
    # LoRA on BERT's pooler (RoBERTa's head dense sits in the carried head, which peft leaves alone)
    assert ("head.0" in {f"{s['layer']}.{s['group']}" for s in m["slots"]}) == (arch == "bert")


def test_every_case_matches_pytorch(fused):
    """Each adapter (its head, its prompt included) within 1e-4 of peft, same accuracy."""
    _, base, ads, side, _, labelled = fused
    result = validate(side, base, budget=TIGHT, labelled=labelled)
    cases = {c["case"]: c for c in result["cases"]}
    assert set(cases) == set(ads)  # no mix: every adapter carries a head; no "base": it has no trained head
    assert result["passed"], {n: c["failures"] for n, c in cases.items() if c["failures"]}
    for name in ads:
        assert cases[name]["max_abs_logits"] <= 1e-4
        assert cases[name]["accuracy_torch"] == cases[name]["accuracy_artifact"]


def test_equals_the_traced_graph_per_row_and_padded_either_side(fused):
    """Rows of one batch on different adapters (LoRA, DoRA, IA3, each with its head), left- or
    right-padded, and each prompt adapter on the whole batch: the traced graph's logits, row for
    row (the traced classifier is checked against PyTorch in test_classifiers.py)."""
    _, _, _, side, traced, _ = fused
    f, t = Model(side), Model(traced)
    rng = np.random.default_rng(3)
    lengths = [9, 3, 12, 1, 6]
    ids = np.zeros((5, 12), np.int64)
    right = np.zeros((5, 12), np.int64)
    for r, n in enumerate(lengths):
        ids[r, :n] = rng.integers(3, VOCAB, n)
        right[r, :n] = 1
    choices = ["qv", "wide", "dora", "ia3", "wide"]
    for mask in (right, right[:, ::-1].copy()):
        tokens = ids if mask is right else np.stack([np.roll(row, 12 - n) for row, n in zip(ids, lengths)])
        np.testing.assert_allclose(f.classify_logits(tokens, adapter=choices, attention_mask=mask),
                                   t.classify_logits(tokens, adapter=choices, attention_mask=mask), atol=1e-5)
    for name in ("prompt", "p_tuning", "bottleneck"):
        np.testing.assert_allclose(f.classify_logits(ids, adapter=name, attention_mask=right),
                                   t.classify_logits(ids, adapter=name, attention_mask=right), atol=1e-5)
    empty = right.copy()
    empty[1] = 0  # nothing to classify, as an empty text
    for m in (f, t):
        with pytest.raises(EdgepeftError, match="attention_mask row 1 is all 0"):
            m.classify_logits(ids, adapter="wide", attention_mask=empty)


def test_merged_and_int8(fused, tmp_path):
    _, base, ads, _, _, labelled = fused
    merged = tmp_path / "merged"
    export(ExportConfig(base=base, out=merged, mode="merged", adapters=(("wide", ads["wide"]),)), quiet=True)
    assert json.loads((merged / "manifest.json").read_text())["adapters"]["wide"]["graph"]["kernels"] == "fused"
    assert validate(merged, base, budget=TIGHT, labelled=labelled)["passed"]
    int8 = tmp_path / "int8"
    export(ExportConfig(base=base, out=int8, adapters=(("qv", ads["qv"]),), quant=QuantConfig(precision="int8")), quiet=True)
    m = json.loads((int8 / "manifest.json").read_text())
    assert m["graph"]["kernels"] == "fused" and m["graph"]["quantization"]["quantized_weight_nodes"] > 0
    assert validate(int8, base, labelled=labelled)["passed"]


def test_auto_falls_back_for_reserved_slots(tmp_path, capsys):
    """``--slots`` on a classifier: the traced graph, with the reason; ``--graph fused`` refuses."""
    from edgepeft.cli import main

    base = make_encoder("bert", tmp_path / "base")
    out = tmp_path / "o"
    assert main(["export", str(base), "--slots", "all-linear", "--out", str(out)]) == 0
    line = next(x for x in capsys.readouterr().err.splitlines() if "graph:" in x)
    assert line.startswith("[edgepeft] graph: generic (the traced model; not fused: reserved slots on a classifier"), line
    assert "kernels" not in json.loads((out / "manifest.json").read_text())["graph"]
    assert main(["export", str(base), "--slots", "all-linear", "--graph", "fused", "--out", str(tmp_path / "x")]) == 2
    assert "the fused encoder does not reserve slots" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_adapter_add_packs_for_the_fused_encoder(fused, tmp_path):
    """``adapter add`` converts an adapter against the fused encoder (no base): its outputs equal
    those of the full export."""
    import shutil

    from edgepeft.lifecycle.add import add_adapter
    from edgepeft.lifecycle.edit import remove_adapter

    _, _, ads, side, _, _ = fused
    art = tmp_path / "art"
    shutil.copytree(side, art)
    remove_adapter(art, "wide")
    add_adapter(art, "wide", ads["wide"], quiet=True)
    ids = np.array([[5, 9, 11, 40, 7], [7, 8, 9, 0, 0]], np.int64)
    mask = (ids > 0).astype(np.int64)
    np.testing.assert_allclose(Model(art).classify_logits(ids, adapter="wide", attention_mask=mask),
                               Model(side).classify_logits(ids, adapter="wide", attention_mask=mask), atol=1e-6)
