"""The JS runtime's contract constants are generated from the Python contract: a drift fails here."""

from edgepeft.contract import js


def test_generated_js_contract_is_current():
    on_disk = js.TARGET.read_text(encoding="utf-8")
    assert on_disk == js.render(), ("runtimes/js/src/core/contract.ts differs from the Python contract; "
                                    "run `python -m edgepeft.contract.js --write`")


def test_render_follows_the_python_constants(monkeypatch):
    monkeypatch.setattr(js, "FORMAT_VERSION", 99)
    monkeypatch.setattr(js, "MIX_RULES", ("cat0", "one", "new"))
    text = js.render()
    assert "export const FORMAT_VERSION = 99;" in text
    assert "export const MIX_RULES = ['cat0', 'one', 'new'] as const;" in text
    assert text != js.TARGET.read_text(encoding="utf-8")  # the drift check above would catch it


def test_no_js_source_repeats_a_generated_constant():
    src = js.TARGET.parent
    for f in src.glob("*.ts"):
        if f == js.TARGET:
            continue
        text = f.read_text(encoding="utf-8")
        for literal in ("'edgepeft-artifact'", "'edgepeft-adapter'", "'prompt.embeds'"):
            assert literal not in text, f"{f.name} repeats {literal}; import it from contract.ts"
