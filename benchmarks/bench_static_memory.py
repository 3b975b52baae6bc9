"""Memory and disk of a static-shape artifact against its number of sequence buckets (issue 24,
item 2: "not measured yet"). A measurement, no change to the runtime.

Run from the repo root (needs the demo install: MiniLM)::

    python benchmarks/bench_static_memory.py [--rounds 3]

MiniLM-L6 with a random LoRA (r 8 on query/value, head carried), exported fp32 for a copy of the
``android-nnapi`` profile (static shapes, batch 1, ``.ort`` files) with 1, 2 and 4 sequence buckets
(``[64]``, ``[32, 64]``, ``[16, 32, 48, 64]``). Per artifact and graph format (``ort``: the
``.ort`` file of each bucket, what a phone loads; ``onnx``: the bucket ``.onnx`` graphs, which
share one external weights file), in a fresh process per (artifact, format, round), rounds
interleaved: resident memory (``VmRSS``) after ``Model(...)`` opened every bucket's session, and
``VmRSS`` / ``VmHWM`` after one classify call per bucket (texts whose length picks each bucket).
NNAPI is not in this onnxruntime build: the sessions run on CPU, which holds the weights the same
way. The baseline is the process with the runtime imported and nothing loaded.

Writes ``docs/bench/static-memory.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
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
FORMATS = ("ort", "onnx")


def log(msg: str) -> None:
    print(f"[bench-static-memory {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def worker(spec: dict) -> dict:
    from edgepeft.runtime import Model

    base_rss = status_mb("VmRSS")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NNAPI is not in this build: CPU runs
        m = Model(spec["artifact"], format=spec["format"], threads=1)
    opened = status_mb("VmRSS")
    for seq in spec["buckets"]:  # one call per bucket: ids of a length that picks it (the [CLS] id 101 first)
        n = max(2, seq - 2)
        m.classify_logits([[101] + [2000 + i for i in range(n - 2)] + [102]], adapter="lora")
    return {"rss_baseline_mb": base_rss, "rss_opened_mb": opened, "rss_after_calls_mb": status_mb("VmRSS"),
            "hwm_mb": status_mb("VmHWM")}


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
    ap.add_argument("--rounds", type=int, default=3)
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
    runs = []
    for r in range(a.rounds):
        for name in BUCKETS:
            for fmt in FORMATS:
                spec = {"artifact": str(arts[name]), "format": fmt, "buckets": BUCKETS[name]}
                p = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                                   text=True, cwd=REPO)
                if p.returncode != 0:
                    raise SystemExit(f"worker {name} {fmt} failed:\n{p.stderr[-3000:]}")
                runs.append({"artifact": name, "format": fmt, "round": r, **json.loads(p.stdout.strip().splitlines()[-1])})
    summary = {}
    for name in BUCKETS:
        for fmt in FORMATS:
            rs = [x for x in runs if x["artifact"] == name and x["format"] == fmt]
            cell = {k: statistics.median(x[k] for x in rs) for k in ("rss_baseline_mb", "rss_opened_mb",
                                                                      "rss_after_calls_mb", "hwm_mb")}
            cell["model_mb"] = cell["rss_after_calls_mb"] - cell["rss_baseline_mb"]
            cell["spread_mb"] = max(x["rss_after_calls_mb"] for x in rs) - min(x["rss_after_calls_mb"] for x in rs)
            summary[f"{name}/{fmt}"] = cell
    for fmt in FORMATS:
        one = summary[f"1 bucket/{fmt}"]["model_mb"]
        for name in BUCKETS:
            summary[f"{name}/{fmt}"]["vs_one_bucket"] = summary[f"{name}/{fmt}"]["model_mb"] / one
    sizes = {name: disk(art) for name, art in arts.items()}
    res = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_info(), "rounds": a.rounds,
           "buckets": BUCKETS, "runs": runs, "summary": summary, "disk": sizes,
           "load_before": load_before, "load_after": os.getloadavg()[0]}
    lines = [f"<!-- benchmarks/bench_static_memory.py, {res['date']}, {a.rounds} rounds -->", "",
             "| artifact | format | RSS after every bucket ran, MB above the bare runtime | vs 1 bucket | "
             "peak (VmHWM) MB | on disk MB |", "|---|---|---:|---:|---:|---:|"]
    for name in BUCKETS:
        for fmt in FORMATS:
            c = summary[f"{name}/{fmt}"]
            d = sizes[name]["ort_files_mb"] if fmt == "ort" else sizes[name]["onnx_buckets_plus_weights_mb"]
            lines.append(f"| {name} {BUCKETS[name]} | {fmt} | {c['model_mb']:.1f} (spread {c['spread_mb']:.1f}) | "
                         f"{c['vs_one_bucket']:.2f}x | {c['hwm_mb']:.1f} | {d:.1f} |")
    lines += ["", f"Weights file (fp32): {sizes['1 bucket']['weights_file_mb']:.1f} MB. Load average (1 min) "
              f"{load_before:.2f} → {res['load_after']:.2f}. Medians of {a.rounds} rounds, a fresh process each."]
    write_result("static-memory", res, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
