"""Safety: adapters bound to their base, crash-safe export and verify, thread-safe runtime.

- base binding: an adapter of another base with the same shapes is refused at export (edgepeft.json
  of ``edgepeft train``, PEFT's base_model_name_or_path) and at runtime load (fingerprint, file tag);
  wrong shapes name the layer, the expected and the found shapes;
- an export killed with SIGKILL at 20 random points leaves OUT absent or complete (``edgepeft
  verify`` passes); verify catches every damaged checksum and every edited shape; leftovers of a
  killed export do not break the next one and are removed by it;
- one ``Model`` under 8 threads x 1000 calls (adapters, mixes, base) gives the single-threaded
  results, also while adapters are added and removed.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import make_adapter, make_base, make_lora
from edgepeft.cli import main
from edgepeft.errors import EdgepeftError
from edgepeft.runtime import Model
from edgepeft.contract import sha256_file

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    return env


def _run(capsys, *argv):
    code = main(list(map(str, argv)))
    out, err = capsys.readouterr()
    return code, out, err


def _export(base, out, **adapters):
    from edgepeft.export import ExportConfig, export

    export(ExportConfig(graph="generic", base=base, out=out, adapters=tuple(adapters.items())), quiet=True)
    return out


@pytest.fixture(scope="module")
def other_base(tmp_path_factory) -> Path:
    """The tiny Llama of conftest with other weights (seed 1): every shape is the same."""
    return make_base("llama", tmp_path_factory.mktemp("other") / "base", tokenizer=True, seed=1)


@pytest.fixture(scope="module")
def side_b(llama_base, tmp_path_factory) -> Path:
    """A second artifact of ``llama_base``: a LoRA, a prefix and an IA3 adapter to add elsewhere."""
    root = tmp_path_factory.mktemp("side-b")
    return _export(llama_base, root / "out",
                   extra=make_lora(llama_base, root / "extra", seed=7, target_modules=["q_proj", "o_proj"]),
                   pre=make_adapter(llama_base, root / "pre", "prefix", seed=8),
                   ia=make_adapter(llama_base, root / "ia", "ia3", seed=9))


@pytest.fixture(scope="module")
def side_c(other_base, tmp_path_factory) -> Path:
    """An artifact of ``other_base`` (same shapes as llama_base, other weights)."""
    root = tmp_path_factory.mktemp("side-c")
    return _export(other_base, root / "out", x=make_lora(other_base, root / "x", seed=5,
                                                          target_modules=["q_proj", "v_proj"]))


class _Reached(Exception):
    """Raised instead of writing the graphs: the checks before it passed."""


@pytest.fixture
def stop_before_write(monkeypatch):
    import edgepeft.export as ex

    def stop(*a, **k):
        raise _Reached()

    monkeypatch.setattr(ex, "write_artifact", stop)


# ----------------------------------------------------------------------------- 2. base binding
def test_peft_adapter_of_same_shaped_other_base_refused(capsys, tmp_path, llama_base, other_base,
                                                        stop_before_write):
    """PEFT records the folder it trained on; that folder has other weights: refused, override named."""
    ad = make_lora(other_base, tmp_path / "ad", target_modules=["q_proj"])
    out = tmp_path / "out"
    code, _, err = _run(capsys, "export", llama_base, "--adapter", f"x={ad}", "--out", out, "--quiet")
    assert code == 2 and "Traceback" not in err
    assert f"PEFT recorded base_model_name_or_path {str(other_base)!r}" in err
    assert "weight files differ" in err and "--allow-base-mismatch" in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["ad"]
    with pytest.raises(_Reached):  # the override lets it through to the graph export
        main(["export", str(llama_base), "--adapter", f"x={ad}", "--out", str(out), "--quiet",
              "--allow-base-mismatch"])


def test_same_base_copy_and_names_accepted(tmp_path, llama_base, llama_adapters, stop_before_write):
    """A byte-identical copy of the recorded base passes; a hub id passes against a plain folder
    (nothing to compare) and against the hub snapshot of that id, not of another id."""
    from edgepeft.export import ExportConfig, export

    def check(base, ad):
        with pytest.raises(_Reached):
            export(ExportConfig(graph="generic", base=base, out=tmp_path / "out", adapters=(("a", ad),)), quiet=True)

    copy = shutil.copytree(llama_base, tmp_path / "copy")
    check(copy, llama_adapters["chat"])
    hub = shutil.copytree(llama_base, tmp_path / "hub" / "models--acme--tiny-llama" / "snapshots" / "0123abc")
    ad = shutil.copytree(llama_adapters["chat"], tmp_path / "ad")
    cfg = json.loads((ad / "adapter_config.json").read_text())
    for named in ("acme/tiny-llama", "someone/tiny-llama"):
        (ad / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": named}))
        check(hub, ad)
        check(llama_base, ad)
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "acme/other-llama"}))
    check(llama_base, ad)  # a plain folder name says nothing about the model in it
    with pytest.raises(EdgepeftError, match=r"'acme/other-llama', but .* is a snapshot of 'acme/tiny-llama'.*"
                                            r"--allow-base-mismatch"):
        export(ExportConfig(graph="generic", base=hub, out=tmp_path / "out", adapters=(("a", ad),)), quiet=True)


@pytest.mark.parametrize("task", ["causal-lm", "classification"])
def test_trained_adapter_bound_by_fingerprint(tmp_path, llama_base, other_base, stop_before_write, task):
    """`edgepeft train` writes edgepeft.json; export with the same weights passes, with a same-shaped
    other base it is refused (even when PEFT's recorded name is made to match), unless overridden."""
    from edgepeft.export import ExportConfig, export
    from edgepeft.export.base import BINDING_NAME
    from edgepeft.train import TrainConfig, train

    data = tmp_path / "d.jsonl"
    rows = [{"text": f"w{i} w{i + 1} w{i + 2}", **({"label": "ab"[i % 2]} if task == "classification" else {})}
            for i in range(3, 11)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ad = tmp_path / "ad"
    train(TrainConfig(kind="lora", model=llama_base, data=data, out=ad, steps=2, batch_size=4,
                      target_modules=("q_proj", "v_proj")), quiet=True)
    binding = json.loads((ad / BINDING_NAME).read_text())
    assert binding["base_fingerprint"].startswith("sha256:") and binding["task"] == task

    def run(base, **kw):
        export(ExportConfig(graph="generic", base=base, out=tmp_path / "out", adapters=(("a", ad),), **kw), quiet=True)

    with pytest.raises(_Reached):
        run(llama_base)  # train's fingerprint is the one export computes
    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(other_base)}))
    with pytest.raises(EdgepeftError, match=rf"trained on base {llama_base}.*\(edgepeft.json\), but "
                                            rf"{other_base} has .*--allow-base-mismatch"):
        run(other_base)
    with pytest.raises(_Reached):
        run(other_base, allow_base_mismatch=True)


@pytest.mark.parametrize("kind, words", [
    ("lora", ["model.layers.0.self_attn.q_proj: expected lora_A (r, 64) and lora_B (64, r), found (4, 32) and (32, 4)"]),
    ("dora", ["model.layers.0.self_attn.q_proj: expected lora_A (r, 64) and lora_B (64, r), found (4, 32) and (32, 4)"]),
    ("ia3", ["model.layers.0.mlp.down_proj: ia3_l has shape (1, 64), expected (64, 1) or (1, 128)"]),
    ("prompt", ["prompt_embeddings has shape (4, 32), this base model needs (4, 64)"]),
    ("prefix", ["prompt_embeddings has shape (5, 64); this base model needs (5, 128) = (num_virtual_tokens, 2 x 2 layers x 2 kv heads x 16 head dim)"]),
])
def test_wrong_shapes_name_layer_expected_found(capsys, tmp_path, llama_base, kind, words):
    narrow = make_base("llama", tmp_path / "narrow", hidden_size=32, num_attention_heads=2,
                       num_key_value_heads=1, intermediate_size=64)
    kw = {"target_modules": ["q_proj"]} if kind in ("lora", "dora") else {}
    ad = make_adapter(narrow, tmp_path / "ad", kind, **kw)
    code, _, err = _run(capsys, "export", llama_base, "--adapter", f"x={ad}", "--out", tmp_path / "out")
    assert code == 2, err
    for w in words:
        assert w in err, err
    assert not (tmp_path / "out").exists()


def _replace_adapter_file(art: Path, name: str, arrays: dict, base_fp: str) -> None:
    from edgepeft.contract.adapter_files import write_adapter_files

    f = art / "adapters" / f"{name}.onnx_adapter"
    fields = write_adapter_files(arrays, f, "fp32", base_fp)  # both files: the runtime checks both
    m = json.loads((art / "manifest.json").read_text())
    m["adapters"][name].update(fields)
    (art / "manifest.json").write_text(json.dumps(m))


def test_runtime_wrong_shape_names_input_expected_found(tmp_path, llama_side):
    art = shutil.copytree(llama_side, tmp_path / "art")
    fp = json.loads((art / "manifest.json").read_text())["base"]["fingerprint"]
    good = Model(llama_side)._store.loaded["chat"].graph
    a = "lora.model.layers.0.self_attn.q_proj.A"
    _replace_adapter_file(art, "chat", {**good, a: np.zeros((4, 65), np.float32)}, fp)
    with pytest.raises(EdgepeftError, match=rf"{a} has shape \(4, 65\) float32, the graph takes \('n', 64\) float32"):
        Model(art)
    assert main(["verify", str(art)]) == 1


def test_runtime_refuses_adapter_of_another_base(capsys, tmp_path, llama_side, side_c):
    """An .onnx_adapter of another artifact: with its own manifest entry the fingerprint differs;
    with the entry edited to claim this base, the file's own base tag still tells."""
    m_c = json.loads((side_c / "manifest.json").read_text())
    with pytest.raises(EdgepeftError, match=r"exported from base sha256:.*made for other weights"):
        Model(llama_side).add_adapter(side_c)

    art = shutil.copytree(llama_side, tmp_path / "art")
    for suffix in (".onnx_adapter", ".safetensors"):
        shutil.copy(side_c / "adapters" / f"x{suffix}", art / "adapters" / f"x{suffix}")
    m = json.loads((art / "manifest.json").read_text())
    m["adapters"]["x"] = m_c["adapters"]["x"]
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EdgepeftError, match=rf"x.onnx_adapter: made for base {m_c['base']['fingerprint']}, "
                                            rf"this artifact's base is {m['base']['fingerprint']}"):
        Model(art)
    m["adapters"]["x"]["base_fingerprint"] = m["base"]["fingerprint"]  # a forged entry
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EdgepeftError, match=r"x.safetensors: the file was exported for another base model"):
        Model(art)
    code, out, _ = _run(capsys, "verify", art)
    assert code == 1 and "x.onnx_adapter: exported for another base" in out


# ----------------------------------------------------------------------------- 5. verify, crash safety
def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def _edit_manifest(art: Path, edit) -> None:
    m = json.loads((art / "manifest.json").read_text())
    edit(m)
    (art / "manifest.json").write_text(json.dumps(m))


def _set(path: list, value):
    def edit(m):
        node = m
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
    return edit


def _rewrite_twin(art: Path, name: str, drop: str | None = None, tag: str | None = None) -> None:
    """Rewrite adapter ``name``'s safetensors twin (one array dropped, or another base tag) and
    record its new sha256, so only the contents check can catch it."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    path = art / "adapters" / f"{name}.safetensors"
    with safe_open(str(path), "np") as f:
        arrays = {k: f.get_tensor(k) for k in f.keys() if k != drop}
        meta = f.metadata()
    save_file(arrays, str(path), metadata={**meta, **({"base_tag": tag} if tag else {})})
    _edit_manifest(art, _set(["adapters", name, "safetensors", "sha256"], sha256_file(path)))


A_Q = "lora.model.layers.0.self_attn.q_proj.A"
DAMAGES = {
    "safetensors twin byte": lambda a: _flip(a / "adapters" / "sql.safetensors", 300),
    "safetensors twin array": lambda a: _rewrite_twin(a, "chat", drop=A_Q),
    "safetensors twin base tag": lambda a: _rewrite_twin(a, "chat", tag="12345"),
    "graph data byte": lambda a: _flip(a / "model.onnx.data", 1000),
    "graph file byte": lambda a: _flip(a / "model.onnx", 200),
    "adapter file byte": lambda a: _flip(a / "adapters" / "sql.onnx_adapter", 300),
    "adapter input shape": lambda a: _edit_manifest(a, _set(["inputs", A_Q, "shape"], [None, 65])),
    "graph input shape": lambda a: _edit_manifest(a, _set(["graph", "inputs", 0, "shape"], ["batch", 7])),
    "graph output shape": lambda a: _edit_manifest(a, _set(["graph", "outputs", 0, "shape"], ["batch", "seq", 97])),
    "slot size": lambda a: _edit_manifest(a, _set(["slots", 0, "out"], 65)),
    "kv cache": lambda a: _edit_manifest(a, _set(["kv_cache", "head_dims"], [8, 8])),
    "vocab": lambda a: _edit_manifest(a, _set(["base", "vocab_size"], 95)),
    "prefix length": None,  # on side_b, below
    "adapter inputs listed": lambda a: _edit_manifest(a, _set(["adapters", "chat", "inputs"], [A_Q])),
}


def test_safetensors_twin_holds_the_adapter_arrays(llama_side):
    """JS runtimes read adapters/NAME.safetensors: the same arrays as the .onnx_adapter, same base tag."""
    import onnxruntime as ort
    from safetensors import safe_open

    m = json.loads((llama_side / "manifest.json").read_text())
    for name, entry in m["adapters"].items():
        fmt = ort.AdapterFormat.read_adapter(str(llama_side / entry["file"]))
        want = {k: v.numpy() for k, v in fmt.get_parameters().items()}
        with safe_open(str(llama_side / entry["safetensors"]["file"]), "np") as f:
            assert f.metadata()["base_tag"] == str(fmt.get_adapter_version())
            got = {k: f.get_tensor(k) for k in f.keys()}
        assert sorted(got) == sorted(want), name
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{name}: {k}")


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_verify_finds_each_damage(capsys, tmp_path, llama_side, side_b, damage):
    src = side_b if damage == "prefix length" else llama_side
    art = shutil.copytree(src, tmp_path / "art")
    code, out, _ = _run(capsys, "verify", art)
    assert code == 0 and out.strip().endswith("OK"), out
    if damage == "prefix length":
        _edit_manifest(art, _set(["adapters", "pre", "prefix", "length"], 6))
    else:
        DAMAGES[damage](art)
    code, out, _ = _run(capsys, "verify", art)
    assert code == 1 and "problem(s)" in out, (damage, out)


_FORK_SERVER = r"""
import json, os, sys
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
import importlib
import torch
torch.set_num_threads(1)
from edgepeft.cli import main
for mod in ("edgepeft.export", "transformers.models.llama.modeling_llama", "onnxscript",
            "onnxscript.function_libs.torch_lib.ops", "torch.onnx._internal.exporter._core"):
    try:  # what every export would otherwise import first
        importlib.import_module(mod)
    except ImportError:
        pass
print("ready", flush=True)
while line := sys.stdin.readline():
    argv = json.loads(line)
    pid = os.fork()
    if pid == 0:  # the export, exactly as `edgepeft export ...` runs it
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        try:
            code = main(argv)
        except BaseException:
            code = 3
        os._exit(code)
    print(pid, flush=True)
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: the pid stays ours
    print("exited", flush=True)
    sys.stdin.readline()
    print(os.waitpid(pid, 0)[1], flush=True)
"""


def test_export_killed_at_20_random_points_leaves_out_absent_or_complete(tmp_path):
    """A process that has imported edgepeft forks one child per export, which runs
    ``edgepeft.cli.main`` with the export's argv (the CLI's own code path), so the trials do not pay
    the imports; the test kills the child with SIGKILL after a seeded random delay, one per stratum
    of the measured export time. Every other trial replaces an existing OUT (--force). After each,
    OUT must be absent or pass ``edgepeft verify``, and each export must have removed what the
    killed one before it left."""
    base = make_base("llama", tmp_path / "base", tokenizer=True, num_hidden_layers=1)
    ad = make_lora(base, tmp_path / "ad", target_modules=["q_proj", "v_proj"])
    parent = tmp_path / "arts"
    parent.mkdir()
    out = parent / "out"
    argv = ["export", str(base), "--adapter", f"a={ad}", "--out", str(out), "--quiet", "--graph", "generic"]
    server = subprocess.Popen([sys.executable, "-c", _FORK_SERVER], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=_env(), cwd=tmp_path)

    def leftovers():
        return sorted(p.name for p in parent.iterdir() if p.name.startswith(".out."))

    def trial(args, delay, watch=None):
        server.stdin.write(json.dumps(args) + "\n")
        server.stdin.flush()
        pid = int(server.stdout.readline())
        t0 = time.monotonic()
        while True:
            wait = 0.02 if watch is not None else (None if delay is None else max(0.0, t0 + delay - time.monotonic()))
            if select.select([server.stdout], [], [], wait)[0]:
                break
            if watch is not None:
                watch(time.monotonic() - t0)
            if delay is not None and time.monotonic() - t0 >= delay:
                os.kill(pid, signal.SIGKILL)  # our child; not reaped yet, so the pid cannot be reused
                break
        assert server.stdout.readline().strip() == "exited"
        elapsed = time.monotonic() - t0
        server.stdin.write("reap\n")
        server.stdin.flush()
        return os.waitstatus_to_exitcode(int(server.stdout.readline())), elapsed

    try:
        assert server.stdout.readline().strip() == "ready"
        phases = {}

        def watch(t):  # when the reference export reaches each stage (for the report)
            tmp = [p for p in parent.iterdir() if p.name.startswith(".out.tmp-") and p.is_dir()]
            if tmp:
                phases.setdefault("temp dir", t)
            if any((p / "model.onnx").exists() for p in tmp):
                phases.setdefault("graph written", t)
            if out.exists():
                phases.setdefault("renamed", t)

        code, runtime = trial(argv, None, watch)
        assert code == 0 and main(["verify", str(out)]) == 0 and leftovers() == []
        keep = shutil.copytree(out, tmp_path / "keep")

        rng = np.random.default_rng(20240601)
        n = 20
        points = (np.arange(n) + rng.random(n)) * 0.98 / n  # one point per 1/20 of the runtime,
        rng.shuffle(points)  # in random order
        rows = []
        shortest = runtime
        queue = [(float(f), 0) for f in points]
        while queue:
            f, tries = queue.pop(0)
            delay = f * shortest
            i = len(rows)
            force = i % 2 == 1
            if force and not out.exists():
                shutil.copytree(keep, out)
            if not force and out.exists():
                shutil.rmtree(out)
            before = leftovers()
            code, elapsed = trial(argv + (["--force"] if force else []), float(delay))
            assert code in (0, -signal.SIGKILL), code
            if out.exists():
                assert main(["verify", str(out)]) == 0, f"trial {i}: OUT incomplete after a kill at {delay:.2f}s"
            after = leftovers()
            if elapsed > 0.5:  # past the start of export(): what earlier kills left is gone
                assert not set(before) & set(after), (i, before, after)
            if code == 0:
                assert after == [], (i, after)
            stale = [x for x in before if not x.endswith(".lock")]
            rows.append({"delay": round(delay, 2), "killed": code != 0, "force": force,
                         "out": "complete" if out.exists() else "absent", "stale_before": len(stale)})
            if code == 0:  # this one ran faster than the shortest so far: try the point again
                shortest = min(shortest, elapsed)
                if tries == 0:
                    queue.append((f, 1))
        killed = [r for r in rows if r["killed"]]
        fresh = [r for r in killed if not r["force"]]
        print(f"\nexport runtime {runtime:.2f}s (shortest {shortest:.2f}s), phases "
              f"{({k: round(v, 2) for k, v in phases.items()})}; {len(rows)} kill points tried: "
              f"{len(killed)} killed, {len(rows) - len(killed)} had finished; killed without "
              f"--force: OUT absent {sum(r['out'] == 'absent' for r in fresh)}, complete "
              f"{sum(r['out'] == 'complete' for r in fresh)}; killed with --force (OUT existed): complete "
              f"{sum(r['out'] == 'complete' for r in killed if r['force'])}, absent "
              f"{sum(r['out'] == 'absent' for r in killed if r['force'])}; temp dirs of killed exports "
              f"removed by the next: {sum(r['stale_before'] for r in rows)}\n{rows}")
        assert len(killed) >= 18
        assert sum(r["stale_before"] for r in rows) > 0  # kills did leave temp dirs, and they went
    finally:
        server.stdin.close()
        server.wait(timeout=60)


def test_leftovers_of_killed_exports_are_removed_live_ones_kept(tmp_path, llama_base, llama_adapters,
                                                                stop_before_write):
    """Temp dirs whose lock nobody holds (their export died) go; a locked one (a running export) stays."""
    import fcntl

    from edgepeft.export import ExportConfig, export

    parent = tmp_path / "arts"
    parent.mkdir()
    for tag in ("dead1", "dead2", "live"):
        (parent / f".out.tmp-{tag}").mkdir()
        (parent / f".out.tmp-{tag}" / "model.onnx").write_bytes(b"partial")
        (parent / f".out.tmp-{tag}.lock").write_bytes(b"")
    (parent / ".out.tmp-dead2.old").mkdir()  # killed between the two renames of --force
    (parent / ".other.tmp-dead.lock").write_bytes(b"")  # another OUT's: not ours to judge
    fd = os.open(parent / ".out.tmp-live.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(_Reached):
            export(ExportConfig(graph="generic", base=llama_base, out=parent / "out", adapters=(("a", llama_adapters["chat"]),)),
                   quiet=True)
    finally:
        os.close(fd)
    assert sorted(p.name for p in parent.iterdir()) == [".other.tmp-dead.lock", ".out.tmp-live",
                                                        ".out.tmp-live.lock"]


# ----------------------------------------------------------------------------- 6. concurrency
def _inputs(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 96, (int(rng.integers(1, 3)), int(rng.integers(3, 7)))) for _ in range(n)]


def _hammer(model, choices, inputs, expected, threads=8, calls=1000, allowed=None, stop=None):
    """``threads`` x ``calls`` random (choice, input) calls; returns (checked, wrong, refused, errors)."""
    lock = threading.Lock()
    tally = {"checked": 0, "wrong": [], "refused": 0, "errors": []}

    def worker(seed):
        rng = np.random.default_rng(seed)
        checked = refused = 0
        wrong, errors = [], []
        for _ in range(calls):
            c, i = int(rng.integers(len(choices))), int(rng.integers(len(inputs)))
            try:
                got = model.logits(inputs[i], adapter=choices[c])
            except EdgepeftError as e:
                if allowed and allowed(choices[c], str(e)):
                    refused += 1
                else:
                    errors.append(repr(e))
                continue
            except Exception as e:  # anything else is a failure
                errors.append(repr(e))
                continue
            checked += 1
            ref = expected[(c, i)]
            if got.shape != ref.shape or np.abs(got - ref).max() > 1e-6:
                wrong.append((c, i))
        with lock:
            tally["checked"] += checked
            tally["refused"] += refused
            tally["wrong"] += wrong
            tally["errors"] += errors

    pool = [threading.Thread(target=worker, args=(s,)) for s in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if stop is not None:
        stop.set()
    return tally


def test_one_model_8_threads_1000_calls_each(llama_side):
    m = Model(llama_side)
    choices = [None, "chat", "sql", "code", {"chat": 0.7, "sql": 0.3}, {"sql": 0.5, "code": 0.5},
               {"chat": 1.0, "sql": 1.0, "code": 1.0}, {"chat": 0.2}, {"code": 2.0, "chat": -1.0},
               {"sql": 0.25, "chat": 0.25}, {"code": 0.1, "sql": 0.9}, {"chat": 0.5, "code": 0.5},
               {"sql": 1.5}]  # 10 mixes: more than the mix cache holds, so it is filled and evicted
    inputs = _inputs()
    expected = {(c, i): m.logits(x, adapter=ch) for c, ch in enumerate(choices) for i, x in enumerate(inputs)}
    t0 = time.perf_counter()
    tally = _hammer(m, choices, inputs, expected)
    print(f"\n8 threads x 1000 calls: {tally['checked']} checked, {len(tally['wrong'])} wrong, "
          f"{time.perf_counter() - t0:.1f}s")
    assert tally["errors"] == [] and tally["wrong"] == []
    assert tally["checked"] == 8000


def test_add_and_remove_adapters(llama_side, side_b, side_c):
    m = Model(llama_side)
    ids = _inputs(1)[0]
    assert m.add_adapter(side_b, "extra") == "extra" and "extra" in m.adapters
    np.testing.assert_allclose(m.logits(ids, adapter="extra"), Model(side_b).logits(ids, adapter="extra"),
                               atol=1e-4)  # another graph of the same base: the same model
    assert m.add_adapter(side_b / "adapters" / "pre.onnx_adapter", as_name="p2") == "p2"
    np.testing.assert_allclose(m.logits(ids, adapter="p2"), Model(side_b).logits(ids, adapter="pre"), atol=1e-4)
    with pytest.raises(EdgepeftError, match="'extra' is already in"):
        m.add_adapter(side_b, "extra")
    with pytest.raises(EdgepeftError, match="holds adapters extra, pre, ia; pass name="):
        m.add_adapter(side_b)
    with pytest.raises(EdgepeftError, match=r"ia3_out\..* is not an adapter input of this graph|"
                                            r"ia3_in\..* is not an adapter input of this graph"):
        m.add_adapter(side_b, "ia")
    with pytest.raises(EdgepeftError, match="made for other weights"):
        m.add_adapter(side_c, "x")
    m.remove_adapter("extra")
    assert "extra" not in m.adapters
    with pytest.raises(EdgepeftError, match=r"'extra' is not in .*it has: chat, sql, code, p2"):
        m.logits(ids, adapter={"extra": 1.0, "chat": 1.0})
    with pytest.raises(EdgepeftError, match="'nope' is not in"):
        m.remove_adapter("nope")
    # a removed and re-added adapter of the same name is the new one, not a cached mix of the old
    before = m.logits(ids, adapter={"chat": 0.5, "p2": 1.0})
    m.remove_adapter("p2")
    m.add_adapter(side_b, "extra", as_name="p2")
    after = m.logits(ids, adapter={"chat": 0.5, "p2": 1.0})
    assert np.abs(after - before).max() > 1e-3
    np.testing.assert_array_equal(after, m.logits(ids, adapter={"chat": 0.5, "p2": 1.0}))


def test_add_remove_while_8_threads_run(llama_side, side_b):
    """6 threads call with adapters that come and go, 2 threads add and remove them in a loop:
    every call returns the single-threaded result or says the adapter is not there."""
    m = Model(llama_side)
    m.add_adapter(side_b, "extra")
    m.add_adapter(side_b, "pre")
    choices = [None, "chat", "extra", "pre", {"chat": 0.5, "extra": 0.5}, {"extra": 1.0, "pre": 1.0},
               {"sql": 0.3, "chat": 0.7}, {"pre": 1.0, "sql": 1.0}]
    inputs = _inputs(4, seed=1)
    expected = {(c, i): m.logits(x, adapter=ch) for c, ch in enumerate(choices) for i, x in enumerate(inputs)}
    stop = threading.Event()
    cycles = {"extra": 0, "pre": 0}
    mutator_errors = []

    def mutate(name):
        try:
            while not stop.is_set():
                m.remove_adapter(name)
                time.sleep(0.002)
                m.add_adapter(side_b, name)
                cycles[name] += 1
                time.sleep(0.002)
        except Exception as e:  # noqa: BLE001 - reported by the assert below
            mutator_errors.append(repr(e))

    def gone(choice, msg):
        names = [choice] if isinstance(choice, str) else list(choice or {})
        return any(f"adapter {n!r} is not in" in msg for n in names if n in cycles)

    mutators = [threading.Thread(target=mutate, args=(n,)) for n in cycles]
    for t in mutators:
        t.start()
    t0 = time.perf_counter()
    tally = _hammer(m, choices, inputs, expected, threads=6, calls=1000, allowed=gone, stop=stop)
    for t in mutators:
        t.join()
    print(f"\nadd/remove under load: {tally['checked']} calls checked, {len(tally['wrong'])} wrong, "
          f"{tally['refused']} refused (adapter removed), {cycles} add/remove cycles, "
          f"{time.perf_counter() - t0:.1f}s")
    assert mutator_errors == [] and tally["errors"] == [] and tally["wrong"] == []
    assert tally["checked"] + tally["refused"] == 6000
    assert tally["refused"] > 0 and min(cycles.values()) > 10
