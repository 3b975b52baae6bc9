"""Per-row adapters: ``adapter=[...]``, one choice per row of a batch, in one session run.

Every row of a per-row batch must give what the same row gives alone with its own adapter (the
rank columns of the other rows' adapters are weighted zero for it, and IA3 / DoRA scales are
offset per row); inputs that apply to every row (heads, prompts, prefixes) must agree, else a
clear error.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from helpers import make_adapter, make_encoder
from test_targets import SMALL_NPU as TARGETS_NPU
from edgepeft.errors import EdgepeftError
from edgepeft.export import ExportConfig, export
from edgepeft.runtime import Model, ProviderFallbackWarning
from edgepeft.targets import load_target

IDS = [[5, 6, 7, 8, 9, 10], [3, 4, 5], [7, 8, 9, 10], [11, 12], [13, 14, 15]]
CHOICES = ["chat", "sql", None, {"code": 0.5, "chat": 1.0}, {"sql": -0.7}]
SMALL_NPU = TARGETS_NPU.replace("batch = 2", "batch = 4").replace("max_rank = 10", "max_rank = 16")


@pytest.fixture(scope="module")
def artifacts(llama_base, llama_adapters, tmp_path_factory) -> dict[str, Model]:
    """The tiny Llama's three LoRAs (chat, sql, code) plus an IA3 and a DoRA one, as a traced
    side-branch artifact, a fused one, a fixed-shape one (batch 4; LoRAs and IA3) and a merged one
    (chat, sql)."""
    root = tmp_path_factory.mktemp("per-row")
    ia3 = make_adapter(llama_base, root / "ia3", "ia3", seed=4, target_modules=["k_proj", "down_proj"],
                       feedforward_modules=["down_proj"])
    dora = make_adapter(llama_base, root / "dora", "dora", seed=5, target_modules=["q_proj", "v_proj", "up_proj"])
    (root / "small-npu.toml").write_text(SMALL_NPU)
    loras = tuple(llama_adapters.items())
    scales = (("ia3", ia3), ("dora", dora))
    configs = {
        "generic": dict(graph="generic", adapters=loras + scales),
        "fused": dict(graph="fused", adapters=loras + scales),
        "static": dict(graph="generic", adapters=loras + scales[:1], target=load_target(root / "small-npu.toml")),
        "merged": dict(graph="fused", adapters=loras[:2], mode="merged"),
    }
    out = {}
    for name, kw in configs.items():
        export(ExportConfig(base=llama_base, out=root / name, **kw), quiet=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ProviderFallbackWarning)
            out[name] = Model(root / name)
    return out


def _alone(model: Model, ids, choices, fn):
    """Each row's result run by itself with its own choice."""
    return [fn(model, [row], c)[0] for row, c in zip(ids, choices)]


def _logits(model, ids, choice):
    return model.logits(ids, choice)


@pytest.mark.parametrize("name", ["generic", "fused", "static"])
def test_per_row_logits_are_each_rows_own(artifacts, name):
    model = artifacts[name]
    ids, choices = (IDS[:4], CHOICES[:4]) if name == "static" else (IDS, CHOICES)  # static: batch 4
    got = model.logits(ids, choices)
    for b, want in enumerate(_alone(model, ids, choices, _logits)):
        n = len(ids[b])
        np.testing.assert_allclose(got[b, -n:], want[-n:], atol=1e-5, err_msg=f"{name} row {b} ({choices[b]})")
    # the rows really differ: a batch all on sql gives another row 0
    assert np.abs(got[0] - model.logits(ids, "sql")[0]).max() > 1e-2


@pytest.mark.parametrize("name", ["generic", "fused", "static", "merged"])
def test_per_row_generation_is_each_rows_own(artifacts, name):
    model = artifacts[name]
    choices = {"merged": ["sql", "chat", "sql"], "static": CHOICES[:3]}.get(name, CHOICES)
    ids = IDS[:len(choices)]
    got = model.generate(ids, 6, choices, stop_at_eos=False)
    for b, c in enumerate(choices):
        alone = model.generate([ids[b]], 6, c, stop_at_eos=False)
        assert got[b, -6:].tolist() == alone[0, -6:].tolist(), f"{name} row {b} ({c})"


def _count_runs(model: Model, monkeypatch) -> list[int]:
    """Count session runs (plain and with I/O binding) of every session of ``model``."""
    calls = [0]
    for layout in model._layouts.values():
        for session in getattr(layout, "buckets", {None: getattr(layout, "session", None)}).values():
            for method in ("run", "run_with_iobinding"):
                real = getattr(session, method)

                def counted(*a, _real=real, **k):
                    calls[0] += 1
                    return _real(*a, **k)
                monkeypatch.setattr(session, method, counted)
    return calls


@pytest.mark.parametrize("name", ["generic", "fused"])
def test_a_per_row_batch_is_one_run_per_step(artifacts, name, monkeypatch):
    model = artifacts[name]
    calls = _count_runs(model, monkeypatch)
    model.generate(IDS, 5, CHOICES, stop_at_eos=False)
    per_row = calls[0]
    calls[0] = 0
    model.generate(IDS, 5, "sql", stop_at_eos=False)
    assert per_row == calls[0] == 5  # prefill + 4 steps, as for one adapter on every row


def test_a_merged_artifact_runs_one_group_per_adapter(artifacts, monkeypatch):
    model = artifacts["merged"]
    calls = _count_runs(model, monkeypatch)
    got = model.logits(IDS[:3], ["sql", "chat", "sql"])
    assert calls[0] == 2
    np.testing.assert_allclose(got[1, -3:], model.logits([IDS[1]], "chat")[0], atol=1e-5)
    with pytest.raises(EdgepeftError, match="merged artifact"):
        model.logits(IDS[:2], ["sql", None])
    with pytest.raises(EdgepeftError, match="merged artifact"):
        model.logits(IDS[:2], ["sql", {"sql": 0.5, "chat": 0.5}])


SCALED = ["ia3", "dora", "chat", None, {"ia3": 1.0, "sql": 0.5}]  # IA3 and DoRA scales differ per row


@pytest.mark.parametrize("name", ["generic", "fused", "static"])
def test_ia3_and_dora_scales_vary_per_row(artifacts, name):
    """IA3 and DoRA scales are offset per row: rows on IA3, DoRA, a LoRA, the base and IA3 mixed
    with a LoRA each get what they get alone, in one call."""
    model = artifacts[name]
    choices = [c for c in SCALED if c != "dora"][:4] if name == "static" else SCALED  # static: LoRAs + IA3, batch 4
    ids = IDS[:len(choices)]
    got = model.logits(ids, choices)
    for b, want in enumerate(_alone(model, ids, choices, _logits)):
        n = len(ids[b])
        np.testing.assert_allclose(got[b, -n:], want[-n:], atol=1e-5, err_msg=f"{name} row {b} ({choices[b]})")
    # the scales really act: the IA3 row differs from the base on the same tokens
    assert np.abs(got[0, -len(ids[0]):] - model.logits([ids[0]])[0]).max() > 1e-2
    gen = model.generate(ids, 5, choices, stop_at_eos=False)
    for b, c in enumerate(choices):
        assert gen[b, -5:].tolist() == model.generate([ids[b]], 5, c, stop_at_eos=False)[0, -5:].tolist()


def test_rows_must_agree_on_what_every_row_shares(artifacts):
    model = artifacts["generic"]
    # a row's own mix is checked as in a call of its own: DoRA scales do not mix at another weight
    with pytest.raises(EdgepeftError, match=r"adapter 'dora' sets dora\..*which does not scale linearly"):
        model.logits(IDS[:2], ["chat", {"dora": 0.5}])
    ok = model.logits(IDS[:2], ["chat", {"ia3": 1.0, "dora": 1.0}])  # on different layers, they mix
    np.testing.assert_allclose(ok[1, -3:], model.logits([IDS[1]], {"ia3": 1.0, "dora": 1.0})[0], atol=1e-5)


def _as_earlier(model: Model, tmp_path, *keys: str) -> Model:
    """A copy of ``model``'s artifact whose manifest lacks ``keys``, as an earlier edgepeft wrote it
    (its graph simply has the per-row inputs unused)."""
    import json
    import shutil

    old = tmp_path / "old"
    shutil.copytree(model.path, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for k in keys:
        del manifest[k]
    (old / "manifest.json").write_text(json.dumps(manifest))
    return Model(old)


def test_an_artifact_without_per_row_scales_says_so(artifacts, tmp_path):
    """An artifact of an earlier edgepeft (no ``row_values``: its graph applies IA3 scales to
    every row) refuses rows that need different scales, naming both rows and the input."""
    model = _as_earlier(artifacts["generic"], tmp_path, "row_values")
    with pytest.raises(EdgepeftError, match=r"row 0 \(chat\) and row 1 \(ia3\) need different values of ia3_in\.model"):
        model.logits(IDS[:2], ["chat", "ia3"])
    # IA3 on every row with per-row LoRAs is fine there: the IA3 scales agree
    got = model.logits(IDS[:2], [{"ia3": 1.0, "chat": 1.0}, {"ia3": 1.0, "sql": 0.5}])
    np.testing.assert_allclose(got[1, -3:], model.logits([IDS[1]], {"ia3": 1.0, "sql": 0.5})[0], atol=1e-5)


def test_bad_per_row_requests_are_refused(artifacts):
    model = artifacts["generic"]
    with pytest.raises(EdgepeftError, match="lists 2 choices for a batch of 3 rows"):
        model.logits(IDS[:3], ["chat", "sql"])
    with pytest.raises(EdgepeftError, match="nope"):
        model.logits(IDS[:2], ["chat", "nope"])
    with pytest.raises(EdgepeftError, match="runs 4 rows per call"):
        artifacts["static"].logits(IDS, CHOICES)


def test_an_artifact_without_per_row_weights_says_so(artifacts, tmp_path):
    model = _as_earlier(artifacts["fused"], tmp_path, "rows", "row_values")  # no per-row inputs at all
    with pytest.raises(EdgepeftError, match="no per-row weights"):
        model.logits(IDS[:2], ["chat", "sql"])
    assert model.logits(IDS[:2], ["chat", "chat"]).shape[0] == 2  # one choice for all rows still works
    b = model.batcher(capacity=3, context=24)  # and rows alike still batch
    rows = [b.join(IDS[0], "chat", 3, stop_at_eos=False), b.join(IDS[1], "chat", 3, stop_at_eos=False)]
    assert not b.fits("sql")  # rows that differ wait
    while b.rows:
        b.step()
    assert rows[1].tokens == model.generate([IDS[1]], 3, "chat", stop_at_eos=False)[0, -3:].tolist()


@pytest.mark.parametrize("arch", ["bert", "roberta"])  # a one-layer head; a two-layer one (dense, out_proj)
def test_classifier_rows_run_their_own_heads(tmp_path, arch):
    """Each PEFT classifier adapter carries its own head; in one call each row runs its own
    (the head inputs fed zeros, each row's head as its offsets): each row equals itself alone."""
    base = make_encoder(arch, tmp_path / "base")
    ads = {k: make_adapter(base, tmp_path / k, kind, seed=i, task="SEQ_CLS")
           for i, (k, kind) in enumerate((("a", "lora"), ("b", "lora"), ("c", "ia3")))}
    export(ExportConfig(graph="generic", base=base, out=tmp_path / "out", adapters=tuple(ads.items())), quiet=True)
    model = Model(tmp_path / "out")
    ids = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    choices = ["a", "b", "c"]
    got = model.classify_logits(ids, choices)
    for b, c in enumerate(choices):
        np.testing.assert_allclose(got[b], model.classify_logits([ids[b]], c)[0], atol=1e-5, err_msg=f"row {b} ({c})")
    assert np.abs(got[0] - model.classify_logits([ids[0]], "b")[0]).max() > 1e-3  # the heads differ
    np.testing.assert_array_equal(model.classify_logits(ids[:2], ["a", "a"]), model.classify_logits(ids[:2], "a"))
    np.testing.assert_array_equal(model.classify_logits(ids[0], ["b"]), model.classify_logits([ids[0]], "b"))  # one row
    with pytest.raises(EdgepeftError, match="lists 3 choices for a batch of 2 rows"):
        model.classify_logits(ids[:2], ["a", "a", "b"])


def test_validate_checks_a_per_row_batch(artifacts, llama_base, monkeypatch):
    """validate's per-row case compares each row with its own choice's PyTorch reference, and
    fails when the rows get another row's adapter."""
    import edgepeft.runtime.adapters as adapters_module
    from edgepeft.validate import validate

    path = artifacts["fused"].path
    report = validate(path, llama_base, max_new_tokens=4, report=path.parent / "fused-report.json", quiet=True)
    case = report["cases"][-1]
    assert case["case"].startswith("per-row(base|") and not case["failures"], case
    assert all(f"|{n}|" in case["case"] for n in ("chat", "sql", "code", "ia3", "dora")), case["case"]
    assert case["positions"] == report["cases"][0]["positions"], "the per-row case compares every row, as a single case"
    real = adapters_module.row_weights

    def every_row_everything(*a, **k):  # rows weights all ones: each row runs every adapter
        return {n: np.ones_like(v) for n, v in real(*a, **k).items()}

    monkeypatch.setattr(adapters_module, "row_weights", every_row_everything)
    report = validate(path, llama_base, max_new_tokens=4, report=path.parent / "bad-report.json", quiet=True)
    assert report["cases"][-1]["failures"] and not report["passed"]


# ---------------------------------------------------------------- rows joining and leaving
def _run_joining(model: Model, prompts, choices, new: int, **kw):
    """Rows join one per step (the first two together); each keeps its own length."""
    b = model.batcher(**kw)
    rows = [b.join(prompts[0], choices[0], new, stop_at_eos=False)]
    for p, c in zip(prompts[1:], choices[1:]):
        rows.append(b.join(p, c, new, stop_at_eos=False))
        b.step()
    while b.rows:
        b.step()
    return b, rows


@pytest.mark.parametrize("name", ["generic", "fused"])
def test_rows_joining_mid_generation_are_each_rows_own(artifacts, name, monkeypatch):
    """Rows that join a running batch (and leave at different steps) get what each gets alone:
    the same greedy tokens, and their last logits within 1e-5 of a full-sequence run; after the
    prefills, one session run per step serves every row."""
    model = artifacts[name]
    news = [6, 3, 5, 2, 4]  # rows leave at different steps
    b = model.batcher(capacity=4, context=40)
    calls = _count_runs(model, monkeypatch)
    rows, steps = [], 0
    choices = ["chat", "ia3", None, {"code": 0.5, "chat": 1.0}, "dora"]  # LoRAs and per-row scales
    for p, c, n in zip(IDS, choices, news):
        while not b.fits(c):  # the fifth waits for a free row
            b.step()
            steps += 1
        rows.append(b.join(p, c, n, stop_at_eos=False))
        b.step()
        steps += 1
    while b.rows:
        b.step()
        steps += 1
    assert calls[0] == len(IDS) + b.runs and b.runs <= steps  # one run per prefill, one per step
    for b_, (row, p, c, n) in enumerate(zip(rows, IDS, choices, news)):
        alone = model.generate([p], n, c, stop_at_eos=False)[0, len(p):].tolist()
        assert row.tokens == alone and row.finish == "length", f"{name} row {b_} ({c})"
        full = model.logits([p + row.tokens[:-1]], c)[0, -1]
        np.testing.assert_allclose(row.logits, full, atol=1e-5, err_msg=f"{name} row {b_} ({c})")


@pytest.mark.parametrize("name", ["static", "merged"])
def test_a_batcher_on_fixed_shapes_or_merged_graphs_runs_one_row_at_a_time(artifacts, name):
    model = artifacts[name]
    choices = ["sql", "chat"]
    b, rows = _run_joining(model, IDS[:1], choices[:1], 4, capacity=4, context=32)
    assert b.serial and b.capacity == 1
    assert rows[0].tokens == model.generate([IDS[0]], 4, "sql", stop_at_eos=False)[0, len(IDS[0]):].tolist()
    b.join(IDS[1], "chat", 3, stop_at_eos=False)
    assert not b.fits("sql")  # one at a time: the next waits
    with pytest.raises(EdgepeftError, match="batch is full"):
        b.join(IDS[2], "sql", 3)


def test_a_batcher_refuses_what_cannot_share_a_call(artifacts):
    model = artifacts["generic"]
    b = model.batcher(capacity=2, context=16)
    b.join(IDS[0], "chat", 3)
    assert b.fits("ia3") and b.fits("dora") and b.fits("sql")  # scales are offset per row
    with pytest.raises(EdgepeftError, match="nope"):
        b.fits("nope")
    with pytest.raises(EdgepeftError, match="exceed the 16 tokens a row holds"):
        b.join(list(range(3, 15)), "sql", 8)
    with pytest.raises(EdgepeftError, match="non-empty list of token ids"):
        b.join([], "sql", 2)


def test_a_running_batch_keeps_one_concatenation_alive(artifacts):
    """Rows with a new adapter joining build the next concatenation of the batch's adapters; the
    previous one is freed (neither the mix cache nor the layout holds it)."""
    import gc
    import weakref

    model = artifacts["fused"]
    b = model.batcher(capacity=3, context=24)
    b.join(IDS[0], "chat", 6, stop_at_eos=False)
    b.join(IDS[1], "sql", 6, stop_at_eos=False)
    b.step()
    first = [weakref.ref(v) for k, v in b._last[1][0].items() if not k.endswith(".rows") and v.size > 1]
    assert first  # the chat + sql concatenation
    b.join(IDS[2], "code", 6, stop_at_eos=False)
    b.step()
    gc.collect()
    assert all(r() is None for r in first)
    while b.rows:
        b.step()
