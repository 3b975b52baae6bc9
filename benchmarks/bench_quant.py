"""Every precision on two real models, side by side in one run: size, agreement, accuracy, speed.

Run from the repo root (needs the demo install and, for the encoder, the adapters that
``benchmarks/bench_encoder.py`` trains)::

    python benchmarks/bench_quant.py [--quick] [--reuse] [--skip-lm] [--skip-encoder] [--schemes]

- SmolLM2-135M-Instruct + the two shipped LoRA adapters (``sentiment``, ``numbers``): per
  precision a side-branch artifact; ``edgepeft validate`` against the PyTorch fp32 model + peft
  (base, each adapter, a mix; 4 prompts, 8 greedy tokens) gives top-1 agreement and mean KL;
  decode tokens/s with ``numbers`` active (batch 1, 16-token prompt, 32 new tokens, 2 threads),
  the precisions measured round-robin, 3 rounds (median, min and max). ``--schemes`` adds, as
  more SmolLM2 rows, the alternatives each default was chosen over (``SCHEMES``: int8 dynamic,
  int8 weight-only in blocks of 32, int8-static A8W8, int4 with int8 compute, int4 with the
  token table and head quantized).
- MiniLM-L6 + the ``lora`` and ``bottleneck`` sentiment classifiers: per precision a
  side-branch artifact; ``validate --labels`` on the held-out Rotten Tomatoes split gives
  accuracy of torch fp32 vs the artifact, top-1 agreement and KL.

Every artifact passes or fails its precision's default budget (recorded in its manifest); the
table says which. Results: ``docs/bench/quant.json`` and ``quant.md`` (the artifacts go to
``benchmarks/results/quant/``), with the machine and the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PRECISIONS = ("fp32", "fp16", "int8", "int8-static", "int4")
ENC = RESULTS / "encoder"
# The alternatives the defaults were chosen over: row name -> QuantConfig fields (SmolLM2 only).
SCHEMES = {
    "int8 dynamic (per-channel weights, activations per call)": {"precision": "int8", "int8_scheme": "dynamic"},
    "int8 weight-only, blocks of 32": {"precision": "int8", "block_size": 32},
    "int8-static A8W8": {"precision": "int8-static", "static_activations": "int8"},
    "int4, int8 compute (accuracy_level 4)": {"precision": "int4", "accuracy_level": 4},
    "int4, token table and head quantized (--quantize-embeddings)": {"precision": "int4",
                                                                     "quantize_embeddings": True},
}

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, write_result  # noqa: E402


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name != "report.json")


def _export(base, adapters, out: Path, quant: dict, reuse: bool) -> float:
    from edgepeft.export import ExportConfig, export
    from edgepeft.quantize import QuantConfig

    if reuse and (out / "manifest.json").is_file():
        return 0.0
    t = time.perf_counter()
    export(ExportConfig(graph="generic", base=base, out=out, adapters=tuple(adapters.items()), force=out.exists(),
                        quant=QuantConfig(**quant)), quiet=True)
    return time.perf_counter() - t


def _summary(result: dict) -> dict:
    cases = result["cases"]
    out = {"passed": result["passed"], "failures": {c["case"]: c["failures"] for c in cases if c["failures"]},
           "min_top1": min(c["top1_agreement"] for c in cases), "max_kl": max(c["mean_kl"] for c in cases),
           "cases": {c["case"]: {k: c[k] for k in ("top1_agreement", "mean_kl", "max_abs_logits",
                                                    "accuracy_torch", "accuracy_artifact")} for c in cases}}
    return out


def bench_lm(quick: bool, reuse: bool, schemes: bool) -> dict:
    from edgepeft.demo import ADAPTERS, ADAPTERS_DIR, PROMPTS
    from edgepeft.demo.data import smollm2_dir
    from edgepeft.runtime import Model
    from edgepeft.validate import validate

    base = smollm2_dir()
    adapters = {n: ADAPTERS_DIR / n for n in ADAPTERS}
    rows, dirs = {}, {}
    runs = {p: {"precision": p} for p in PRECISIONS} | (SCHEMES if schemes else {})
    for i, (name, quant) in enumerate(runs.items()):
        out = dirs[name] = RESULTS / "quant" / (f"lm-{name}" if name in PRECISIONS else f"lm-scheme{i - len(PRECISIONS)}")
        print(f"[bench_quant] SmolLM2 {name}: export", file=sys.stderr, flush=True)
        secs = _export(base, adapters, out, quant, reuse)
        print(f"[bench_quant] SmolLM2 {name}: validate", file=sys.stderr, flush=True)
        result = validate(out, base, prompts=list(PROMPTS), max_new_tokens=4 if quick else 8)
        rows[name] = {"quant": quant, "export_s": round(secs, 1), "bytes": _size(out), **_summary(result)}
    prompt = None
    n_new, times = (16 if quick else 32), {p: [] for p in runs}
    for _ in range(2 if quick else 3):
        for name in runs:  # round-robin, one model loaded at a time: every row sees the same load
            m = Model(dirs[name], threads=2)
            prompt = prompt or m.tokenizer.encode("Number: 4821\nIn words: four thousand eight hundred").ids[:16]
            m.generate([prompt], max_new_tokens=2, adapter="numbers")  # warm-up
            t = time.perf_counter()
            m.generate([prompt], max_new_tokens=n_new, adapter="numbers", stop_at_eos=False)
            times[name].append(n_new / (time.perf_counter() - t))
            del m
    for name in runs:
        rows[name]["tok_s"] = round(statistics.median(times[name]), 1)
        rows[name]["tok_s_rounds"] = [round(x, 1) for x in times[name]]
    return rows


def bench_encoder(quick: bool, reuse: bool) -> dict:
    from edgepeft.demo.data import minilm_dir
    from edgepeft.validate import validate

    base = minilm_dir()
    adapters = {n: ENC / "adapters" / n for n in ("lora", "bottleneck")}
    for n, d in adapters.items():
        if not (d / "adapter_config.json").is_file():
            raise SystemExit(f"{d}: missing; run `python benchmarks/bench_encoder.py` first (it trains it).")
    rows = {}
    for p in PRECISIONS:
        out = RESULTS / "quant" / f"minilm-{p}"
        print(f"[bench_quant] MiniLM {p}: export + validate", file=sys.stderr, flush=True)
        secs = _export(base, adapters, out, {"precision": p}, reuse)
        result = validate(out, base, labelled=ENC / "test.jsonl", limit=200 if quick else None)
        rows[p] = {"export_s": round(secs, 1), "bytes": _size(out), **_summary(result)}
    return rows


def table(lm: dict | None, enc: dict | None) -> str:
    lines = []
    if lm:
        ref = lm["fp32"]["bytes"]
        lines += ["SmolLM2-135M-Instruct + 2 LoRA adapters (base, each adapter, a 0.7/0.3 mix)", "",
                  "| precision | artifact MB | size vs fp32 | min top-1 | max mean KL | decode tok/s (min-max) "
                  "| vs fp32 | budget |",
                  "|---|---|---|---|---|---|---|---|"]
        for p, r in lm.items():
            lo, hi = min(r["tok_s_rounds"]), max(r["tok_s_rounds"])
            lines.append(f"| {p} | {r['bytes'] / 1e6:.0f} | {r['bytes'] / ref:.2f}x | {r['min_top1']:.2%} | "
                         f"{r['max_kl']:.2e} | {r['tok_s']} ({lo}-{hi}) | {r['tok_s'] / lm['fp32']['tok_s']:.2f}x | "
                         f"{'pass' if r['passed'] else 'FAIL'} |")
        lines.append("")
    if enc:
        ref = enc["fp32"]["bytes"]
        lines += ["MiniLM-L6 + 2 sentiment classifiers (held-out Rotten Tomatoes accuracy, torch fp32 -> artifact)", "",
                  "| precision | artifact MB | size vs fp32 | lora acc | bottleneck acc | min top-1 | max mean KL | budget |",
                  "|---|---|---|---|---|---|---|---|"]
        for p, r in enc.items():
            acc = {n: f"{c['accuracy_torch']:.2%} -> {c['accuracy_artifact']:.2%}" for n, c in r["cases"].items()}
            lines.append(f"| {p} | {r['bytes'] / 1e6:.1f} | {r['bytes'] / ref:.2f}x | {acc['lora']} | "
                         f"{acc['bottleneck']} | {r['min_top1']:.2%} | {r['max_kl']:.2e} | "
                         f"{'pass' if r['passed'] else 'FAIL'} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer tokens, rows and repeats")
    ap.add_argument("--reuse", action="store_true", help="keep artifacts that exist")
    ap.add_argument("--skip-lm", action="store_true")
    ap.add_argument("--skip-encoder", action="store_true")
    ap.add_argument("--schemes", action="store_true", help="also the SmolLM2 alternatives in SCHEMES")
    args = ap.parse_args()
    t0, machine = time.perf_counter(), machine_info()
    enc = None if args.skip_encoder else bench_encoder(args.quick, args.reuse)
    lm = None if args.skip_lm else bench_lm(args.quick, args.reuse, args.schemes)
    text = table(lm, enc)
    machine["loadavg_end"] = os.getloadavg()
    write_result("quant", {"machine": machine, "lm": lm, "encoder": enc, "quick": args.quick,
                           "seconds": round(time.perf_counter() - t0)},
                 [f"<!-- python benchmarks/bench_quant.py {' '.join(sys.argv[1:])}; "
                  f"{time.perf_counter() - t0:.0f} s; load {machine['loadavg_start'][0]:.2f} -> "
                  f"{machine['loadavg_end'][0]:.2f} -->", "", text])
    failed = [p for rows in (lm or {}, enc or {}) for p, r in rows.items() if p in PRECISIONS and not r["passed"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
