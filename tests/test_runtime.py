"""The runtime shim: torch-free, padding, swaps without rebuilds, threads, onnxruntime's own path."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import threading

import numpy as np
import onnxruntime as ort
import pytest

from edgepeft.errors import EdgepeftError
from edgepeft.runtime import Model
from edgepeft.contract import slot_input_name


@pytest.fixture(scope="module")
def model(llama_side):
    return Model(llama_side)


def _ids(rows=2, seq=6, seed=0):
    return np.random.default_rng(seed).integers(3, 96, (rows, seq))


def test_runtime_imports_no_torch(llama_side):
    """The shim runs with torch, transformers and peft made unimportable."""
    code = textwrap.dedent(f"""
        import sys
        for name in ("torch", "transformers", "peft"):
            sys.modules[name] = None  # any import of them now raises ImportError
        from edgepeft.runtime import Model
        m = Model({str(llama_side)!r})
        out = m.logits([[5, 6, 7]], adapter={{"chat": 0.5, "sql": 0.5}})
        text = m.generate_text("w5 w6 w7", max_new_tokens=4, adapter="sql")
        assert out.shape == (1, 3, 96), out.shape
        assert isinstance(text, str) and text, text
        print("ok", sorted(k for k in sys.modules if k.split(".")[0] in ("torch", "transformers", "peft") and sys.modules[k] is not None))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok []"


def test_adapters_listed_and_shapes(model):
    assert model.adapters == ["chat", "sql", "code"]
    assert model.logits(_ids(), adapter="chat").shape == (2, 6, 96)


def test_unfed_inputs_are_the_base_model(model, llama_side):
    """Running the graph with no LoRA inputs at all uses the rank-0 defaults: the base model."""
    sess = ort.InferenceSession(str(llama_side / "model.onnx"))
    ids = _ids()
    mask = np.ones_like(ids)
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": np.tile(np.arange(6), (2, 1))}
    for i, (h, d) in enumerate(zip(model.manifest["kv_cache"]["kv_heads"], model.manifest["kv_cache"]["head_dims"])):
        feeds[f"past.{i}.key"] = feeds[f"past.{i}.value"] = np.zeros((2, h, 0, d), np.float32)
    plain = sess.run(["logits"], feeds)[0]
    np.testing.assert_allclose(plain, model.logits(ids), atol=1e-6)

    # onnxruntime's own LoraAdapter + RunOptions drive the same graph, exactly (scale is in the file).
    for name in model.adapters:
        adapter = ort.LoraAdapter()
        adapter.Load(str(llama_side / "adapters" / f"{name}.onnx_adapter"))
        ro = ort.RunOptions()
        ro.add_active_adapter(adapter)
        native = sess.run(["logits"], feeds, run_options=ro)[0]
        np.testing.assert_allclose(native, model.logits(ids, adapter=name), atol=1e-5)
        assert np.abs(native - plain).max() > 1e-2


def test_mix_is_linear_in_the_weights(model):
    """A mix equals the weighted sum of the adapters' deltas: check against single adapters' ranks."""
    ids = _ids()
    np.testing.assert_allclose(model.logits(ids, adapter={"chat": 1.0}), model.logits(ids, adapter="chat"), atol=1e-5)
    np.testing.assert_allclose(model.logits(ids, adapter={"chat": 0.0, "sql": 0.0}), model.logits(ids), atol=1e-5)
    feeds = model._store.feeds({"chat": 0.7, "sql": 0.3})[0]
    a, b = lora_input_names("model.layers.0.self_attn.q_proj")
    assert feeds[a].shape[0] == 4 + 8 and feeds[b].shape[1] == 4 + 8  # ranks concatenated


@pytest.mark.parametrize("adapter", [None, "chat", {"chat": 0.6, "sql": 0.4}])
def test_left_and_right_padding_match_unpadded_rows(model, adapter):
    rows = [[5, 9, 11, 40, 2 + 1], [7, 8], [30, 31, 32, 33, 34, 35, 36]]
    singles = [model.logits([r], adapter=adapter)[0] for r in rows]
    left = model.logits(rows, adapter=adapter)  # ragged -> left padded
    width = left.shape[1]
    for r, s, got in zip(rows, singles, left):
        np.testing.assert_allclose(got[width - len(r):], s, atol=1e-5)
    ids = np.zeros((3, width), np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    right = model.logits(ids, adapter=adapter, attention_mask=mask)
    for r, s, got in zip(rows, singles, right):
        np.testing.assert_allclose(got[:len(r)], s, atol=1e-5)


def test_generate_batched_equals_single(model):
    rows = [[5, 9, 11, 40], [7, 8], [30, 31, 32, 33, 34, 35]]
    batched = model.generate(rows, max_new_tokens=12, adapter="sql", stop_at_eos=False)
    for i, r in enumerate(rows):
        single = model.generate([r], max_new_tokens=12, adapter="sql", stop_at_eos=False)
        np.testing.assert_array_equal(batched[i, -12:], single[0, -12:])
        np.testing.assert_array_equal(single[0, :len(r)], r)


def test_generate_stops_at_eos(llama_side, tmp_path):
    """Declare the 3rd greedy token to be EOS: generation must stop right after its first use."""
    free = Model(llama_side).generate([[5, 6, 7]], max_new_tokens=10, adapter="chat", stop_at_eos=False)[0, 3:]
    eos = int(free[2])
    copy = tmp_path / "art"
    shutil.copytree(llama_side, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["base"]["eos_token_id"] = eos
    (copy / "manifest.json").write_text(json.dumps(manifest))
    out = Model(copy).generate([[5, 6, 7]], max_new_tokens=10, adapter="chat")[0, 3:]
    stop = free.tolist().index(eos)
    np.testing.assert_array_equal(out, free[:stop + 1])


def test_swapping_rebuilds_no_session(model):
    layout = model._layouts[None]
    session = layout.session
    first = model.logits(_ids(), adapter="chat")
    for choice in ["sql", None, {"chat": 0.5, "sql": 0.5}, "chat"]:
        model.logits(_ids(), adapter=choice)
    assert model._layouts == {None: layout} and layout.session is session
    np.testing.assert_array_equal(model.logits(_ids(), adapter="chat"), first)
    feeds = model._store.feeds("chat")[0]
    a, _ = lora_input_names("model.layers.0.self_attn.q_proj")
    assert feeds[a] is model._store.loaded["chat"].graph[a]  # fed as loaded: no per-call copies


def test_threads_each_get_their_own_adapter(model):
    choices = [None, "chat", "sql", {"chat": 0.7, "sql": 0.3}, {"sql": 1.0}]
    inputs = [_ids(2, 5, seed=s) for s in range(4)]
    expected = {(c, i): model.logits(inputs[i], adapter=choices[c]) for c in range(len(choices)) for i in range(4)}
    wrong, calls = [], []

    def worker(seed):
        rng = np.random.default_rng(seed)
        for _ in range(40):
            c, i = int(rng.integers(len(choices))), int(rng.integers(4))
            got = model.logits(inputs[i], adapter=choices[c])
            calls.append(1)
            if not np.array_equal(got, expected[(c, i)]):
                wrong.append((c, i))

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 240 and wrong == []


def test_generate_text_uses_the_artifact_tokenizer(model):
    text = model.generate_text("w5 w6 w7", max_new_tokens=5, adapter="chat")
    assert all(w.startswith("w") or w in ("<unk>",) for w in text.split())


def test_unknown_adapter_is_named(model):
    with pytest.raises(EdgepeftError, match=r"'nope' is not in .*it has: chat, sql, code"):
        model.logits(_ids(), adapter="nope")
    with pytest.raises(EdgepeftError, match="must lie in"):
        model.logits([[500]])


def test_tampered_adapter_file_is_refused(llama_side, tmp_path):
    copy = tmp_path / "art"
    shutil.copytree(llama_side, copy)
    f = copy / "adapters" / "chat.onnx_adapter"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(EdgepeftError, match="chat.onnx_adapter: sha256 does not match"):
        Model(copy)


def test_manifest_paths_stay_inside(llama_side, tmp_path):
    copy = tmp_path / "art"
    shutil.copytree(llama_side, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["adapters"]["chat"]["file"] = "../../etc/passwd"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EdgepeftError, match="outside the artifact"):
        Model(copy)


def lora_input_names(module: str) -> tuple[str, str]:
    """Graph input names of one LoRA slot: ``A (r, in)`` and ``B (out, r)``."""
    return slot_input_name("lora", module, "A"), slot_input_name("lora", module, "B")
