"""The web demo (runtimes/js/web) in headless Chromium gives the Python runtime's text.

A tiny Llama artifact with two LoRA adapters of different ranks is exported, once per graph (the
traced graph; the fused graph in fp32; the fused graph in int4 with the fast options, whose
GroupQueryAttention, MatMulNBits and GatherBlockQuantized contrib ops onnxruntime-web's wasm
backend runs); the Python runtime
computes the expected text for one adapter, a weighted mix and the base model;
runtimes/js/test/browser.test.mjs serves the page, drives Chromium (playwright-core), compares the shown text, reads the shown swap
time and tok/s, and checks screenshots. Needs Node >= 20, runtimes/js built
(``(cd runtimes/js && npm ci && npm run build)``) and Chromium (``apt-get install -y chromium``):
a missing one fails with the command that fixes it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import make_base, make_lora

ROOT = Path(__file__).resolve().parents[1]
JS = ROOT / "runtimes" / "js"
TEST = JS / "test" / "browser.test.mjs"
BUILD = "(cd runtimes/js && npm ci && npm run build)"
PROMPT = "w5 w9 w13"
MAX_NEW = 12
ADAPTER = "sql"
MIX = {"chat": 0.7, "sql": 0.3}


def _chromium() -> str | None:
    for c in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
              shutil.which("chromium-browser")):
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    return None


def _prerequisites() -> tuple[str, str]:
    """node and Chromium paths; fails (not skips) with the fixing command when one is missing."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not on PATH: apt-get install -y nodejs npm (Node.js >= 20), then " + BUILD)
    major = subprocess.run([node, "-p", "process.versions.node.split('.')[0]"], capture_output=True,
                           text=True).stdout.strip()
    if not major.isdigit() or int(major) < 20:
        pytest.fail(f"node {major or '?'} is too old for runtimes/js: install Node.js >= 20")
    missing = [p for p in ("node_modules/playwright-core", "node_modules/onnxruntime-web",
                           "node_modules/@huggingface/tokenizers", "dist/web.js")
               if not (JS / p).exists()]
    if missing:
        pytest.fail(f"runtimes/js is not installed and built (missing {', '.join(missing)}): run {BUILD}")
    chromium = _chromium()
    if chromium is None:
        pytest.fail("Chromium not found (CHROMIUM, /usr/bin/chromium): apt-get install -y chromium")
    return node, chromium


@pytest.fixture(scope="module")
def tools() -> tuple[str, str]:
    return _prerequisites()


GRAPHS = {"traced": {"graph": "generic"}, "fused": {"graph": "fused"},
          "fused-int4": {"graph": "fused", "quant": dict(precision="int4", accuracy_level=4, head_bits=8)}}


@pytest.fixture(scope="module", params=list(GRAPHS))
def browser_case(tools, tmp_path_factory, request) -> Path:
    """The case JSON for browser.test.mjs: artifact, prompt, choices and the Python texts."""
    from edgepeft.export import ExportConfig, export
    from edgepeft.quantize import QuantConfig
    from edgepeft.runtime import Model

    graph = dict(GRAPHS[request.param])
    if "quant" in graph:
        graph["quant"] = QuantConfig(**graph["quant"])
    root = tmp_path_factory.mktemp(f"js-browser-{request.param}")
    base = make_base("llama", root / "base", tokenizer=True)
    adapters = {
        "chat": make_lora(base, root / "chat", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "sql": make_lora(base, root / "sql", seed=2, r=8, lora_alpha=16, target_modules="all-linear"),
    }
    out = root / "artifact"
    export(ExportConfig(base=base, out=out, adapters=tuple(adapters.items()), **graph), quiet=True)
    model = Model(out)
    expected = {"adapter": model.generate_text(PROMPT, max_new_tokens=MAX_NEW, adapter=ADAPTER),
                "mix": model.generate_text(PROMPT, max_new_tokens=MAX_NEW, adapter=MIX)}
    expected["base"] = model.generate_text(PROMPT, max_new_tokens=MAX_NEW)
    # The case must tell the choices apart, or a page that ignores the adapter would pass.
    assert len(set(expected.values())) == 3, expected
    assert all(len(t.split()) >= 4 for t in (expected["adapter"], expected["mix"])), expected
    case = root / "case.json"
    case.write_text(json.dumps({"artifact": str(out), "prompt": PROMPT, "maxNewTokens": MAX_NEW,
                                "adapter": ADAPTER, "mix": MIX, "expected": expected}, indent=1))
    return case


def test_web_page_in_chromium(tools, browser_case):
    node, chromium = tools
    env = {**os.environ, "EDGEPEFT_JS_BROWSER_CASE": str(browser_case), "CHROMIUM": chromium}
    try:
        r = subprocess.run([node, "--test", str(TEST)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"browser test timed out after 180 s\n{e.stdout or ''}\n{e.stderr or ''}")
    assert r.returncode == 0, f"node --test {TEST} failed (rc {r.returncode}):\n{r.stdout[-12000:]}\n{r.stderr[-4000:]}"
    shown = json.loads((browser_case.parent / "shown.json").read_text())
    for choice in ("adapter", "mix"):
        assert shown[choice]["swapMs"] > 0 and shown[choice]["tokS"] > 0, shown
    for png in ("page.png", "output.png"):
        assert (browser_case.parent / png).stat().st_size > 1000, png
    print(f"shown on the page: {shown}; screenshots in {browser_case.parent}")
