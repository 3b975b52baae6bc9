"""Speed of two edgepeft commits side by side: the demo artifact exported and run by each.

Issue 18 (the restructure) must leave speed unchanged. This runs the old and the new code as rows
of one run: each commit's checkout exports the demo artifact (SmolLM2-135M-Instruct fp32, side
branch, the shipped ``numbers`` and ``sentiment`` LoRA adapters) with its own exporter, and its
own runtime decodes it, in a fresh process per row and round, the rows taking turns::

    python benchmarks/bench_commits.py --old c889216 [--new HEAD] [--rounds 3] [--runs 5]

Per row and round: load, one warm-up, then ``--runs`` times a 64-token greedy generation and a
1-token one (prefill only) with ``numbers`` active (and a 0.5/0.5 mix, and no adapter), batch 1,
a 32-token prompt, 2 threads. Decode tok/s = 63 / (t64 - t1), the median over runs; each figure
is then the median over rounds, with the spread (min-max) and the load average before and after.
Only the public runtime API is used, so both commits are measured the same way.

Output: a table on stdout, ``benchmarks/data/bench_commits.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "data"
CHOICES = {"numbers": "numbers", "mix": {"numbers": 0.5, "sentiment": 0.5}, "base": None}

EXPORT = """
import sys
from pathlib import Path
from edgepeft.demo import ADAPTERS, ADAPTERS_DIR
from edgepeft.demo.data import smollm2_dir
from edgepeft.export import ExportConfig, export
out = Path(sys.argv[1])
export(ExportConfig(graph="generic", base=smollm2_dir(), out=out, adapters=tuple((n, ADAPTERS_DIR / n) for n in ADAPTERS),
                    force=out.exists()), quiet=True)
"""

WORKER = """
import json, statistics, sys, time
import numpy as np
from edgepeft.runtime import Model
spec = json.loads(sys.argv[1])
m = Model(spec["artifact"], threads=spec["threads"])
ids = np.array([spec["prompt"]], dtype=np.int64)
out = {}
for label, choice in spec["choices"].items():
    m.generate(ids, 8, adapter=choice, stop_at_eos=False)  # warm-up (and the feeds' first build)
    full, one = [], []
    for _ in range(spec["runs"]):
        t = time.perf_counter(); m.generate(ids, spec["new_tokens"], adapter=choice, stop_at_eos=False)
        full.append(time.perf_counter() - t)
        t = time.perf_counter(); m.generate(ids, 1, adapter=choice, stop_at_eos=False)
        one.append(time.perf_counter() - t)
    out[label] = {"decode_tok_s": (spec["new_tokens"] - 1) / (statistics.median(full) - statistics.median(one)),
                  "prefill_ms": 1000 * statistics.median(one)}
print(json.dumps(out))
"""


def _run(tree: Path, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tree), "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=tree, env=env)


def _checkout(rev: str, where: Path) -> tuple[Path, str]:
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    tree = where / sha
    if not tree.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), sha], cwd=ROOT, check=True,
                       capture_output=True)
    return tree, sha


def markdown(res: dict) -> str:
    rows = ["| commit | choice | decode tok/s median (rounds) | prefill ms | new/old |",
            "|---|---|---|---|---|"]
    old = res["rows"][res["old"]]
    for sha, row in res["rows"].items():
        for label in CHOICES:
            r = row[label]
            ratio = r["decode_tok_s"] / old[label]["decode_tok_s"]
            rows.append(f"| {sha} | {label} | {r['decode_tok_s']:.1f} ({', '.join(f'{x:.1f}' for x in r['rounds'])}) "
                        f"| {r['prefill_ms']:.0f} | {ratio:.3f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", required=True, help="the commit to compare against")
    ap.add_argument("--new", default="HEAD")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "edgepeft-bench-commits"))
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _common import machine_info
    from bench_speed import _prompt_ids

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    trees = dict(_checkout(rev, work)[::-1] for rev in (args.old, args.new))  # sha -> tree
    arts = {}
    for sha, tree in trees.items():
        arts[sha] = work / f"artifact-{sha}"
        if not (arts[sha] / "manifest.json").is_file():
            print(f"[bench_commits] exporting the demo artifact with {sha}", file=sys.stderr, flush=True)
            p = _run(tree, ["-c", EXPORT, str(arts[sha])])
            if p.returncode:
                print(p.stderr[-2000:], file=sys.stderr)
                return 1
    graphs = {sha: json.loads((a / "manifest.json").read_text())["graph"]["sha256"] for sha, a in arts.items()}
    spec = {"threads": args.threads, "runs": args.runs, "new_tokens": 64, "prompt": _prompt_ids(32),
            "choices": CHOICES}
    load_before = os.getloadavg()
    rounds: dict[str, list[dict]] = {sha: [] for sha in trees}
    for r in range(args.rounds):
        for sha, tree in trees.items():
            print(f"[bench_commits] round {r + 1}/{args.rounds}: {sha}", file=sys.stderr, flush=True)
            p = _run(tree, ["-c", WORKER, json.dumps({**spec, "artifact": str(arts[sha])})])
            if p.returncode:
                print(p.stderr[-2000:], file=sys.stderr)
                return 1
            rounds[sha].append(json.loads(p.stdout.strip().splitlines()[-1]))
    load_after = os.getloadavg()
    old_sha = next(iter(trees))
    res = {"date": time.strftime("%Y-%m-%d %H:%M"), "old": old_sha, "new": list(trees)[1],
           "graph_sha256": graphs, "same_graph": len(set(graphs.values())) == 1,
           "config": {k: v for k, v in spec.items() if k != "prompt"} | {"rounds": args.rounds},
           "loadavg_before": load_before, "loadavg_after": load_after, "machine": machine_info(), "rows": {}}
    for sha, runs in rounds.items():
        res["rows"][sha] = {label: {"decode_tok_s": statistics.median(x[label]["decode_tok_s"] for x in runs),
                                    "prefill_ms": statistics.median(x[label]["prefill_ms"] for x in runs),
                                    "rounds": [x[label]["decode_tok_s"] for x in runs]}
                            for label in CHOICES}
    DATA.mkdir(parents=True, exist_ok=True)
    (DATA / "bench_commits.json").write_text(json.dumps(res, indent=1) + "\n")
    table = markdown(res)
    text = (f"# edgepeft {res['old']} vs {res['new']}, {res['date']}\n\nSame graph: {res['same_graph']}; "
            f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}.\n\n{table}\n")
    (DATA / "bench_commits.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
