"""validate at release scale: several artifacts in one report, task scores of causal LMs
(``--labels`` with ``{"prompt", "target"}`` rows), and the cases fanned out as Ray tasks.

8 LoRAs of a tiny Llama in two builds (the traced and the fused graph). The serial report, through
the CLI, is the reference: the Ray runs must equal it case by case, with the cases run in Ray's
worker processes, also when one of them is killed mid-case. The local Ray is this module's, on
127.0.0.1, and is stopped at the end.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import make_base, make_lora

N_ADAPTERS = 8
TOKENS = 4  # greedy tokens per prompt: keeps the torch side (full recomputation) quick


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """``(base, adapters, {"traced": dir, "fused": dir}, labelled file)``."""
    from edgepeft.export import ExportConfig, export
    from edgepeft.runtime import Model

    root = tmp_path_factory.mktemp("scale")
    base = make_base("llama", root / "base", tokenizer=True)
    targets = (["q_proj", "v_proj"], "all-linear", ["k_proj", "up_proj"], ["o_proj", "down_proj"])
    adapters = {f"a{i}": make_lora(base, root / f"a{i}", seed=10 + i, r=2 + 2 * (i % 4), lora_alpha=8,
                                   target_modules=targets[i % 4]) for i in range(N_ADAPTERS)}
    out = {}
    for graph in ("traced", "fused"):
        out[graph] = root / graph
        export(ExportConfig(base=base, out=out[graph], adapters=tuple(adapters.items()),
                            graph="generic" if graph == "traced" else "fused"), quiet=True)
    # labelled prompts of adapter a0: its targets are the artifact's own completions (word tokens)
    art = Model(out["traced"])
    rng = np.random.default_rng(0)
    prompts = [" ".join(f"w{t}" for t in rng.integers(3, 96, int(n))) for n in rng.integers(3, 9, 12)]
    rows = []
    for p in prompts:
        ids = np.array([art.tokenizer.encode(p).ids])
        done = art.generate(ids, 5, adapter="a0")[0, ids.shape[1]:].tolist()
        done = done[:done.index(2)] if 2 in done else done  # <eos> = 2
        rows.append({"prompt": p, "target": art.tokenizer.decode(done)})
    labelled = root / "a0-tasks.jsonl"
    labelled.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return base, adapters, out, labelled


def _validate(builds, tmp_path, *extra) -> dict:
    """The CLI's report of both builds (``--report tmp_path/report.json``)."""
    from edgepeft.cli import main

    base, _, out, labelled = builds
    report = tmp_path / "report.json"
    code = main(["validate", str(out["traced"]), str(out["fused"]), "--reference", str(base), "--labels",
                 f"a0={labelled}", "--max-new-tokens", str(TOKENS), "--report", str(report), "--quiet", *extra])
    result = json.loads(report.read_text())
    assert code == (0 if result["passed"] else 1)
    assert report.with_suffix(".md").is_file() and report.with_suffix(".html").is_file()
    return result


@pytest.fixture(scope="module")
def serial(builds, tmp_path_factory):
    return _validate(builds, tmp_path_factory.mktemp("serial"))





@pytest.fixture(scope="module")
def local_ray():
    """A Ray of 2 CPUs on 127.0.0.1, this module's own; validate --ray uses it as it is."""
    import ray

    ctx = ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False,
                   logging_level=logging.WARNING)
    yield ctx.address_info["gcs_address"]
    ray.shutdown()


def _cases(result: dict) -> list:
    return [(r["artifact"], r["cases"]) for r in result["artifacts"]]


def test_several_artifacts_one_report(serial, builds, tmp_path):
    _, _, out, _ = builds
    assert serial["passed"], json.dumps(serial["artifacts"][0]["cases"][0]["failures"])
    assert [r["artifact"] for r in serial["artifacts"]] == [str(out["traced"]), str(out["fused"])]
    for r in serial["artifacts"]:
        names = [c["case"] for c in r["cases"]]
        assert names[:N_ADAPTERS + 1] == ["base"] + [f"a{i}" for i in range(N_ADAPTERS)]
        assert any(n.startswith("mix(") for n in names) and any(n.startswith("per-row(") for n in names)
        assert {run["pid"] for run in r["runs"]} == {os.getpid()}  # serial: this process
    assert serial["ray"] is None
    from edgepeft.validate import format_report

    text = format_report(serial)
    rows = [line for line in text.splitlines() if line.startswith(("traced ", "fused "))]
    assert len(rows) == sum(len(r["cases"]) for r in serial["artifacts"])


def test_task_scores_of_the_labelled_adapter(serial):
    for r in serial["artifacts"]:
        by = {c["case"]: c for c in r["cases"]}
        a0 = by["a0"]
        assert a0["task_rows"] == 12
        # the targets are the artifact's own completions cut at <eos>: both sides agree, F1 > 0
        assert a0["accuracy_torch"] == a0["accuracy_artifact"] and a0["f1_torch"] == a0["f1_artifact"]
        assert a0["f1_torch"] > 0.5
        mixes = [c for n, c in by.items() if n.startswith("mix(") and "a0=" in n]
        assert mixes and all(c["task_rows"] == 12 for c in mixes)  # a mix holding a0 is scored too
        assert by["a1"]["task_rows"] is None and by["base"]["task_rows"] is None


def test_ray_report_equals_serial(serial, builds, tmp_path, local_ray):
    result = _validate(builds, tmp_path, "--ray")
    assert _cases(result) == _cases(serial)  # every metric to the last digit written
    assert result["ray"]["address"] == "local" and result["ray"]["cpus"] == 2
    pids = {run["pid"] for r in result["artifacts"] for run in r["runs"]}
    assert os.getpid() not in pids and pids, pids  # the cases ran in Ray's worker processes


def test_ray_address_joins_a_running_cluster(serial, builds, tmp_path, local_ray):
    """``--ray HOST:PORT`` from another process (the CLI, as a user runs it) joins this module's Ray."""
    import subprocess

    base, _, out, labelled = builds
    report = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "-m", "edgepeft", "validate", str(out["traced"]), "--reference", str(base),
                        "--labels", f"a0={labelled}", "--max-new-tokens", str(TOKENS), "--report", str(report),
                        "--ray", local_ray, "--quiet"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(report.read_text())
    assert result["cases"] == serial["artifacts"][0]["cases"]
    assert result["ray"]["address"] == local_ray and "ran on Ray" in r.stdout


def _ray_case_pids() -> list[int]:
    """Processes running a validate case now (Ray titles a busy worker ``ray::validate_case``)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "cmdline").read_bytes().startswith(b"ray::validate_case"):
                    out.append(int(d.name))
            except OSError:
                continue
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds Ray's workers in /proc")
def test_a_killed_worker_loses_no_case(serial, builds, tmp_path, local_ray):
    killed: list[int] = []
    stop = threading.Event()

    def killer():
        while not stop.is_set() and not killed:
            for pid in _ray_case_pids():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                break
            time.sleep(0.005)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        result = _validate(builds, tmp_path, "--ray")
    finally:
        stop.set()
        t.join()
    assert killed, "no worker was seen running a case"
    assert _cases(result) == _cases(serial)  # each case exactly once, numbers unchanged
    assert [len(r["runs"]) for r in result["artifacts"]] == [len(r["cases"]) for r in serial["artifacts"]]


def test_a_broken_artifact_fails_the_task_gate(builds, tmp_path):
    """An artifact built from a perturbed a0, validated against the real a0: the task scores drop."""
    import torch
    from safetensors.torch import load_file, save_file

    from edgepeft.export import ExportConfig, export
    from edgepeft.validate import validate

    base, adapters, _, labelled = builds
    bad = tmp_path / "a0-perturbed"
    bad.mkdir()
    for f in adapters["a0"].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    weights = load_file(adapters["a0"] / "adapter_model.safetensors")
    g = torch.Generator().manual_seed(0)
    save_file({k: v + (torch.randn(v.shape, generator=g) * 2.0 if "lora_B" in k else 0) for k, v in weights.items()},
              bad / "adapter_model.safetensors")
    out = tmp_path / "broken"
    export(ExportConfig(base=base, out=out, adapters=(("a0", bad),), graph="generic"), quiet=True)
    result = validate(out, base, adapter_dirs={"a0": adapters["a0"]}, labelled={"a0": labelled},
                      max_new_tokens=TOKENS, choices=["a0"], quiet=True)
    (case,) = result["cases"]
    assert not result["passed"]
    assert case["f1_artifact"] < case["f1_torch"]
    assert any(f.startswith("token F1 drop") for f in case["failures"]), case["failures"]


def test_ray_not_installed_exits_2(builds, tmp_path, capsys, monkeypatch):
    from edgepeft.cli import main

    base, _, out, _ = builds
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    report = tmp_path / "r.json"
    code = main(["validate", str(out["traced"]), "--reference", str(base), "--ray", "--report", str(report),
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'edgepeft[scale]'" in err and "Traceback" not in err
    assert not report.exists()


@pytest.mark.parametrize("labels, words", [
    (lambda d: [f"nope={d}"], "has no adapter 'nope'"),
    (lambda d: [str(d.parent / "missing.jsonl")], "labelled file not found"),
    (lambda d: [f"a0={d}", f"a0={d}"], "each name"),
])
def test_bad_labels_exit_2(builds, tmp_path, capsys, labels, words):
    from edgepeft.cli import main

    base, _, out, labelled = builds
    argv = ["validate", str(out["traced"]), "--reference", str(base), "--quiet", "--report", str(tmp_path / "r.json")]
    for v in labels(labelled):
        argv += ["--labels", v]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and words in err, err
    assert not (tmp_path / "r.json").exists()


def test_classifier_rows_refused_for_a_causal_lm(builds, tmp_path, capsys):
    from edgepeft.cli import main

    base, _, out, _ = builds
    rows = tmp_path / "cls.jsonl"
    rows.write_text('{"text": "w3 w4", "label": 1}\n')
    code = main(["validate", str(out["traced"]), "--reference", str(base), "--labels", str(rows), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and f"{rows}:1" in err and '"prompt"' in err, err


def test_scores():
    from edgepeft.validate.metrics import task_scores, token_f1

    assert token_f1([1, 2, 3], [1, 2, 3]) == 1.0
    assert token_f1([], []) == 1.0 and token_f1([1], []) == 0.0
    assert token_f1([1, 2], [2, 3]) == pytest.approx(0.5)
    assert token_f1([1, 1, 2], [1, 2, 2]) == pytest.approx(2 / 3)  # counts, not sets
    words = {"four": 1, "hundred": 2, "two": 3}
    em, f1 = task_scores(["  four hundred\n", "four two"], ["four hundred", "four hundred"],
                         lambda s: [words[w] for w in s.split()])
    assert em == 0.5 and f1 == pytest.approx((1.0 + 0.5) / 2)


def test_a_mix_is_applied_once_per_case():
    """Ref.held: greedy's steps and the nested calls of a case enter the mix once, and a later
    case enters it again (a mix of 32 LoRAs took 184 s as one case when applied per forward)."""
    import contextlib

    import torch

    from edgepeft.validate.reference import Ref

    entered = []

    @contextlib.contextmanager
    def enter():
        entered.append("in")
        yield
        entered.append("out")

    class Tiny(torch.nn.Module):  # logits favour the next token id: greedy counts up
        def forward(self, input_ids, attention_mask, position_ids):
            assert entered and entered[-1] == "in", "a forward pass outside the mix"
            return type("Out", (), {"logits": torch.nn.functional.one_hot((input_ids + 1) % 16, 16).float()})

    ref = Ref(Tiny(), enter=enter)
    ids, mask = np.array([[1, 2]]), np.ones((1, 2), np.int64)
    assert ref.greedy(ids, mask, 5).tolist() == [[3, 4, 5, 6, 7]]
    assert entered == ["in", "out"]
    with ref.held():
        ref.logits(ids, mask)
        ref.greedy(ids, mask, 3)
    assert entered == ["in", "out"] * 2
    ref.logits(ids, mask)
    assert entered == ["in", "out"] * 3
