"""Target profiles: parsing, `edgepeft targets`, ORT-format bundles, partition reports, providers, max_rank."""

from __future__ import annotations

import json
import re
import shutil
import warnings

import numpy as np
import pytest

from edgepeft.cli import main
from edgepeft.errors import EdgepeftError
from edgepeft.runtime import Model, ProviderFallbackWarning
from edgepeft.runtime.static import StaticLayout
from edgepeft.contract import verify
from edgepeft.targets import (DEFAULT_TARGET, TARGETS_DIR, field_help, load_target, quant_defaults,
                              shipped, shipped_names)

SHIPPED = {"cpu-x86_64", "cpu-arm64", "android-nnapi", "android-qnn", "ios-coreml", "web-wasm", "web-webgpu"}


def test_every_shipped_profile_parses():
    assert set(shipped_names()) == SHIPPED
    targets = {t.name: t for t in shipped()}
    assert set(targets) == SHIPPED
    for t in targets.values():
        assert t.providers[-1] == "CPUExecutionProvider"
        assert t.manifest()["name"] == t.name
    assert not targets["cpu-x86_64"].ort_format and targets["cpu-x86_64"].precision == "fp32"
    assert all(targets[n].ort_format for n in SHIPPED - {"cpu-x86_64"})
    for n in ("android-nnapi", "android-qnn", "ios-coreml"):  # accelerators that need fixed shapes
        assert targets[n].static_shapes and targets[n].max_rank
        assert "static_shapes" not in targets[n].not_applied()  # applied to side-branch artifacts
        assert "static_shapes" in targets[n].not_applied("merged")
    assert load_target(None).name == DEFAULT_TARGET
    assert load_target(TARGETS_DIR / "ios-coreml.toml") == targets["ios-coreml"]
    assert [k for k, _ in field_help()][:3] == ["name", "description", "providers"]


def test_targets_command_lists_all(capsys):
    assert main(["targets"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 7
    assert {line.split()[0] for line in lines} == SHIPPED
    assert lines[0].startswith("cpu-x86_64")
    assert main(["targets", "android-qnn"]) == 0
    out = capsys.readouterr().out
    assert "precision = 'int8-static'" in out and "static_shapes = True" in out


@pytest.mark.parametrize("text, expected", [
    ('providers = ["CPUExecutionProvider"]\nprecison = "fp16"\n', ["unknown key 'precison'", "Valid keys:", "precision"]),
    ('batch = "one"\n', ["batch = 'one'", "expected an integer"]),
    ('ort_format = 1\n', ["ort_format = 1", "true or false"]),
    ('providers = ["NNAPIExecutionProvider", "CPUExecutionProvider"]\n', ["'NNAPIExecutionProvider'", "NnapiExecutionProvider"]),
    ('providers = ["NnapiExecutionProvider"]\n', ["must end with CPUExecutionProvider"]),
    ('precision = "int3"\n', ["precision = 'int3'", "int4"]),
    ('static_shapes = true\n', ["static_shapes needs sequence_buckets"]),
    ('max_rank = 0\n', ["max_rank = 0", ">= 1"]),
    ('providers = [\n', ["not valid TOML"]),
])
def test_bad_profile_exits_2_with_a_readable_message(tmp_path, capsys, text, expected):
    path = tmp_path / "mine.toml"
    path.write_text(text)
    assert main(["targets", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "Traceback" not in err
    for e in expected:
        assert e in err, err


def test_missing_profile_exits_2(tmp_path, capsys, llama_base):
    assert main(["targets", "android-nnapi-typo"]) == 2
    err = capsys.readouterr().err
    assert "android-nnapi-typo" in err and "android-nnapi," in err  # names the shipped ones
    out = tmp_path / "out"
    assert main(["export", str(llama_base), "--out", str(out), "--target", str(tmp_path / "none.toml")]) == 2
    assert "none.toml: file not found" in capsys.readouterr().err
    assert not out.exists()


def test_explicit_precision_wins_over_the_target():
    qnn = load_target("android-qnn")
    assert quant_defaults(qnn, None, None, None) == {"precision": "int8-static", "int8_scheme": "weight-only",
                                                     "static_activations": "int16"}
    assert quant_defaults(qnn, "fp32", None, None)["precision"] == "fp32"
    nnapi = load_target("android-nnapi")  # its int8 activations apply only to int8-static
    assert quant_defaults(nnapi, None, None, None)["static_activations"] == "int16"
    assert quant_defaults(nnapi, "int8-static", None, None)["static_activations"] == "int8"
    assert quant_defaults(nnapi, "int8-static", None, "int16")["static_activations"] == "int16"


def test_default_export_is_cpu_x86_64(llama_side):
    m = json.loads((llama_side / "manifest.json").read_text())
    assert m["target"]["name"] == "cpu-x86_64" and m["target"]["files"] == []
    assert m["graph"]["opset"] == 20 and "ort" not in m["graph"]
    assert not (llama_side / "model.ort").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no provider warning: the target asks for CPU only
        assert Model(llama_side).format == "onnx"
    with pytest.raises(EdgepeftError, match="no .ort graph"):
        Model(llama_side, format="ort")


@pytest.fixture(scope="module")
def nnapi_out(llama_base, llama_adapters, tmp_path_factory):
    """The tiny Llama + chat (r=4) and sql (r=8, o_proj r=2) exported for android-nnapi via the CLI."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("nnapi") / "out"
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        rc = main(["export", str(llama_base), "--adapter", f"chat={llama_adapters['chat']}",
                   "--adapter", f"sql={llama_adapters['sql']}", "--out", str(out),
                   "--target", "android-nnapi", "--quiet"])
    assert rc == 0
    return out, text.getvalue()


def test_ort_bundle_files_and_report(nnapi_out):
    out, printed = nnapi_out
    for f in ("model.s1.ort", "model.s128.ort", "required_operators_and_types.config", "partitions.json",
              "model.onnx", "model.s1.onnx", "model.s128.onnx"):
        assert (out / f).is_file(), f
    # the accelerator runs the bucket graphs: no .ort of the dynamic graph, one weights file for all
    assert not (out / "model.ort").exists() and [p.name for p in out.glob("*.data")] == ["model.onnx.data"]
    assert not (out / ".ort-in").exists() and not (out / ".ort-out").exists()
    config = (out / "required_operators_and_types.config").read_text()
    assert re.search(r"^ai\.onnx;\d+;", config, re.M) and "MatMul" in config
    m = json.loads((out / "manifest.json").read_text())
    t = m["target"]
    assert t["name"] == "android-nnapi" and t["providers"][0] == "NnapiExecutionProvider"
    assert {f["file"] for f in t["files"]} == {"required_operators_and_types.config", "partitions.json"}
    assert [b["ort"]["file"] for b in m["graph"]["buckets"]] == ["model.s1.ort", "model.s128.ort"]
    assert m["static"] == {"batch": 1, "buckets": [1, 128], "context": 512, "max_rank": 64}
    assert "static_shapes" not in t["not_applied"]
    reports = json.loads((out / "partitions.json").read_text())
    assert set(reports) == {"model.onnx", "model.s1.onnx", "model.s128.onnx"}
    report = reports["model.onnx"]
    assert set(report) == {"nnapi", "coreml"}
    for acc, e in report.items():
        a, f = e["as_exported"], e["if_shapes_fixed"]
        assert a["nodes"] > 50 and 0 <= a["supported_pct"] <= f["supported_pct"] <= 100
        assert f["partitions"] >= 1 and f["unsupported_ops"]
        after = reports["model.s128.onnx"][acc]["as_exported"]  # fixed shapes + rewrites, really
        assert after["supported_pct"] > a["supported_pct"] + 50 and after["nodes_unsupported_by_dynamic_shape"] == 0
        assert "ai.onnx:Reciprocal" not in after["unsupported_ops"] and "ai.onnx:Neg" not in after["unsupported_ops"]
        assert after["partitions"] <= 3 < e["if_shapes_fixed"]["partitions"]  # the rewrites join them
    assert t["partitions"]["model.onnx"] == report
    assert "model.s1.ort, model.s128.ort; static shapes: batch 1, buckets 1/128, context 512, max_rank 64" in printed
    assert "partitions model.s128.onnx nnapi:" in printed and "NOT applied" not in printed.replace("fp16 NOT", "")


def test_ort_runs_on_cpu_and_matches_onnx_with_swaps_and_mixes(nnapi_out, llama_side):
    """The static .ort bundle (ranks padded to 64, a 512-slot KV window) against the dynamic
    artifact of the same base and adapters (default target)."""
    out, _ = nnapi_out
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ort_model = Model(out, format="ort")  # the target's NNAPI is not in this build
    assert ort_model.format == "ort" and ort_model.providers == ["CPUExecutionProvider"]
    assert ort_model._layouts[None].shared is None  # each .ort file holds its own weights
    fallback = [w for w in caught if issubclass(w.category, ProviderFallbackWarning)]
    assert len(fallback) == 1 and "NnapiExecutionProvider" in str(fallback[0].message)
    onnx_model = Model(llama_side)
    assert onnx_model.format == "onnx" and not isinstance(onnx_model._layouts[None], StaticLayout)
    ids = np.random.default_rng(0).integers(3, 96, (2, 7))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    base = ort_model.logits(ids, attention_mask=mask)
    # swap back and forth, then mix two ranks (4 and 8/2): one session, only feeds change
    for choice in ("chat", "sql", None, "sql", {"chat": 0.7, "sql": 0.3}, "chat", {"sql": 1.0, "chat": 1.0}):
        got = ort_model.logits(ids, adapter=choice, attention_mask=mask)
        want = onnx_model.logits(ids, adapter=choice, attention_mask=mask)
        real = mask.astype(bool)  # what a padded slot's query computes is meaningless either way
        np.testing.assert_allclose(got[real], want[real], atol=1e-5)
        if choice is not None:
            assert np.abs(got - base)[real].max() > 1e-2, choice  # the adapter really acts on the .ort
    np.testing.assert_array_equal(ort_model.generate(ids, 6, adapter={"chat": 0.5, "sql": 0.5}, attention_mask=mask),
                                  onnx_model.generate(ids, 6, adapter={"chat": 0.5, "sql": 0.5}, attention_mask=mask))


def test_explicit_providers_fall_back_with_one_warning(llama_side):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = Model(llama_side, providers=["QNNExecutionProvider", "CoreMLExecutionProvider", "CPUExecutionProvider"])
    msgs = [str(w.message) for w in caught if issubclass(w.category, ProviderFallbackWarning)]
    assert len(msgs) == 1 and "QNNExecutionProvider, CoreMLExecutionProvider" in msgs[0]
    assert m.providers == ["CPUExecutionProvider"]


def test_verify_covers_bundle_files(nnapi_out, tmp_path):
    out, _ = nnapi_out
    assert verify(out) == []
    for rel in ("model.s1.ort", "model.s128.onnx", "required_operators_and_types.config", "partitions.json"):
        copy = tmp_path / rel.replace(".", "_")
        shutil.copytree(out, copy)
        with open(copy / rel, "ab") as f:
            f.write(b"\0")
        problems = verify(copy)  # a damaged .onnx is also unreadable: a second line, same file
        assert 1 <= len(problems) <= 2 and all(rel in p for p in problems), problems
        (copy / rel).unlink()
        assert any("missing" in p for p in verify(copy))
    copy = tmp_path / "ort-damaged"
    shutil.copytree(out, copy)
    with open(copy / "model.s128.ort", "ab") as f:
        f.write(b"\0")
    with pytest.raises(EdgepeftError, match="model.s128.ort: sha256"):
        Model(copy, format="ort")  # (auto loads the .onnx graphs, which share the weights)


def test_inspect_shows_target_and_partitions(nnapi_out, capsys):
    out, _ = nnapi_out
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "target android-nnapi: providers NnapiExecutionProvider, CPUExecutionProvider" in text
    assert "partitions model.onnx coreml:" in text and "partitions model.s128.onnx coreml:" in text
    assert "model.s128.ort" in text and "static shapes: batch 1, buckets 1/128, context 512, max_rank 64" in text


def test_rank_above_max_rank_is_refused(llama_base, llama_adapters, tmp_path, capsys):
    profile = tmp_path / "small-npu.toml"
    profile.write_text((TARGETS_DIR / "android-nnapi.toml").read_text().replace("max_rank = 64", "max_rank = 4"))
    out = tmp_path / "out"
    rc = main(["export", str(llama_base), "--adapter", f"chat={llama_adapters['chat']}",
               "--adapter", f"sql={llama_adapters['sql']}", "--out", str(out), "--target", str(profile), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    for part in ("adapter 'sql'", "rank 8", "max_rank 4", "'small-npu'"):
        assert part in err, err
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_merged_artifact_gets_one_ort_per_graph(llama_base, llama_adapters, tmp_path):
    """Merged mode: merged/NAME.ort beside each merged/NAME.onnx, one operator config for all."""
    from edgepeft.export import ExportConfig, export
    from edgepeft.contract import verify as check

    profile = tmp_path / "arm-fp32.toml"
    profile.write_text('providers = ["XnnpackExecutionProvider", "CPUExecutionProvider"]\nplatform = "arm64"\n'
                       'ort_format = true\n')
    out = tmp_path / "merged"
    adapters = (("chat", llama_adapters["chat"]), ("code", llama_adapters["code"]))
    m = export(ExportConfig(graph="generic", base=llama_base, out=out, adapters=adapters, mode="merged",
                            target=load_target(profile)), quiet=True)
    assert [a["graph"]["ort"]["file"] for a in m["adapters"].values()] == ["merged/chat.ort", "merged/code.ort"]
    assert (out / "required_operators_and_types.config").is_file() and check(out) == []
    ids = np.random.default_rng(1).integers(3, 96, (1, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProviderFallbackWarning)
        via_ort, via_onnx = Model(out), Model(out, format="onnx")
    assert via_ort.format == "ort"
    for name in ("chat", "code"):
        np.testing.assert_allclose(via_ort.logits(ids, adapter=name), via_onnx.logits(ids, adapter=name), atol=1e-5)


def test_partition_report_survives_a_transpose_without_perm(tmp_path):
    """The fp16 converter writes Transpose nodes without 'perm'; onnxruntime's checker indexes
    attribute[0] of every Transpose, so the report failed on every fp16 graph."""
    import onnx
    from onnx import TensorProto, helper

    from edgepeft.targets.bundle import partition_report

    graph = helper.make_graph(
        [helper.make_node("Transpose", ["x"], ["t"]), helper.make_node("Relu", ["t"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 2])])
    path = tmp_path / "t.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), path)
    report = partition_report(path, ("nnapi", "coreml"))
    assert "error" not in report, report
    assert report["nnapi"]["as_exported"] == {**report["nnapi"]["as_exported"], "nodes": 2, "supported_nodes": 2,
                                              "partitions": 1, "supported_pct": 100.0}


SMALL_NPU = """providers = ["NnapiExecutionProvider", "CPUExecutionProvider"]
platform = "arm64"
static_shapes = true
batch = 2
sequence_buckets = [1, 4]
context_length = 24
max_rank = 10
"""


@pytest.fixture(scope="module")
def small_static(llama_base, llama_adapters, tmp_path_factory):
    """Batch 2, buckets 1 / 4, a 24-slot KV window, max_rank 10: prompts run in several chunks and
    row groups; sql (k_proj rank 8) + code (2) fill layer 1's k_proj exactly, chat (q_proj rank
    4) + sql (8) overflow the fixed rank."""
    from edgepeft.export import ExportConfig, export

    root = tmp_path_factory.mktemp("small-static")
    (root / "small-npu.toml").write_text(SMALL_NPU)
    out = root / "out"
    export(ExportConfig(graph="generic", base=llama_base, out=out, adapters=tuple(llama_adapters.items()),
                        target=load_target(root / "small-npu.toml")), quiet=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProviderFallbackWarning)
        return Model(out)


def test_static_graphs_fix_every_shape_and_share_the_weights(small_static):
    import onnx

    out = small_static.path
    m = small_static.manifest
    assert verify(out) == []
    dynamic = onnx.load(str(out / "model.onnx"), load_external_data=False)
    for b, seq in zip(m["graph"]["buckets"], (1, 4)):
        g = onnx.load(str(out / b["file"]), load_external_data=False)
        shapes = {v.name: [d.dim_value if d.HasField("dim_value") else d.dim_param
                           for d in v.type.tensor_type.shape.dim] for v in list(g.graph.input) + list(g.graph.output)}
        assert all(isinstance(d, int) and d > 0 for s in shapes.values() for d in s), shapes
        assert shapes["input_ids"] == [2, seq] and shapes["attention_mask"] == [2, 24]
        assert shapes["past.0.key"][2] == 24 - seq and shapes["present.0.key"][2] == 24
        assert shapes["lora.model.layers.0.self_attn.q_proj.A"] == [10, 64]
        assert shapes["lora.model.layers.0.self_attn.q_proj.B"] == [64, 10]
        assert b["data_file"] == "model.onnx.data" and b["data_sha256"] == m["graph"]["data_sha256"]
        ops = {n.op_type for n in g.graph.node}
        assert "Reciprocal" not in ops and "Reciprocal" in {n.op_type for n in dynamic.graph.node}
        # torch's per-node records (module, FX node: ~90 % of the file, kept per session) are dropped
        assert not any(n.doc_string or n.metadata_props for x in (dynamic, g) for n in x.graph.node)
        expands = [sum(n.op_type == "Expand" for n in x.graph.node) for x in (dynamic, g)]
        assert expands[1] <= expands[0] - 4  # repeat_kv of k and v in both layers became Concats
        assert (out / b["file"]).stat().st_size < 2 * (out / "model.onnx").stat().st_size
    # a file the bucket graphs point at, outside the artifact, is refused as for the dynamic graph
    assert {p.name for p in out.glob("*.data")} == {"model.onnx.data"}


def test_static_runtime_matches_the_dynamic_artifact(small_static, llama_side):
    """Padding (ranks to 10, chunks to buckets 4 / 1, rows to batch 2) and the sliding KV window
    are exact: logits and greedy tokens equal the dynamic graph's, for base, swaps and mixes."""
    dynamic = Model(llama_side)
    rng = np.random.default_rng(3)
    rows = [list(rng.integers(3, 96, n)) for n in (3, 9, 6)]  # 9 tokens: chunks 4 + 4 + 1; 3 rows: 2 groups
    mask = np.array([[0] * (9 - len(r)) + [1] * len(r) for r in rows], bool)
    base = small_static.logits(rows)
    for choice in (None, "chat", "sql", "code", "chat", {"chat": 0.6, "code": 0.4}, {"sql": 0.5, "code": 0.5}):
        got, want = small_static.logits(rows, adapter=choice), dynamic.logits(rows, adapter=choice)
        assert got.shape == want.shape == (3, 9, 96)
        np.testing.assert_allclose(got[mask], want[mask], atol=1e-5, err_msg=str(choice))
        if choice is not None:
            assert np.abs(got - base)[mask].max() > 1e-2, choice
        np.testing.assert_array_equal(small_static.generate(rows, 5, adapter=choice, stop_at_eos=False),
                                      dynamic.generate(rows, 5, adapter=choice, stop_at_eos=False))


def test_static_runtime_refuses_what_does_not_fit(small_static):
    # the first input found too large names the mix's rank, 12, whichever of A (r, in) or B (out, r) it is
    with pytest.raises(EdgepeftError, match=r"chat \+ sql: input lora\..* needs shape \((12, \d+|\d+, 12)\), above "
                                            r"the fixed \((10, \d+|\d+, 10)\).*max_rank 10"):
        small_static.logits([[5, 6, 7]], adapter={"chat": 0.5, "sql": 0.5})  # q_proj: rank 4 + 8
    with pytest.raises(EdgepeftError, match=r"9 tokens \(run as bucket\(s\) \[4, 4, 1\]\) and 20 new "
                                            r"tokens take 29 slots .* context_length 24"):
        small_static.generate([list(range(3, 12))], 20)
    assert small_static.generate([list(range(3, 12))], 15, stop_at_eos=False).shape == (1, 24)


def test_static_buckets_share_one_copy_of_the_weights(nnapi_out, tmp_path):
    """Two bucket sessions, one memory-mapped copy: auto loads the .onnx graphs with the data
    file's tensors as shared buffers (not prepacked); the outputs equal each session's own copy
    (share_weights=False) and the .ort files'. A truncated data file is refused by name."""
    import shutil

    import onnx

    out, _ = nnapi_out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProviderFallbackWarning)
        shared = Model(out)
        own = Model(out, format="onnx", share_weights=False)
        ort_model = Model(out, format="ort")
    layout = shared._layouts[None]
    assert shared.format == "onnx" and sorted(layout.buckets) == [1, 128]
    proto = onnx.load(str(out / "model.s128.onnx"), load_external_data=False)
    external = {t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL} - {
        i.name for i in proto.graph.input}
    assert set(layout.shared) == external and len(external) > 10
    for session in layout.buckets.values():  # not prepacked, one arena for all
        options = session.get_session_options()
        assert options.get_session_config_entry("session.disable_prepacking") == "1"
        assert options.get_session_config_entry("session.use_env_allocators") == "1"
    assert own._layouts[None].shared is None
    for session in own._layouts[None].buckets.values():
        for entry in ("session.disable_prepacking", "session.use_env_allocators"):  # as by default
            with pytest.raises(RuntimeError, match="does not have configuration"):
                session.get_session_options().get_session_config_entry(entry)
    ids = np.random.default_rng(1).integers(3, 96, (1, 9))  # a chunk of 128, then steps of 1
    for choice in (None, "sql", {"chat": 0.5, "sql": 0.5}):
        want = own.logits(ids, adapter=choice)
        np.testing.assert_array_equal(shared.logits(ids, adapter=choice), want)
        np.testing.assert_allclose(ort_model.logits(ids, adapter=choice), want, atol=1e-5)
    np.testing.assert_array_equal(shared.generate(ids, 5, adapter="sql", stop_at_eos=False),
                                  own.generate(ids, 5, adapter="sql", stop_at_eos=False))
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    data = broken / "model.onnx.data"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(EdgepeftError, match=r"model\.s1\.onnx: initializer '.*' does not fit model\.onnx\.data "
                                            r".*the artifact is damaged"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ProviderFallbackWarning)
            Model(broken)


def test_static_encoder_pads_to_buckets(tmp_path):
    """An encoder classifier on a static profile: one graph per bucket, texts right-padded to the
    shortest bucket that holds them, LoRA rank 4 and a bottleneck of 8 padded to max_rank 10."""
    from helpers import CLASSIFIER_HEADS, make_adapter, make_bottleneck, make_encoder
    from edgepeft.export import ExportConfig, export

    base = make_encoder("bert", tmp_path / "bert")
    ads = {"lora": make_adapter(base, tmp_path / "lora", "lora", task="SEQ_CLS"),
           "bottleneck": make_bottleneck(base, tmp_path / "bottleneck", task="SEQ_CLS",
                                         heads=CLASSIFIER_HEADS["bert"], seed=7)}
    profile = tmp_path / "enc-npu.toml"
    profile.write_text(SMALL_NPU.replace("[1, 4]", "[1, 8, 16]"))  # 1: dropped for encoders
    dyn, st = tmp_path / "dyn", tmp_path / "static"
    export(ExportConfig(graph="generic", base=base, out=dyn, adapters=tuple(ads.items())), quiet=True)
    export(ExportConfig(graph="generic", base=base, out=st, adapters=tuple(ads.items()), target=load_target(profile)), quiet=True)
    assert verify(st) == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProviderFallbackWarning)
        static = Model(st)
    assert sorted(static._layouts[None].buckets) == [8, 16]
    texts = ["w5 w9 w11", "w40 w41 w42 w43 w44 w45 w46 w47 w48 w49 w50", "w7"]  # 5, 13, 3 tokens
    for adapter in ("lora", "bottleneck"):
        np.testing.assert_allclose(static.classify_logits(texts, adapter=adapter),
                                   Model(dyn).classify_logits(texts, adapter=adapter), atol=1e-5)
    prompt = make_adapter(base, tmp_path / "prompt", "prompt", task="SEQ_CLS")
    rc = main(["export", str(base), "--adapter", f"p={prompt}", "--out", str(tmp_path / "p"),
               "--target", str(profile), "--quiet"])
    assert rc == 2 and not (tmp_path / "p").exists()
