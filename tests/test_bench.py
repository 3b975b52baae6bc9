"""``edgepeft bench``: one real run on a tiny Llama (side vs merged vs PyTorch+peft), a classifier
run, and bad inputs (exit 2, one message).

The runs are module-scoped (a bench spawns a process per row and repeat); repeats and samples
are few, so the numbers are not meaningful, only their presence, consistency and units.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import make_adapter, make_base, make_encoder, make_lora
from edgepeft.cli import main
from edgepeft.export import ExportConfig, export

REPO = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"


def _env(cache: Path) -> dict:
    return {**os.environ, "XDG_CACHE_HOME": str(cache),
            "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A tiny Llama, two LoRA adapters, the side artifact, and one `edgepeft bench --json` run."""
    root = tmp_path_factory.mktemp("bench-lm")
    base = make_base("llama", root / "base", tokenizer=True)
    chat = make_lora(base, root / "chat", r=4, target_modules=["q_proj", "v_proj"])
    sql = make_lora(base, root / "sql", seed=2, r=8, target_modules="all-linear")
    side = root / "side"
    export(ExportConfig(graph="generic", base=base, out=side, adapters=(("chat", chat), ("sql", sql))), quiet=True)
    out = root / "bench-out"
    p = subprocess.run([sys.executable, "-m", "edgepeft", "bench", str(side), "--compare-torch", str(base),
                        "--repeats", "2", "--prefill-samples", "3", "--new-tokens", "5", "--prompt-tokens", "6",
                        "--threads", "1", "--out", str(out), "--json"], capture_output=True, text=True, env=_env(root / "cache"),
                       timeout=1200)
    assert p.returncode == 0, p.stderr[-3000:]
    return {"base": base, "side": side, "out": out, "cache": root / "cache", "result": json.loads(p.stdout),
            "stderr": p.stderr}


def test_lm_rows_and_fields(lm):
    r = lm["result"]
    s = r["summary"]
    mix = "mix(chat=0.5,sql=0.5)"
    want = {f"edgepeft-side:{c}" for c in ("base", "chat", "sql", mix)} | {"edgepeft-merged:sql"} | {
        f"torch:{c}" for c in ("base", "chat", "sql", mix)}
    assert set(s) == want  # sql: the larger adapter file is the merged reference
    assert r["config"]["merged_adapter"] == "sql" and r["config"]["repeats"] == 2
    for key, v in s.items():
        assert v["repeats"] == 2 and v["prefill_samples"] == 6, key
        assert 0 < v["prefill_ms_p50"] <= v["prefill_ms_p95"] < 60_000, key
        assert 0 < v["decode_tok_s"] < 1e6 and v["step_ms_median"] > 0, key
        assert 0 < v["load_s"] < 600 and 20 < v["peak_rss_mb"] < 20_000, key
    # each row's own process: onnxruntime rows never import torch, so they stay far smaller
    assert s["edgepeft-side:chat"]["peak_rss_mb"] < s["torch:chat"]["peak_rss_mb"]
    runs = [x for x in r["runs"] if x["row"] == "edgepeft-side:chat"]
    assert [x["repeat"] for x in runs] == [0, 1] and all(len(x["tokens"]) == 5 for x in runs)


def test_lm_ratios_are_the_medians_ratio(lm):
    s = lm["result"]["summary"]
    for key, v in s.items():
        if v["system"] == "torch":
            assert "vs_torch" not in v
            continue
        t = s[f"torch:{v['case']}"]
        assert v["vs_torch"]["decode"] == pytest.approx(v["decode_tok_s"] / t["decode_tok_s"], rel=1e-12)
        assert v["vs_torch"]["prefill"] == pytest.approx(t["prefill_ms_p50"] / v["prefill_ms_p50"], rel=1e-12)
    m = s["edgepeft-merged:sql"]
    assert m["vs_merged"]["decode"] == pytest.approx(1.0)
    side = s["edgepeft-side:sql"]
    assert side["vs_merged"]["decode"] == pytest.approx(side["decode_tok_s"] / m["decode_tok_s"], rel=1e-12)
    # medians are the medians of the per-repeat values in "runs"
    runs = [x["decode_tok_s"] for x in lm["result"]["runs"] if x["row"] == "edgepeft-side:sql"]
    assert side["decode_tok_s"] == pytest.approx(sum(runs) / 2)


def test_lm_swap_memory_sizes_and_files(lm):
    r = lm["result"]
    side, merged, torch_ = r["swap"]["swap-side"], r["swap"]["swap-merged"], r["swap"]["swap-torch"]
    assert 0 < side["feeds_alternating_us"] < 1e5
    assert 0 < side["mix_cached_us"] < side["mix_uncached_us"]
    assert side["steps"]["after_swap_ms"] > 0 and side["steps"]["steady_ms"] > 0
    assert set(side["memory_per_adapter"]) == {"chat", "sql"}
    assert side["memory_per_adapter"]["sql"]["arrays_mb"] > side["memory_per_adapter"]["chat"]["arrays_mb"] > 0
    assert merged["session_create_ms"] > 0 and merged["repeats"] == 3
    assert torch_["set_adapter_alternating_us"] > 0 and torch_["memory_per_adapter"]["sql"]["load_adapter_ms"] > 0
    sizes = r["sizes_mb"]
    assert sizes["adapter sql"] > sizes["adapter chat"] > 0 and sizes["graph"] > sizes["adapter sql"]
    assert sizes["merged graph sql"] > 0 and sizes["peft sql/adapter_model.safetensors"] > 0
    on_disk = json.loads((lm["out"] / "bench.json").read_text())
    assert on_disk["summary"] == r["summary"]
    png = (lm["out"] / "bench.png").read_bytes()
    assert png.startswith(PNG) and len(png) > 20_000
    # the merged reference was exported into the cache once
    assert list((lm["cache"] / "edgepeft" / "bench-merged").iterdir())
    assert "Traceback" not in lm["stderr"]


def test_lm_table_reuses_cached_merged(lm, tmp_path, capsys):
    """The text table, one quick run without torch: the cached merged graph is reused."""
    os.environ["XDG_CACHE_HOME"] = str(lm["cache"])
    try:
        code = main(["bench", str(lm["side"]), "--repeats", "1", "--prefill-samples", "2", "--new-tokens", "3",
                     "--prompt-tokens", "4", "--out", str(tmp_path / "b"), "--quiet"])
    finally:
        del os.environ["XDG_CACHE_HOME"]
    out, err = capsys.readouterr()
    assert code == 0, err
    assert err == ""  # --quiet
    assert "decode tok/s" in out and "vs merged" in out and "cached:" in out
    assert "edgepeft-merged sql" in out and not any(line.startswith("torch") for line in out.splitlines())
    assert "resident memory added per loaded adapter" in out and "sizes on disk" in out
    assert (tmp_path / "b" / "bench.png").read_bytes().startswith(PNG)


def test_merged_artifact_bench(lm, tmp_path, capsys):
    """A merged artifact is benchmarked as itself: one row per adapter, no side swap."""
    merged = next((lm["cache"] / "edgepeft" / "bench-merged").iterdir())
    code = main(["bench", str(merged), "--repeats", "1", "--prefill-samples", "2", "--new-tokens", "3",
                 "--prompt-tokens", "4", "--out", str(tmp_path / "b"), "--json", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    r = json.loads(out)
    assert r["mode"] == "merged" and set(r["summary"]) == {"edgepeft-merged:sql"} and r["swap"] == {}
    assert r["summary"]["edgepeft-merged:sql"]["decode_tok_s"] > 0


def test_classifier_bench(tmp_path, capsys):
    """Classifiers: latency per batch instead of decode tok/s; no base row (untrained head)."""
    base = make_encoder("bert", tmp_path / "base", hidden=32, layers=1, heads=2)
    ads = {k: make_adapter(base, tmp_path / k, k, seed=i + 1, task="SEQ_CLS") for i, k in enumerate(("lora", "ia3"))}
    side = tmp_path / "side"
    export(ExportConfig(graph="generic", base=base, out=side, adapters=tuple(ads.items())), quiet=True)
    code = main(["bench", str(side), "--merged", "no", "--repeats", "1", "--batch-sizes", "4",
                 "--batch-samples", "3", "--json", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    r = json.loads(out)
    assert r["task"] == "classification" and r["config"]["batch_sizes"] == [1, 4]
    assert set(r["summary"]) == {"edgepeft-side:lora", "edgepeft-side:ia3"}
    for v in r["summary"].values():
        assert 0 < v["batch1_ms_p50"] <= v["batch1_ms_p95"] and 0 < v["batch4_ms_p50"] <= v["batch4_ms_p95"]
        assert "decode_tok_s" not in v and v["peak_rss_mb"] > 0
    assert (side / "bench" / "bench.json").is_file() and (side / "bench" / "bench.png").read_bytes().startswith(PNG)


def test_bad_inputs_exit_2(capsys, tmp_path, lm):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["bench", tmp_path / "nope"], "artifact directory not found"),
        (["bench", empty], "is not an edgepeft artifact"),
        (["bench", lm["side"], "--compare-torch", tmp_path / "nope"], "not a Hugging Face model folder"),
        (["bench", lm["side"], "--repeats", "0"], "--repeats must be at least 1"),
        (["bench", lm["side"], "--batch-sizes", "1,x"], "--batch-sizes '1,x': expected integers"),
        (["bench", lm["side"], "--merged", lm["side"]], "a side artifact; pass a merged one"),
        (["bench", lm["side"], "--merged-adapter", "nope"], "--merged-adapter 'nope': not in"),
        (["bench", lm["side"], "--adapter", f"nope={tmp_path}"], "no adapter 'nope' in"),
        (["bench", lm["side"], "--compare-torch", lm["base"], "--adapter", f"chat={tmp_path}"],
         "adapter 'chat''s PEFT folder is not there"),
    ]
    for argv, words in cases:
        code = main([str(a) for a in argv] + ["--quiet"])
        _, err = capsys.readouterr()
        assert code == 2, (argv, err)
        assert err.startswith("edgepeft bench: error: ") and words in err and "Traceback" not in err, (argv, err)


def test_other_base_exit_2(capsys, tmp_path, lm):
    """A --compare-torch base with other weights is refused before anything is timed."""
    other = make_base("llama", tmp_path / "other", tokenizer=True, seed=5)
    code = main(["bench", str(lm["side"]), "--compare-torch", str(other), "--merged", "no", "--quiet"])
    _, err = capsys.readouterr()
    assert code == 2 and "are not the base the artifact was exported from" in err and "Traceback" not in err
