"""Every precision on two real models, side by side in one run: size, agreement, accuracy, speed.

Run from the repo root (needs the demo install and, for the encoder, the adapters that
``benchmarks/bench_encoder.py`` trains)::

    python benchmarks/bench_quant.py [--quick] [--reuse] [--skip-lm] [--skip-encoder]

- SmolLM2-135M-Instruct + the two shipped LoRA adapters (``sentiment``, ``numbers``): per
  precision a side-branch artifact; ``edgepeft validate`` against the PyTorch fp32 model + peft
  (base, each adapter, a mix; 4 prompts, 8 greedy tokens) gives top-1 agreement and mean KL;
  decode tokens/s with ``numbers`` active (batch 1, 16-token prompt, 32 new tokens, 2 threads),
  the precisions measured round-robin, median of 3.
- MiniLM-L6 + the ``lora`` and ``bottleneck`` sentiment classifiers: per precision a
  side-branch artifact; ``validate --labels`` on the held-out Rotten Tomatoes split gives
  accuracy of torch fp32 vs the artifact, top-1 agreement and KL.

Every artifact passes or fails its precision's default budget (recorded in its manifest); the
table says which. Results: ``benchmarks/results/quant.json`` and ``quant.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PRECISIONS = ("fp32", "fp16", "int8", "int8-static", "int4")
ENC = RESULTS / "encoder"


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name != "report.json")


def _export(base, adapters, out: Path, precision: str, reuse: bool) -> float:
    from edgepeft.export import ExportConfig, export
    from edgepeft.quantize import QuantConfig

    if reuse and (out / "manifest.json").is_file():
        return 0.0
    t = time.perf_counter()
    export(ExportConfig(graph="generic", base=base, out=out, adapters=tuple(adapters.items()), force=out.exists(),
                        quant=QuantConfig(precision=precision)), quiet=True)
    return time.perf_counter() - t


def _summary(result: dict) -> dict:
    cases = result["cases"]
    out = {"passed": result["passed"], "failures": {c["case"]: c["failures"] for c in cases if c["failures"]},
           "min_top1": min(c["top1_agreement"] for c in cases), "max_kl": max(c["mean_kl"] for c in cases),
           "cases": {c["case"]: {k: c[k] for k in ("top1_agreement", "mean_kl", "max_abs_logits",
                                                    "accuracy_torch", "accuracy_artifact")} for c in cases}}
    return out


def bench_lm(quick: bool, reuse: bool) -> dict:
    from edgepeft.demo import ADAPTERS, ADAPTERS_DIR, PROMPTS
    from edgepeft.demo.data import smollm2_dir
    from edgepeft.runtime import Model
    from edgepeft.validate import validate

    base = smollm2_dir()
    adapters = {n: ADAPTERS_DIR / n for n in ADAPTERS}
    rows = {}
    for p in PRECISIONS:
        out = RESULTS / "quant" / f"lm-{p}"
        print(f"[bench_quant] SmolLM2 {p}: export", file=sys.stderr, flush=True)
        secs = _export(base, adapters, out, p, reuse)
        print(f"[bench_quant] SmolLM2 {p}: validate", file=sys.stderr, flush=True)
        result = validate(out, base, prompts=list(PROMPTS), max_new_tokens=4 if quick else 8)
        rows[p] = {"export_s": round(secs, 1), "bytes": _size(out), **_summary(result)}
    models = {p: Model(RESULTS / "quant" / f"lm-{p}", threads=2) for p in PRECISIONS}
    prompt = models["fp32"].tokenizer.encode("Number: 4821\nIn words: four thousand eight hundred").ids[:16]
    n_new, times = (16 if quick else 32), {p: [] for p in PRECISIONS}
    for p, m in models.items():  # warm-up
        m.generate([prompt], max_new_tokens=2, adapter="numbers")
    for _ in range(2 if quick else 3):
        for p, m in models.items():  # round-robin: every precision sees the same load
            t = time.perf_counter()
            m.generate([prompt], max_new_tokens=n_new, adapter="numbers", stop_at_eos=False)
            times[p].append(time.perf_counter() - t)
    for p in PRECISIONS:
        rows[p]["tok_s"] = round(n_new / statistics.median(times[p]), 1)
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
        secs = _export(base, adapters, out, p, reuse)
        result = validate(out, base, labelled=ENC / "test.jsonl", limit=200 if quick else None)
        rows[p] = {"export_s": round(secs, 1), "bytes": _size(out), **_summary(result)}
    return rows


def table(lm: dict | None, enc: dict | None) -> str:
    lines = []
    if lm:
        ref = lm["fp32"]["bytes"]
        lines += ["SmolLM2-135M-Instruct + 2 LoRA adapters (base, each adapter, a 0.7/0.3 mix)", "",
                  "| precision | artifact MB | size vs fp32 | min top-1 | max mean KL | decode tok/s | vs fp32 | budget |",
                  "|---|---|---|---|---|---|---|---|"]
        for p, r in lm.items():
            lines.append(f"| {p} | {r['bytes'] / 1e6:.0f} | {r['bytes'] / ref:.2f}x | {r['min_top1']:.2%} | "
                         f"{r['max_kl']:.2e} | {r['tok_s']} | {r['tok_s'] / lm['fp32']['tok_s']:.2f}x | "
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
    args = ap.parse_args()
    t0 = time.perf_counter()
    enc = None if args.skip_encoder else bench_encoder(args.quick, args.reuse)
    lm = None if args.skip_lm else bench_lm(args.quick, args.reuse)
    text = table(lm, enc)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quant.json").write_text(json.dumps({"lm": lm, "encoder": enc, "quick": args.quick,
                                                    "seconds": round(time.perf_counter() - t0)}, indent=2))
    (RESULTS / "quant.md").write_text(text + "\n")
    failed = [p for rows in (lm or {}, enc or {}) for p, r in rows.items() if not r["passed"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
