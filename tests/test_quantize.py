"""Quantized artifacts: base weights quantized, adapter branches untouched, adapters still swap
and mix, budgets enforced, and calibration over every adapter keeps an adapter from clipping."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from helpers import make_adapter, make_base, make_encoder
from edgepeft.errors import EdgepeftError
from edgepeft.export import ExportConfig, export
from edgepeft.quantize import QuantConfig, adapter_nodes, quantize_graph
from edgepeft.runtime import Model
from edgepeft.validate import Budget, validate

QUANTIZED_OPS = {"MatMulInteger", "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear",
                 "MatMulNBits", "QLinearMatMul"}
# Tiny random models have nearly flat next-token distributions, so top-1 flips on any noise;
# KL is the meaningful bound here (real-model budgets: README, benchmarks/bench_quant.py).
LOOSE = Budget(max_abs_logits=None, min_top1=0.0, max_kl=1e-2, greedy_must_match=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    base = make_base("llama", root / "base", tokenizer=True)
    ads = {"lora": make_adapter(base, root / "lora", "lora", target_modules=["q_proj", "v_proj", "o_proj"]),
           "lora2": make_adapter(base, root / "lora2", "lora", seed=4, r=2, target_modules=["q_proj"]),
           "ia3": make_adapter(base, root / "ia3", "ia3", seed=2),
           "prefix": make_adapter(base, root / "prefix", "prefix", seed=3)}
    fp32 = root / "fp32"
    export(ExportConfig(graph="generic", base=base, out=fp32, adapters=tuple(ads.items())), quiet=True)
    rng = np.random.default_rng(1)  # calibration texts in the tiny word-level vocabulary
    (root / "calib.txt").write_text("\n".join(" ".join(f"w{i}" for i in rng.integers(3, 96, rng.integers(4, 24)))
                                              for _ in range(48)))
    return root, base, ads, fp32


@pytest.fixture(scope="module", params=["fp16", "int8", "int8-static", "int4"])
def quantized(request, setup):
    root, base, ads, _ = setup
    out = root / request.param
    calib = str(root / "calib.txt") if request.param == "int8-static" else None
    export(ExportConfig(graph="generic", base=base, out=out, adapters=tuple(ads.items()),
                        quant=QuantConfig(precision=request.param, adapter_precision="fp16", calibration=calib)),
           quiet=True)
    return request.param, out


def test_adapter_branches_stay_float(quantized):
    precision, out = quantized
    model = onnx.load(str(out / "model.onnx"), load_external_data=True)
    m = Model(out)
    names = list(m.manifest["inputs"])
    inits = {i.name: i for i in model.graph.initializer}
    for name in names:  # every adapter input keeps its float identity default
        assert inits[name].data_type == onnx.TensorProto.FLOAT, name
    ops = {n.op_type for n in model.graph.node}
    assert ops & (QUANTIZED_OPS | {"Cast"}), f"{precision}: nothing was quantized"
    branch = adapter_nodes(model, names)
    assert branch
    for node in model.graph.node:
        if node.name in branch:
            assert node.op_type not in QUANTIZED_OPS, (precision, node.name, node.op_type)
    for graph_input in model.graph.input:
        if graph_input.name in names:
            assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert m.manifest["precision"] == precision and m.manifest["budget"]["min_top1"] < 1


def test_adapters_swap_mix_and_match_pytorch(quantized, setup):
    precision, out = quantized
    _, base, _, fp32 = setup
    q, ref = Model(out), Model(fp32)
    ids = np.array([[5, 9, 11, 40, 3, 7], [30, 31, 32, 33, 34, 35]])
    ref_base = ref.logits(ids)
    for choice in ["lora", "ia3", "prefix", {"lora": 0.7, "lora2": 0.3}, {"lora": 1.0, "prefix": 1.0}]:
        got, want = q.logits(ids, adapter=choice), ref.logits(ids, adapter=choice)
        assert np.abs(want - ref_base).max() > 1e-2
        # the adapter survives quantization: the quantized output is nearer the fp32 output with
        # the adapter than the fp32 output without it (the adapter's effect, not the noise)
        assert np.linalg.norm(got - want) < 0.75 * np.linalg.norm(got - ref_base), (precision, choice)
    np.testing.assert_allclose(q.logits(ids, adapter={"lora": 1.0}), q.logits(ids, adapter="lora"), atol=1e-5)
    result = validate(out, base, max_new_tokens=4, budget=LOOSE)
    assert result["passed"], result["cases"]
    assert len(result["cases"]) == 8  # base, 4 adapters, a mix, a composition, a per-row batch


def test_budget_is_enforced(quantized, setup):
    precision, out = quantized
    _, base, _, _ = setup
    strict = Budget(max_abs_logits=1e-9, min_top1=1.0, max_kl=0.0)
    result = validate(out, base, max_new_tokens=2, budget=strict)
    assert not result["passed"]
    assert any("max |Δlogits|" in f for c in result["cases"] for f in c["failures"])


def test_adapter_files_can_be_stored_fp16(quantized, setup):
    import onnxruntime as ort

    _, out = quantized
    _, _, _, fp32 = setup
    for name in ("lora", "ia3", "prefix"):
        half = ort.AdapterFormat.read_adapter(str(out / "adapters" / f"{name}.onnx_adapter")).get_parameters()
        full = ort.AdapterFormat.read_adapter(str(fp32 / "adapters" / f"{name}.onnx_adapter")).get_parameters()
        assert {v.numpy().dtype for v in half.values()} == {np.dtype(np.float16)}
        assert {v.numpy().dtype for v in full.values()} == {np.dtype(np.float32)}
        assert sum(v.numpy().nbytes for v in half.values()) * 2 == sum(v.numpy().nbytes for v in full.values())


def _feeds(model: Model, ids: np.ndarray, adapter: str | None) -> dict:
    mask = np.ones_like(ids)
    past, mask = model._layouts[None].start(ids.shape[0], mask, None)
    feeds = model._store.feeds(adapter)[0] if adapter else {}
    return {"input_ids": ids, "attention_mask": mask, "position_ids": np.tile(np.arange(ids.shape[1]), (ids.shape[0], 1)),
            **past, **feeds}


def test_calibration_over_every_adapter_prevents_clipping(tmp_path):
    """An adapter that drives activations far outside the base's range: calibrated on the base
    alone, int8-static clips it; calibrated the edgepeft way (base + each adapter), it does not."""
    import onnxruntime as ort
    from safetensors.torch import load_file, save_file

    base = make_base("llama", tmp_path / "base", tokenizer=True)
    loud = make_adapter(base, tmp_path / "loud", "lora", target_modules=["v_proj"])
    t = load_file(loud / "adapter_model.safetensors")
    save_file({k: v * (30.0 if "lora_B" in k else 1.0) for k, v in t.items()}, loud / "adapter_model.safetensors")
    out = tmp_path / "fp32"
    export(ExportConfig(graph="generic", base=base, out=out, adapters=(("loud", loud),)), quiet=True)
    m = Model(out)
    rng = np.random.default_rng(0)
    calib = [rng.integers(3, 96, (2, 12)) for _ in range(6)]
    test = rng.integers(3, 96, (2, 12))
    names = list(m.manifest["inputs"])
    src = out / "model.onnx"

    def quantize(with_adapter: bool, dst):
        feeds = [_feeds(m, ids, None) for ids in calib]
        if with_adapter:
            feeds += [_feeds(m, ids, "loud") for ids in calib]
        quantize_graph(src, dst, QuantConfig(precision="int8-static"), names, iter(feeds))
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        return ort.InferenceSession(str(dst), opts)

    ref = m.logits(test, adapter="loud")
    errors = {}
    for with_adapter in (False, True):
        session = quantize(with_adapter, tmp_path / f"q{with_adapter}.onnx")
        got = session.run(["logits"], _feeds(m, test, "loud"))[0]
        errors[with_adapter] = float(np.abs(got - ref).mean())
    assert errors[True] * 3 < errors[False], errors


def test_quantization_refusals(setup, tmp_path):
    _, base, ads, _ = setup
    with pytest.raises(EdgepeftError, match="--precision 'int3'"):
        QuantConfig(precision="int3")
    with pytest.raises(EdgepeftError, match="--calibration is for integer precisions"):
        QuantConfig(precision="fp16", calibration="default")
    with pytest.raises(EdgepeftError, match="no such file, nor a packaged set"):
        export(ExportConfig(graph="generic", base=base, out=tmp_path / "o", adapters=(("lora", ads["lora"]),),
                            quant=QuantConfig(precision="int8-static", calibration="nope")), quiet=True)
    assert not (tmp_path / "o").exists()


def test_embeddings_and_head_are_kept_unless_asked(setup, tmp_path):
    _, base, ads, _ = setup
    sizes = {}
    for flag in (False, True):
        out = tmp_path / f"e{flag}"
        man = export(ExportConfig(graph="generic", base=base, out=out, adapters=(("lora", ads["lora"]),),
                                  quant=QuantConfig(precision="int8", quantize_embeddings=flag)), quiet=True)
        sizes[flag] = (out / "model.onnx.data").stat().st_size
        info = man["graph"]["quantization"]
        assert info["quantized_weight_nodes"] == info["weight_nodes"] - (0 if flag else 1)
    assert sizes[True] < sizes[False]


@pytest.mark.parametrize("precision", ["int8", "int8-static", "int4"])
def test_classifier_heads_still_swap_after_quantization(tmp_path, precision):
    """A head fed to a Gemm: onnxruntime's quantizers would replace it with a transposed constant
    copy (cutting the input off); edgepeft rewrites those Gemms first."""
    base = make_encoder("bert", tmp_path / "bert", seed=None)  # not re-seeded
    ads = {n: make_adapter(base, tmp_path / n, "lora", seed=i + 1, task="SEQ_CLS") for i, n in enumerate(("a", "b"))}
    fp32, q = tmp_path / "fp32", tmp_path / "q"
    export(ExportConfig(graph="generic", base=base, out=fp32, adapters=tuple(ads.items())), quiet=True)
    export(ExportConfig(graph="generic", base=base, out=q, adapters=tuple(ads.items()), quant=QuantConfig(precision=precision)),
           quiet=True)
    texts = ["w5 w9 w11", "w40 w41 w42 w43", "w7 w8"]
    ref, got = Model(fp32), Model(q)
    for name in ads:
        np.testing.assert_allclose(got.classify(texts, adapter=name), ref.classify(texts, adapter=name), atol=0.05)
    assert np.abs(got.classify(texts, adapter="a") - got.classify(texts, adapter="b")).max() > 0.05


def _attr(node, name):
    return next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def test_schemes_resolved_for_the_task_and_recorded(quantized):
    """By default int8 is weight-only (8-bit MatMulNBits), int8-static runs 16-bit activations,
    int4 is 4-bit MatMulNBits everywhere but the adapter branches; the manifest says so."""
    precision, out = quantized
    q = Model(out).manifest["quantization"]
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    nbits = {n.name: _attr(n, "bits") for n in graph.node if n.op_type == "MatMulNBits"}
    if precision == "int8":
        assert q["int8_scheme"] == "weight-only" and nbits and set(nbits.values()) == {8}
    if precision == "int8-static":
        assert q["static_activations"] == "int16"
        inits = {i.name: i for i in graph.initializer}
        zero_points = [inits[n.input[2]] for n in graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]
        assert zero_points and {z.data_type for z in zero_points} == {onnx.TensorProto.UINT16}
    if precision == "int4":
        info = Model(out).manifest["graph"]["quantization"]
        assert q["protect"] == 0 and info["protected_nodes"] == 0
        assert nbits and set(nbits.values()) == {4} and len(nbits) == info["quantized_weight_nodes"]
    with pytest.raises(EdgepeftError, match="--int8-scheme is for --precision int8"):
        QuantConfig(precision="int4", int8_scheme="dynamic")


def test_protect_picks_the_matmul_with_the_largest_error(tmp_path):
    """A v_proj with 30x larger weights (its input is normalised, like q/k's) has by far the largest
    int4 error: --protect for one MatMul of the 14 must pick exactly that one (found by its
    weights, not by a node name)."""
    import torch
    from transformers import AutoModelForCausalLM

    base = make_base("llama", tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight.mul_(30)
    model.save_pretrained(base)
    loud = model.model.layers[1].self_attn.v_proj.weight.detach().numpy().T  # (K, N) as the graph holds it
    fp32, q = tmp_path / "fp32", tmp_path / "int4"
    export(ExportConfig(graph="generic", base=base, out=fp32), quiet=True)
    export(ExportConfig(graph="generic", base=base, out=q, quant=QuantConfig(precision="int4", protect=1 / 14)), quiet=True)
    protected = Model(q).manifest["graph"]["quantization"]["protected"]
    graph = onnx.load(str(fp32 / "model.onnx"), load_external_data=True).graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    loud_nodes = [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits
                  and inits[n.input[1]].shape == loud.shape and np.allclose(inits[n.input[1]], loud)]
    assert len(loud_nodes) == 1 and list(protected) == loud_nodes
    graph = onnx.load(str(q / "model.onnx"), load_external_data=False).graph
    bits = sorted(_attr(n, "bits") for n in graph.node if n.op_type == "MatMulNBits")
    assert bits == [4] * 13 + [8]  # the protected one at 8 bits, the other 13 at 4


def test_integer_zero_points_rewrite_is_exact(setup):
    """HQQ's float zero points, split into uint8 zero points + a block-sum offset, give the same
    logits (the rewrite that lets onnxruntime's fast 4-bit kernels run HQQ weights)."""
    import copy

    import onnxruntime as ort
    from onnxruntime.quantization.matmul_nbits_quantizer import (HQQWeightOnlyQuantConfig,
                                                                 MatMulNBitsQuantizer)

    from edgepeft.quantize import integer_zero_points

    _, _, _, fp32 = setup
    model = onnx.load(str(fp32 / "model.onnx"), load_external_data=True)
    inits = {i.name for i in model.graph.initializer}
    weights = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    q = MatMulNBitsQuantizer(model, nodes_to_exclude=[n.name for n in model.graph.node if n.name not in weights],
                             algo_config=HQQWeightOnlyQuantConfig(block_size=32, bits=4))
    q.process()
    hqq = q.model.model
    rewritten = copy.deepcopy(hqq)
    assert integer_zero_points(rewritten) == len(weights) > 0
    zps = {i.name: i.data_type for i in rewritten.graph.initializer}
    assert {zps[n.input[3]] for n in rewritten.graph.node if n.op_type == "MatMulNBits"} == {onnx.TensorProto.UINT8}
    m = Model(fp32)
    ids = np.array([[5, 9, 11, 40, 3, 7], [30, 31, 32, 33, 34, 35]])
    feeds = _feeds(m, ids, None)
    outs = []
    for graph in (hqq, rewritten):
        sess = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
        names = {i.name for i in sess.get_inputs()}
        outs.append(sess.run(["logits"], {k: v for k, v in feeds.items() if k in names})[0])
    assert np.abs(outs[0]).max() > 0.1
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-4)


@pytest.mark.parametrize("k", [96, 40])
def test_integer_zero_points_partial_last_block(k):
    """A K the block does not divide (96 = 64 + 32; 40 < 64) ends in a partial block: it gets
    integer zero points too (left with float ones, onnxruntime took its slow path, 8x slower on
    SmolLM2 in blocks of 128), and the product stays exact."""
    import copy

    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    from edgepeft.quantize import integer_zero_points

    rng = np.random.default_rng(0)
    n = 48
    w = rng.normal(size=(k, n)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    q = MatMulNBitsQuantizer(model, algo_config=HQQWeightOnlyQuantConfig(block_size=64, bits=4))
    q.process()
    hqq = q.model.model
    assert [_attr(n, "K") for n in hqq.graph.node if n.op_type == "MatMulNBits"] == [k]
    rewritten = copy.deepcopy(hqq)
    assert integer_zero_points(rewritten) == 1
    zps = {i.name: i.data_type for i in rewritten.graph.initializer}
    assert [zps[n.input[3]] for n in rewritten.graph.node if n.op_type == "MatMulNBits"] == [TensorProto.UINT8]
    x = rng.normal(size=(3, k)).astype(np.float32)
    want, got = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]
                 for m in (hqq, rewritten))
    assert np.abs(want - x @ w).max() > 1e-3  # 4-bit weights: not the float product
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_int8_sensitivity_counts_the_kernels_activation_rounding():
    """int8 weight-only computes with int8 activations (accuracy_level 4), per block of K: an
    activation outlier coarsens its whole block. Two MatMuls with equal weights, one fed an input
    whose channel 0 is 100x (its weight row is 0, so weights alone see no difference): the
    measured error must single it out."""
    from onnx import TensorProto, helper, numpy_helper

    from edgepeft.quantize import sensitivity

    rng = np.random.default_rng(0)
    k, n = 64, 32
    w = rng.normal(size=(k, n)).astype(np.float32)
    w[0] = 0.0
    nodes = [helper.make_node("MatMul", [x, f"w{x}"], [f"y{x}"], name=f"mm_{x}") for x in "ab"]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(x, TensorProto.FLOAT, [None, k]) for x in "ab"],
                              [helper.make_tensor_value_info(f"y{x}", TensorProto.FLOAT, [None, n]) for x in "ab"],
                              [numpy_helper.from_array(w, f"w{x}") for x in "ab"])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    smooth = rng.normal(size=(128, k)).astype(np.float32)
    loud = smooth.copy()
    loud[:, 0] *= 100
    errors = sensitivity(model, list(model.graph.node), [{"a": smooth, "b": loud}], QuantConfig(precision="int8"))
    assert errors["mm_b"] > 5 * errors["mm_a"] > 0, errors
    weights_only = sensitivity(model, list(model.graph.node), [{"a": smooth, "b": loud}], QuantConfig(precision="int4"))
    assert weights_only["mm_b"] == pytest.approx(weights_only["mm_a"], rel=1e-3)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_tied_embedding_and_head_quantized_when_asked(tmp_path, precision):
    """A tied LM head (MatMul over Transpose(embedding)) is untied and quantized by the scheme
    with --quantize-embeddings; under int4 the embedding Gather becomes 4-bit too. The logits stay
    close to the fp32 artifact's and the adapter still applies."""
    base = make_base("llama", tmp_path / "base", tokenizer=True, tie_word_embeddings=True)
    lora = make_adapter(base, tmp_path / "lora", "lora", target_modules=["q_proj", "v_proj"])
    outs = {}
    for name, quant in (("fp32", QuantConfig()), ("plain", QuantConfig(precision=precision)),
                        ("emb", QuantConfig(precision=precision, quantize_embeddings=True))):
        outs[name] = tmp_path / name
        export(ExportConfig(graph="generic", base=base, out=outs[name], adapters=(("lora", lora),), quant=quant), quiet=True)
    graph = onnx.load(str(outs["emb"] / "model.onnx"), load_external_data=False).graph
    ops = {n.op_type for n in graph.node}
    producer = {o: n for n in graph.node for o in n.output}
    head = producer["logits"]
    head = producer[head.input[0]] if head.op_type == "Sub" else head  # int4: the zero-point rewrite
    assert head.op_type == "MatMulNBits"  # untied and quantized
    assert ("GatherBlockQuantized" in ops) == (precision == "int4")
    size = {k: (v / "model.onnx.data").stat().st_size for k, v in outs.items()}
    assert size["emb"] < size["fp32"] and size["plain"] < size["fp32"]
    if precision == "int4":  # int8 keeps the Gather's float table beside the 8-bit head: no smaller
        assert size["emb"] < size["plain"]  # than "plain", whose tied table is stored once
    ids = np.array([[5, 9, 11, 40, 3, 7], [30, 31, 32, 33, 34, 35]])
    ref, q = Model(outs["fp32"]), Model(outs["emb"])
    for adapter in (None, "lora"):
        a, b = ref.logits(ids, adapter=adapter), q.logits(ids, adapter=adapter)
        pa = np.exp(a - a.max(-1, keepdims=True))
        pa /= pa.sum(-1, keepdims=True)
        kl = (pa * (np.log(pa) - (b - b.max(-1, keepdims=True) - np.log(np.exp(b - b.max(-1, keepdims=True)).sum(-1, keepdims=True))))).sum(-1)
        assert kl.mean() < 1e-2, (adapter, kl.mean())
    assert np.abs(q.logits(ids, adapter="lora") - q.logits(ids)).max() > 1e-3


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_tied_table_stored_once(tmp_path, precision):
    """A tied head reads E^T and the token Gather takes columns of it: one copy of the table in the
    data file and in the .ort (onnxruntime used to fold Transpose(E) into a second one), and the
    logits equal PyTorch's."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgepeft.targets import load_target

    base = make_base("llama", tmp_path / "base", tokenizer=True, tie_word_embeddings=True)
    lora = make_adapter(base, tmp_path / "lora", "lora", target_modules=["q_proj", "v_proj"])
    profile = tmp_path / "arm.toml"
    profile.write_text('platform = "arm64"\nort_format = true\n')
    out = tmp_path / "out"
    export(ExportConfig(graph="generic", base=base, out=out, adapters=(("lora", lora),), quant=QuantConfig(precision=precision),
                        target=load_target(profile)), quiet=True)
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    vocab, d = 96, 64
    tables = [t for t in graph.initializer if sorted(t.dims) == sorted([vocab, d])]
    assert [list(t.dims) for t in tables] == [[d, vocab]]  # E^T only
    producer = {o: n for n in graph.node for o in n.output}
    assert not any(n.op_type == "Transpose" and n.input[0] == tables[0].name for n in graph.node)
    gather = next(n for n in graph.node if n.op_type == "Gather" and n.input[1] == "input_ids")
    assert gather.input[0] == tables[0].name and onnx.helper.get_attribute_value(gather.attribute[0]) == 1
    # what onnxruntime makes of it at load (and in the .ort): still one copy, no folded transpose
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(out / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    folded = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph.initializer
    assert len([t for t in folded if sorted(t.dims) == sorted([vocab, d])]) == 1
    assert producer["logits"].op_type in ("MatMul", "Sub")
    ids = np.array([[5, 9, 11, 40, 3, 7], [30, 31, 32, 33, 34, 35]])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(base).eval()(torch.from_numpy(ids)).logits.numpy()
    got = Model(out, format="onnx").logits(ids)
    if precision == "fp32":
        np.testing.assert_allclose(got, want, atol=1e-5)
        np.testing.assert_allclose(Model(out).logits(ids, adapter="lora"), Model(out, format="onnx").logits(ids, adapter="lora"), atol=1e-5)
    else:
        assert np.abs(got - want).max() < 0.2
