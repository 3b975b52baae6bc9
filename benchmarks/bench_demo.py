"""The README's speed table: ``edgepeft bench`` on the real models, PyTorch + peft side by side.

Run from the repo root (needs the demo install; MiniLM needs the encoder benchmark's artifact)::

    python benchmarks/bench_demo.py [--reuse] [--repeats 5] [--skip-minilm | --skip-smollm2]

1. SmolLM2-135M-Instruct (``edgepeft demo``'s base) with the two demo LoRA adapters: exports (or,
   with ``--reuse``, reuses when made from the same base and adapter folders) a side-branch
   artifact of ``numbers`` + ``sentiment`` into ``benchmarks/results/artifacts/side``, then runs
   the equivalent of::

       edgepeft bench benchmarks/results/artifacts/side --compare-torch SMOLLM2_DIR --repeats 5 \\
           --out benchmarks/results/bench_smollm2

   (the merged reference, ``numbers``, the larger adapter, is exported once into
   ``~/.cache/edgepeft/bench-merged`` and reused by later runs).

2. MiniLM-L6 with the encoder benchmark's ``lora``, ``bottleneck`` and ``prompt`` sentiment
   classifiers (``benchmarks/results/encoder/artifact``, made by ``bench_encoder.py``)::

       edgepeft bench benchmarks/results/encoder/artifact --compare-torch MINILM_DIR --repeats 5 \\
           --out benchmarks/results/bench_minilm

   (merged reference: ``lora``, the only mergeable one, exported once into the same cache).

All measuring is :mod:`edgepeft.bench` (one fresh subprocess per row and repeat, round-robin,
medians). This script adds the exports and writes both results as Markdown tables to
``benchmarks/results/bench_demo.md`` (and stdout): the tables in the README.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
ADAPTERS = REPO / "edgepeft" / "demo" / "adapters"
TITLES = {"bench_smollm2": "SmolLM2-135M-Instruct, fp32, `numbers` (r=16) + `sentiment` (r=8) LoRA",
          "bench_minilm": "MiniLM-L6 classifiers, fp32, `lora` / `bottleneck` / `prompt`"}


def log(msg: str) -> None:
    print(f"[bench_demo {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def same_export(path: Path, base: Path, mode: str, adapters) -> bool:
    """``path`` holds an artifact of this edgepeft's format made from these base and adapter folders."""
    from edgepeft.errors import EdgepeftError
    from edgepeft.contract import read_manifest

    try:
        m = read_manifest(path)
    except EdgepeftError:
        return False
    return (m.get("mode") == mode and m.get("base", {}).get("source") == str(base)
            and {n: e.get("source") for n, e in m.get("adapters", {}).items()}
            == {n: str(p.resolve()) for n, p in adapters})


def ensure(base: Path, path: Path, mode: str, names: tuple[str, ...], reuse: bool, adapters_dir: Path) -> Path:
    adapters = tuple((n, adapters_dir / n) for n in names)
    if reuse and same_export(path, base, mode, adapters):
        log(f"reusing {path}")
        return path
    if path.is_symlink():
        raise SystemExit(f"{path} is a symlink to another artifact that does not fit; not exporting over it.")
    log(f"exporting {mode} artifact to {path} (a few minutes) ...")
    cmd = [sys.executable, "-m", "edgepeft", "export", str(base), "--mode", mode, "--out", str(path), "--force",
           "--quiet", *[a for n, p in adapters for a in ("--adapter", f"{n}={p}")]]
    subprocess.run(cmd, check=True)  # a subprocess: this process stays small
    return path


def fmt(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def ratio(v: dict, which: str, key: str) -> str:
    r = (v.get(which) or {}).get(key)
    return "—" if r is None else f"{r:.2f}x"


def md_lm(res: dict) -> list[str]:
    out = ["| system | case | prefill p50 / p95 ms | decode tok/s | vs PyTorch+peft | vs merged | load s | peak RSS MB "
           "| CPU/wall |", "|---|---|---|---|---|---|---|---|---|"]
    for v in res["summary"].values():
        out.append(f"| {v['system']} | {v['case']} | {fmt(v['prefill_ms_p50'], '.1f')} / {fmt(v['prefill_ms_p95'], '.1f')} "
                   f"| {fmt(v['decode_tok_s'], '.1f')} | {ratio(v, 'vs_torch', 'decode')} | "
                   f"{ratio(v, 'vs_merged', 'decode')} | {fmt(v['load_s'], '.2f')} | {fmt(v['peak_rss_mb'], '.0f')} | "
                   f"{fmt(v.get('cpu_per_wall'), '.2f')} |")
    return out


def md_cls(res: dict) -> list[str]:
    bs = res["config"]["batch_sizes"]
    head = "| system | case | " + " | ".join(f"batch {b} p50 / p95 ms | vs PyTorch+peft | vs merged" for b in bs)
    out = [head + " | load s | peak RSS MB | CPU/wall |", "|---|---|" + "---|---|---|" * len(bs) + "---|---|---|"]
    for v in res["summary"].values():
        cells = [f"{fmt(v[f'batch{b}_ms_p50'], '.2f')} / {fmt(v[f'batch{b}_ms_p95'], '.2f')} | "
                 f"{ratio(v, 'vs_torch', f'batch{b}')} | {ratio(v, 'vs_merged', f'batch{b}')}" for b in bs]
        out.append(f"| {v['system']} | {v['case']} | " + " | ".join(cells)
                   + f" | {fmt(v['load_s'], '.2f')} | {fmt(v['peak_rss_mb'], '.0f')} | {fmt(v.get('cpu_per_wall'), '.2f')} |")
    return out


def markdown(res: dict, title: str) -> str:
    from edgepeft.bench import memory_rows, swap_rows

    c, m = res["config"], res["machine"]
    lines = [f"### {title}", "",
             f"<!-- {res['date']}: {c['repeats']} repeats, {c['threads']} thread(s), {m['cpu']}, "
             f"load average at the end {m['loadavg_end'][0]:.1f} -->", ""]
    lines += md_lm(res) if res["task"] == "causal-lm" else md_cls(res)
    lines += ["", "| adapter swap | median |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in swap_rows(res)]
    lines += ["", "| resident memory added per loaded adapter | MB |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in memory_rows(res["swap"])]
    lines += ["", "| size on disk | MB |", "|---|---|"]
    lines += [f"| {k} | {fmt(v, '.2f')} |" for k, v in res["sizes_mb"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reuse", action="store_true", help="reuse exported artifacts when they exist")
    ap.add_argument("--repeats", type=int, default=5, help="fresh processes per row (default 5)")
    ap.add_argument("--skip-minilm", action="store_true", help="only SmolLM2")
    ap.add_argument("--skip-smollm2", action="store_true", help="only MiniLM")
    ap.add_argument("--threads", type=int, default=None, help="default: the usable cores")
    ap.add_argument("--adapters-dir", type=Path, default=ADAPTERS, help="folder with numbers/ and sentiment/")
    ap.add_argument("--render", action="store_true",
                    help="measure nothing: rewrite bench_demo.md from the last run's bench.json files")
    args = ap.parse_args(argv)
    if args.render:
        md = []
        for sub, title in TITLES.items():
            f = RESULTS / sub / "bench.json"
            if f.is_file():
                md.append(markdown(json.loads(f.read_text()), title))
        (RESULTS / "bench_demo.md").write_text("\n".join(md))
        print("\n".join(md))
        return 0

    from edgepeft.bench import format_bench, run_bench
    from edgepeft.demo.data import smollm2_dir

    t0 = time.perf_counter()
    md = []
    if not args.skip_smollm2:
        base = Path(smollm2_dir())
        side = ensure(base, RESULTS / "artifacts" / "side", "side", ("numbers", "sentiment"), args.reuse,
                      args.adapters_dir.resolve())
        lm = run_bench(side, out=RESULTS / "bench_smollm2", compare_torch=base, repeats=args.repeats,
                       threads=args.threads)
        print(format_bench(lm), flush=True)
        md.append(markdown(lm, TITLES["bench_smollm2"]))
    enc = RESULTS / "encoder" / "artifact"
    if not args.skip_minilm:
        src = Path(json.loads((enc / "manifest.json").read_text())["base"]["source"]) if (enc / "manifest.json").is_file() else None
        if src is None or not (src / "config.json").is_file():
            log(f"MiniLM skipped: no {enc} (run benchmarks/bench_encoder.py first) or its base folder is gone")
        else:
            cls = run_bench(enc, out=RESULTS / "bench_minilm", compare_torch=src, repeats=args.repeats,
                            threads=args.threads)
            print("\n" + format_bench(cls), flush=True)
            md.append(markdown(cls, TITLES["bench_minilm"]))
    head = (f"<!-- python benchmarks/bench_demo.py --reuse --repeats {args.repeats}"
            + (f" --threads {args.threads}" if args.threads else "")
            + "".join(f" --{f}" for f in ("skip-minilm", "skip-smollm2") if getattr(args, f.replace("-", "_")))
            + f"; {time.perf_counter() - t0:.0f} s -->\n\n")
    (RESULTS / "bench_demo.md").write_text(head + "\n".join(md))
    log(f"wrote {RESULTS / 'bench_demo.md'} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
