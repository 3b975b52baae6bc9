"""VeRA (PEFT ``peft_type`` VERA) against PEFT's own model: side branch and merged, a causal LM and
an encoder classifier, fp32 and quantized bases.

Budget (the issue's): max |Δlogits| <= 1e-4 in fp32 at every real position of a left-padded
batch, greedy tokens identical. The shared projections are graph inputs stored once per layer
width; an adapter file holds only its lambdas when its projections are the graph's.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
import torch

from helpers import VOCAB, make_adapter, make_base, make_tokenizer
from edgepeft.contract import Feature, Part, value_digest, verify
from edgepeft.errors import EdgepeftError
from edgepeft.export import ExportConfig, export
from edgepeft.quantize import QuantConfig
from edgepeft.runtime import Model
from edgepeft.runtime.model import positions

ROWS = [[5, 9, 11, 40, 3, 7], [30, 31, 32], [60, 61, 62, 63, 64]]  # left-padded by the runtime
NEW = 6
ATTN_FF = ["q_proj", "v_proj", "down_proj"]  # in 64 / 64 / 128, out 64 / 32 / 64
OTHER = ["k_proj", "o_proj", "up_proj"]  # in 64, out 32 / 64 / 128


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A tiny Llama; VeRA ``v1`` and ``v1b`` (same targets and key: the same projections), ``v2``
    (other targets and rank 4: other projections), a LoRA; their side artifact."""
    root = tmp_path_factory.mktemp("vera")
    base = make_base("llama", root / "base", tokenizer=True)
    ads = {"v1": make_adapter(base, root / "v1", "vera", seed=1, target_modules=ATTN_FF),
           "v1b": make_adapter(base, root / "v1b", "vera", seed=2, target_modules=ATTN_FF),
           "v2": make_adapter(base, root / "v2", "vera", seed=3, r=4, target_modules=OTHER),
           "lora": make_adapter(base, root / "lora", "lora", seed=4, target_modules=["q_proj", "v_proj"])}
    side = root / "side"
    export(ExportConfig(graph="generic", base=base, out=side, adapters=tuple(ads.items())), quiet=True)
    return root, base, ads, side


def _left_padded(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    return ids, mask


def _peft_lm(base, vera=None, lora=None):
    """PeftModel of ``vera`` over the base (with ``lora`` merged into it first: their sum)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    if lora is not None:
        model = PeftModel.from_pretrained(model, lora).merge_and_unload()
    return (PeftModel.from_pretrained(model, vera) if vera is not None else model).eval()


@torch.no_grad()
def _ref_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                position_ids=torch.from_numpy(positions(mask)))
    return out.logits.float().numpy()  # (B, S, V)


def _ref_greedy(model, ids: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
    """Greedy tokens by full recomputation (no cache). -> (B, n)"""
    new = []
    for _ in range(n):
        nxt = _ref_logits(model, ids, mask)[:, -1].argmax(-1)[:, None]  # (B, 1)
        new.append(nxt)
        ids, mask = np.concatenate([ids, nxt], 1), np.concatenate([mask, np.ones_like(nxt)], 1)
    return np.concatenate(new, 1)


@pytest.fixture(scope="module")
def refs(lm):
    """PyTorch logits of ROWS per adapter choice (a name, or a VeRA + LoRA sum)."""
    _, base, ads, _ = lm
    ids, mask = _left_padded(ROWS)
    models = {None: _peft_lm(base), "v1": _peft_lm(base, ads["v1"]), "v1b": _peft_lm(base, ads["v1b"]),
              "v2": _peft_lm(base, ads["v2"]), "v1+lora": _peft_lm(base, ads["v1"], ads["lora"])}
    return {k: (_ref_logits(m, ids, mask), _ref_greedy(m, ids, mask, NEW)) for k, m in models.items()}


def _close(got: np.ndarray, want: np.ndarray, mask: np.ndarray) -> float:
    real = mask.astype(bool)
    return float(np.abs(got[real] - want[real]).max())


@pytest.mark.parametrize("name", ["v1", "v1b", "v2"])
def test_side_branch_matches_peft(lm, refs, name):
    _, _, _, side = lm
    m = Model(side)
    _, mask = _left_padded(ROWS)
    want, greedy = refs[name]
    assert _close(m.logits(ROWS, adapter=name), want, mask) <= 1e-4
    assert _close(want, refs[None][0], mask) > 1e-2  # the adapter really changes the output
    out = m.generate(ROWS, max_new_tokens=NEW, adapter=name, stop_at_eos=False)
    np.testing.assert_array_equal(out[:, -NEW:], greedy)


def test_swapped_per_call_with_a_lora_and_composed(lm, refs):
    """One model: VeRA adapters with the graph's projections and with their own, the base and a
    VeRA + LoRA sum (PEFT cannot hold both in one model: its reference merges the LoRA first)."""
    _, _, _, side = lm
    m = Model(side)
    _, mask = _left_padded(ROWS)
    for choice, key in [("v1", "v1"), ("v2", "v2"), (None, None), ("v1b", "v1b"),
                        ({"v1": 1.0, "lora": 1.0}, "v1+lora"), ("v2", "v2"), ("v1", "v1")]:
        assert _close(m.logits(ROWS, adapter=choice), refs[key][0], mask) <= 1e-4, choice
    out = m.generate(ROWS, max_new_tokens=NEW, adapter={"v1": 1.0, "lora": 1.0}, stop_at_eos=False)
    np.testing.assert_array_equal(out[:, -NEW:], refs["v1+lora"][1])


@pytest.mark.parametrize("choice, message", [
    ({"v1": 1.0, "v1b": 1.0}, r"both set vera\..*does not mix"),
    ({"v1": 1.0, "v2": 1.0}, r"adapter 'v2' sets vera\.shared\.32\.B, a part shared .* adapter 'v1' uses "
                             r"the graph's default for it"),
    ({"v1": 0.5}, "does not scale linearly; give it weight 1"),
])
def test_mixes_without_an_exact_form_are_refused(lm, choice, message):
    """lambda_b scales after the rank sum, so two VeRA adapters on one layer do not mix; nor may
    an adapter's own projections replace those another adapter of the call relies on."""
    with pytest.raises(EdgepeftError, match=message):
        Model(lm[3]).logits(ROWS, adapter=choice)


def _adapter_arrays(path) -> set[str]:
    import onnxruntime as ort

    return set(ort.AdapterFormat.read_adapter(str(path)).get_parameters())


def test_projections_are_stored_once_per_width(lm):
    _, _, _, side = lm
    manifest = json.loads((side / "manifest.json").read_text())
    shared = {"vera.shared.64.A", "vera.shared.128.A",  # in widths of q, v, k, o, up / of down
              "vera.shared.32.B", "vera.shared.64.B", "vera.shared.128.B"}  # out widths of v, k / q, o, down / up
    graph_inputs = [i.name for i in onnx.load(str(side / "model.onnx"), load_external_data=False).graph.input]
    assert {n for n in graph_inputs if ".shared." in n} == shared and len(set(graph_inputs)) == len(graph_inputs)
    assert {n for n in manifest["inputs"] if ".shared." in n} == shared
    assert not [n for n in graph_inputs if n.startswith("vera.model.") and n.endswith((".A", ".B"))]
    assert manifest["features"]["vera"] == [["lambda_d", [8], "one"], ["lambda_b", ["out"], "one"],
                                            ["A", [8, "in"], "one", "shared"], ["B", ["out", 8], "one", "shared"]]
    entries = manifest["adapters"]
    for name in ("v1", "v1b"):  # the graph's projections: lambdas only
        arrays = _adapter_arrays(side / entries[name]["file"])
        assert arrays and all(n.endswith((".lambda_d", ".lambda_b")) for n in arrays), name
        assert set(entries[name]["defaults"]) == shared - {"vera.shared.128.B"}
    own = _adapter_arrays(side / entries["v2"]["file"])  # other projections (key 0, other widths): its own
    assert {n for n in own if ".shared." in n} == {"vera.shared.64.A", "vera.shared.32.B", "vera.shared.64.B"}
    assert entries["v2"]["defaults"] == ["vera.shared.128.B"]  # only v2 has up_proj: the default is its own
    assert not [n for n in entries["lora"]["inputs"] if "vera" in n] and "defaults" not in entries["lora"]
    assert verify(side) == []


def test_verify_catches_a_changed_default(lm, tmp_path):
    import shutil

    side = tmp_path / "side"
    shutil.copytree(lm[3], side)
    path = side / "manifest.json"
    m = json.loads(path.read_text())
    m["inputs"]["vera.shared.64.A"]["default"] = value_digest(np.zeros((8, 64), np.float32))
    path.write_text(json.dumps(m))
    assert any("another default for vera.shared.64.A" in p for p in verify(side))


def test_add_adapter_checks_the_defaults_it_relies_on(lm, tmp_path):
    """An adapter file without projections is only added where the graph's are the same."""
    root, base, ads, side = lm
    alone = {}
    for name in ("v1b", "v2"):  # exported alone, each leaves all its projections to its graph
        alone[name] = tmp_path / name
        export(ExportConfig(graph="generic", base=base, out=alone[name], adapters=((name, ads[name]),)), quiet=True)
        assert all(".shared." not in n for n in _adapter_arrays(alone[name] / "adapters" / f"{name}.onnx_adapter"))
    m = Model(side)
    m.add_adapter(alone["v1b"], "v1b", as_name="v1b-added")
    np.testing.assert_array_equal(m.logits(ROWS, adapter="v1b-added"), m.logits(ROWS, adapter="v1b"))
    with pytest.raises(EdgepeftError, match=r"adapter 'v2' leaves vera\.shared\.\S+ to its graph's default .* "
                                            "another value. Export the adapter into this artifact"):
        m.add_adapter(alone["v2"], "v2", as_name="v2-added")


def test_merged_matches_peft(lm, refs, tmp_path):
    _, base, ads, _ = lm
    out = tmp_path / "merged"
    export(ExportConfig(graph="generic", base=base, out=out, mode="merged", adapters=(("v1", ads["v1"]), ("v2", ads["v2"]))),
           quiet=True)
    m = Model(out)
    _, mask = _left_padded(ROWS)
    for name in ("v1", "v2"):
        assert _close(m.logits(ROWS, adapter=name), refs[name][0], mask) <= 1e-4, name
        out_ids = m.generate(ROWS, max_new_tokens=NEW, adapter=name, stop_at_eos=False)
        np.testing.assert_array_equal(out_ids[:, -NEW:], refs[name][1])
    assert verify(out) == []


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_base_keeps_the_vera_branch(lm, precision, tmp_path):
    """As tests/test_quantize.py bounds LoRA: the quantized output is nearer the fp32 output with
    the adapter than without it; the projections stay float, as the manifest states them."""
    _, base, ads, side = lm
    out = tmp_path / precision
    export(ExportConfig(graph="generic", base=base, out=out, adapters=tuple(ads.items()),
                        quant=QuantConfig(precision=precision, adapter_precision="fp16")), quiet=True)
    assert verify(out) == []  # includes each shared default's digest against the quantized graph
    inits = {t.name: t for t in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.initializer}
    assert all(inits[n].data_type == onnx.TensorProto.FLOAT for n in json.loads(
        (out / "manifest.json").read_text())["inputs"] if ".shared." in n)
    q, ref = Model(out), Model(side)
    ref_base = ref.logits(ROWS)
    for choice in ("v1", "v2", {"v1": 1.0, "lora": 1.0}):
        got, want = q.logits(ROWS, adapter=choice), ref.logits(ROWS, adapter=choice)
        assert np.linalg.norm(got - want) < 0.75 * np.linalg.norm(got - ref_base), (precision, choice)


def test_static_shapes_take_the_shared_defaults(lm, tmp_path):
    """Static targets fix every axis: VeRA's inputs are fixed already (rank R), keep their
    defaults in the bucket graphs, and compute what the dynamic graph does."""
    from test_targets import SMALL_NPU

    from edgepeft.targets import load_target

    _, base, ads, side = lm
    (tmp_path / "npu.toml").write_text(SMALL_NPU)
    out = tmp_path / "static"
    export(ExportConfig(graph="generic", base=base, out=out, adapters=tuple(ads.items()), target=load_target(tmp_path / "npu.toml"),
                        quant=QuantConfig(precision="fp32")), quiet=True)
    assert verify(out) == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NNAPI is not in this onnxruntime build: CPU runs
        m = Model(out)
    ref = Model(side)
    _, mask = _left_padded(ROWS)
    for choice in ("v1", "v2", {"v1": 1.0, "lora": 0.5}, None):
        assert _close(m.logits(ROWS, adapter=choice), ref.logits(ROWS, adapter=choice), mask) <= 1e-4, choice
    np.testing.assert_array_equal(m.generate(ROWS, max_new_tokens=4, adapter="v2", stop_at_eos=False),
                                  ref.generate(ROWS, max_new_tokens=4, adapter="v2", stop_at_eos=False))


def _edit_tensors(src, dst, edit):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(dst / "adapter_model.safetensors")
    save_file(edit(tensors), dst / "adapter_model.safetensors")
    return dst


def test_files_edgepeft_cannot_reproduce_are_refused(lm, tmp_path):
    _, base, ads, _ = lm
    no_proj = make_adapter(base, tmp_path / "no-proj", "vera", target_modules=["q_proj"], save_projection=False)
    with pytest.raises(EdgepeftError, match=r"no-proj/adapter_config.json: save_projection=false: .*PEFT "
                                            r"regenerates them from projection_prng_key with torch's random generator"):
        export(ExportConfig(graph="generic", base=base, out=tmp_path / "a", adapters=(("x", no_proj),)), quiet=True)
    key = "base_model.model.model.layers.0.self_attn.q_proj.vera_lambda_b"
    short = _edit_tensors(ads["v1"], tmp_path / "short", lambda t: {**t, key: t[key][:-1]})
    with pytest.raises(EdgepeftError, match=r"short/adapter_model.safetensors: model.layers.0.self_attn.q_proj: "
                                            r"vera_lambda_d \(8,\) and vera_lambda_b \(63,\) must be \(8,\) and \(64,\)"):
        export(ExportConfig(graph="generic", base=base, out=tmp_path / "b", adapters=(("x", short),)), quiet=True)
    narrow = _edit_tensors(ads["v1"], tmp_path / "narrow",
                           lambda t: {**t, "base_model.vera_A": t["base_model.vera_A"][:, :100].contiguous()})
    with pytest.raises(EdgepeftError, match=r"narrow/adapter_model.safetensors: model.layers.\d.mlp.down_proj "
                                            r"\(128 -> 64\) does not fit the projections vera_A \(8, 100\)"):
        export(ExportConfig(graph="generic", base=base, out=tmp_path / "c", adapters=(("x", narrow),)), quiet=True)
    bias = _edit_tensors(ads["v1"], tmp_path / "bias", lambda t: t)
    cfg = json.loads((bias / "adapter_config.json").read_text())
    (bias / "adapter_config.json").write_text(json.dumps({**cfg, "bias": "all"}))
    with pytest.raises(EdgepeftError, match="bias='all': trained biases are not exported"):
        export(ExportConfig(graph="generic", base=base, out=tmp_path / "d", adapters=(("x", bias),)), quiet=True)


@pytest.mark.parametrize("make, message", [
    (lambda: Part("A", ("r", "in"), None, "one", shared=True), "no dynamic rank"),
    (lambda: Part("A", ("R", "in"), 0.0, "one", shared=True), "no identity"),
    (lambda: Part("A", ("R", "in"), None, "cat0", shared=True), "cannot grow by concatenation"),
    (lambda: Part("B", ("out", "R"), None, "sumw", shared=True), "a shared part mixes by 'one'"),
    (lambda: Part("d", ("R",), None, "one"), "an identity value is needed"),
    (lambda: Feature("f", (Part("d", ("R",), 0.0, "one"), Part("A", ("r", "in"), 0.0, "cat0")), order=1,
                     on_output=lambda y, h, base, p: y), "either dynamic"),
])
def test_the_contract_keeps_shared_parts_exact(make, message):
    """What lets the graph default a shared part to a value: a fixed rank, rule 'one', and the
    identity carried by the feature's other parts."""
    with pytest.raises(ValueError, match=message):
        make()


# ---------------------------------------------------------------- an encoder classifier
@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A tiny BERT saved without a head, a VeRA SEQ_CLS adapter carrying its head (modules_to_save)."""
    from transformers import AutoConfig, AutoModel

    root = tmp_path_factory.mktemp("vera-bert")
    torch.manual_seed(0)
    base = root / "base"
    AutoModel.from_config(AutoConfig.for_model(
        "bert", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        vocab_size=VOCAB, max_position_embeddings=64)).save_pretrained(base)
    make_tokenizer(base)
    ads = {"cls": make_adapter(base, root / "cls", "vera", seed=1, task="SEQ_CLS",
                               target_modules=["query", "value", "intermediate.dense"]),
           "cls2": make_adapter(base, root / "cls2", "vera", seed=2, task="SEQ_CLS",
                                target_modules=["query", "value", "intermediate.dense"])}
    return root, base, ads


@pytest.mark.parametrize("mode", ["side", "merged"])
def test_encoder_classifier_matches_peft(bert, mode):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    root, base, ads = bert
    out = root / mode
    if not out.exists():
        export(ExportConfig(graph="generic", base=base, out=out, mode=mode, adapters=tuple(ads.items())), quiet=True)
    m = Model(out)
    rows = [[5, 9, 11, 40], [7, 8], [30, 31, 32, 33, 34, 35, 36]]
    width = max(len(r) for r in rows)
    ids = np.array([r + [0] * (width - len(r)) for r in rows])
    mask = np.array([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    got = {}
    for name, path in ads.items():
        model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base, num_labels=2),
                                          path).eval()
        with torch.no_grad():
            want = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
        got[name] = m.classify_logits(rows, adapter=name)
        assert np.abs(got[name] - want).max() <= 1e-4, name
    assert np.abs(got["cls"] - got["cls2"]).max() > 1e-3  # each brings its own lambdas and head
    assert verify(out) == []


# ---------------------------------------------------------------- validate and train
def test_validate_passes_in_fp32(lm):
    """edgepeft validate builds each VeRA reference from the kind's REFERENCE (PEFT's model)."""
    from edgepeft.validate import Budget, validate

    _, base, ads, side = lm
    result = validate(side, base, max_new_tokens=4, budget=Budget(max_abs_logits=1e-4), quiet=True)
    cases = {c["case"]: c for c in result["cases"]}
    assert set(ads) | {"base"} <= set(cases) and result["passed"], result["cases"]
    assert all(c["max_abs_logits"] <= 1e-4 and c["greedy_mismatches"] == 0 for c in cases.values())


@pytest.mark.parametrize("task", ["causal-lm", "classification"])
def test_train_exports_and_validates(lm, bert, tmp_path, task):
    """edgepeft train --kind vera: PEFT trains and saves it (projections in the file); the
    export of the result matches PEFT in fp32."""
    from edgepeft.train import TrainConfig, train
    from edgepeft.validate import Budget, validate

    base = lm[1] if task == "causal-lm" else bert[1]
    rng = np.random.default_rng(0)
    rows = [{"text": " ".join(f"w{i}" for i in rng.integers(3, VOCAB, rng.integers(3, 10))),
             **({"label": ["neg", "pos"][i % 2]} if task == "classification" else {})} for i in range(16)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "trained"
    summary = train(TrainConfig("vera", base, data, out, steps=3, batch_size=4), quiet=True)
    assert summary["kind"] == "vera" and summary["task"] == task and summary["trainable_params"] > 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "VERA" and cfg["save_projection"] is True
    art = tmp_path / "art"
    export(ExportConfig(graph="generic", base=base, out=art, adapters=(("trained", out),)), quiet=True)
    result = validate(art, base, max_new_tokens=3, budget=Budget(max_abs_logits=1e-4), quiet=True,
                      **({"labelled": data} if task == "classification" else {}))
    assert result["passed"], result["cases"]
    assert any(c["case"] == "trained" for c in result["cases"])
    if task == "causal-lm":  # trained away from PEFT's identity init (lambda_b = 0)
        m = Model(art)
        assert np.abs(m.logits(ROWS, adapter="trained") - m.logits(ROWS)).max() > 1e-5
