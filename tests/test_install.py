"""The two installs as users get them (issue 20): the wheel and sdist built with ``python -m
build``, the runtime wheel (``pip install edgepeft``: no torch) installed into a fresh venv, and
an artifact exported earlier in the run used end to end from it.

pip resolves onnxruntime, onnx, numpy and tokenizers from the index pip is configured with (the
same one the test command's ``pip install`` used); nothing else is downloaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ("edgepeft/targets/profiles/cpu-x86_64.toml", "edgepeft/targets/profiles/android-qnn.toml",
        "edgepeft/calibration/default.txt", "edgepeft/calibration/heldout.txt",
        "edgepeft/demo/adapters/numbers/adapter_config.json")


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=900, **kw)


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    """``python -m build`` of this checkout: the sdist, and the wheel built from that sdist."""
    out = tmp_path_factory.mktemp("dist")
    r = _run([sys.executable, "-m", "build", "--outdir", out, ROOT])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return {"wheel": next(out.glob("edgepeft-*.whl")), "sdist": next(out.glob("edgepeft-*.tar.gz"))}


@pytest.fixture(scope="module")
def runtime_venv(dists, tmp_path_factory) -> Path:
    """A fresh venv with the runtime wheel installed (its dependencies only)."""
    venv = tmp_path_factory.mktemp("rt") / "venv"
    r = _run([sys.executable, "-m", "venv", venv])
    assert r.returncode == 0, r.stderr
    r = _run([venv / "bin" / "python", "-m", "pip", "install", "--quiet", dists["wheel"]])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return venv


def test_wheel_and_sdist_carry_the_data_files(dists):
    """Target profiles, calibration texts and demo adapters are package data in the wheel; the
    sdist holds the sources and pyproject the wheel was built from."""
    names = set(zipfile.ZipFile(dists["wheel"]).namelist())
    assert set(DATA) <= names, sorted(set(DATA) - names)
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "runtimes/"))]
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    requires = [line for line in zipfile.ZipFile(dists["wheel"]).read(meta).decode().splitlines()
                if line.startswith("Requires-Dist:")]
    plain = sorted(r.split()[1].split("=")[0].split(">")[0].split("<")[0] for r in requires if "extra ==" not in r)
    assert plain == ["cryptography", "numpy", "onnx", "onnxruntime", "safetensors", "tokenizers", "tqdm"]
    assert any("torch==2.13.0" in r and "extra == \"export\"" in r for r in requires)
    with tarfile.open(dists["sdist"]) as t:
        members = {m.split("/", 1)[1] for m in t.getnames() if "/" in m}
    assert {"pyproject.toml", "README.md", "edgepeft/cli.py", *DATA} <= members, \
        sorted({"pyproject.toml", "README.md", *DATA} - members)


def test_runtime_install_runs_an_artifact(runtime_venv, llama_side, tmp_path):
    """No torch, transformers or peft in the venv; from it, the artifact's logits equal this
    checkout's, and run / inspect / verify / targets / bench --merged no work."""
    py, cli = runtime_venv / "bin" / "python", runtime_venv / "bin" / "edgepeft"
    r = _run([py, "-c", "import importlib.util as u, json; print(json.dumps([m for m in "
              "('torch', 'transformers', 'peft', 'matplotlib') if u.find_spec(m)]))"])
    assert r.returncode == 0 and json.loads(r.stdout) == [], r.stdout + r.stderr
    ids = np.array([[3, 7, 11, 5, 9]], np.int64)
    np.save(tmp_path / "ids.npy", ids)
    code = ("import sys, numpy as np; from edgepeft.runtime import Model; m = Model(sys.argv[1]); "
            "np.save(sys.argv[3], m.logits(np.load(sys.argv[2]), {'chat': 0.7, 'sql': 0.3})); "
            "print(sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'transformers', 'peft')))")
    r = _run([py, "-c", code, llama_side, tmp_path / "ids.npy", tmp_path / "out.npy"], cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
    from edgepeft.runtime import Model

    want = Model(llama_side).logits(ids, {"chat": 0.7, "sql": 0.3})
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), want, atol=1e-5, rtol=0)

    from edgepeft.cli import main

    args = ["run", llama_side, "--adapter", "sql", "--prompt", "w3 w7 w11", "--max-new-tokens", "4"]
    r = _run([cli, *args], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    import contextlib
    import io

    here = io.StringIO()
    with contextlib.redirect_stdout(here):
        assert main([str(a) for a in args]) == 0
    assert r.stdout == here.getvalue()
    for args, expect in ((["inspect", llama_side], "adapter sql: lora rank 8"), (["verify", llama_side], "OK"),
                         (["targets"], "android-qnn"), (["targets", "ios-coreml"], "CoreMLExecutionProvider"),
                         (["bench", llama_side, "--merged", "no", "--repeats", "1", "--new-tokens", "4",
                           "--prefill-samples", "1", "--out", tmp_path / "bench", "--quiet"], "no bench.png")):
        r = _run([cli, *args], cwd=tmp_path)
        assert r.returncode == 0 and expect in r.stdout, (args, r.stdout[-2000:], r.stderr[-2000:])
        assert "Traceback" not in r.stderr
    # adapter packs need no toolchain: keys, a signed pack, and the runtime loading it
    for args in (["keygen", "--out", tmp_path / "k"], ["adapter", "list", llama_side],
                 ["adapter", "pack", llama_side, "sql", "--out", tmp_path / "sql.edgepeft-pack", "--sign", tmp_path / "k"]):
        r = _run([cli, *args], cwd=tmp_path)
        assert r.returncode == 0 and "Traceback" not in r.stderr, (args, r.stderr[-2000:])
    code = ("import sys, numpy as np; from edgepeft.runtime import Model; "
            "m = Model(sys.argv[1], trusted_keys=[sys.argv[2]]); print(m.add_adapter(sys.argv[3], as_name='again')); "
            "np.save(sys.argv[5], m.logits(np.load(sys.argv[4]), 'again'))")
    r = _run([py, "-c", code, llama_side, tmp_path / "k.pub", tmp_path / "sql.edgepeft-pack", tmp_path / "ids.npy",
              tmp_path / "pack.npy"], cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "again", r.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "pack.npy"), Model(llama_side).logits(ids, "sql"), atol=1e-6, rtol=0)


def test_runtime_install_refuses_the_toolchain_commands(runtime_venv, llama_base, llama_side, tmp_path):
    """export, validate, train, demo and bench --compare-torch exit 2 with the one install line;
    an unknown profile name exits 2 with the packaged names."""
    cli = runtime_venv / "bin" / "edgepeft"
    line = 'pip install torch==2.13.0 && pip install "edgepeft[export]"'
    for args in (["export", llama_base, "--out", tmp_path / "o"], ["validate", llama_side, "--reference", llama_base],
                 ["train", "--help"], ["demo"], ["bench", llama_side, "--compare-torch", llama_base],
                 ["adapter", "add", llama_side, "--adapter", f"x={llama_base}"]):
        r = _run([cli, *args], cwd=tmp_path)
        assert r.returncode == 2 and line in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    r = _run([cli, "targets", "android-nnapi-typo"], cwd=tmp_path)
    assert r.returncode == 2 and "android-nnapi, android-qnn, cpu-arm64" in r.stderr and "Traceback" not in r.stderr
