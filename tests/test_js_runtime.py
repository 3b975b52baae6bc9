"""The TypeScript runtime (runtimes/js) against the Python runtime on the same artifacts.

Tiny artifacts are exported here (a LoRA / prefix / bottleneck / IA3 side artifact in fp32 and in
int8 with fp16 adapter files, a merged artifact, an encoder classifier (traced and fused), a static-shape artifact
with LoRAs of ranks 4 / 8 / 2, a LoHa + LoRA artifact, a VeRA artifact whose shared projections are
graph defaults; fused-layout artifacts: fp32 side, int4 side with the fast options, merged), the
Python runtime's
outputs on fixed inputs are written to a cases dir, and ``node --test`` runs
``runtimes/js/test/parity.test.mjs`` on them: logits within 1e-5 (fp32), greedy ids and texts
identical, classify labels identical, and the refusals (tampered file, other format version,
unknown adapter; on the static artifact: KV window overflow and a mix above max_rank; on the VeRA
artifact: one adapter's projections replacing those another relies on). Fused artifacts run both
ways the JS runtime has (KV buffer written in place: onnxruntime-node; present fed back as past:
the core with a plain ort, as onnxruntime-web does), and an adapter swapped on a running KV buffer
gives Python's next-step logits.

Per-row adapters and continuous batching (no export of their own: the artifacts above): a list of
choices, one per row, on the traced, fused and static artifacts (JS logits within the tolerance
of Python's per-row logits, greedy ids equal, one session run per step), the refusals of rows that
cannot share a call (their prefixes or bottlenecks differ, too many rows for a
fixed batch, ranks above max_rank); per-row classification heads (each row its adapter's head, on
the traced and static classifiers) and ``mix.row_weights``'s feeds and refusal of a row on the base
head beside rows on their adapters' heads; and a ``Model.batcher`` schedule of rows joining at different steps with
different adapters (each row's tokens equal to Python's ``generate`` of that row alone, Python's
number of decode runs, one session run per step), serial on the static and merged artifacts.

Adapter packs (``_pack_cases``: no export of their own, ``edgepeft adapter`` commands on copies of
the artifacts above): ``Model.addAdapter`` of signed packs (``edgepeft keygen``, ``edgepeft adapter
pack --sign``) gives Python's logits for the adapter, alone and mixed, fp32 and fp16 arrays; a newer
version replaces a loaded one (a call already running keeps the old one), ``removeAdapter``; and
every refusal (array byte, header text, unsigned, untrusted or revoked key, another base, another
slot schema, same or older version, a manifest without ``slot_schema``) leaves the model as it was,
with Python's message.

Needs the package built: ``(cd runtimes/js && npm ci && npm run build)``; without it the test
fails (it does not skip), so CI cannot pass without running the JS side.

Run the builder alone (for JS development): ``python tests/test_js_runtime.py OUT_DIR``.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from helpers import make_adapter, make_base, make_bottleneck, make_encoder, make_family_base, make_lora  # noqa: E402
# the static-shape target: batch 2, buckets 1 / 4, a 24-slot KV window, max_rank 10 (chat q_proj
# rank 4 + sql 8 overflow it; chat + code fit)
from test_targets import SMALL_NPU  # noqa: E402

JS = Path(__file__).resolve().parents[1] / "runtimes" / "js"
PARITY = JS / "test" / "parity.test.mjs"
BUILD_HINT = "run `(cd runtimes/js && npm ci && npm run build)` first"
# int8 graphs: onnxruntime 1.32 (Python) and 1.30 (node) may pick other integer kernels; the max
# |diff| observed on these artifacts is reported by the node test (see its output).
INT8_TOL = 1e-4
# fused graphs: GroupQueryAttention / MatMulNBits of onnxruntime 1.32 (Python) and 1.30 (node)
FUSED_TOL = 1e-4
INT4_TOL = 1e-4
FAST_INT4 = dict(precision="int4", accuracy_level=4, head_bits=8)


def _f32(a) -> str:
    """Little-endian float32 bytes of ``a`` as base64 (exact, compact)."""
    return base64.b64encode(np.ascontiguousarray(a, dtype="<f4").tobytes()).decode()


def _lm_cases(path: Path, choices: list, tol: float, text: bool = True) -> dict:
    from edgepeft.runtime import Model

    m = Model(path)
    ragged = [[5, 9, 11, 40, 3, 7], [30, 31, 32]]  # left-padded by both runtimes
    rect = [[12, 13, 14, 15], [60, 61, 62, 63]]
    logits, gens, texts = [], [], []
    for choice in choices:
        for ids in (ragged, rect):
            out = m.logits(ids, adapter=choice)
            logits.append({"adapter": choice, "ids": ids, "dims": list(out.shape), "data": _f32(out)})
        gens.append({"adapter": choice, "ids": ragged, "max_new_tokens": 6,
                     "out": m.generate(ragged, max_new_tokens=6, adapter=choice).tolist()})
        if text:
            prompt = "w5 w9 w11 w40"
            texts.append({"adapter": choice, "prompt": prompt, "max_new_tokens": 5,
                          "out": m.generate_text(prompt, max_new_tokens=5, adapter=choice)})
    # a mask given explicitly (right padding) on the first choice
    mask = [[1, 1, 1, 1], [1, 1, 0, 0]]
    out = m.logits(np.array(rect), adapter=choices[0], attention_mask=np.array(mask))
    logits.append({"adapter": choices[0], "ids": rect, "mask": mask, "dims": list(out.shape), "data": _f32(out)})
    return {"dir": str(path), "task": "causal-lm", "tol": tol, "adapters": m.adapters,
            "logits": logits, "generate": gens, "generate_text": texts}


def _static_cases(root: Path, base: Path, ads: dict) -> dict:
    """A static-shape artifact (fp32): logits of a ragged batch (3 rows: 2 row groups; 9 tokens:
    chunks 4 + 4 + 1), greedy ids, and the two refusals (KV window overflow, mix above max_rank)."""
    from edgepeft.export import ExportConfig, export
    from edgepeft.runtime import Model
    from edgepeft.targets import load_target

    (root / "small-npu.toml").write_text(SMALL_NPU)
    out = root / "static"
    export(ExportConfig(graph="generic", base=base, out=out, adapters=tuple(ads.items()),
                        target=load_target(root / "small-npu.toml")), quiet=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = Model(out)
    rows = [[5, 9, 11, 40, 3, 7, 8, 20, 21], [30, 31, 32], [60, 61, 62, 63, 64, 65]]
    logits, gens = [], []
    for choice in (None, "chat", "sql", {"chat": 0.6, "code": 0.4}):
        out_ = m.logits(rows, adapter=choice)
        logits.append({"adapter": choice, "ids": rows, "dims": list(out_.shape), "data": _f32(out_)})
        gens.append({"adapter": choice, "ids": rows, "max_new_tokens": 5,
                     "out": m.generate(rows, max_new_tokens=5, adapter=choice).tolist()})
    refusals = _refusals(m, out, [
        {"method": "generate", "ids": [list(range(3, 12))], "max_new_tokens": 20, "adapter": "chat"},
        {"method": "logits", "ids": [[5, 6, 7]], "adapter": {"chat": 0.5, "sql": 0.5}},
        # per-row: more rows than the fixed batch of 2; chat + sql ranks (4 + 8) above max_rank 10
        {"method": "logits", "ids": PER_ROW_IDS[:3], "adapter": ["chat", "code", None]},
        {"method": "logits", "ids": PER_ROW_IDS[:2], "adapter": ["chat", "sql"]}])
    return {"dir": str(out), "task": "causal-lm", "tol": 1e-5, "adapters": m.adapters, "logits": logits,
            "generate": gens, "refusals": refusals,
            "per_row": _per_row_cases(out, [["chat", {"chat": 0.6, "code": 0.4}], [None, "code"]]),
            "batcher": _batcher_case(out, ["chat", "code"], [4, 3], 4, 20)}


def _refusals(m, out: Path, calls: list[dict]) -> list[dict]:
    """Python's message for each call, which must be refused (the JS test expects the same)."""
    from edgepeft.errors import EdgepeftError

    refusals = []
    for call in calls:
        try:
            if call["method"] == "generate":
                m.generate(call["ids"], max_new_tokens=call["max_new_tokens"], adapter=call["adapter"])
            elif call["method"] == "classify":
                m.classify_logits(call["ids"], adapter=call["adapter"])
            else:
                m.logits(call["ids"], adapter=call["adapter"])
        except EdgepeftError as e:
            refusals.append({**call, "message": str(e).replace(str(out), "<dir>")})
    assert len(refusals) == len(calls), refusals
    return refusals


PER_ROW_IDS = [[5, 9, 11, 40, 3, 7], [30, 31, 32], [12, 13, 14, 15], [60, 61]]
PROMPTS = [[5, 9, 11, 40], [30, 31, 32], [12, 13, 14, 15, 16], [60, 61], [7, 8, 9], [20, 21, 22, 23]]


def _per_row_cases(path: Path, lists: list[list], new: int = 5) -> list[dict]:
    """Python's per-row logits and greedy ids (EOS ignored, so every step runs) of each list of
    choices, one per row of ``PER_ROW_IDS``."""
    m, cases = _model(path), []
    for choices in lists:
        ids = PER_ROW_IDS[:len(choices)]
        out = m.logits(ids, adapter=choices)
        cases.append({"adapter": choices, "ids": ids, "dims": list(out.shape), "data": _f32(out),
                      "max_new_tokens": new,
                      "out": m.generate(ids, new, choices, stop_at_eos=False).tolist()})
    return cases


def _model(path: Path):
    from edgepeft.runtime import Model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # static targets: NNAPI is not in this onnxruntime build
        return Model(path)


def _batcher_case(path: Path, choices: list, news: list[int], capacity: int, context: int) -> dict:
    """Rows joining a running ``Model.batcher`` one per step (each waiting while it does not fit),
    then decoding to their length: Python's number of decode runs, each row's last logits, and
    what each row gives alone (``generate``), which the JS batcher's rows must equal."""
    m = _model(path)
    b = m.batcher(capacity=capacity, context=context)
    rows = []
    for p, c, n in zip(PROMPTS, choices, news):
        while not b.fits(c):
            b.step()
        rows.append(b.join(p, c, n, stop_at_eos=False))
        b.step()
    while b.rows:
        b.step()
    alone = [m.generate([p], n, c, stop_at_eos=False)[0, len(p):].tolist() for p, c, n in zip(PROMPTS, choices, news)]
    return {"prompts": PROMPTS[:len(choices)], "choices": choices, "news": news, "capacity": capacity,
            "context": context, "serial": b.serial, "runs": b.runs, "tokens": alone,
            "python_tokens": [r.tokens for r in rows], "logits": [_f32(r.logits) for r in rows]}


def _swap_case(path: Path) -> dict:
    """Python's next-step logits when the adapter changes on a running KV buffer of a fused graph:
    a prompt with ``sql``, then one token each with ``chat``, the base, ``code`` and a mix."""
    from edgepeft.runtime import Model, fused

    m = Model(path)
    lay = m._layouts[None]
    ids, lengths = [[5, 9, 17, 33, 4]], np.array([5])
    kv = fused.Cache(lay.session, lay.cache, 1, 10)
    kv.bind_adapter(lay.values(m._store.feeds("sql")[0]))
    kv.run(np.array(ids), lengths)
    steps = []
    for choice in ("chat", None, "code", {"chat": 0.7, "sql": 0.3}):
        kv.bind_adapter(lay.values(m._store.feeds(choice)[0]))
        lengths = lengths + 1
        out = kv.run(np.array([[7]]), lengths)  # (1, 1, V)
        steps.append({"adapter": choice, "ids": [[7]], "lengths": lengths.tolist(), "dims": list(out.shape),
                      "data": _f32(out)})
    return {"first": "sql", "ids": ids, "lengths": [5], "slots": 10, "steps": steps}


def _per_row_side(side: Path) -> dict:
    """The traced side artifact's per-row cases: LoRAs, the base and a mix per row; a bottleneck
    every row shares; IA3 on one row (a case where the graph offsets IA3 scales per row, a refusal
    where it does not); the refusals of rows that cannot share a call."""
    from edgepeft.errors import EdgepeftError

    lists = [["chat", "sql", None, {"chat": 0.5, "sql": 0.5}],
             [{"houlsby": 0.25, "chat": 1.0}, {"houlsby": 0.25, "sql": 0.5}, {"houlsby": 0.25}]]
    calls = [{"method": "logits", "ids": PER_ROW_IDS[:2], "adapter": ["prefix", "chat"]},  # KV-cache seeds
             {"method": "logits", "ids": PER_ROW_IDS[:2], "adapter": [{"houlsby": 0.5}, "houlsby"]},  # bottlenecks
             {"method": "generate", "ids": PER_ROW_IDS[:2], "max_new_tokens": 3, "adapter": ["chat", {"prefix": 0.5}]},
             {"method": "logits", "ids": PER_ROW_IDS[:3], "adapter": ["chat", "sql"]}]  # one per row
    m = _model(side)
    try:  # IA3 per row: an artifact with per-row offsets runs it, an older graph refuses it
        m.logits(PER_ROW_IDS[:2], adapter=["ia3", "chat"])
        lists.append(["ia3", "chat"])
    except EdgepeftError:
        calls.append({"method": "logits", "ids": PER_ROW_IDS[:2], "adapter": ["ia3", "chat"]})
    return {"per_row": _per_row_cases(side, lists), "refusals": _refusals(m, side, calls),
            "batcher": _batcher_case(side, ["chat", "sql", None, {"chat": 0.5, "sql": 0.5}, "ia3", "prefix"],
                                     [6, 3, 5, 2, 4, 3], 3, 40)}


def _row_weights_cases(m) -> list[dict]:
    """``mix.row_weights`` on the classifier's adapters for lists of row keys: each per-row feed
    (the head offsets ``(B, out, in)`` / ``(B, 1, out)``, the head inputs fed zeros, IA3 offsets
    and LoRA weights), or the refusal of a row that runs the base's head beside rows with their
    adapters' (a classify call refuses such rows earlier when the base head is untrained, as here)."""
    from edgepeft.errors import EdgepeftError
    from edgepeft.runtime.mix import row_weights

    from types import SimpleNamespace

    rows, values = m.manifest.get("rows", {}), m.manifest.get("row_values", {})
    out = []
    # drop_heads: adapters given without their head arrays (as an adapter without a head is)
    for keys, drop in (([[["lora", 1.0]], [["ia3", 1.0]], [["lora", 1.0]]], []), ([[["ia3", 1.0]], []], []),
                       ([[["ia3", 1.0]], [["bottleneck", 1.0], ["lora", 0.5]]], ["bottleneck", "lora"])):
        loaded = {n: SimpleNamespace(graph={k: v for k, v in a.graph.items() if not k.startswith("head.")})
                  if n in drop else a for n, a in m._store._loaded.items()}
        names = sorted({n for k in keys for n, _ in k})
        case = {"keys": keys, "names": names, "drop_heads": drop}
        try:
            feeds = row_weights([tuple(map(tuple, k)) for k in keys], names, loaded, rows, values)
            case["feeds"] = {k: {"dims": list(v.shape), "data": _f32(v)} for k, v in feeds.items()}
        except EdgepeftError as e:
            case["message"] = str(e)
        out.append(case)
    assert sum("message" in c for c in out) == 2, out
    return out


def _fused_cases(root: Path, base: Path, ads: dict) -> dict:
    """Fused-layout artifacts (``--graph fused``): fp32 side with three LoRAs (q/v; all-linear
    rsLoRA with a rank pattern; k/up on one layer), int4 side with the fast options, merged."""
    from edgepeft.export import ExportConfig, export
    from edgepeft.quantize import QuantConfig

    side, int4, merged = root / "fused", root / "fused-int4", root / "fused-merged"
    export(ExportConfig(base=base, out=side, adapters=tuple(ads.items()), graph="fused"), quiet=True)
    export(ExportConfig(base=base, out=int4, adapters=tuple(ads.items()), graph="fused",
                        quant=QuantConfig(**FAST_INT4)), quiet=True)
    export(ExportConfig(base=base, out=merged, adapters=(("sql", ads["sql"]),), mode="merged", graph="fused"),
           quiet=True)
    mix = {"chat": 0.7, "sql": 0.3}
    cases = {"fused": _lm_cases(side, [None, "chat", "sql", "code", mix, {"chat": 0.5, "sql": 0.25, "code": 1.5}],
                                FUSED_TOL),
             "fused-int4": _lm_cases(int4, [None, "sql", mix], INT4_TOL, text=False),
             "fused-merged": _lm_cases(merged, ["sql"], FUSED_TOL, text=False)}
    for arch in ("gemma3_text", "gemma2"):  # q/k norm, FastGelu, windows, sandwich norms, soft caps
        fam = make_family_base(arch, root / arch / "base")
        lora = make_lora(fam, root / arch / "lora", r=4, target_modules="all-linear")
        export(ExportConfig(base=fam, out=root / arch / "fused", adapters=(("a", lora),), graph="fused"), quiet=True)
        cases[f"fused-{arch}"] = _lm_cases(root / arch / "fused", [None, "a"], FUSED_TOL, text=False)
    for case in cases.values():
        case["fused"] = True
    cases["fused"]["swap"] = _swap_case(side)
    from edgepeft.runtime import Model

    cases["fused"]["refusals"] = _refusals(Model(side), side, [  # past the 128 rotary positions
        {"method": "generate", "ids": [[3 + i % 90 for i in range(120)]], "max_new_tokens": 10, "adapter": "chat"},
        {"method": "logits", "ids": [[5] * 130], "adapter": None}])
    cases["fused"]["per_row"] = _per_row_cases(side, [["chat", "sql", None, {"chat": 0.5, "sql": 0.5}],
                                                      ["code", {"sql": -0.7, "chat": 1.0}, "sql"]])
    cases["fused"]["batcher"] = _batcher_case(side, ["chat", "sql", None, {"chat": 0.5, "sql": 0.5}, "code"],
                                              [6, 3, 5, 2, 4], 3, 40)
    return cases


def _vera_cases(root: Path, base: Path, lora: Path) -> dict:
    """A VeRA side artifact: two adapters with the graph's projections (lambdas-only files), one
    with its own (other targets and rank, zero-padded), a LoRA; swaps, a VeRA + LoRA sum, and the
    refusal of a mix whose own projections would replace another adapter's defaults."""
    from edgepeft.export import ExportConfig, export
    from edgepeft.runtime import Model

    targets = ["q_proj", "v_proj", "down_proj"]
    ads = {"v1": make_adapter(base, root / "v1", "vera", seed=1, target_modules=targets),
           "v1b": make_adapter(base, root / "v1b", "vera", seed=2, target_modules=targets),
           "v2": make_adapter(base, root / "v2", "vera", seed=3, r=4, target_modules=["k_proj", "o_proj", "up_proj"]),
           "chat": lora}
    out = root / "vera"
    export(ExportConfig(graph="generic", base=base, out=out, adapters=tuple(ads.items())), quiet=True)
    cases = _lm_cases(out, [None, "v1", "v2", "v1b", {"v1": 1.0, "chat": 0.5}], 1e-5, text=False)
    cases["refusals"] = _refusals(Model(out), out, [
        {"method": "logits", "ids": [[5, 6, 7]], "adapter": {"v1": 1.0, "v2": 1.0}}])
    return cases


def _sampling_cases(side: Path, fused_dir: str) -> dict:
    """Decoding options (issue 21): the next-token rules on fixed logits (JS must compute Python's
    processed logits), stop strings, stop token ids and the refusals of bad options on two
    artifacts (traced and fused), greedy so the texts are Python's exactly."""
    from edgepeft.errors import EdgepeftError
    from edgepeft.runtime import Model
    from edgepeft.runtime.decode import Sampling

    rng = np.random.default_rng(5)
    logits = (rng.standard_normal((4, 40)) * 3).astype(np.float32)
    seen = rng.integers(0, 40, (4, 5))
    rules = []
    for opts in (dict(temperature=0.7), dict(temperature=1.0, top_k=5), dict(temperature=1.3, top_p=0.8),
                 dict(temperature=0.9, top_k=20, top_p=0.5), dict(repetition_penalty=1.3),
                 dict(temperature=0.8, repetition_penalty=0.7, top_k=7, top_p=0.9)):
        got = Sampling(**opts).processed(logits, list(seen))
        rules.append({"opts": opts, "logits": _f32(logits), "seen": seen.tolist(), "dims": list(logits.shape),
                      "want": _f32(np.where(np.isinf(got), -1e30, got))})
    texts = []
    for path in (side, Path(fused_dir)):
        m = Model(path)
        prompt = "w3 w7 w11 w5"
        full = m.generate_text(prompt, max_new_tokens=12, adapter="sql")
        stop = " " + full.split()[3]
        ids = m.tokenizer.encode(prompt).ids
        tok = int(m.generate([ids], max_new_tokens=12, adapter="sql")[0, len(ids) + 2])
        texts.append({"dir": str(path), "prompt": prompt, "adapter": "sql", "max_new_tokens": 12, "full": full,
                      "stop": [stop, "never"], "stopped": m.generate_text(prompt, 12, "sql", stop=[stop, "never"]),
                      "ids": [ids], "stop_token_ids": [tok],
                      "cut": m.generate([ids], 12, "sql", stop_token_ids=[tok]).tolist()})
    refusals = []
    for opts in (dict(temperature=-1), dict(top_k=-2), dict(top_p=1.5), dict(repetition_penalty=0), dict(seed=-1)):
        try:
            Sampling(**opts)
        except EdgepeftError as e:
            refusals.append({"opts": opts, "message": str(e)})
    assert len(refusals) == 5
    return {"rules": rules, "texts": texts, "refusals": refusals}


def _pack_cases(root: Path, fused: Path, int8: Path, side: Path, merged: Path, other_base: Path, code: Path) -> dict:
    """Adapter packs for ``Model.addAdapter`` (no export: ``edgepeft adapter`` commands on copies).

    ``shipped``: the fused artifact less ``sql`` (the app as shipped, with a slot schema); packs of
    ``sql`` from the fused artifact (version 1: signed by the trusted key, by another key, unsigned;
    a byte of an array flipped; its header text edited), from a copy where ``sql`` was added again
    from other weights (version 2), of ``chat`` (version 1: replaces the shipped one), from an
    artifact of another base and from the traced artifact (another slot schema); ``sql`` from the
    int8 artifact (fp16 arrays) for a copy of it less ``sql``. Python's logits after each load and
    Python's message for each refusal (the JS runtime names the pack by the same path)."""
    from edgepeft.cli import main
    from edgepeft.contract import packs
    from edgepeft.errors import EdgepeftError
    from edgepeft.runtime import Model

    d = root / "packs"
    d.mkdir()
    for k in ("good", "other"):
        packs.generate_key(d / k)
    keys = {k: (d / f"{k}.pub").read_text().strip() for k in ("good", "other")}
    shipped, server, shipped8 = d / "shipped", d / "server", d / "shipped-int8"
    shutil.copytree(fused, shipped)
    shutil.copytree(int8, shipped8)
    assert main(["adapter", "remove", str(shipped), "sql"]) == 0
    assert main(["adapter", "remove", str(shipped8), "sql"]) == 0
    shutil.copytree(shipped, server)  # sql again, from other weights: its version 2
    assert main(["adapter", "add", str(server), "--adapter", f"sql={code}", "--quiet"]) == 0

    def pack(art: Path, name: str, out: str, version: int = 1, key: str | None = "good") -> str:
        f = d / f"{out}.edgepeft-pack"
        assert main(["adapter", "pack", str(art), name, "--out", str(f), "--version", str(version)]
                    + (["--sign", str(d / key)] if key else [])) == 0
        return str(f)

    def tampered(src: str, out: str, *, header=None, array_byte=False) -> str:
        data = bytearray(Path(src).read_bytes())
        n = int.from_bytes(data[:8], "little")
        if header is not None:  # the pack text edited, its signature kept
            head = json.loads(data[8:8 + n])
            head["__metadata__"]["pack"] = header(head["__metadata__"]["pack"])
            text = json.dumps(head).encode()
            data = bytearray(len(text).to_bytes(8, "little")) + text + data[8 + n:]
        if array_byte:
            data[-3] ^= 0x40
        f = d / f"{out}.edgepeft-pack"
        f.write_bytes(bytes(data))
        return str(f)

    v1, v2 = pack(fused, "sql", "sql-v1"), pack(server, "sql", "sql-v2", 2)
    files = {"v1": v1, "v2": v2, "chat_v1": pack(fused, "chat", "chat-v1"), "int8": pack(int8, "sql", "sql-int8"),
             "unsigned": pack(fused, "sql", "sql-unsigned", key=None)}
    refused = {  # refused in the state where v1 is loaded
        "array byte": tampered(v1, "array-byte", array_byte=True),
        "header text": tampered(v1, "header", header=lambda t: t.replace('"version":1', '"version":9')),
        "unsigned": files["unsigned"],
        "untrusted key": pack(fused, "sql", "sql-other-key", key="other"),
        "another base": pack(other_base, "a", "other-base"),
        "another slot schema": pack(side, "sql", "traced"),
        "same version": v1}
    junk = d / "junk.edgepeft-pack"
    junk.write_bytes(b"\x00" * 40)
    files["junk"] = str(junk)
    ids = [[5, 9, 11, 40, 3, 7], [30, 31, 32]]
    mix = {"chat": 0.5, "sql": 0.5}

    def logits(m, choice) -> dict:
        out = m.logits(ids, adapter=choice)
        return {"dims": list(out.shape), "data": _f32(out)}

    def message(m, path: str) -> str:
        try:
            m.add_adapter(path)
        except EdgepeftError as e:
            return str(e).replace("remove_adapter", "removeAdapter")
        raise AssertionError(f"{path} was not refused")

    m = Model(shipped, trusted_keys=[keys["good"]])
    shipped_adapters = m.adapters
    assert m.add_adapter(v1) == "sql"
    want = {"v1": logits(m, "sql"), "v1_mix": logits(m, mix)}
    messages = {case: message(m, path) for case, path in refused.items()}
    assert m.add_adapter(v2) == "sql"
    want.update(v2=logits(m, "sql"), v2_mix=logits(m, mix))
    messages["older version"] = message(m, v1)
    assert m.add_adapter(files["chat_v1"]) == "chat"
    want["chat"] = logits(m, "chat")
    good_id = packs.key_id(packs.public_key(keys["good"]))
    for revoked in (good_id, keys["good"]):
        messages[f"revoked {revoked[:7]}"] = message(Model(shipped, trusted_keys=[keys["good"]], revoked=[revoked]), v1)
    try:
        Model(shipped, trusted_keys=["ed25519:AAAA"])
    except EdgepeftError as e:
        messages["bad key"] = str(e)
    m8 = Model(shipped8, trusted_keys=[keys["good"]])
    assert m8.add_adapter(files["int8"]) == "sql"
    want["int8"] = logits(m8, "sql")
    return {"shipped": str(shipped), "shipped_int8": str(shipped8), "shipped_adapters": shipped_adapters,
            "keys": keys, "key_files": {k: str(d / f"{k}.pub") for k in keys}, "good_id": good_id, "files": files,
            "refused": refused, "messages": messages, "ids": ids, "mix": mix, "want": want,
            "tol": FUSED_TOL, "int8_tol": INT8_TOL, "merged": str(merged),
            "constants": {"format": packs.PACK_FORMAT, "version": packs.PACK_VERSION, "suffix": packs.PACK_SUFFIX,
                          "max_bytes": packs.MAX_PACK_BYTES, "key_prefix": packs.KEY_PREFIX}}


def build_cases(root: Path) -> Path:
    """Export the tiny artifacts under ``root`` and write ``root/cases.json``."""
    from edgepeft.export import ExportConfig, export
    from edgepeft.quantize import QuantConfig
    from edgepeft.runtime import Model

    root.mkdir(parents=True, exist_ok=True)
    base = make_base("llama", root / "base", tokenizer=True)
    ads = {
        "chat": make_lora(base, root / "chat", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "sql": make_lora(base, root / "sql", seed=2, r=8, lora_alpha=16, use_rslora=True,
                         target_modules="all-linear", rank_pattern={"o_proj": 2}),
        "prefix": make_adapter(base, root / "prefix", "prefix", seed=3),
        "houlsby": make_bottleneck(base, root / "houlsby"),
        "ia3": make_adapter(base, root / "ia3", "ia3", seed=4),
    }
    code = make_lora(base, root / "code", seed=3, r=2, lora_alpha=3, target_modules=["k_proj", "up_proj"],
                     layers_to_transform=[1])
    side, int8, merged = root / "side", root / "int8", root / "merged"
    export(ExportConfig(graph="generic", base=base, out=side, adapters=tuple(ads.items())), quiet=True)
    export(ExportConfig(graph="generic", base=base, out=int8, adapters=tuple(ads.items()),
                        quant=QuantConfig(precision="int8", int8_scheme="dynamic", adapter_precision="fp16")),
           quiet=True)
    export(ExportConfig(graph="generic", base=base, out=merged, adapters=(("chat", ads["chat"]),), mode="merged"), quiet=True)
    choices = [None, "chat", "sql", "prefix", "houlsby", "ia3", {"chat": 0.7, "sql": 0.3},
               {"chat": 0.5, "houlsby": 0.25}, {"chat": 1.0, "prefix": 1.0}]
    artifacts = {"side": _lm_cases(side, choices, 1e-5),
                 "int8": _lm_cases(int8, [None, "chat", "prefix", "houlsby", {"chat": 0.7, "sql": 0.3}],
                                   INT8_TOL),
                 "merged": _lm_cases(merged, ["chat"], 1e-5)}
    artifacts["side"].update(_per_row_side(side))
    artifacts["merged"]["batcher"] = _batcher_case(merged, ["chat", "chat"], [4, 3], 4, 20)

    # an encoder classifier with a LoRA, a bottleneck and an IA3 adapter (each with its own head)
    enc = make_encoder("bert", root / "bert")
    cls_ads = {"lora": make_adapter(enc, root / "cls-lora", "lora", seed=1, task="SEQ_CLS"),
               "bottleneck": make_bottleneck(enc, root / "cls-bottleneck", task="SEQ_CLS", heads=["classifier"],
                                             seed=7),
               "ia3": make_adapter(enc, root / "cls-ia3", "ia3", seed=3, task="SEQ_CLS")}
    cls = root / "cls"
    export(ExportConfig(graph="generic", base=enc, out=cls, adapters=tuple(cls_ads.items())), quiet=True)
    m = Model(cls)
    texts = ["w5 w9 w11", "w40 w41 w42 w43 w44 w45 w46", "w7"]
    ids = [[5, 9, 11], [40, 41, 42, 43, 44]]
    cases = []
    for choice in ("lora", "bottleneck", {"bottleneck": 1.0}):
        for inp in (texts, ids):
            lg = m.classify_logits(inp, adapter=choice)
            probs = m.classify(inp, adapter=choice)
            cases.append({"adapter": choice, "input": inp, "dims": list(lg.shape), "logits": _f32(lg),
                          "probs": _f32(probs), "labels": lg.argmax(-1).tolist()})
    # a list, one per row: the per-row path, the rows' heads alike, or each row its adapter's own
    # head (and IA3 scales) through the graph's per-row offsets
    for per_row, inp in ((["lora", {"lora": 1.0}], ids), (["lora", "ia3"], ids), (["ia3", "lora", "ia3"], texts)):
        lg = m.classify_logits(inp, adapter=per_row)
        cases.append({"adapter": per_row, "input": inp, "dims": list(lg.shape), "logits": _f32(lg),
                      "probs": _f32(m.classify(inp, adapter=per_row)), "labels": lg.argmax(-1).tolist()})
    artifacts["cls"] = {"dir": str(cls), "task": "classification", "tol": 1e-5, "adapters": m.adapters,
                        "classify": cases, "refusals": _refusals(m, cls, [
                            # the rows' bottlenecks differ (a bottleneck applies to every row)
                            {"method": "classify", "ids": ids, "adapter": ["lora", "bottleneck"]}]),
                        "row_weights": _row_weights_cases(m)}
    # the fused encoder (--graph auto with LoRA, IA3 and a prompt): MultiHeadAttention / BiasGelu on packed tokens
    cls_fused = root / "cls-fused"
    prompt = make_adapter(enc, root / "cls-prompt", "prompt", seed=4, task="SEQ_CLS")
    export(ExportConfig(base=enc, out=cls_fused, adapters=(("lora", cls_ads["lora"]), ("ia3", cls_ads["ia3"]),
                                                           ("prompt", prompt))), quiet=True)
    mf = Model(cls_fused)
    assert mf.manifest["graph"]["kernels"] == "fused"
    fused_cases = []
    for choice, inp in (("lora", texts), ("lora", ids), ("ia3", ids), (["lora", "ia3"], ids),
                        (["ia3", "lora", "ia3"], texts), ("prompt", texts), ("prompt", ids)):
        lg = mf.classify_logits(inp, adapter=choice)
        fused_cases.append({"adapter": choice, "input": inp, "dims": list(lg.shape), "logits": _f32(lg),
                            "probs": _f32(mf.classify(inp, adapter=choice)), "labels": lg.argmax(-1).tolist()})
    artifacts["cls-fused"] = {"dir": str(cls_fused), "task": "classification", "tol": 1e-5,
                              "adapters": mf.adapters, "classify": fused_cases}
    # the same encoder on a static profile: one graph per bucket (8, 16), texts right-padded to one
    from edgepeft.targets import load_target

    (root / "small-npu-enc.toml").write_text(SMALL_NPU.replace("[1, 4]", "[1, 8, 16]"))
    cls_static = root / "cls-static"
    export(ExportConfig(graph="generic", base=enc, out=cls_static, adapters=tuple(cls_ads.items()),
                        target=load_target(root / "small-npu-enc.toml")), quiet=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NNAPI is not in this onnxruntime build: CPU runs
        ms = Model(cls_static)
    long_ids = [list(range(3, 15)), [5, 9, 11]]  # 12 tokens: the 16 bucket
    static_cases = []
    for choice in ("lora", "bottleneck", ["lora", "ia3"]):  # a list: each row its head (the fixed batch of 2)
        for inp in (texts[:2], long_ids) if isinstance(choice, list) else (texts, long_ids):
            lg = ms.classify_logits(inp, adapter=choice)
            probs = ms.classify(inp, adapter=choice)
            static_cases.append({"adapter": choice, "input": inp, "dims": list(lg.shape), "logits": _f32(lg),
                                 "probs": _f32(probs), "labels": lg.argmax(-1).tolist()})
    artifacts["cls-static"] = {"dir": str(cls_static), "task": "classification", "tol": 1e-5,
                               "adapters": ms.adapters, "classify": static_cases}
    loras = {"chat": ads["chat"], "sql": ads["sql"], "code": code}
    artifacts["static"] = _static_cases(root, base, loras)
    artifacts.update(_fused_cases(root, base, loras))
    # LoHa (fed to the graph as the LoRA it equals): its own small artifact, alone and mixed with a LoRA
    from test_loha import make_loha

    loha_ads = {"hada": make_loha(base, root / "hada", r=3, target_modules=["q_proj", "down_proj"]),
                "chat": ads["chat"]}
    export(ExportConfig(graph="generic", base=base, out=root / "loha", adapters=tuple(loha_ads.items())), quiet=True)
    artifacts["loha"] = _lm_cases(root / "loha", ["hada", {"hada": 0.7, "chat": 0.3}], 1e-5, text=False)
    artifacts["vera"] = _vera_cases(root, base, ads["chat"])
    pack_cases = _pack_cases(root, Path(artifacts["fused"]["dir"]), int8, side, merged, root / "gemma3_text" / "fused",
                             code)
    out = root / "cases.json"
    out.write_text(json.dumps({"artifacts": artifacts, "sampling": _sampling_cases(side, artifacts["fused"]["dir"]),
                               "packs": pack_cases}))
    return out


def _node() -> str:
    """The node binary, after checking the package is installed and built (fails, never skips)."""
    missing = [p for p in (JS / "node_modules" / "onnxruntime-node", JS / "dist" / "node.js") if not p.exists()]
    if missing:
        pytest.fail(f"{missing[0]} is missing: the JS runtime is not installed / built; {BUILD_HINT}.")
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not on PATH; install Node.js 20+ to test runtimes/js.")
    return node


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> Path | None:
    if not (JS / "dist" / "node.js").exists():
        return None  # the test fails with the build hint, without spending time on exports
    return build_cases(tmp_path_factory.mktemp("js-parity"))


def test_js_runtime_matches_python(cases):
    node = _node()
    res = subprocess.run([node, "--test", "--test-reporter=spec", str(PARITY)], capture_output=True, text=True,
                         timeout=300, cwd=JS, env={**os.environ, "EDGEPEFT_JS_CASES": str(cases.parent)})
    print(res.stdout[-8000:])
    assert res.returncode == 0, f"node --test failed ({res.returncode}):\n{res.stdout[-12000:]}\n{res.stderr[-4000:]}"


if __name__ == "__main__":
    print(build_cases(Path(sys.argv[1])))
