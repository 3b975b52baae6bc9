"""Every shipped target profile on two real models: build, run the bundle itself, validate, measure.

Run from the repo root (needs the demo install and, for the encoder, the adapters that
``benchmarks/bench_encoder.py`` trains)::

    python benchmarks/bench_targets.py [--reuse] [--only NAME ...] [--skip-lm] [--skip-encoder] [--limit N]

Per profile and model: ``edgepeft export --target NAME`` (the profile's default precision), then
``edgepeft validate`` on the graph the runtime loads for that artifact (the ``.ort`` file when the
profile writes one; on static-shape profiles the fixed-shape bucket graphs), on the CPU provider:

- SmolLM2-135M-Instruct + ``sentiment`` (LoRA r=8, q/v) and ``numbers`` (r=16, q/k/v/o): base,
  each adapter and a 0.7/0.3 mix, every position of the prompts + held-out texts, greedy tokens;
- MiniLM-L6 + the ``lora`` and ``bottleneck`` sentiment classifiers: held-out accuracy, top-1, KL.

Reported per profile: artifact size (and the ``.ort`` files'), the validate verdict against the
precision's budget, and node coverage / partitions for NNAPI and Core ML: of the dynamic graph
(before), and of the graph the accelerator gets (after: fixed shapes + rewrites on static
profiles). Results: ``benchmarks/results/targets.json`` and ``targets.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ENC = RESULTS / "encoder"


def _mb(paths) -> float:
    return round(sum(p.stat().st_size for p in paths if p.is_file()) / 1e6, 1)


def _coverage(manifest: dict) -> dict:
    """{accelerator: {before, after}}: nodes supported % and partitions."""
    parts = (manifest.get("target") or {}).get("partitions") or {}
    if not parts:
        return {}
    dynamic = parts.get(manifest["graph"]["file"] if manifest["mode"] == "side" else next(iter(parts)))
    buckets = manifest["graph"].get("buckets") or []
    after_graph = parts.get(buckets[-1]["file"]) if buckets else None
    out = {}
    for acc, e in (dynamic or {}).items():
        if not isinstance(e, dict):
            continue
        row = {"before": e["as_exported"], "shapes_only": e["if_shapes_fixed"]}
        if after_graph:
            row["after"] = after_graph[acc]["as_exported"]
        out[acc] = {k: {f: v[f] for f in ("supported_pct", "partitions", "nodes", "unsupported_ops")}
                    for k, v in row.items()}
    return out


def run_one(model: str, target: str, base: Path, adapters: dict, reuse: bool, limit: int | None) -> dict:
    from edgepeft.export import ExportConfig, export
    from edgepeft.contract import read_manifest
    from edgepeft.targets import load_target
    from edgepeft.validate import validate

    out = RESULTS / "targets" / f"{model}-{target}"
    t = time.perf_counter()
    if not (reuse and (out / "manifest.json").is_file()):
        print(f"[bench_targets] {model} {target}: export", file=sys.stderr, flush=True)
        export(ExportConfig(graph="generic", base=base, out=out, adapters=tuple(adapters.items()), force=out.exists(),
                            target=load_target(target)), quiet=True)
    export_s = time.perf_counter() - t
    m = read_manifest(out)
    print(f"[bench_targets] {model} {target}: validate", file=sys.stderr, flush=True)
    t = time.perf_counter()
    if model == "smollm2":
        from edgepeft.demo import PROMPTS

        result = validate(out, base, prompts=list(PROMPTS), max_new_tokens=8)
    else:
        result = validate(out, base, labelled=ENC / "test.jsonl", limit=limit)
    cases = result["cases"]
    files = [p for p in out.rglob("*") if p.is_file()]
    return {
        "precision": m["precision"], "static": m.get("static"), "export_s": round(export_s, 1),
        "validate_s": round(time.perf_counter() - t, 1), "graph_format": result.get("graph_format"),
        "artifact_mb": _mb(files), "ort_mb": _mb([p for p in files if p.suffix == ".ort"]),
        "passed": result["passed"], "min_top1": min(c["top1_agreement"] for c in cases),
        "max_kl": max(c["mean_kl"] for c in cases),
        "cases": {c["case"]: {k: c.get(k) for k in ("top1_agreement", "mean_kl", "accuracy_torch",
                                                     "accuracy_artifact", "failures")} for c in cases},
        "coverage": _coverage(m),
    }


def table(rows: dict) -> str:
    lines = ["| model | target | precision | shapes | graph run | artifact MB | .ort MB | min top-1 | max KL | "
             "budget | NNAPI before -> after | Core ML before -> after |", "|" + "---|" * 12]
    for key, r in rows.items():
        model, target = key.split(":")
        st = r["static"]
        shapes = f"b{st['batch']} s{'/'.join(map(str, st['buckets']))}" + (
            f" c{st['context']}" if st.get("context") else "") + f" r{st['max_rank']}" if st else "dynamic"
        cov = []
        for acc in ("nnapi", "coreml"):
            c = r["coverage"].get(acc)
            if not c:
                cov.append("-")
                continue
            b, a = c["before"], c.get("after")
            cov.append(f"{b['supported_pct']}%/{b['partitions']}"
                       + (f" -> {a['supported_pct']}%/{a['partitions']}" if a else ""))
        lines.append(f"| {model} | {target} | {r['precision']} | {shapes} | .{r['graph_format']} | "
                     f"{r['artifact_mb']} | {r['ort_mb']} | {r['min_top1']:.2%} | {r['max_kl']:.1e} | "
                     f"{'pass' if r['passed'] else 'FAIL'} | {cov[0]} | {cov[1]} |")
    return "\n".join(lines)


def main() -> int:
    from edgepeft.targets import shipped_names

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reuse", action="store_true", help="keep artifacts that exist")
    ap.add_argument("--only", nargs="*", default=None, help="profiles to run (default: all shipped)")
    ap.add_argument("--skip-lm", action="store_true")
    ap.add_argument("--skip-encoder", action="store_true")
    ap.add_argument("--limit", type=int, default=None, help="labelled rows for MiniLM (default: all)")
    args = ap.parse_args()
    from edgepeft.demo import ADAPTERS, ADAPTERS_DIR
    from edgepeft.demo.data import minilm_dir, smollm2_dir

    targets = args.only or shipped_names()
    models = []
    if not args.skip_encoder:
        enc = {n: ENC / "adapters" / n for n in ("lora", "bottleneck")}
        for d in enc.values():
            if not (d / "adapter_config.json").is_file():
                raise SystemExit(f"{d}: missing; run `python benchmarks/bench_encoder.py` first (it trains it).")
        models.append(("minilm", minilm_dir(), enc))
    if not args.skip_lm:
        models.append(("smollm2", smollm2_dir(), {n: ADAPTERS_DIR / n for n in ADAPTERS}))
    t0 = time.perf_counter()
    path = RESULTS / "targets.json"
    rows = json.loads(path.read_text())["rows"] if args.reuse and path.is_file() else {}
    for model, base, adapters in models:
        for target in targets:
            rows[f"{model}:{target}"] = run_one(model, target, base, adapters, args.reuse, args.limit)
            path.write_text(json.dumps({"rows": rows, "seconds": round(time.perf_counter() - t0)}, indent=2))
    text = table(rows)
    print(text)
    (RESULTS / "targets.md").write_text(text + "\n")
    return 0 if all(r["passed"] for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
