"""Resident memory of a loaded adapter, by the file it is read from, in a process that runs sessions.

    python benchmarks/bench_adapter_memory.py [--artifact edgepeft-demo] [--rounds 3]

An artifact's adapters are stored twice (``adapters/NAME.onnx_adapter`` and its ``.safetensors``
twin). For each adapter and each file, a fresh process opens the artifact with ``Model`` (its
sessions and adapters loaded, as an app has them) and adds the adapter once more under another
name with ``Model.add_adapter`` (every check, as an app adds one), then reports the RSS added
against the adapter's arrays. The files read: ``safetensors`` (the runtime reads the twin when the
manifest entry lists one, as every export writes it) or ``onnx_adapter`` (onnxruntime's
AdapterFormat reader, what the runtime read before, and still reads when an entry lists no twin:
the benchmark opens a copy of the artifact whose manifest lists no twins, so that every adapter,
at open and when added, is read that way).
Rounds interleave the two; medians and spread; the load average before and after.
Needs an artifact with adapters (``edgepeft demo`` writes ``edgepeft-demo/``).
JSON and table: ``docs/bench/adapter-memory.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine_info, spread, spread_rows, write_result  # noqa: E402

READERS = ("onnx_adapter", "safetensors")


def one(artifact: Path, source: Path, name: str) -> dict:
    """In this process: open ``artifact``, add adapter ``name`` of ``source`` under another name,
    and say the RSS added and the arrays' size."""
    import gc

    from edgepeft.bench.workers import rss_mb
    from edgepeft.runtime.model import Model

    model = Model(artifact)
    gc.collect()
    before = rss_mb()
    new = model.add_adapter(source, name, as_name=f"{name}-again")
    gc.collect()
    added = rss_mb() - before
    adapter = model._store.loaded[new]
    nbytes = sum(v.nbytes for v in adapter.graph.values()) + sum(k.nbytes + v.nbytes for k, v in adapter.prefix or [])
    return {"rss_added_mb": round(added, 2), "arrays_mb": round(nbytes / 2**20, 2), "rss_open_mb": round(before, 1)}


def without_twins(artifact: Path, out: Path) -> Path:
    """``out``: the artifact with no ``safetensors`` field in its manifest's adapter entries (its
    other files linked), so that every adapter, at open and when added, is read from the
    ``.onnx_adapter``: an artifact as the runtime read it before."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for f in artifact.iterdir():  # hard links: the runtime refuses links out of the artifact
        if f.name not in ("manifest.json", "adapters"):
            if f.is_dir():
                shutil.copytree(f, out / f.name)
            else:
                os.link(f, out / f.name)
    shutil.copytree(artifact / "adapters", out / "adapters")
    m = json.loads((artifact / "manifest.json").read_text())
    for entry in m["adapters"].values():
        entry.pop("safetensors", None)
    (out / "manifest.json").write_text(json.dumps(m))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, default=Path("edgepeft-demo"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--one", nargs=2, metavar=("SOURCE", "NAME"), help=argparse.SUPPRESS)  # a worker process
    args = ap.parse_args()
    artifact = args.artifact.resolve()
    if args.one:
        print(json.dumps(one(artifact, Path(args.one[0]), args.one[1])))
        return 0
    if not (artifact / "manifest.json").is_file():
        raise SystemExit(f"{artifact}: no artifact there; run `edgepeft demo` first or pass --artifact DIR.")
    names = list(json.loads((artifact / "manifest.json").read_text())["adapters"])
    sources = {"safetensors": artifact,
               "onnx_adapter": without_twins(artifact, REPO / "benchmarks" / "results" / "adapter-memory-no-twins")}
    runs: dict[str, list[float]] = {}
    arrays_mb: dict[str, float] = {}
    opened: dict[str, list[float]] = {}  # RSS once the artifact is open (its adapters loaded), by reader
    load0 = os.getloadavg()
    for r in range(args.rounds):
        for name in names:
            for reader in (READERS if r % 2 == 0 else READERS[::-1]):  # interleaved, order alternating
                out = subprocess.run([sys.executable, __file__, "--artifact", str(sources[reader]), "--one",
                                      str(sources[reader]), name],
                                     capture_output=True, text=True, check=True)
                res = json.loads(out.stdout.strip().splitlines()[-1])
                runs.setdefault(f"{name}, {reader}", []).append(res["rss_added_mb"])
                opened.setdefault(reader, []).append(res["rss_open_mb"])
                arrays_mb[name] = res["arrays_mb"]
    load1 = os.getloadavg()
    added = spread(runs)
    ratio = {k: round(d["median"] / arrays_mb[k.split(",")[0]], 3) for k, d in added.items()}
    result = {"machine": machine_info(), "artifact": str(artifact.relative_to(REPO) if artifact.is_relative_to(REPO)
                                                          else artifact),
              "rounds": args.rounds, "arrays_mb": arrays_mb, "rss_added_mb": added,
              "rss_over_arrays": ratio, "rss_open_mb": spread(opened), "loadavg_before": load0, "loadavg_after": load1}
    lines = ["# Resident memory of a loaded adapter, by reader", "",
             f"Artifact `{result['artifact']}`; {args.rounds} interleaved rounds, each a fresh process with the "
             f"artifact open; load {load0[0]:.2f} → {load1[0]:.2f}.", "",
             "| adapter, reader | RSS added MB, median | min | max | its arrays MB | RSS / arrays |",
             "|---|---|---|---|---|---|"]
    lines += spread_rows(runs, 2, lambda k: f" {arrays_mb[k.split(',')[0]]:.2f} | {ratio[k]:.2f} |")
    lines += ["", "| RSS once the artifact is open with its adapters, by reader | MB, median | min | max |",
              "|---|---|---|---|"] + spread_rows(opened, 1)
    write_result("adapter-memory", result, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
