"""The CLI: help texts, exit codes (0 ok, 1 budget broken, 2 bad input) and no partial OUT."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from edgepeft.cli import main


def _run(capsys, *argv):
    code = main(list(map(str, argv)))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_comes_from_docstrings():
    res = subprocess.run([sys.executable, "-m", "edgepeft", "export", "--help"], capture_output=True, text=True)
    assert res.returncode == 0
    assert "side (default): one ONNX graph whose adapter weights are run-time inputs" in res.stdout
    assert "--adapter NAME=DIR" in res.stdout
    top = subprocess.run([sys.executable, "-m", "edgepeft", "--help"], capture_output=True, text=True)
    for cmd in ("export", "validate", "run", "classify", "train", "inspect", "verify", "demo", "bench"):
        assert cmd in top.stdout


def _bad_adapter(src, tmp_path, how):
    ad = tmp_path / "bad"
    shutil.copytree(src, ad)
    cfg_path = ad / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    if how == "peft_type":
        cfg["peft_type"] = "LOHA"
    elif how == "targets":
        cfg["target_modules"] = ["not_a_layer"]
    elif how == "corrupt":
        st = ad / "adapter_model.safetensors"
        st.write_bytes(b"\x00" * 7)
    elif how == "missing":
        (ad / "adapter_model.safetensors").unlink()
    cfg_path.write_text(json.dumps(cfg))
    return ad


@pytest.mark.parametrize("how, words", [
    ("peft_type", ["adapter_config.json", "peft_type 'LOHA' is not supported", "Supported: LORA"]),
    ("targets", ["adapter_config.json", "matches no module", "Modules that exist: q_proj"]),
    ("corrupt", ["adapter_model.safetensors", "corrupt or truncated", "save the adapter again"]),
    ("missing", ["no adapter_model.safetensors", "save_pretrained"]),
])
def test_bad_adapter_exit_2_and_no_out(capsys, tmp_path, llama_base, llama_adapters, how, words):
    ad = _bad_adapter(llama_adapters["chat"], tmp_path, how)
    out = tmp_path / "out"
    code, _, err = _run(capsys, "export", llama_base, "--adapter", f"chat={ad}", "--out", out, "--quiet")
    assert code == 2
    assert "Traceback" not in err and err.startswith("edgepeft export: error: ")
    for w in words:
        assert w in err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_adapter_of_another_base_exit_2(capsys, tmp_path, llama_base):
    from conftest import make_base, make_lora

    other = make_base("llama", tmp_path / "other", hidden_size=32, num_attention_heads=2, intermediate_size=64)
    ad = make_lora(other, tmp_path / "ad", target_modules=["v_proj"])
    code, _, err = _run(capsys, "export", llama_base, "--adapter", f"x={ad}", "--out", tmp_path / "out")
    assert code == 2
    assert "v_proj: expected lora_A (r, 64) and lora_B (32, r), found (4, 32) and (32, 4)" in err
    assert "made for a base model with other layer sizes" in err
    assert not (tmp_path / "out").exists()


def test_usage_errors_exit_2(capsys, tmp_path, llama_base, llama_side):
    cases = [
        (["export", llama_base, "--adapter", "nodir", "--out", tmp_path / "o"], "expected NAME=DIR"),
        (["export", tmp_path / "nope", "--out", tmp_path / "o"], "not a Hugging Face model folder"),
        (["export", llama_base, "--mode", "merged", "--out", tmp_path / "o"], "needs at least one --adapter"),
        (["export", llama_base, "--out", llama_side], "already exists. Pass --force"),
        (["run", tmp_path / "nope", "--prompt", "x"], "artifact directory not found"),
        (["run", llama_side, "--mix", "chat:1", "--prompt", "x"], "expected NAME=WEIGHT"),
        (["run", llama_side, "--adapter", "zzz", "--prompt", "w5"], "'zzz' is not in"),
        (["validate", llama_side, "--reference", llama_side], "not a Hugging Face model folder"),
    ]
    for argv, words in cases:
        code, _, err = _run(capsys, *argv)
        assert code == 2, (argv, err)
        assert words in err, (argv, err)
        assert "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_failed_export_leaves_nothing(capsys, tmp_path, llama_base, llama_adapters, monkeypatch):
    """An error half-way (after the graph is written) removes the temporary dir; OUT never appears."""
    import edgepeft.export.build as build

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(build, "write_adapter_files", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        main(["export", str(llama_base), "--adapter", f"chat={llama_adapters['chat']}", "--out",
              str(tmp_path / "out"), "--quiet"])
    assert list(tmp_path.iterdir()) == []


def test_run_inspect_validate(capsys, tmp_path, llama_base, llama_side, llama_adapters):
    code, out, _ = _run(capsys, "run", llama_side, "--mix", "chat=0.7,sql=0.3", "--prompt", "w5 w6",
                        "--max-new-tokens", "3")
    assert code == 0 and out.strip()
    code, out, _ = _run(capsys, "inspect", llama_side)
    assert code == 0 and "adapter sql: lora rank 8" in out and "adapters/chat.onnx_adapter" in out
    report = tmp_path / "report.json"
    code, out, _ = _run(capsys, "validate", llama_side, "--reference", llama_base, "--max-new-tokens", "4",
                        "--report", report)
    assert code == 0 and "PASSED" in out
    assert json.loads(report.read_text())["passed"] is True
    # Validating against the wrong adapter must fail loudly with exit 1, naming the case.
    code, out, _ = _run(capsys, "validate", llama_side, "--reference", llama_base, "--max-new-tokens", "4",
                        "--adapter", f"chat={llama_adapters['sql']}", "--report", report)
    assert code == 1 and "FAILED" in out
    assert any(line.startswith("chat ") and "FAIL" in line for line in out.splitlines())


def test_verify_finds_every_damaged_file(capsys, tmp_path, llama_side):
    copy = tmp_path / "art"
    shutil.copytree(llama_side, copy)
    code, out, _ = _run(capsys, "verify", copy)
    assert code == 0 and out.strip().endswith("OK")
    (copy / "adapters" / "sql.onnx_adapter").unlink()
    with open(copy / "model.onnx.data", "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xfe")
    code, out, _ = _run(capsys, "verify", copy)
    assert code == 1
    assert "sql.onnx_adapter: missing" in out and "model.onnx.data: sha256 differs" in out
    assert "2 problem(s)" in out
