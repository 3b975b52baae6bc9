"""Adapters added after export: ``export --slots``, ``edgepeft adapter add / remove / list``.

An adapter added to an artifact exported with empty slots must compute what a full export with
that adapter computes (1e-5), on the traced and the fused graph, fp32 and int4, causal LM and
classifier; every refusal leaves the artifact as it was (manifest bytes, adapter files).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgepeft.cli import main
from edgepeft.contract import verify
from edgepeft.export import ExportConfig, export
from edgepeft.quantize import QuantConfig
from edgepeft.runtime import Model
from helpers import make_adapter, make_base, make_encoder, make_lora

IDS = np.array([[1, 5, 9, 22, 7, 3, 11]])
SLOTS = "lora:all-linear,ia3:k_proj,v_proj,down_proj"


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("edgepeft adapter: error: "), err
    return code, out, err


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file of an artifact and its bytes (a refusal must not change any)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".edgepeft-edit.lock"}


@pytest.fixture(scope="module")
def adapters(llama_base, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lifecycle-adapters")
    return {
        "lora": make_lora(llama_base, root / "lora", seed=4, r=8, lora_alpha=16, target_modules="all-linear"),
        "ia3": make_adapter(llama_base, root / "ia3", "ia3", seed=5, target_modules=["k_proj", "v_proj", "down_proj"],
                            feedforward_modules=["down_proj"]),
        "dora": make_adapter(llama_base, root / "dora", "dora", seed=6, target_modules=["q_proj", "v_proj"]),
    }


def _export(base: Path, out: Path, graph: str, adapters=(), slots=None, precision=None, **kw) -> Path:
    quant = QuantConfig(precision=precision) if precision else None
    export(ExportConfig(base=base, out=out, graph=graph, adapters=tuple(adapters), slots=slots, quant=quant, **kw),
           quiet=True)
    return out


@pytest.fixture(scope="module")
def pairs(llama_base, adapters, tmp_path_factory) -> dict[tuple[str, str], tuple[Path, Path]]:
    """``{(graph, precision): (exported with empty slots, then the adapters added; a full export
    with the adapters)}``."""
    root = tmp_path_factory.mktemp("lifecycle")
    out = {}
    for graph, precision in (("generic", "fp32"), ("fused", "fp32"), ("fused", "int4")):
        tag = f"{graph}-{precision}"
        slotted = _export(llama_base, root / f"slotted-{tag}", graph, slots=SLOTS + ",dora:q_proj,v_proj",
                          precision=precision)
        full = _export(llama_base, root / f"full-{tag}", graph, [(k, adapters[k]) for k in ("lora", "ia3", "dora")],
                       precision=precision)
        out[(graph, precision)] = (slotted, full)
    return out


@pytest.mark.parametrize("graph,precision", [("generic", "fp32"), ("fused", "fp32"), ("fused", "int4")])
def test_added_adapters_equal_a_full_export(pairs, adapters, llama_base, capsys, graph, precision):
    slotted, full = pairs[(graph, precision)]
    assert json.loads((slotted / "manifest.json").read_text())["adapters"] == {}
    for name in ("lora", "ia3"):
        code, out, _ = cli(capsys, "adapter", "add", slotted, "--adapter", f"{name}={adapters[name]}", "--quiet")
        assert code == 0 and f"added {name}" in out
    # DoRA's arrays read the base weights: refused without --base, exact with it
    before = snapshot(slotted)
    code, _, err = cli(capsys, "adapter", "add", slotted, "--adapter", f"dora={adapters['dora']}")
    assert code == 2 and "--base" in err and snapshot(slotted) == before
    code, _, _ = cli(capsys, "adapter", "add", slotted, "--adapter", f"dora={adapters['dora']}", "--base", llama_base,
                     "--quiet")
    assert code == 0
    assert verify(slotted) == []
    got, want = Model(slotted), Model(full)
    base = want.logits(IDS)
    for choice in ("lora", "ia3", "dora", {"lora": 0.7, "ia3": 1.0}):
        a, b = got.logits(IDS, adapter=choice), want.logits(IDS, adapter=choice)
        assert np.abs(a - b).max() <= 1e-5, (choice, np.abs(a - b).max())
        assert np.abs(b - base).max() > 1e-2, choice  # the adapter changes the output
    assert got.generate(IDS, 6, adapter="lora").tolist() == want.generate(IDS, 6, adapter="lora").tolist()
    rows = ["lora", None, "ia3"]
    np.testing.assert_allclose(got.logits(np.repeat(IDS, 3, 0), adapter=rows),
                               want.logits(np.repeat(IDS, 3, 0), adapter=rows), atol=1e-5)


def test_classifier_added_adapter_carries_its_head(tmp_path, capsys):
    base = make_encoder("bert", tmp_path / "bert")
    lora = make_adapter(base, tmp_path / "lora", "lora", seed=3, task="SEQ_CLS", target_modules=["query", "value"])
    slotted = _export(base, tmp_path / "slotted", "generic", slots="query,value", task="classification")
    full = _export(base, tmp_path / "full", "generic", [("lora", lora)], task="classification")
    code, _, _ = cli(capsys, "adapter", "add", slotted, "--adapter", f"lora={lora}", "--quiet")
    assert code == 0
    texts = ["w3 w4 w5", "w9 w8"]
    a, b = Model(slotted).classify_logits(texts, adapter="lora"), Model(full).classify_logits(texts, adapter="lora")
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert Model(slotted).manifest["adapters"]["lora"]["head"]  # it carries its own head (the base has none)
    code, out, _ = cli(capsys, "adapter", "list", slotted)
    assert out.startswith("lora\tlora") and "--slots query,value" in out
    headless = make_adapter(base, tmp_path / "headless", "lora", task="SEQ_CLS", modules_to_save=None,
                            target_modules=["query"])
    if json.loads((headless / "adapter_config.json").read_text()).get("modules_to_save"):
        from safetensors.torch import load_file, save_file  # PEFT adds the head for SEQ_CLS: drop it

        t = {k: v for k, v in load_file(headless / "adapter_model.safetensors").items() if "classifier" not in k}
        save_file(t, headless / "adapter_model.safetensors")
    before = snapshot(slotted)
    code, _, err = cli(capsys, "adapter", "add", slotted, "--adapter", f"headless={headless}")
    assert code == 2 and "does not carry one" in err and snapshot(slotted) == before
    code, _, _ = cli(capsys, "adapter", "remove", slotted, "lora")
    assert code == 0 and Model(slotted).adapters == [] and verify(slotted) == []
    code, out, _ = cli(capsys, "inspect", slotted)
    assert code == 0 and "slots reserved with --slots query,value" in out and ".edgepeft-edit.lock" not in out


def test_remove_and_list(llama_base, adapters, tmp_path, capsys):
    root = _export(llama_base, tmp_path / "a", "fused", [("lora", adapters["lora"])], slots=SLOTS)
    code, _, _ = cli(capsys, "adapter", "add", root, "--adapter", f"ia3={adapters['ia3']}", "--quiet")
    assert code == 0
    code, out, _ = cli(capsys, "adapter", "list", root)
    lines = out.splitlines()
    assert lines[0].startswith("lora\tlora") and lines[1].startswith("ia3\tia3") and lines[1].endswith("added")
    assert f"--slots {SLOTS}" in lines[-1]
    model = Model(root)  # opened before the removal: keeps running what it loaded
    code, out, _ = cli(capsys, "adapter", "remove", root, "ia3")
    assert code == 0 and not (root / "adapters" / "ia3.onnx_adapter").exists()
    assert not (root / "adapters" / "ia3.safetensors").exists()
    assert Model(root).adapters == ["lora"] and verify(root) == []
    assert model.logits(IDS, adapter="ia3").shape == (1, IDS.shape[1], model.manifest["base"]["vocab_size"])
    code, _, err = cli(capsys, "adapter", "remove", root, "ia3")
    assert code == 2 and "no adapter named 'ia3'" in err


def test_refusals_leave_the_artifact_as_it_was(llama_base, adapters, tmp_path, capsys):
    root = _export(llama_base, tmp_path / "a", "fused", slots="q_proj,v_proj")
    qv = make_lora(llama_base, tmp_path / "qv", r=4, target_modules=["q_proj", "v_proj"])
    assert cli(capsys, "adapter", "add", root, "--adapter", f"qv={qv}", "--quiet")[0] == 0
    other = make_base("llama", tmp_path / "other", seed=9)  # same shapes, other weights
    foreign = make_lora(other, tmp_path / "foreign", r=4, target_modules=["q_proj"])
    wide = make_base("llama", tmp_path / "wide", hidden_size=96)
    wider = make_lora(wide, tmp_path / "wider", r=4, target_modules=["q_proj"])
    before = snapshot(root)
    cases = [
        (["--adapter", f"more={adapters['ia3']}"], "--slots ia3:"),  # no IA3 slots
        (["--adapter", f"big={make_lora(llama_base, tmp_path / 'up', target_modules=['up_proj'])}"],
         "--slots lora:up_proj"),
        (["--adapter", f"qv={qv}"], "already has an adapter named 'qv'"),
        (["--adapter", f"../evil={adapters['lora']}"], "not allowed"),
        (["--adapter", f"foreign={foreign}"], "trained on"),
        (["--adapter", f"wider={wider}"], "other layer sizes"),
        (["--adapter", f"x={tmp_path / 'missing'}"], "missing"),
    ]
    for args, words in cases:
        code, _, err = cli(capsys, "adapter", "add", root, *args)
        assert code == 2 and words in err, (args, err)
        assert snapshot(root) == before, args
    code, _, _ = cli(capsys, "adapter", "add", root, "--adapter", f"foreign={foreign}", "--allow-base-mismatch", "--quiet")
    assert code == 0


def test_rank_above_max_rank_is_refused(llama_base, adapters, tmp_path, capsys):
    from edgepeft.targets import TARGETS_DIR, load_target

    profile = tmp_path / "small.toml"
    text = (TARGETS_DIR / "cpu-x86_64.toml").read_text()
    profile.write_text(text.replace("max_rank", "# max_rank") + "\nmax_rank = 4\n")
    root = _export(llama_base, tmp_path / "a", "fused", slots="all-linear", target=load_target(str(profile)))
    before = snapshot(root)
    code, _, err = cli(capsys, "adapter", "add", root, "--adapter", f"lora={adapters['lora']}")  # r = 8
    assert code == 2 and "max_rank 4" in err and snapshot(root) == before


def test_merged_old_and_int8_static_artifacts_are_refused(llama_base, adapters, tmp_path, capsys):
    merged = _export(llama_base, tmp_path / "merged", "fused", [("lora", adapters["lora"])], mode="merged")
    code, _, err = cli(capsys, "adapter", "add", merged, "--adapter", f"x={adapters['ia3']}")
    assert code == 2 and "merged artifact" in err
    old = _export(llama_base, tmp_path / "old", "fused", slots="all-linear")
    # as an artifact exported before base_modules.json was kept: transformers builds the tree, and says so
    manifest = json.loads((old / "manifest.json").read_text())
    (old / manifest["base"].pop("modules")).unlink()
    (old / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    code, _, err = cli(capsys, "adapter", "add", old, "--adapter", f"x={adapters['lora']}")
    assert code == 0 and "building it with transformers" in err
    assert cli(capsys, "adapter", "remove", old, "x")[0] == 0
    (old / "base_config.json").unlink()  # as an artifact exported before base_config.json was kept
    code, _, err = cli(capsys, "adapter", "add", old, "--adapter", f"x={adapters['lora']}")
    assert code == 2 and "--base" in err
    code, _, _ = cli(capsys, "adapter", "add", old, "--adapter", f"x={adapters['lora']}", "--base", llama_base, "--quiet")
    assert code == 0
    static = tmp_path / "static"
    shutil.copytree(old, static)
    m = json.loads((static / "manifest.json").read_text())
    (static / "manifest.json").write_text(json.dumps({**m, "precision": "int8-static"}))
    code, _, err = cli(capsys, "adapter", "add", static, "--adapter", f"y={adapters['lora']}")
    assert code == 2 and "--validate" in err


def test_add_with_validate(llama_base, adapters, tmp_path, capsys):
    root = _export(llama_base, tmp_path / "a", "fused", slots=SLOTS)
    code, out, _ = cli(capsys, "adapter", "add", root, "--adapter", f"lora={adapters['lora']}", "--validate",
                       "--reference", llama_base, "--quiet")
    assert code == 0 and "lora" in out
    report = json.loads((root / "report-lora.json").read_text())
    assert report["passed"] and [c["case"] for c in report["cases"]] == ["lora"]


def test_slots_spec_errors(llama_base, tmp_path):
    from edgepeft.errors import EdgepeftError
    from edgepeft.export.config import parse_slots

    assert parse_slots("all-linear") == ((None, ("all-linear",)),)
    assert parse_slots("lora:all-linear,ia3:k_proj,v_proj") == (("lora", ("all-linear",)), ("ia3", ("k_proj", "v_proj")))
    for bad in ("", "lora:", "lora:q_proj,,v_proj", "all-linear,q_proj", "lora:q_proj,lora:v_proj"):
        with pytest.raises(EdgepeftError, match="--slots"):
            parse_slots(bad)
    for spec, words in (("prefix:q_proj", "cannot be reserved"), ("nope_proj", "names no linear layer"),
                        ("zzz:q_proj", "not known")):
        with pytest.raises(EdgepeftError, match=words):
            _export(llama_base, tmp_path / "x", "fused", slots=spec)
        assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- packs
@pytest.fixture(scope="module")
def packs(llama_base, adapters, tmp_path_factory) -> dict:
    """A shipped artifact (empty slots, no adapters), a build server's copy with adapters added,
    two keys, and packs made from the copy."""
    from edgepeft.contract.packs import generate_key

    root = tmp_path_factory.mktemp("packs")
    shipped = _export(llama_base, root / "shipped", "fused", slots=SLOTS)
    server = root / "server"
    shutil.copytree(shipped, server)
    for name in ("lora", "ia3"):
        assert main(["adapter", "add", str(server), "--adapter", f"{name}={adapters[name]}", "--quiet"]) == 0
    keys = {k: generate_key(root / k)[0] for k in ("good", "other")}
    out = {"shipped": shipped, "server": server, "keys": keys, "root": root}
    for name, version, key in (("lora", 1, "good"), ("lora", 2, "good"), ("ia3", 1, "good"),
                               ("ia3", 1, None), ("ia3", 1, "other")):
        f = root / f"{name}-v{version}-{key}.edgepeft-pack"
        args = ["adapter", "pack", str(server), name, "--out", str(f), "--version", str(version)]
        assert main(args + (["--sign", str(root / key)] if key else [])) == 0
        out[(name, version, key)] = f
    return out


def test_pack_round_trip(packs):
    from edgepeft.contract.packs import key_id, public_key

    model = Model(packs["shipped"], trusted_keys=[packs["keys"]["good"]])
    server = Model(packs["server"])
    assert model.add_adapter(packs[("lora", 1, "good")]) == "lora"
    assert model.add_adapter(packs[("ia3", 1, "good")]) == "ia3"
    for name in ("lora", "ia3"):
        np.testing.assert_allclose(model.logits(IDS, adapter=name), server.logits(IDS, adapter=name), atol=1e-6)
    assert model.manifest["adapters"]["lora"]["pack"]["version"] == 1
    # a newer version replaces the loaded one; the same or an older one is refused
    assert model.add_adapter(packs[("lora", 2, "good")]) == "lora"
    with pytest.raises(Exception, match="version 2 is loaded"):
        model.add_adapter(packs[("lora", 1, "good")])
    model.remove_adapter("lora")
    with pytest.raises(Exception, match="'lora' is not in"):
        model.logits(IDS, adapter="lora")
    # revocation by key id or by key
    good = packs["keys"]["good"]
    for revoked in (key_id(public_key(good)), str(good)):
        m = Model(packs["shipped"], trusted_keys=[good], revoked=[revoked])
        with pytest.raises(Exception, match="revoked"):
            m.add_adapter(packs[("lora", 1, "good")])
        assert m.adapters == []
    # no pinned keys: an unsigned pack loads (development); checksums are still checked
    assert Model(packs["shipped"]).add_adapter(packs[("ia3", 1, None)]) == "ia3"


def _tampered(src: Path, dst: Path, *, header=None, array_byte=False) -> Path:
    """A copy of a pack with its header text changed (``header(text) -> text``, the signature kept)
    or one byte of its array data flipped."""
    data = bytearray(src.read_bytes())
    n = int.from_bytes(data[:8], "little")
    head = json.loads(data[8:8 + n])
    if header is not None:
        head["__metadata__"]["pack"] = header(head["__metadata__"]["pack"])
        text = json.dumps(head).encode()
        data = bytearray(len(text).to_bytes(8, "little")) + text + data[8 + n:]
    if array_byte:
        data[-3] ^= 0x40
    dst.write_bytes(bytes(data))
    return dst


def test_pack_refusals_leave_the_model_as_it_was(packs, llama_base, adapters, tmp_path):
    good = packs["keys"]["good"]
    model = Model(packs["shipped"], trusted_keys=[good])
    model.add_adapter(packs[("lora", 1, "good")])
    before = model.logits(IDS, adapter="lora")
    other_base = make_base("llama", tmp_path / "other-base", seed=7)
    other_art = _export(other_base, tmp_path / "other-art", "fused", slots=SLOTS)
    main(["adapter", "add", str(other_art), "--adapter", f"ia3={adapters['ia3']}", "--allow-base-mismatch", "--quiet"])
    main(["adapter", "pack", str(other_art), "ia3", "--out", str(tmp_path / "base.edgepeft-pack"), "--sign", str(packs["root"] / "good")])
    other_slots = _export(llama_base, tmp_path / "other-slots", "fused", slots="q_proj,v_proj")
    main(["adapter", "add", str(other_slots), "--adapter", f"qv={make_lora(llama_base, tmp_path / 'qv', target_modules=['q_proj'])}", "--quiet"])
    main(["adapter", "pack", str(other_slots), "qv", "--out", str(tmp_path / "schema.edgepeft-pack"), "--sign", str(packs["root"] / "good")])
    src = packs[("ia3", 1, "good")]
    cases = {
        "unsigned": (packs[("ia3", 1, None)], "not signed"),
        "untrusted key": (packs[("ia3", 1, "other")], "not among the trusted keys"),
        "header edited": (_tampered(src, tmp_path / "h.edgepeft-pack", header=lambda t: t.replace('"version":1', '"version":9')),
                          "does not verify"),
        "array byte": (_tampered(src, tmp_path / "a.edgepeft-pack", array_byte=True), "does not match its sha256"),
        "other base": (tmp_path / "base.edgepeft-pack", "packed for base"),
        "other slots": (tmp_path / "schema.edgepeft-pack", "slot schema"),
        "not a pack": (_write(tmp_path / "junk.edgepeft-pack", b"\x00" * 40), "not a readable adapter pack"),
        "older version": (packs[("lora", 1, "good")], "version 1 is loaded"),
    }
    for case, (path, words) in cases.items():
        with pytest.raises(Exception, match=words):
            model.add_adapter(path)
        assert model.adapters == ["lora"], case
    np.testing.assert_array_equal(model.logits(IDS, adapter="lora"), before)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_pack_and_keygen_cli_errors(packs, tmp_path, capsys):
    code, _, err = cli(capsys, "adapter", "pack", packs["server"], "nope", "--out", tmp_path / "x.edgepeft-pack")
    assert code == 2 and "no adapter named 'nope'" in err
    code, _, err = cli(capsys, "adapter", "pack", packs["server"], "lora", "--out", tmp_path / "x.bin")
    assert code == 2 and ".edgepeft-pack" in err
    code, _, err = cli(capsys, "adapter", "pack", packs["server"], "lora", "--out", tmp_path / "x.edgepeft-pack",
                       "--sign", tmp_path / "nokey")
    assert code == 2 and "no such key file" in err and not (tmp_path / "x.edgepeft-pack").exists()
    code = main(["keygen", "--out", str(packs["root"] / "good")])
    assert code == 2  # a key is never overwritten
    assert oct((packs["root"] / "good").stat().st_mode & 0o777) == "0o600"


# ---------------------------------------------------------------- mix
def test_mix_written_as_an_adapter(llama_base, adapters, tmp_path, capsys):
    qv = make_lora(llama_base, tmp_path / "qv", seed=8, r=4, target_modules=["q_proj", "v_proj"])
    root = _export(llama_base, tmp_path / "a", "fused", [("lora", adapters["lora"]), ("qv", qv),
                                                          ("ia3", adapters["ia3"])])
    code, out, _ = cli(capsys, "adapter", "mix", root, "both=lora:0.7,qv:0.3")
    assert code == 0 and "mix of lora x0.7 + qv x0.3" in out
    model = Model(root)
    want = model.logits(IDS, adapter={"lora": 0.7, "qv": 0.3})
    np.testing.assert_allclose(model.logits(IDS, adapter="both"), want, atol=1e-6)
    assert np.abs(want - model.logits(IDS, adapter="lora")).max() > 1e-3
    assert model.manifest["adapters"]["both"]["mix_of"] == {"lora": 0.7, "qv": 0.3} and verify(root) == []
    report = __import__("edgepeft.validate", fromlist=["validate"]).validate(
        root, llama_base, choices=["both"], max_new_tokens=4, quiet=True, report=tmp_path / "r.json")
    assert report["passed"] and report["cases"][0]["case"] == "both"
    before = snapshot(root)
    for spec, words in (("both=lora:0.5", "already has an adapter named 'both'"),
                        ("x=lora:0.5,ia3:1", "different kinds"), ("x=nope:1", "no adapter 'nope'"),
                        ("x=lora", "expected NAME=ADAPTER:WEIGHT"), ("../x=lora:1", "not allowed")):
        code, _, err = cli(capsys, "adapter", "mix", root, spec)
        assert code == 2 and words in err, (spec, err)
    assert snapshot(root) == before
