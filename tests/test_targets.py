"""Target profiles: parsing, `edgepeft targets`, ORT-format bundles, partition reports, providers, max_rank."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest

from edgepeft.cli import main
from edgepeft.errors import EdgepeftError
from edgepeft.runtime import Model, ProviderFallbackWarning
from edgepeft.runtime.manifest import verify
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
        assert "static_shapes" in targets[n].not_applied()
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
    assert "precision = 'int8-static'" in out and "NOT applied by this version: static_shapes" in out


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
    for f in ("model.ort", "required_operators_and_types.config", "partitions.json", "model.onnx"):
        assert (out / f).is_file(), f
    assert not (out / ".ort-in").exists() and not (out / ".ort-out").exists()
    config = (out / "required_operators_and_types.config").read_text()
    assert "ai.onnx;20;" in config and "MatMul" in config
    m = json.loads((out / "manifest.json").read_text())
    t = m["target"]
    assert t["name"] == "android-nnapi" and t["providers"][0] == "NnapiExecutionProvider"
    assert {f["file"] for f in t["files"]} == {"required_operators_and_types.config", "partitions.json"}
    assert m["graph"]["ort"]["file"] == "model.ort"
    assert "static_shapes" in t["not_applied"]
    report = json.loads((out / "partitions.json").read_text())["model.onnx"]
    assert set(report) == {"nnapi", "coreml"}
    for acc, e in report.items():
        a, f = e["as_exported"], e["if_shapes_fixed"]
        assert a["nodes"] > 50 and 0 <= a["supported_pct"] <= f["supported_pct"] <= 100
        assert f["partitions"] >= 1 and f["unsupported_ops"]
    assert t["partitions"]["model.onnx"] == report
    assert "partitions model.onnx nnapi:" in printed and "static_shapes NOT applied" in printed


def test_ort_runs_on_cpu_and_matches_onnx_with_swaps_and_mixes(nnapi_out):
    out, _ = nnapi_out
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ort_model = Model(out)  # auto: the .ort; the target's NNAPI is not in this build
    assert ort_model.format == "ort" and ort_model.providers == ["CPUExecutionProvider"]
    fallback = [w for w in caught if issubclass(w.category, ProviderFallbackWarning)]
    assert len(fallback) == 1 and "NnapiExecutionProvider" in str(fallback[0].message)
    onnx_model = Model(out, format="onnx")
    assert onnx_model.format == "onnx"
    ids = np.random.default_rng(0).integers(3, 96, (2, 7))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    base = ort_model.logits(ids, attention_mask=mask)
    # swap back and forth, then mix two ranks (4 and 8/2): one session, only feeds change
    for choice in ("chat", "sql", None, "sql", {"chat": 0.7, "sql": 0.3}, "chat", {"sql": 1.0, "chat": 1.0}):
        got = ort_model.logits(ids, adapter=choice, attention_mask=mask)
        want = onnx_model.logits(ids, adapter=choice, attention_mask=mask)
        np.testing.assert_allclose(got, want, atol=1e-5)
        if choice is not None:
            assert np.abs(got - base).max() > 1e-2, choice  # the adapter really acts on the .ort
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
    for rel in ("model.ort", "required_operators_and_types.config", "partitions.json"):
        copy = tmp_path / rel.replace(".", "_")
        shutil.copytree(out, copy)
        with open(copy / rel, "ab") as f:
            f.write(b"\0")
        problems = verify(copy)
        assert len(problems) == 1 and rel in problems[0], problems
        (copy / rel).unlink()
        assert any("missing" in p for p in verify(copy))
    copy = tmp_path / "ort-damaged"
    shutil.copytree(out, copy)
    with open(copy / "model.ort", "ab") as f:
        f.write(b"\0")
    with pytest.raises(EdgepeftError, match="model.ort: sha256"):
        Model(copy)


def test_inspect_shows_target_and_partitions(nnapi_out, capsys):
    out, _ = nnapi_out
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "target android-nnapi: providers NnapiExecutionProvider, CPUExecutionProvider" in text
    assert "partitions model.onnx coreml:" in text and "model.ort" in text


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
    from edgepeft.runtime.manifest import verify as check

    profile = tmp_path / "arm-fp32.toml"
    profile.write_text('providers = ["XnnpackExecutionProvider", "CPUExecutionProvider"]\nplatform = "arm64"\n'
                       'ort_format = true\n')
    out = tmp_path / "merged"
    adapters = (("chat", llama_adapters["chat"]), ("code", llama_adapters["code"]))
    m = export(ExportConfig(base=llama_base, out=out, adapters=adapters, mode="merged",
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
