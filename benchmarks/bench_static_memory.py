"""Memory, disk and call time of a static-shape artifact against its number of sequence buckets,
with and without one shared copy of the weights (issue 24, item 2).

Run from the repo root (needs the demo install: MiniLM; the node rows need ``bash
runtimes/js/setup.sh``)::

    python benchmarks/bench_static_memory.py [--rounds 5]

MiniLM-L6 with a random LoRA (r 8 on query/value, head carried), exported fp32 for a copy of the
``android-nnapi`` profile (static shapes, batch 1, ``.ort`` files) with 1, 2 and 4 sequence buckets
(``[64]``, ``[32, 64]``, ``[16, 32, 48, 64]``). Systems, each in a fresh process per (artifact,
system, round), rounds interleaved:

- ``py-ort``: Python ``Model(format="ort")``: each bucket's ``.ort`` file, weights inside each;
- ``py-onnx-own``: Python ``Model(format="onnx", share_weights=False)``: the bucket ``.onnx``
  graphs (one external weights file), each session with its own prepacked copy (before
  2026-12-07 this was all there was);
- ``py-onnx-shared``: Python ``Model(format="onnx")`` (what ``Model()`` loads since, for two
  buckets or more): the bucket sessions take one memory-mapped copy of the weights
  (``add_initializer``), not prepacked, and one CPU arena (onnxruntime's env allocator, since
  2026-12-07) (with one bucket nothing is shared: as ``py-onnx-own``);
- ``node-own`` / ``node-shared``: the node runtime, ``shareWeights: false`` / default (the
  sessions do not prepack, so all read the one file onnxruntime maps: shared pages);
- ``node-shared-noarena``: ``node-shared`` with ``enableCpuMemArena: false`` (onnxruntime-node
  cannot give its sessions one arena, as Python does; without an arena each call's working
  memory is returned after the call).

Per run: resident memory (``VmRSS``) and proportional set size (``Pss`` of
``/proc/self/smaps_rollup``: a page mapped by several sessions counts once) above the bare runtime,
after one call per bucket (ids whose length picks each bucket), the peak (``VmHWM``), and per
bucket the median of 5 calls (1 intra-op thread). NNAPI is not in this onnxruntime build: the
sessions run on CPU. Ratios: against the same system's 1-bucket artifact, and against the
smallest 1-bucket run (``py-onnx-own``), which is what the issue's goal ("≤ 1.1x one bucket's")
compares with.

Writes ``docs/bench/static-memory.json`` and ``.md``.
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
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import machine_info, write_result  # noqa: E402

REPO = HERE.parent
WORK = HERE / "results" / "static-memory"
BUCKETS = {"1 bucket": [64], "2 buckets": [32, 64], "4 buckets": [16, 32, 48, 64]}
SYSTEMS = {"py-ort": {"format": "ort", "share": False}, "py-onnx-own": {"format": "onnx", "share": False},
           "py-onnx-shared": {"format": "onnx", "share": True}, "node-own": {"share": False},
           "node-shared": {"share": True}, "node-shared-noarena": {"share": True, "arena": False}}
NODE_SCRIPT = HERE / "static_memory_node.mjs"


def log(msg: str) -> None:
    print(f"[bench-static-memory {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def pss_mb() -> float:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    raise KeyError("Pss")


def worker(spec: dict) -> dict:
    from edgepeft.runtime import Model

    base_rss, base_pss = status_mb("VmRSS"), pss_mb()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NNAPI is not in this build: CPU runs
        m = Model(spec["artifact"], format=spec["format"], threads=1, share_weights=spec["share"])
    opened = status_mb("VmRSS")
    ms = {}
    for seq in spec["buckets"]:  # one call per bucket: ids of a length that picks it (the [CLS] id 101 first)
        n = max(2, seq - 2)
        ids = [[101] + [2000 + i for i in range(n - 2)] + [102]]
        m.classify_logits(ids, adapter="lora")
        times = []
        for _ in range(5):
            t = time.perf_counter()
            m.classify_logits(ids, adapter="lora")
            times.append((time.perf_counter() - t) * 1e3)
        ms[str(seq)] = statistics.median(times)
    return {"format": m.format, "rss_mb": status_mb("VmRSS") - base_rss, "pss_mb": pss_mb() - base_pss,
            "rss_opened_mb": opened - base_rss, "hwm_mb": status_mb("VmHWM"), "ms": ms}


def make_adapter(minilm: Path, out: Path) -> Path:
    if (out / "adapter_config.json").is_file():
        return out
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=2)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, task_type="SEQ_CLS"))
    peft_model.save_pretrained(out)
    return out


def export(minilm: Path, adapter: Path, name: str, buckets: list[int]) -> Path:
    profile = (REPO / "edgepeft" / "targets" / "profiles" / "android-nnapi.toml").read_text()
    lines = [f"sequence_buckets = {buckets}" if line.startswith("sequence_buckets") else line
             for line in profile.splitlines()]
    toml = WORK / f"{name.replace(' ', '-')}.toml"
    toml.write_text("\n".join(lines) + "\n")
    out = WORK / name.replace(" ", "-")
    if not (out / "manifest.json").is_file():
        log(f"exporting {name} {buckets}")
        p = subprocess.run([sys.executable, "-m", "edgepeft", "export", str(minilm), "--adapter", f"lora={adapter}",
                            "--target", str(toml), "--out", str(out), "--force", "--quiet", "--allow-base-mismatch"],
                           capture_output=True, text=True, cwd=REPO)
        if p.returncode != 0:
            raise SystemExit(f"export {name} failed:\n{p.stderr[-3000:]}")
    return out


def disk(art: Path) -> dict:
    m = json.loads((art / "manifest.json").read_text())
    graph = m["graph"]
    size = lambda rel: (art / rel).stat().st_size / 2**20  # noqa: E731
    onnx = sum(size(b["file"]) for b in graph["buckets"]) + size(graph["data_file"])
    ort = sum(size(b["ort"]["file"]) for b in graph["buckets"] if b.get("ort"))
    return {"onnx_buckets_plus_weights_mb": onnx, "ort_files_mb": ort, "weights_file_mb": size(graph["data_file"]),
            "buckets": [b["seq"] for b in graph["buckets"]]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--systems", nargs="*", default=list(SYSTEMS), choices=list(SYSTEMS),
                    help="which systems (py-onnx-own is always run: the ratios' reference)")
    ap.add_argument("--name", default="static-memory", help="result files docs/bench/NAME.json and .md")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return 0
    from edgepeft.demo.data import minilm_dir

    minilm = minilm_dir()
    WORK.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    adapter = make_adapter(minilm, WORK / "lora")
    arts = {name: export(minilm, adapter, name, b) for name, b in BUCKETS.items()}
    node = shutil.which("node") and (REPO / "runtimes" / "js" / "dist" / "node.js").is_file()
    systems = [k for k in SYSTEMS if (k in a.systems or k == "py-onnx-own") and (node or not k.startswith("node"))]
    runs = []
    for r in range(a.rounds):
        for name in BUCKETS:
            for system in systems:
                spec = {"artifact": str(arts[name]), "buckets": BUCKETS[name], **SYSTEMS[system]}
                cmd = (["node", str(NODE_SCRIPT), json.dumps(spec)] if system.startswith("node")
                       else [sys.executable, __file__, "--worker", json.dumps(spec)])
                p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
                if p.returncode != 0:
                    raise SystemExit(f"worker {name} {system} failed:\n{p.stderr[-3000:]}")
                runs.append({"artifact": name, "system": system, "round": r,
                             **json.loads(p.stdout.strip().splitlines()[-1])})
    summary = {}
    for name in BUCKETS:
        for system in systems:
            rs = [x for x in runs if x["artifact"] == name and x["system"] == system]
            cell = {k: statistics.median(x[k] for x in rs) for k in ("rss_mb", "pss_mb", "hwm_mb")}
            cell["spread_rss_mb"] = max(x["rss_mb"] for x in rs) - min(x["rss_mb"] for x in rs)
            cell["spread_pss_mb"] = max(x["pss_mb"] for x in rs) - min(x["pss_mb"] for x in rs)
            cell["ms"] = {b: statistics.median(x["ms"][b] for x in rs) for b in rs[0]["ms"]}
            cell["ms_range"] = {b: [min(x["ms"][b] for x in rs), max(x["ms"][b] for x in rs)] for b in rs[0]["ms"]}
            summary[f"{name}/{system}"] = cell
    for system in systems:
        one = summary[f"1 bucket/{system}"]
        for name in BUCKETS:
            c = summary[f"{name}/{system}"]
            c["rss_vs_one_bucket"] = c["rss_mb"] / one["rss_mb"]
            c["pss_vs_one_bucket"] = c["pss_mb"] / one["pss_mb"]
            c["pss_vs_smallest_one_bucket"] = c["pss_mb"] / summary["1 bucket/py-onnx-own"]["pss_mb"]
    sizes = {name: disk(art) for name, art in arts.items()}
    res = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_info(), "rounds": a.rounds,
           "buckets": BUCKETS, "systems": {k: SYSTEMS[k] for k in systems}, "runs": runs, "summary": summary,
           "disk": sizes, "load_before": load_before, "load_after": os.getloadavg()[0]}
    lines = [f"<!-- benchmarks/bench_static_memory.py, {res['date']}, {a.rounds} rounds -->", "",
             "| artifact | system | RSS MB above the bare runtime (vs 1 bucket) | PSS MB (vs 1 bucket) | "
             "PSS vs py-onnx-own 1 bucket | peak MB | ms per call, per bucket (median of rounds) | on disk MB |",
             "|---|---|---:|---:|---:|---:|---|---:|"]
    for name in BUCKETS:
        for system in systems:
            c = summary[f"{name}/{system}"]
            d = sizes[name]["ort_files_mb"] if system == "py-ort" else sizes[name]["onnx_buckets_plus_weights_mb"]
            calls = ", ".join(f"s{b} {v:.1f}" for b, v in c["ms"].items())
            lines.append(f"| {name} {BUCKETS[name]} | {system} | {c['rss_mb']:.1f} ({c['rss_vs_one_bucket']:.2f}x) | "
                         f"{c['pss_mb']:.1f} ({c['pss_vs_one_bucket']:.2f}x) | {c['pss_vs_smallest_one_bucket']:.2f}x | "
                         f"{c['hwm_mb']:.0f} | {calls} | {d:.1f} |")
    lines += ["", f"Weights file (fp32): {sizes['1 bucket']['weights_file_mb']:.1f} MB. Load average (1 min) "
              f"{load_before:.2f} → {res['load_after']:.2f}. Medians of {a.rounds} rounds, a fresh process each; "
              "1 intra-op thread. RSS and PSS spreads are in the JSON."]
    write_result(a.name, res, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
