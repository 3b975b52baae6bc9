"""DoRA and IA3 in the fused graph (``--graph fused``), against PyTorch + peft.

One fused side artifact per base (a tiny Llama; a tiny Gemma 3 with sandwich norms, q/k norm and
sliding windows) holds two plain LoRAs, a DoRA (on q/k/v/o/down, so biases-free groups get a
per-output ``mag`` beside the low rank) and an IA3 with PEFT's default targets (output scales on
k/v or q/v, an input scale on down). ``validate`` compares the base, each adapter and the LoRA mix
at every real position of a left-padded batch (logits within 1e-4) and 32 greedy tokens. Mixes
validate has no PyTorch reference for (DoRA or IA3 with a LoRA, DoRA with IA3) are compared with
the traced graph, whose slot composes the same features in the same order; mixes that do not
compose are refused by the runtime with the reason. Merged DoRA and int4 run too.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from edgepeft.errors import EdgepeftError
from edgepeft.export import ExportConfig, export
from edgepeft.quantize import QuantConfig, adapter_nodes
from edgepeft.runtime import Model
from edgepeft.validate import Budget, validate
from helpers import make_adapter, make_lora

STRICT = Budget(max_abs_logits=1e-4, min_top1=1.0, max_kl=1e-6, greedy_must_match=True)
FAST = QuantConfig(precision="int4", accuracy_level=4, head_bits=8)
IA3_TARGETS = {"llama": None, "gemma3_text": None}  # None: PEFT's defaults for the model type


def _adapters(base, root) -> dict:
    """Two LoRAs, a DoRA and an IA3 (PEFT's default targets: down_proj's input scaled)."""
    return {
        "lora": make_lora(base, root / "lora", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]),
        "lora2": make_lora(base, root / "lora2", seed=2, r=6, lora_alpha=12, target_modules="all-linear"),
        "dora": make_adapter(base, root / "dora", "dora", seed=3,
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]),
        "ia3": make_adapter(base, root / "ia3", "ia3", seed=4),
    }


@pytest.fixture(scope="module")
def llama(llama_base, tmp_path_factory):
    """(base, adapters, fused side artifact, traced side artifact) of the tiny Llama."""
    root = tmp_path_factory.mktemp("fused-kinds")
    adapters = _adapters(llama_base, root)
    outs = {}
    for graph in ("fused", "generic"):
        outs[graph] = root / graph
        export(ExportConfig(base=llama_base, out=outs[graph], adapters=tuple(adapters.items()), graph=graph),
               quiet=True)
    return llama_base, adapters, outs["fused"], outs["generic"]


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    """(base, fused side artifact) of a tiny Gemma 3 (built as tests/test_families.py builds it)."""
    from test_families import _base

    root = tmp_path_factory.mktemp("fused-kinds-gemma3")
    base = _base("gemma3_text", root / "base")
    adapters = _adapters(base, root)
    out = root / "fused"
    export(ExportConfig(base=base, out=out, adapters=tuple(adapters.items()), graph="fused"), quiet=True)
    return base, out


def _check_validates(base, out):
    result = validate(out, base, max_new_tokens=32, budget=STRICT, quiet=True)
    cases = {c["case"]: c for c in result["cases"]}
    (per_row,) = [k for k in cases if k.startswith("per-row(")]
    assert set(cases) - {per_row} == {"base", "lora", "lora2", "dora", "ia3", "mix(lora=0.7,lora2=0.3)"}
    # every choice in one per-row batch: DoRA and IA3 scales are offset per row
    assert set(per_row[len("per-row("):-1].split("|")) == set(cases) - {per_row}, per_row
    for name, c in cases.items():
        assert not c["failures"], f"{name}: {c['failures']}"
        assert c["greedy_tokens"] == 4 * 32
    assert result["passed"]


def test_llama_fused_dora_ia3_match_peft(llama):
    base, _, fused, _ = llama
    m = Model(fused)
    assert m.fused
    inputs = m.manifest["inputs"]
    # IA3's default targets: k/v outputs (q|k|v group, out scale), down's input (in scale);
    # DoRA: mag scales on q|k|v, o, down; every scale is one adapter's alone
    assert inputs["scale.0.qkv.out"] == {"shape": [64 + 2 * 32], "mix": "one"}
    assert inputs["scale.1.down.in"] == {"shape": [128], "mix": "one"}
    assert {"scale.0.qkv.mag", "scale.0.o.mag", "scale.0.down.mag"} <= set(inputs)
    assert not any(k.startswith("scale.") and k.endswith((".AT", ".BT")) for k in inputs)
    assert "scale.0.gate_up.in" not in inputs and "scale.0.gate_up.mag" not in inputs
    _check_validates(base, fused)


def test_gemma3_fused_dora_ia3_match_peft(gemma3):
    """Sandwich norms, q/k norm after the scaled q|k|v, windows shorter than the prompts."""
    base, out = gemma3
    assert Model(out).fused and "scale.0.qkv.out" in Model(out).manifest["inputs"]
    _check_validates(base, out)


MIXES = [{"dora": 1.0, "lora": 0.5}, {"ia3": 1.0, "lora2": 0.7}, {"dora": 1.0, "ia3": 1.0},
         {"dora": 1.0, "ia3": 1.0, "lora": 0.3, "lora2": 1.2}]


@pytest.mark.parametrize("choice", MIXES, ids=str)
def test_mixes_match_the_traced_graph(llama, choice):
    """DoRA / IA3 with LoRAs and with each other: what the traced graph computes (its slot runs
    IA3's input scale, the base, DoRA, LoRA, IA3's output scale, as the fused group does)."""
    _, _, fused, traced = llama
    ids = np.random.default_rng(7).integers(3, 96, (3, 9))
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    a, b = Model(fused), Model(traced)
    la, lb = a.logits(ids, choice, mask), b.logits(ids, choice, mask)
    np.testing.assert_allclose(la[mask == 1], lb[mask == 1], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(a.generate(ids, 12, choice, mask, stop_at_eos=False),
                                  b.generate(ids, 12, choice, mask, stop_at_eos=False))


def test_mixes_that_do_not_compose_are_refused(llama, tmp_path):
    """A scale (DoRA's mag, IA3's scale) is one adapter's: a weight other than 1, or two adapters
    scaling one group, is refused with the input and the reason."""
    base, adapters, fused, _ = llama
    m = Model(fused)
    ids = np.array([[5, 9, 17]])
    with pytest.raises(EdgepeftError, match=r"adapter 'dora' sets scale\.\d\.\w+\.mag, which does not scale "
                                            r"linearly; give it weight 1"):
        m.logits(ids, {"dora": 0.5, "lora": 1.0})
    with pytest.raises(EdgepeftError, match=r"adapter 'ia3' sets scale\..*give it weight 1"):
        m.logits(ids, {"ia3": 2.0})
    other = tmp_path / "other"  # a second IA3, exported into another fused artifact and added here
    export(ExportConfig(base=base, out=other, adapters=(("ia3b", make_adapter(base, tmp_path / "ia3b", "ia3", seed=9)),),
                        graph="fused"), quiet=True)
    m.add_adapter(other, "ia3b")
    with pytest.raises(EdgepeftError, match=r"adapters 'ia3' and 'ia3b' both set scale\..*does not mix"):
        m.logits(ids, {"ia3": 1.0, "ia3b": 1.0})


def test_input_scales_that_differ_inside_a_group_are_refused(llama_base, tmp_path):
    """gate|up read one input through one MatMul: IA3 scaling gate's input only is refused at
    export, with the reason and the way out."""
    ia3 = make_adapter(llama_base, tmp_path / "ia3", "ia3", target_modules=["gate_proj"],
                       feedforward_modules=["gate_proj"])
    out = tmp_path / "out"
    with pytest.raises(EdgepeftError, match=r"scales the inputs of .*gate_proj, .*up_proj differently.*"
                                            r"--graph generic"):
        export(ExportConfig(base=llama_base, out=out, adapters=(("ia3", ia3),), graph="fused"), quiet=True)
    assert not out.exists()


def test_fused_merged_dora(llama, tmp_path):
    """The merged fused graph of a DoRA adapter (PEFT's merge, then the plain fused graph)."""
    base, adapters, _, _ = llama
    out = tmp_path / "merged"
    export(ExportConfig(base=base, out=out, adapters=(("dora", adapters["dora"]),), mode="merged", graph="fused"),
           quiet=True)
    m = Model(out)
    assert m.merged and m.manifest["graph"]["layout"] == "fused"
    result = validate(out, base, max_new_tokens=32, budget=STRICT, quiet=True)
    assert result["passed"], [c["failures"] for c in result["cases"]]


def _confident_base(path):
    """A tiny Llama whose predictions are far from ties: tied head, token table x10 (a random
    model's logits are near-uniform, so int4 noise flips top-1 at ~10 % of positions and decides
    whole runs of equal tokens; trained models are not like that)."""
    import torch
    from transformers import AutoModelForCausalLM

    from helpers import make_base

    base = make_base("llama", path, tokenizer=True, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(10.0)
    model.save_pretrained(base)
    return base


def test_fused_int4_keeps_scales_float(tmp_path):
    """int4 with the fast options: the scale inputs and their nodes stay fp32 (only base MatMuls
    become MatMulNBits), and every case is within the default int4 budget, on texts of distinct
    words (the built-in texts are unknown words to the test tokenizer)."""
    base = _confident_base(tmp_path / "base")
    adapters = _adapters(base, tmp_path)
    out = tmp_path / "int4"
    export(ExportConfig(base=base, out=out, adapters=tuple(adapters.items()), graph="fused", quant=FAST), quiet=True)
    m = Model(out)
    names = list(m.manifest["inputs"])
    assert any(n.startswith("scale.") for n in names)
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in proto.graph.input if i.name in names)
    branch = adapter_nodes(proto, names)
    assert all(n.op_type in ("MatMul", "Add") for n in proto.graph.node if n.name in branch)
    assert any(n.op_type == "MatMulNBits" for n in proto.graph.node)
    rng = np.random.default_rng(0)
    texts = [" ".join(f"w{i}" for i in rng.integers(3, 96, 48)) for _ in range(8)]
    prompts = [" ".join(f"w{i}" for i in rng.integers(3, 96, 6)) for _ in range(4)]
    result = validate(out, base, prompts=prompts, texts=texts, max_new_tokens=8, quiet=True)
    assert result["budget"]["min_top1"] == 0.9 and result["budget"]["max_kl"] == 0.2  # the int4 default
    assert result["passed"], {c["case"]: c["failures"] for c in result["cases"]}


def test_bottlenecks_run_in_the_fused_graph(llama_base, tmp_path):
    """Houlsby (GELU, after o_proj and down_proj) and Pfeiffer (ReLU, after down_proj) bottlenecks
    are the fused graph's residual branch on a group's output: ``--graph auto`` builds it, every
    case validates against PyTorch, and mixes (two bottlenecks, a bottleneck with a LoRA on the same
    projection) equal the traced graph."""
    from helpers import make_bottleneck

    ads = {"houlsby": make_bottleneck(llama_base, tmp_path / "houlsby", seed=5),
           "pfeiffer": make_bottleneck(llama_base, tmp_path / "pfeiffer", seed=6, config="pfeiffer", act="relu"),
           "lora": make_lora(llama_base, tmp_path / "lora", r=4, lora_alpha=8, target_modules=["o_proj", "down_proj"])}
    fused, traced = tmp_path / "fused", tmp_path / "traced"
    export(ExportConfig(base=llama_base, out=fused, adapters=tuple(ads.items())), quiet=True)
    export(ExportConfig(base=llama_base, out=traced, adapters=tuple(ads.items()), graph="generic"), quiet=True)
    f, t = Model(fused), Model(traced)
    assert f.fused and any(n.startswith("residual.") for n in f.manifest["inputs"])
    result = validate(fused, llama_base, max_new_tokens=8, budget=STRICT, quiet=True)
    assert result["passed"], {c["case"]: c["failures"] for c in result["cases"] if c["failures"]}
    assert {"houlsby", "pfeiffer"} <= {c["case"] for c in result["cases"]}
    ids = np.array([[5, 9, 11, 40, 7, 8], [0, 0, 12, 13, 14, 15]])
    mask = (np.arange(6) >= np.array([[0], [2]])).astype(np.int64)
    for choice in ("houlsby", {"houlsby": 0.6, "pfeiffer": 0.4}, {"houlsby": 1.0, "lora": 1.0}):
        np.testing.assert_allclose(f.logits(ids, adapter=choice, attention_mask=mask)[mask == 1],
                                   t.logits(ids, adapter=choice, attention_mask=mask)[mask == 1], atol=1e-4)
