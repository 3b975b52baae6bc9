"""The two installs side by side (issue 20): runtime only (``pip install edgepeft``) against the
toolchain (``pip install torch==2.13.0 && pip install "edgepeft[export]"``), each in a fresh venv
from this checkout's wheel.

Per install: MB on disk (the venv's site-packages), the time to import ``edgepeft.runtime`` in a
fresh process (and, for the toolchain, ``edgepeft.export``), and the peak RSS of a process that
loads ``Model(ARTIFACT)`` and runs one ``logits`` call. Import time and RSS are medians of
``--rounds`` fresh processes, the two venvs taking turns.

    python benchmarks/bench_install.py --artifact edgepeft-demo [--rounds 5] [--work DIR]

Writes ``docs/bench/install.json`` (``--out``) and prints the table ``docs/install.md`` shows.
pip resolves the packages from the index it is configured with.
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
IMPORT = "import time; t = time.perf_counter(); import {mod}; print(time.perf_counter() - t)"
RSS = ("import resource, sys, numpy as np; from edgepeft.runtime import Model; m = Model(sys.argv[1]); "
       "m.logits(np.array([[1, 2, 3, 4, 5, 6, 7, 8]])); "
       "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, sorted(k for k in sys.modules if k == 'torch'))")


def _run(cmd: list, **kw) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, **kw)
    if r.returncode:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r.stdout


def _site_mb(venv: Path) -> float:
    site = next((venv / "lib").glob("python3*/site-packages"))
    return sum(f.stat().st_size for f in site.rglob("*") if f.is_file() and not f.is_symlink()) / 2**20


def _venv(path: Path, installs: list[list[str]]) -> Path:
    if not (path / "bin" / "python").exists():
        _run([sys.executable, "-m", "venv", path])
        for args in installs:
            _run([path / "bin" / "python", "-m", "pip", "install", "--quiet", *args])
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", required=True, help="an artifact to load (the demo's: edgepeft-demo)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--work", default=None, help="where the wheel and venvs go (kept; default: a temp dir)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench" / "install.json"))
    args = ap.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="edgepeft-install-"))
    work.mkdir(parents=True, exist_ok=True)
    wheels = work / "dist"
    if not list(wheels.glob("edgepeft-*.whl")):
        _run([sys.executable, "-m", "build", "--wheel", "--outdir", wheels, ROOT])
    wheel = next(wheels.glob("edgepeft-*.whl"))
    t = time.perf_counter()
    venvs = {"runtime": _venv(work / "runtime", [[str(wheel)]]),
             "toolchain": _venv(work / "toolchain", [["torch==2.13.0"], [f"{wheel}[export]"]])}
    print(f"[bench_install] venvs ready in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    imports = {"runtime": ["edgepeft.runtime"], "toolchain": ["edgepeft.runtime", "edgepeft.export"]}
    rounds: dict = {k: {"rss_mb": [], **{f"import_{m}_s": [] for m in mods}} for k, mods in imports.items()}
    load_before = os.getloadavg()
    for _ in range(args.rounds):
        for name, venv in venvs.items():
            py = venv / "bin" / "python"
            for mod in imports[name]:
                rounds[name][f"import_{mod}_s"].append(float(_run([py, "-c", IMPORT.format(mod=mod)], cwd=work)))
            rss, torch = _run([py, "-c", RSS, Path(args.artifact).resolve()], cwd=work).split(maxsplit=1)
            assert torch.strip() == "[]", f"{name}: Model imported torch"
            rounds[name]["rss_mb"].append(float(rss))
    rows = {}
    for name, venv in venvs.items():
        r = {k: round(statistics.median(v), 3) for k, v in rounds[name].items()}
        r["spread"] = {k: [round(min(v), 3), round(max(v), 3)] for k, v in rounds[name].items()}
        r["site_packages_mb"] = round(_site_mb(venv), 1)
        r["packages"] = len(_run([venv / "bin" / "python", "-m", "pip", "list", "--format=freeze"]).split())
        rows[name] = r
    res = {"date": time.strftime("%Y-%m-%d %H:%M"), "artifact": str(Path(args.artifact).resolve()),
           "wheel": wheel.name, "wheel_mb": round(wheel.stat().st_size / 2**20, 2), "rounds": args.rounds,
           "python": sys.version.split()[0], "load_before": load_before, "load_after": os.getloadavg(),
           "rows": rows, "raw": rounds}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    rt, tc = rows["runtime"], rows["toolchain"]
    print("| install | site-packages MB | packages | import edgepeft.runtime s | import edgepeft.export s | "
          "peak RSS, Model + one logits call, MB |")
    print("|---|---|---|---|---|---|")
    for name, r in (("runtime only (`pip install edgepeft`)", rt), ("toolchain (`edgepeft[export]`)", tc)):
        exp = r.get("import_edgepeft.export_s")
        print(f"| {name} | {r['site_packages_mb']:.0f} | {r['packages']} | {r['import_edgepeft.runtime_s']:.2f} | "
              f"{'—' if exp is None else f'{exp:.2f}'} | {r['rss_mb']:.0f} |")
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
