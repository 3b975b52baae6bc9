"""GGUF bases in: a ``.gguf`` file wherever a model folder is accepted (export, validate --reference,
train), dequantized once into a cache keyed by the file's sha256.

The GGUF is written here with the ``gguf`` package: a tiny Llama (2 layers, hidden 64) with F32 (or
Q4_1, for the mixed-width case) and Q8_0 tensors and a byte-level BPE vocabulary in its metadata,
as llama.cpp's converter writes them (q/k rows permuted for its rotary layout). ``EDGEPEFT_CACHE`` points into the test's temp dir.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import gguf
import numpy as np
import onnx
import pytest
import torch

from edgepeft.cli import main
from helpers import make_lora

HIDDEN, LAYERS, FFN, HEADS, KV_HEADS = 64, 2, 128, 4, 2
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "a n", "Ġ a"]
TEXTS = ["the cat sat on the mat", "a man and the dog ran in the rain", "then the hen ate an ant"]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py), which transformers' loader undoes."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, arch: str = "llama", seed: int = 0, q4: bool = False) -> dict[str, np.ndarray]:
    """Write a tiny GGUF of ``arch`` (Llama tensor names and keys); returns the Hugging Face state
    dict it holds (the quantized tensors as they dequantize). o_proj and gate_proj are Q8_0; with
    ``q4`` the other projections are Q4_1 (a mixed file, as Q4_K_M is), else F32."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(seed)
    tokens = list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in MERGES] + ["<|endoftext|>"]
    vocab, head_dim = len(tokens), HIDDEN // HEADS
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types([1] * (vocab - 1) + [3])  # the last one is a control token
    w.add_token_merges(MERGES)
    w.add_bos_token_id(vocab - 1)
    w.add_eos_token_id(vocab - 1)
    hf = {}

    Q8, Q4 = gguf.GGMLQuantizationType.Q8_0, (gguf.GGMLQuantizationType.Q4_1 if q4 else None)

    def put(name: str, hf_name: str, value: np.ndarray, stored: np.ndarray | None = None, qtype=None):
        if qtype is not None:  # quantized blocks (rows are blocked alone, so q/k's row permutation
            # commutes with it); the model gets them back dequantized
            blocks = gguf.quants.quantize(value if stored is None else stored, qtype)
            w.add_tensor(name, blocks, raw_dtype=qtype)
            hf[hf_name] = gguf.quants.dequantize(gguf.quants.quantize(value, qtype), qtype)
        else:
            w.add_tensor(name, value if stored is None else stored)
            hf[hf_name] = value

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    put("token_embd.weight", "model.embed_tokens.weight", rand(vocab, HIDDEN))
    for i in range(LAYERS):
        g, h = f"blk.{i}.", f"model.layers.{i}."
        q, k = rand(HIDDEN, HIDDEN), rand(KV_HEADS * head_dim, HIDDEN)
        put(g + "attn_norm.weight", h + "input_layernorm.weight", 1 + rand(HIDDEN))
        put(g + "attn_q.weight", h + "self_attn.q_proj.weight", q, _permute(q, HEADS), qtype=Q4)
        put(g + "attn_k.weight", h + "self_attn.k_proj.weight", k, _permute(k, KV_HEADS), qtype=Q4)
        put(g + "attn_v.weight", h + "self_attn.v_proj.weight", rand(KV_HEADS * head_dim, HIDDEN), qtype=Q4)
        put(g + "attn_output.weight", h + "self_attn.o_proj.weight", rand(HIDDEN, HIDDEN), qtype=Q8)
        put(g + "ffn_norm.weight", h + "post_attention_layernorm.weight", 1 + rand(HIDDEN))
        put(g + "ffn_gate.weight", h + "mlp.gate_proj.weight", rand(FFN, HIDDEN), qtype=Q8)
        put(g + "ffn_up.weight", h + "mlp.up_proj.weight", rand(FFN, HIDDEN), qtype=Q4)
        put(g + "ffn_down.weight", h + "mlp.down_proj.weight", rand(HIDDEN, FFN), qtype=Q4)
    put("output_norm.weight", "model.norm.weight", 1 + rand(HIDDEN))
    put("output.weight", "lm_head.weight", rand(vocab, HIDDEN))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """``EDGEPEFT_CACHE`` for this module's tests."""
    root = tmp_path_factory.mktemp("gguf-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEPEFT_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(path of tiny.gguf, the state dict it holds)``."""
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_gguf(path)


@pytest.fixture(scope="module")
def source(tiny, cache):
    """The GGUF resolved (dequantized into the cache) once."""
    from edgepeft.gguf import resolve_base

    return resolve_base(tiny[0])


def _run(capsys, *argv):
    code = main(list(map(str, argv)))
    out, err = capsys.readouterr()
    return code, out, err


def test_gguf_loads_to_the_weights_written(tiny, source, cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgepeft.gguf import is_gguf

    path, written = tiny
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert source.sha256 == digest and source.gguf == path.resolve()
    assert source.folder == cache / "gguf" / digest
    assert source.manifest() == {"file": str(path.resolve()), "sha256": digest}
    assert not json.loads((source.folder / "config.json").read_text()).get("quantization_config")
    model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=torch.float32)
    state = model.state_dict()
    assert set(state) == set(written)
    for name, value in written.items():
        assert torch.equal(state[name], torch.from_numpy(value)), name
    tok = AutoTokenizer.from_pretrained(source.folder)
    assert (source.folder / "tokenizer.json").is_file() and tok.eos_token == "<|endoftext|>"
    assert tok.decode(tok("the cat")["input_ids"]) == "the cat"
    assert [p.name for p in (cache / "gguf").iterdir()] == [digest]  # no temp dir left
    assert is_gguf(path) and not is_gguf(source.folder) and is_gguf(path.parent / "missing.gguf")
    (path.parent / "folder.gguf").mkdir()
    assert not is_gguf(path.parent / "folder.gguf")  # a folder is never a GGUF file


def test_train_export_validate_from_gguf(tiny, source, cache, tmp_path, capsys, monkeypatch):
    """train, export and validate take the GGUF; the manifest records its sha256; the cache is hit
    (nothing converted again); adapters made on the dequantized folder bind to it."""
    import edgepeft.gguf as eg

    path, _ = tiny
    calls = []
    monkeypatch.setattr(eg, "dequantize_gguf", lambda *a, **k: calls.append(a))  # a cache miss would show
    weights = source.folder / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))

    code, _, err = _run(capsys, "train", path, "--data", data, "--kind", "lora", "--steps", "2",
                        "--batch-size", "2", "--r", "4", "--out", tmp_path / "trained", "--quiet")
    assert code == 0, err
    made = make_lora(source.folder, tmp_path / "made", r=2, lora_alpha=4, target_modules=["v_proj", "up_proj"])
    out = tmp_path / "out"
    for n in (1, 2):  # the second export runs from the cache as well
        code, _, err = _run(capsys, "export", path, "--adapter", f"trained={tmp_path / 'trained'}",
                            "--adapter", f"made={made}", "--out", out, "--force", "--quiet")
        assert code == 0, err
    m = json.loads((out / "manifest.json").read_text())
    assert m["base"]["gguf"] == {"file": str(path.resolve()), "sha256": source.sha256}
    assert list(m["base"])[:4] == ["source", "model_type", "fingerprint", "gguf"]
    assert m["base"]["source"] == str(source.folder)
    assert {e["base_fingerprint"] for e in m["adapters"].values()} == {m["base"]["fingerprint"]}
    binding = json.loads((tmp_path / "trained" / "edgepeft.json").read_text())
    assert binding["base_fingerprint"] == m["base"]["fingerprint"]  # trained from the GGUF, same weights
    code, out_text, err = _run(capsys, "inspect", out)
    assert code == 0 and f"GGUF {path.resolve()}" in out_text
    code, _, err = _run(capsys, "verify", out)
    assert code == 0, err

    code, _, err = _run(capsys, "validate", out, "--reference", path, "--max-new-tokens", "4", "--json", "--quiet")
    assert code == 0, err
    assert calls == [] and weights.stat().st_mtime_ns == stamp


def _bad_files(root: Path, good: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, words the error must contain)."""
    root.mkdir()
    data = good.read_bytes()
    (root / "text.gguf").write_text("not a model, just some text\n")
    (root / "empty.gguf").write_bytes(b"")
    (root / "model.bin").write_bytes(b"PK\x03\x04 a zip, say")  # a file of another kind, any name
    (root / "half.gguf").write_bytes(data[: len(data) // 2])
    (root / "head.gguf").write_bytes(data[:2000])  # cut inside the metadata
    write_gguf(root / "rwkv.gguf", arch="rwkv7")  # an architecture transformers' GGUF loader lacks
    return {
        "text": (root / "text.gguf", "not a GGUF file (it begins with b'not '"),
        "empty": (root / "empty.gguf", "not a GGUF file (it is empty)"),
        "other": (root / "model.bin", "not a GGUF file"),
        "missing": (root / "nope.gguf", "GGUF file not found"),
        "half": (root / "half.gguf", "damaged or truncated GGUF file"),
        "head": (root / "head.gguf", "damaged or truncated GGUF file"),
        "arch": (root / "rwkv.gguf", "cannot load this GGUF file (architecture 'rwkv7'"),
    }


def test_bad_gguf_files_are_refused_clearly(tiny, tmp_path, capsys, monkeypatch, llama_side):
    """Exit 2, one message naming the file, the problem and the fix; no traceback, no cache folder."""
    monkeypatch.setenv("EDGEPEFT_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "the cat"}) + "\n")
    for name, (bad, words) in _bad_files(tmp_path / "bad", tiny[0]).items():
        commands = [["export", bad, "--out", tmp_path / "o"]]
        if name in ("text", "half", "arch"):
            commands += [["validate", llama_side, "--reference", bad],
                         ["train", bad, "--data", data, "--kind", "lora", "--out", tmp_path / "t"]]
        for argv in commands:
            code, _, err = _run(capsys, *argv)
            assert code == 2, (name, argv, err)
            assert str(bad) in err and words in err, (name, argv, err)
            assert any(fix in err for fix in ("Pass ", "again", "Use a GGUF")), (name, err)
            assert "Traceback" not in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "t").exists()
    cache = tmp_path / "cache" / "gguf"
    assert not cache.exists() or not any(cache.iterdir())  # nothing half-written


def test_int4_keeps_the_wider_tensors_of_a_mixed_gguf(tmp_path, cache, capsys):
    """A mixed-width GGUF (Q4_1 projections, Q8_0 o_proj and gate_proj, as Q4_K_M mixes Q4_K with
    Q5_0-Q8_0): int4 keeps the fused MatMuls holding an 8-bit tensor (o; gate|up) at 8 bits and
    the rest 4-bit, found from the weights' grid (``--widths source``, the default); ``--widths
    uniform`` makes all 4-bit, further from the fp32 artifact; inspect says which."""
    path = tmp_path / "mixed.gguf"
    write_gguf(path, seed=1, q4=True)
    outs = {}
    for name, extra in (("fp32", ()), ("source", ("--precision", "int4")),
                        ("uniform", ("--precision", "int4", "--widths", "uniform"))):
        outs[name] = tmp_path / name
        code, _, err = _run(capsys, "export", path, "--out", outs[name], "--quiet", *extra)
        assert code == 0, err
    bits = {}
    for name in ("source", "uniform"):
        graph = onnx.load(str(outs[name] / "model.onnx"), load_external_data=False).graph
        assert any(n.op_type == "GroupQueryAttention" for n in graph.node)  # the fused graph
        bits[name] = sorted((n.input[1].split(".")[-2], onnx.helper.get_attribute_value(
            next(a for a in n.attribute if a.name == "bits"))) for n in graph.node if n.op_type == "MatMulNBits")
    per_layer = [("down", 4), ("gate_up", 8), ("o", 8), ("qkv", 4)]
    assert bits["source"] == sorted(per_layer * LAYERS)
    assert bits["uniform"] == sorted([(g, 4) for g, _ in per_layer] * LAYERS)
    code, text, _ = _run(capsys, "inspect", outs["source"])
    assert code == 0 and f"{2 * LAYERS} kept 8-bit (off the source's 4-bit grid)" in text
    from edgepeft.runtime import Model

    ids = np.array([[5, 9, 17, 30, 2, 41, 7, 12]])
    want = Model(outs["fp32"]).logits(ids)
    err = {n: np.abs(Model(outs[n]).logits(ids) - want).mean() for n in ("source", "uniform")}
    assert 0 < err["source"] < 0.5 * err["uniform"]
