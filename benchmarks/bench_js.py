"""Decode speed of the JS runtime (Node, onnxruntime-node) against the Python runtime, same artifact.

Run from the repo root after ``runtimes/js/setup.sh`` and the demo install (SmolLM2 + the shipped
adapters)::

    python benchmarks/bench_js.py [--artifact DIR] [--runs 5] [--rounds 3]

Setup: the demo artifact (SmolLM2-135M-Instruct fp32, side branch, ``numbers`` and ``sentiment``;
exported into ``benchmarks/results/js/demo`` unless ``--artifact`` names one), a 32-token prompt,
64 greedy tokens (EOS ignored), batch 1, 2 threads, ``numbers`` active. Decode tok/s is
``(tokens - 1) / (time from the end of the prefill to the end of the last step)``, the median of
``--runs`` generations; each runtime runs in its own process, the two take turns ``--rounds``
times and each figure is the median over rounds. Swap: the time to build (first use) or look up
(cached) the adapter feeds of another adapter. Python runs onnxruntime 1.32, Node onnxruntime-node
1.30 (the newest on npm).

Output: a table on stdout, ``benchmarks/results/js.json`` and ``js.md``.
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

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
NODE_WORKER = ROOT / "benchmarks" / "js_decode.mjs"


def _spawn(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _artifact(path: str | None) -> Path:
    if path:
        return Path(path)
    from edgepeft.demo import ADAPTERS, ADAPTERS_DIR
    from edgepeft.demo.data import smollm2_dir
    from edgepeft.export import ExportConfig, export
    from edgepeft.contract import read_manifest

    out = RESULTS / "js" / "demo"
    try:
        if all(e.get("safetensors") for e in read_manifest(out)["adapters"].values()):
            return out
    except Exception:  # missing or from an older edgepeft: export again
        pass
    print(f"[bench_js] exporting the demo artifact into {out}", file=sys.stderr, flush=True)
    export(ExportConfig(graph="generic", base=smollm2_dir(), out=out, adapters=tuple((n, ADAPTERS_DIR / n) for n in ADAPTERS),
                        force=out.exists()), quiet=True)
    return out


def markdown(res: dict) -> str:
    lines = ["| runtime | decode tok/s (rounds) | prefill ms | load s | swap ms (first / cached) | peak RSS MB |",
             "|---|---|---|---|---|---|"]
    for name, r in res["rows"].items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error']} | | | | |")
            continue
        rounds = ", ".join(f"{x:.1f}" for x in r["rounds"] if x is not None)
        first = f"{r['swap_first_ms']:.3f} / " if r.get("swap_first_ms") is not None else ""
        lines.append(f"| {name} | {r['decode_tok_s']:.1f} ({rounds}) | {r['prefill_ms']:.0f} | {r['load_s']:.2f} | "
                     f"{first}{r['swap_ms']:.4f} | {r['peak_rss_mb']:.0f} |")
    js, py = res["rows"].get("node"), res["rows"].get("python")
    if js and py and "error" not in js and "error" not in py:
        lines.append(f"\nNode / Python decode: {js['decode_tok_s'] / py['decode_tok_s']:.2f}x; "
                     f"same 64 tokens: {js['tokens'] == py['tokens']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", default=None, help="a causal-LM side artifact with a 'numbers' adapter "
                                                     "(default: the demo artifact, exported once)")
    ap.add_argument("--runs", type=int, default=5, help="generations per runtime and round, median (default 5)")
    ap.add_argument("--rounds", type=int, default=3, help="times the runtimes take turns (default 3)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if not (ROOT / "runtimes" / "js" / "dist" / "node.js").is_file():
        print("benchmarks/bench_js.py: runtimes/js/dist is missing; run runtimes/js/setup.sh first.", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _common import machine_info
    from bench_speed import _prompt_ids

    art = _artifact(args.artifact)
    spec = {"artifact": str(art), "threads": args.threads, "runs": args.runs, "new_tokens": args.new_tokens,
            "prompt": _prompt_ids(args.prompt_tokens), "adapter": "numbers", "swap_pairs": 40}
    jobs = {"python": [sys.executable, str(ROOT / "benchmarks" / "bench_speed.py"), "--worker", "ort", json.dumps(spec)],
            "node": ["node", str(NODE_WORKER), json.dumps(spec)]}
    rounds: dict[str, list[dict]] = {k: [] for k in jobs}
    for r in range(args.rounds):
        for name, cmd in jobs.items():
            print(f"[bench_js] round {r + 1}/{args.rounds}: {name}", file=sys.stderr, flush=True)
            rounds[name].append(_spawn(cmd))
    res = {"date": time.strftime("%Y-%m-%d %H:%M"), "artifact": str(art),
           "config": {k: v for k, v in spec.items() if k != "prompt"} | {"rounds": args.rounds},
           "machine": machine_info(), "rows": {}}
    for name, runs in rounds.items():
        ok = [x for x in runs if "error" not in x]
        if not ok:
            res["rows"][name] = runs[-1]
            continue
        row = {k: statistics.median(x[k] for x in ok) if isinstance(v, (int, float)) else ok[-1][k]
               for k, v in ok[0].items()}
        row["rounds"] = [x.get("decode_tok_s") for x in runs]
        res["rows"][name] = row
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "js.json").write_text(json.dumps(res, indent=1))
    table = markdown(res)
    (RESULTS / "js.md").write_text(f"# JS vs Python runtime, {res['date']}\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
