"""The fused decoder graph (``--graph fused``) against the generic one, and what it refuses."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from edgepeft.errors import EdgepeftError
from edgepeft.export import ExportConfig, export
from edgepeft.quantize import QuantConfig
from edgepeft.runtime import Model, fused
from edgepeft.contract import past_names

from helpers import make_adapter

FAST = QuantConfig(precision="int4", accuracy_level=4, head_bits=8)


@pytest.fixture(scope="module")
def fused_side(llama_base, llama_adapters, tmp_path_factory):
    out = tmp_path_factory.mktemp("fused") / "side"
    export(ExportConfig(base=llama_base, out=out, adapters=tuple(llama_adapters.items()), graph="fused"), quiet=True)
    return out


@pytest.fixture(scope="module")
def ragged():
    ids = np.random.default_rng(5).integers(3, 96, (3, 7))
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, :1] = 0
    return ids, mask


CHOICES = [None, "chat", "sql", "code", {"chat": 0.5, "sql": 0.25, "code": 1.5}]


@pytest.mark.parametrize("choice", CHOICES, ids=str)
def test_fused_matches_generic(fused_side, llama_side, ragged, choice):
    """Logits within 1e-5 at every real position of a left-padded batch, and identical greedy
    tokens, for the base, each adapter (q/v; all-linear rsLoRA with rank and alpha patterns; k/up
    on one layer) and a weighted mix of all three."""
    ids, mask = ragged
    a, b = Model(fused_side), Model(llama_side)
    assert a.fused and not b.fused
    la, lb = a.logits(ids, choice, mask), b.logits(ids, choice, mask)
    for r in range(ids.shape[0]):
        np.testing.assert_allclose(la[r][mask[r] == 1], lb[r][mask[r] == 1], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(a.generate(ids, 10, choice, mask, stop_at_eos=False),
                                  b.generate(ids, 10, choice, mask, stop_at_eos=False))


def test_fused_graph_is_fused(fused_side):
    """One GroupQueryAttention per layer, q|k|v and gate|up packed, no traced attention ops; the
    KV cache is one buffer (past and present have the same axis)."""
    m = Model(fused_side)
    ops = m.manifest["graph"]["ops"]
    assert ops["GroupQueryAttention"] == 2 and ops["SkipSimplifiedLayerNormalization"] == 4
    assert not {"Softmax", "Expand", "Transpose", "Reshape"} & set(ops) - {"Transpose"}
    proto = onnx.load(str(fused_side / "model.onnx"), load_external_data=False)
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*proto.graph.input, *proto.graph.output]}
    assert shapes["past.0.key"] == shapes["present.0.key"] == ["batch", 2, "max_seq", 16]
    assert m.manifest["kv_cache"]["buffer"] == "shared"
    qkv = [i for i in proto.graph.initializer if i.name.endswith("self_attn.qkv.weight_t")]
    assert len(qkv) == 2 and list(qkv[0].dims) == [64, 64 + 2 * 32]


def test_swap_mid_generation(fused_side, llama_side):
    """Rebinding another adapter on a running KV buffer: the next step equals the generic graph
    run on the same cache with the new adapter (the swap leaves no input of the old one bound)."""
    a, b = Model(fused_side), Model(llama_side)
    ids = np.array([[5, 9, 17, 33, 4]])
    fl, tl = a._layouts[None], b._layouts[None]  # fused, traced
    kv = fused.Cache(fl.session, fl.cache, 1, 8)
    kv.bind_adapter(fl.values(a._store.feeds("sql")[0]))
    lengths = np.array([5])
    kv.run(ids, lengths)
    past, mask = tl.start(1, np.ones((1, 5), np.int64), None)
    present = tl.run(b._store.feeds("sql")[0], ids, mask, past)[1:]
    for choice in ("chat", None, "code"):
        kv.bind_adapter(fl.values(a._store.feeds(choice)[0]))
        lengths = lengths + 1
        step = kv.run(np.array([[7]]), lengths)[:, 0]
        past = {n: v for i in range(len(tl.cache)) for n, v in zip(past_names(i), present[2 * i:2 * i + 2])}
        mask = np.ones((1, int(lengths[0])), np.int64)
        out = tl.run(b._store.feeds(choice)[0], np.array([[7]]), mask, past)
        present = out[1:]
        np.testing.assert_allclose(step, out[0][:, -1], atol=1e-5, rtol=0)


def test_fused_merged_matches_side(llama_base, llama_adapters, llama_side, tmp_path, ragged):
    out = tmp_path / "merged"
    export(ExportConfig(base=llama_base, out=out, adapters=(("sql", llama_adapters["sql"]),), mode="merged",
                        graph="fused"), quiet=True)
    ids, mask = ragged
    la, lb = Model(out).logits(ids, "sql", mask), Model(llama_side).logits(ids, "sql", mask)
    for r in range(ids.shape[0]):
        np.testing.assert_allclose(la[r][mask[r] == 1], lb[r][mask[r] == 1], atol=1e-4, rtol=0)


def test_fused_int4_fast(llama_base, llama_adapters, tmp_path, ragged):
    """int4 with int8 compute and an 8-bit head and table: every MatMulNBits computes at
    accuracy_level 4, the head is 8-bit, the token table an 8-bit GatherBlockQuantized; its
    logits equal the generic graph quantized the same way (same weights, same kernels) closely."""
    outs = {}
    for graph in ("fused", "generic"):
        outs[graph] = tmp_path / graph
        export(ExportConfig(base=llama_base, out=outs[graph], adapters=tuple(llama_adapters.items()),
                            graph=graph, quant=FAST), quiet=True)
    proto = onnx.load(str(outs["fused"] / "model.onnx"), load_external_data=False)
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nbits]
    assert all(a["accuracy_level"] == 4 for a in attrs)
    assert sorted(a["bits"] for a in attrs).count(8) == 1 and max(a["N"] for a in attrs if a["bits"] == 8) == 96
    assert [n.op_type for n in proto.graph.node if n.input and n.input[-1] == "input_ids" or
            "input_ids" in n.input] == ["GatherBlockQuantized"]
    ids, mask = ragged
    for choice in (None, "sql", {"chat": 1.0, "code": 0.5}):
        la, lb = Model(outs["fused"]).logits(ids, choice, mask), Model(outs["generic"]).logits(ids, choice, mask)
        real = mask == 1
        assert np.abs(la[real] - lb[real]).max() < 0.05 * np.abs(lb[real]).max()
        assert (la[real].argmax(-1) == lb[real].argmax(-1)).mean() >= 0.9


def test_fused_int4_protect(llama_base, llama_adapters, fused_side, tmp_path, ragged):
    """``--protect`` on the fused graph: the share of packed MatMuls with the largest measured
    error (probe: calibration texts run through the fused graph itself) is 8-bit, the rest 4-bit,
    the graph stays fused, and protecting everything brings the logits closest to fp32."""
    outs = {}
    for share in (0.0, 0.25, 1.0):
        outs[share] = tmp_path / f"protect-{share}"
        export(ExportConfig(base=llama_base, out=outs[share], adapters=tuple(llama_adapters.items()), graph="auto",
                            quant=QuantConfig(precision="int4", accuracy_level=4, protect=share)), quiet=True)
    m = Model(outs[0.25])
    assert m.fused
    protected = m.manifest["graph"]["quantization"]["protected"]
    proto = onnx.load(str(outs[0.25] / "model.onnx"), load_external_data=False)
    bits = {n.name: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}["bits"]
            for n in proto.graph.node if n.op_type == "MatMulNBits"}
    assert len(protected) == 2 and len(bits) == 8  # 2 layers x (q|k|v, o, gate|up, down); the head stays float
    assert sorted(bits.values()) == [4] * 6 + [8] * 2
    assert all(bits[f"{name}_Q8"] == 8 for name in protected)
    ids, mask = ragged
    real = mask == 1
    ref = Model(fused_side)
    for choice in (None, "sql"):
        want = ref.logits(ids, choice, mask)[real]
        err = {s: np.abs(Model(o).logits(ids, choice, mask)[real] - want).mean() for s, o in outs.items()}
        assert 0 < err[1.0] < min(err[0.0], err[0.25])  # 8-bit everywhere: closest; a 2-of-8 share is within noise here


def test_calls_past_the_rotary_tables_are_refused(fused_side):
    """The manifest records the rotary tables' rows (the base's max_position_embeddings, 128); a
    prompt, or prompt + new tokens, past them is refused by name instead of onnxruntime's kernel
    error; up to them it runs."""
    m = Model(fused_side)
    assert m.manifest["graph"]["positions"] == 128
    with pytest.raises(EdgepeftError, match=r"^120 prompt tokens \+ 10 new tokens exceed the 128 positions"):
        m.generate([[3 + i % 90 for i in range(120)]], max_new_tokens=10, adapter="sql")
    with pytest.raises(EdgepeftError, match=r"^130 prompt tokens exceed the 128 positions .*shorten the prompt\.$"):
        m.logits(np.full((1, 130), 5))
    assert m.generate([[3 + i % 90 for i in range(120)]], max_new_tokens=8, adapter="sql").shape == (1, 128)


def test_right_align_refuses_gaps():
    with pytest.raises(EdgepeftError, match="row 0"):
        fused.right_align(np.ones((1, 4), np.int64), np.array([[1, 0, 1, 1]]))
    ids, lengths = fused.right_align(np.array([[0, 0, 5, 6], [7, 8, 9, 0]]), np.array([[0, 0, 1, 1], [1, 1, 1, 0]]))
    assert ids.tolist() == [[5, 6, 0], [7, 8, 9]] and lengths.tolist() == [2, 3]


def test_fused_refusals(llama_base, llama_adapters, tmp_path):
    """What the fused graph cannot compute is refused before anything is written, with the reason
    and the way out (--graph generic)."""
    prefix = make_adapter(llama_base, tmp_path / "prefix", "prefix")
    vera = make_adapter(llama_base, tmp_path / "vera", "vera", target_modules=["q_proj", "v_proj"])
    for name, path in (("prefix", prefix), ("vera", vera)):
        out = tmp_path / f"out-{name}"
        with pytest.raises(EdgepeftError, match=rf"adapter '{name}'.*--graph generic"):
            export(ExportConfig(base=llama_base, out=out, adapters=((name, path),), graph="fused"), quiet=True)
        assert not out.exists() and not list(tmp_path.glob(f".out-{name}*"))
    from edgepeft.targets import load_target

    with pytest.raises(EdgepeftError, match="fixes every shape"):
        ExportConfig(base=llama_base, out=tmp_path / "x", graph="fused", target=load_target("android-nnapi"))
    with pytest.raises(EdgepeftError, match="int8-static"):
        ExportConfig(base=llama_base, out=tmp_path / "x", graph="fused", quant=QuantConfig(precision="int8-static"))
    with pytest.raises(EdgepeftError, match="--graph"):
        ExportConfig(base=llama_base, out=tmp_path / "x", graph="traced")
    with pytest.raises(EdgepeftError, match="head-bits"):
        QuantConfig(precision="int8", head_bits=8)


def test_fused_cli_exit_2_on_other_architectures(tmp_path, capsys):
    from helpers import make_base
    from edgepeft.cli import main

    base = make_base("gpt2", tmp_path / "gpt2")
    rc = main(["export", str(base), "--graph", "fused", "--out", str(tmp_path / "out")])
    assert rc == 2 and "model_type 'gpt2'" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_bench_runs_on_a_fused_artifact(fused_side, tmp_path, capsys):
    """`edgepeft bench` times a fused artifact (its runs go through I/O binding) and its swaps."""
    import json

    from edgepeft.cli import main

    code = main(["bench", str(fused_side), "--merged", "no", "--repeats", "1", "--prefill-samples", "2",
                 "--new-tokens", "3", "--prompt-tokens", "4", "--threads", "1", "--out", str(tmp_path / "b"),
                 "--json", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    r = json.loads(out)
    assert all(v["decode_tok_s"] > 0 for v in r["summary"].values()) and len(r["summary"]) >= 4
    steps = r["swap"]["swap-side"]["steps"]
    assert steps["after_swap_ms"] > 0 and steps["steady_ms"] > 0


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_other_llama_family_members(arch, tmp_path):
    """qwen2 (q/k/v biases) and mistral (no sliding window) build the same fused graph."""
    from helpers import make_base, make_lora

    base = make_base(arch, tmp_path / "base")
    lora = make_lora(base, tmp_path / "lora", target_modules="all-linear")
    outs = {}
    for graph in ("fused", "generic"):
        outs[graph] = tmp_path / graph
        export(ExportConfig(base=base, out=outs[graph], adapters=(("a", lora),), graph=graph), quiet=True)
    ids = np.random.default_rng(2).integers(3, 96, (2, 6))
    for choice in (None, "a"):
        np.testing.assert_allclose(Model(outs["fused"]).logits(ids, choice), Model(outs["generic"]).logits(ids, choice),
                                   atol=1e-5, rtol=0)
