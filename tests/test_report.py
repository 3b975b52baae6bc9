"""`edgepeft validate` writes report.md and a self-contained report.html beside report.json, and
shows progress on stderr only (--quiet: none; --json: stdout is the JSON result alone)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from helpers import VOCAB, make_adapter, make_base, make_encoder
from edgepeft.cli import main
from edgepeft.export import ExportConfig, export

PNG = "data:image/png;base64,"


def _run(capsys, *argv):
    code = main(list(map(str, argv)))
    out, err = capsys.readouterr()
    return code, out, err


def _texts(path, n=8, seed=0):
    """``n`` texts of in-vocabulary words (the tiny tokenizer knows w3..w95), 5..40 tokens long."""
    rng = np.random.default_rng(seed)
    path.write_text("".join(" ".join(f"w{i}" for i in rng.integers(3, VOCAB, rng.integers(5, 41))) + "\n"
                            for _ in range(n)))
    return path


@pytest.fixture(scope="module")
def causal(tmp_path_factory):
    """(base, side artifact with two LoRA adapters, texts file)."""
    root = tmp_path_factory.mktemp("report-causal")
    base = make_base("llama", root / "base", tokenizer=True)
    ads = (("chat", make_adapter(base, root / "chat", "lora", seed=1, target_modules=["q_proj", "v_proj"])),
           ("sql", make_adapter(base, root / "sql", "lora", seed=2, target_modules=["v_proj", "down_proj"])))
    art = root / "art"
    export(ExportConfig(graph="generic", base=base, out=art, adapters=ads), quiet=True)
    return base, art, _texts(root / "texts.txt")


CASES = ["base", "chat", "sql", "mix(chat=0.7,sql=0.3)", "per-row(base|chat|sql|mix(chat=0.7,sql=0.3))"]


def _sections(html: str) -> dict[str, str]:
    """Each case's <section> of the html, by case name."""
    found = re.findall(r"<section><h2>(.*?)<span class=\"badge (PASS|FAIL)\">.*?</section>", html, re.S)
    return {name: verdict for name, verdict in found}


def test_reports_beside_json_quiet(capsys, tmp_path, causal):
    base, art, texts = causal
    report = tmp_path / "out" / "report.json"
    report.parent.mkdir()
    code, out, err = _run(capsys, "validate", art, "--reference", base, "--texts", texts, "--max-new-tokens", 3,
                          "--report", report, "--quiet")
    assert code == 0 and "PASSED" in out
    assert err == ""  # --quiet: no bar, no line
    result = json.loads(report.read_text())
    md, html = (report.with_suffix(".md").read_text(), report.with_suffix(".html").read_text())
    assert [c["case"] for c in result["cases"]] == CASES
    # Self-contained: one embedded PNG per case and the all-cases one, nothing loaded from elsewhere.
    assert html.count(PNG) == len(CASES) + 1
    assert html.index("<h2>At a glance</h2>") < html.index("<section>")
    assert not re.search(r"(src|href)=\"(?!data:)", html)
    assert _sections(html) == {c: "PASS" for c in CASES}
    for c in CASES:
        assert f"## {c}: PASS".replace("|", "\\|") in md  # markdown escapes the per-row case's bars
    for text in (md, html):
        for word in (str(art), str(base), "fp32", result["date"], "top-1 agreement", "mean KL", "≤ 0.001"):
            assert word in text, word
    assert "- PASS: max |Δlogits|" in md and "FAIL" not in md
    # report.json keeps summaries, not one number per position.
    for c in result["cases"]:
        d = c["distributions"]
        assert sum(d["abs_logits"]["counts"]) + d["abs_logits"]["zeros"] == c["positions"]
        by = d["by_position"]
        assert sum(by["count"]) == c["positions"] and len(by["position"]) <= 128
        assert by["position"][0] == 0 and all(t == 1.0 for t in by["top1"])
    assert report.stat().st_size < 40_000


def test_strict_budget_fails_json_and_bar(capsys, tmp_path, causal):
    """A bound no float graph meets: FAIL per case and per bound; --json keeps stdout pure JSON
    while the progress bar goes to stderr."""
    base, art, texts = causal
    report = tmp_path / "report.json"
    code, out, err = _run(capsys, "validate", art, "--reference", base, "--texts", texts, "--max-new-tokens", 2,
                          "--report", report, "--max-abs-logits", 1e-12, "--json")
    assert code == 1
    result = json.loads(out)  # the whole of stdout
    assert result["passed"] is False and result == json.loads(report.read_text())
    assert "validate" in err and "case" in err  # tqdm's bar, on stderr
    html, md = report.with_suffix(".html").read_text(), report.with_suffix(".md").read_text()
    assert _sections(html) == {c: "FAIL" for c in CASES}
    assert "edgepeft validate: FAILED" in md and "edgepeft validate: " in html and "FAILED" in html
    assert md.count("- FAIL: max |Δlogits|") == len(CASES) and "(bound: ≤ 1e-12)" in md
    assert html.count('<td class="FAIL">FAIL</td>') == 2 * len(CASES)  # summary row + the bound row
    assert html.count(PNG) == len(CASES) + 1


def test_classifier_report_with_accuracy(capsys, tmp_path_factory):
    root = tmp_path_factory.mktemp("report-bert")
    base = make_encoder("bert", root / "base", hidden=32, layers=1, heads=2)
    ads = (("pos", make_adapter(base, root / "pos", "lora", seed=1, task="SEQ_CLS")),
           ("neg", make_adapter(base, root / "neg", "ia3", seed=2, task="SEQ_CLS")))
    art = root / "art"
    export(ExportConfig(graph="generic", base=base, out=art, adapters=ads), quiet=True)
    rng = np.random.default_rng(0)
    labelled = root / "labelled.jsonl"
    labelled.write_text("".join(json.dumps({"text": " ".join(f"w{i}" for i in rng.integers(3, VOCAB, 8)),
                                            "label": int(rng.integers(0, 2))}) + "\n" for _ in range(24)))
    code, out, err = _run(capsys, "validate", art, "--reference", base, "--labels", labelled, "--quiet")
    assert code == 0 and err == ""
    html, md = (art / "report.html").read_text(), (art / "report.md").read_text()
    assert html.count(PNG) == 3 and _sections(html) == {"pos": "PASS", "neg": "PASS"}
    assert "accuracy drop" in md and "accuracy torch / artifact" in html and str(labelled) in md
    cases = json.loads((art / "report.json").read_text())["cases"]
    assert all("by_position" not in c["distributions"] and c["accuracy_torch"] is not None for c in cases)


def test_export_progress_on_stderr_and_quiet(capsys, tmp_path, causal):
    """Export's calibration and quantization show bars on stderr (merged: a bar over the graphs);
    --quiet silences all of it; stdout keeps its one result line."""
    base, art, _ = causal
    chat = tmp_path / "chat"
    make_adapter(base, chat, "lora", seed=1, target_modules=["q_proj", "v_proj"])
    code, out, err = _run(capsys, "export", base, "--adapter", f"chat={chat}", "--out", tmp_path / "q",
                          "--precision", "int8-static", "--protect", 0.2, "--quiet")
    assert code == 0 and err == "" and out.count("\n") == 1
    code, out, err = _run(capsys, "export", base, "--adapter", f"chat={chat}", "--out", tmp_path / "m",
                          "--mode", "merged", "--precision", "int8-static")
    assert code == 0 and out.count("\n") == 1 and out.startswith(str(tmp_path / "m"))
    for word in ("[edgepeft] loading base model", "merged graphs", "quantize int8-static", "calibrate",
                 "[edgepeft] wrote"):
        assert word in err, word
