"""Benchmark edgepeft against PyTorch + peft on the demo model (SmolLM2-135M-Instruct), CPU.

Run from the repo root::

    python benchmarks/bench_demo.py [--quick] [--reuse] [--out benchmarks/results/bench_demo.json]

What is measured, all in one run so every number saw the same machine load:

1. Greedy decoding, batch 1, a fixed 32-token prompt, 64 new tokens (no EOS stop), 2 threads:

   a. ``edgepeft-side-base``   side-branch artifact, no adapter (rank-0 LoRA inputs)
   b. ``edgepeft-side-numbers`` side-branch artifact, ``numbers`` active
   c. ``edgepeft-side-mix``    side-branch artifact, ``{numbers: 0.5, sentiment: 0.5}``
   d. ``edgepeft-merged-numbers`` merged artifact of ``numbers`` (one plain graph)
   e. ``torch-peft-numbers``   PyTorch eager fp32 + peft, unmerged LoRA, ``numbers`` active,
      HF ``generate`` (KV cache, ``do_sample=False``, ``min_new_tokens=max_new_tokens=64``)
   f. ``torch-base``           PyTorch eager fp32, base model, same ``generate`` call

   Each (system, repeat) is a fresh subprocess (``bench_demo.py --worker NAME``) that loads the
   model, runs one untimed warm-up generation, then one timed generation, and prints one JSON
   line. Workers run one after another, never in parallel; repeats are round-robin over the
   systems (the order rotated each repeat) so load noise on the shared machine hits all systems
   alike. Numbers reported are medians over the repeats (N=5, or 2 with ``--quick``).

   Timing: the end of every forward pass is time-stamped (edgepeft: a wrapper around the
   session's ``run``; PyTorch: a forward hook on the ``*ForCausalLM`` module).
   *prefill* = from the ``generate`` call to the end of the first forward (the 32-token prompt,
   which also yields new token 1). *decode* = from there to ``generate`` returning, i.e. the
   remaining 63 one-token steps including all per-step Python work. **decode tok/s = 63 /
   decode seconds** (time per step measured directly, not 64 / (total - prefill)). The median
   single-step time is also recorded.

2. Adapter swap cost (one subprocess per system, many repeats, medians):

   - edgepeft side branch: ``Model._feeds(name)`` alternating two adapters (what a call with
     another ``adapter=`` does before running); an uncached 2-adapter mix (cache cleared each
     time) and a cached one; and a single decode step (32-token KV cache) run right after
     switching the LoRA feeds vs the same step with unchanged feeds (pattern A A B B ...: the
     first of each pair is "after swap", the second "steady").
   - merged deployment: what switching to another adapter costs there, i.e. dropping the
     session and creating a new ``onnxruntime.InferenceSession`` for a merged graph (the file is
     in the OS page cache, so this is the warm case), plus its first step vs a steady step.
   - PyTorch + peft: ``set_adapter`` alternating two loaded adapters, the first step after it vs
     a steady step, and ``load_adapter`` from disk (+ ``delete_adapter``) for comparison.

3. Peak RSS of each decode worker at its end (load + warm-up + timed run; it includes the Python
   libraries the system needs: onnxruntime + numpy for edgepeft, torch + transformers + peft for
   PyTorch). Reported: ``VmHWM`` from ``/proc/self/status``. ``getrusage(RUSAGE_SELF).ru_maxrss``
   is recorded too, but on Linux it inherits the spawning process's peak across fork + exec, so
   it is only meaningful while the parent stays small (exports therefore run in a subprocess).

4. Artifact sizes on disk and model load time (``Model(...)`` / ``from_pretrained`` in the
   decode workers, medians).

Artifacts are exported into ``benchmarks/results/artifacts/{side,merged}`` (side: both demo
adapters; merged: ``numbers``); ``--reuse`` keeps them when they exist and were made from the
same base and adapter folders. Everything raw (per-repeat worker output, step times, generated
tokens, machine info, versions) goes to the JSON file; tables go to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, median, timeit_us  # noqa: E402

REPO = HERE.parent
DEFAULT_OUT = HERE / "results" / "bench_demo.json"
DEFAULT_ADAPTERS = REPO / "edgepeft" / "demo" / "adapters"
THREADS = 2
PROMPT_LEN = 32
NEW_TOKENS = 64
MIX = {"numbers": 0.5, "sentiment": 0.5}
PROMPT_TEXT = ("The quick brown fox jumps over the lazy dog while the old farmer counts his sheep, "
               "one, two, three, four, five, and then he writes the numbers down in a small book "
               "that he keeps in the pocket of his coat.")

SYSTEMS = {  # name -> (kind, adapter choice)
    "edgepeft-side-base": ("side", None),
    "edgepeft-side-numbers": ("side", "numbers"),
    "edgepeft-side-mix": ("side", MIX),
    "edgepeft-merged-numbers": ("merged", "numbers"),
    "torch-peft-numbers": ("torch", "numbers"),
    "torch-base": ("torch", None),
}
SWAP_WORKERS = ("swap-side", "swap-merged", "swap-torch")
T_ENTRY = time.perf_counter()  # a worker's start, before it imports onnxruntime / torch


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def peak_rss() -> dict:
    """Peak RSS of this process in MB.

    ``peak_rss_mb`` is ``VmHWM`` from ``/proc/self/status``: the high-water mark of this
    process's own address space. ``ru_maxrss_mb`` (getrusage) is kept for reference, but on Linux
    it carries over the parent's peak through fork/vfork + exec (the kernel folds the old address
    space's high-water mark into it at exec), so it can never be below the spawning process's RSS.
    """
    out = {"ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KiB on Linux
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                out["peak_rss_mb"] = int(line.split()[1]) / 1024
    except OSError:
        pass
    out.setdefault("peak_rss_mb", out["ru_maxrss_mb"])
    return out


def cpu_snapshot() -> tuple[float, int, float]:
    """(process CPU seconds, involuntary context switches, wall clock) for contention diagnostics."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime, ru.ru_nivcsw, time.perf_counter()


def contention(before: tuple[float, int, float]) -> dict:
    """CPU use of the timed section: cpu_per_wall near the thread count means it had the cores;
    many involuntary context switches mean other processes took them."""
    cpu, ivcsw, wall = cpu_snapshot()
    return {"cpu_per_wall": (cpu - before[0]) / (wall - before[2]), "invol_ctx_switches": ivcsw - before[1],
            "loadavg_1m": os.getloadavg()[0]}


# ------------------------------------------------------------------ decode workers
def timing_from_stamps(t0: float, stamps: list[float], t_end: float) -> dict:
    """Prefill / decode split from forward-end time stamps (see module docstring)."""
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    decode_s = t_end - stamps[0]
    return {"forwards": len(stamps), "prefill_ms": (stamps[0] - t0) * 1e3,
            "decode_s": decode_s, "total_s": t_end - t0,
            "decode_tok_s": (len(stamps) - 1) / decode_s,
            "step_ms_median": median(steps) * 1e3 if steps else None,
            "step_ms": [round(s * 1e3, 4) for s in steps]}


def worker_edgepeft(spec: dict, kind: str, adapter) -> dict:
    import numpy as np
    import onnxruntime as ort

    from edgepeft.runtime import Model

    t = time.perf_counter()
    m = Model(spec["artifacts"][kind], threads=THREADS)
    load_s = time.perf_counter() - t
    ready_s = time.perf_counter() - T_ENTRY
    ids = np.asarray([spec["prompt_ids"]], np.int64)
    key = None if kind == "side" else adapter
    real = m._sessions[key]
    stamps: list[float] = []

    def timed_run(*a, **kw):
        out = real.run(*a, **kw)
        stamps.append(time.perf_counter())
        return out

    m._sessions[key] = SimpleNamespace(run=timed_run)
    m.generate(ids, NEW_TOKENS, adapter=adapter, stop_at_eos=False)  # warm-up
    stamps.clear()
    usage = cpu_snapshot()
    t0 = time.perf_counter()
    out = m.generate(ids, NEW_TOKENS, adapter=adapter, stop_at_eos=False)
    t_end = time.perf_counter()
    return {"load_s": load_s, "ready_s": ready_s, **timing_from_stamps(t0, stamps, t_end),
            **contention(usage), "tokens": out[0, ids.shape[1]:].tolist(), "ort_version": ort.__version__}


def load_torch(spec: dict, adapters: list[str]):
    """Base model (fp32, eval) with the given peft adapters loaded; returns (model, load seconds)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(THREADS)
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["base"], dtype=torch.float32)
    if adapters:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, Path(spec["adapters_dir"]) / adapters[0],
                                          adapter_name=adapters[0])
        for name in adapters[1:]:
            model.load_adapter(Path(spec["adapters_dir"]) / name, adapter_name=name)
        model.set_adapter(adapters[0])
    model.eval()
    return model, time.perf_counter() - t


def worker_torch(spec: dict, adapter) -> dict:
    import torch

    model, load_s = load_torch(spec, [adapter] if adapter else [])
    ready_s = time.perf_counter() - T_ENTRY
    lm = model.get_base_model() if adapter else model
    stamps: list[float] = []
    lm.register_forward_hook(lambda *_: stamps.append(time.perf_counter()))
    ids = torch.tensor([spec["prompt_ids"]], dtype=torch.long)
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
              min_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True,
              pad_token_id=spec["pad_token_id"])
    with torch.inference_mode():
        model.generate(**kw)  # warm-up
        stamps.clear()
        usage = cpu_snapshot()
        t0 = time.perf_counter()
        out = model.generate(**kw)
        t_end = time.perf_counter()
    return {"load_s": load_s, "ready_s": ready_s, **timing_from_stamps(t0, stamps, t_end), **contention(usage),
            "tokens": out[0, ids.shape[1]:].tolist(), "torch_threads": torch.get_num_threads()}


# ------------------------------------------------------------------ swap workers
def alternating_steps(step_a, step_b, pairs: int) -> dict:
    """Pattern A A B B A A ...: first of each pair runs right after a switch, second is steady."""
    after, steady = [], []
    step_b()
    for i in range(2 * pairs):
        fn = step_a if i % 2 == 0 else step_b
        for bucket in (after, steady):
            t = time.perf_counter()
            fn()
            bucket.append((time.perf_counter() - t) * 1e3)
    return {"after_swap_step_ms": median(after), "steady_step_ms": median(steady),
            "after_swap_extra_ms": median(after) - median(steady), "pairs": pairs,
            "after_swap_all_ms": [round(x, 4) for x in after],
            "steady_all_ms": [round(x, 4) for x in steady]}


def ort_step_fn(m, session, lora_of, spec):
    """Run the 32-token prompt once; return (its ms, a one-token decode step on that fixed KV
    cache). ``lora_of()`` gives the LoRA feeds for each run."""
    import numpy as np

    from edgepeft.runtime.manifest import past_names

    ids = np.asarray([spec["prompt_ids"]], np.int64)
    mask = np.ones_like(ids)
    t = time.perf_counter()
    _, *present = m._run(session, lora_of(), ids, mask, m._start(1, mask, None)[0])
    prefill_ms = (time.perf_counter() - t) * 1e3
    past = {n: v for i in range(len(m._cache)) for n, v in zip(past_names(i), present[2 * i:2 * i + 2])}
    step_ids = ids[:, -1:]
    mask1 = np.ones((1, ids.shape[1] + 1), np.int64)
    return prefill_ms, lambda: m._run(session, lora_of(), step_ids, mask1, past)


def worker_swap_side(spec: dict, quick: bool) -> dict:
    from edgepeft.runtime import Model

    m = Model(spec["artifacts"]["side"], threads=THREADS)
    n = 500 if quick else 5000
    names = ["numbers", "sentiment"]
    i = [0]

    def feeds_alternating():
        i[0] += 1
        return m._feeds(names[i[0] % 2])[0]

    def mix_uncached():
        m._mixes.clear()
        return m._feeds(MIX)[0]

    res = {"lora_feeds_name_alternating": timeit_us(feeds_alternating, n),
           "lora_feeds_none": timeit_us(lambda: m._feeds(None)[0], n),
           "lora_feeds_mix_uncached": timeit_us(mix_uncached, n // 10),
           "lora_feeds_mix_cached": timeit_us(lambda: m._feeds(MIX)[0], n)}
    session = m._sessions[None]
    pairs = 15 if quick else 60
    # the step includes _feeds for the current choice, as generate does at the start of a call
    cur = ["numbers"]
    _, step = ort_step_fn(m, session, lambda: m._feeds(cur[0])[0], spec)

    def choose(name):
        def run():
            cur[0] = name
            step()
        return run

    for _ in range(3):
        step()  # warm-up
    res["step_numbers_vs_sentiment"] = alternating_steps(choose("numbers"), choose("sentiment"), pairs)
    res["step_numbers_vs_base"] = alternating_steps(choose("numbers"), choose(None), pairs)
    res["step_numbers_vs_mix"] = alternating_steps(choose("numbers"), choose(MIX), pairs)
    return res


def worker_swap_merged(spec: dict, quick: bool) -> dict:
    import onnxruntime as ort

    from edgepeft.runtime import Model

    m = Model(spec["artifacts"]["merged"], threads=THREADS)
    graph = Path(spec["artifacts"]["merged"]) / m.manifest["adapters"]["numbers"]["graph"]["file"]
    session = m._sessions["numbers"]
    warm_prefill = [ort_step_fn(m, session, dict, spec)[0] for _ in range(4)][1:]
    _, step = ort_step_fn(m, session, dict, spec)
    for _ in range(3):
        step()
    steady = timeit_us(step, 15 if quick else 40)
    create, first_prefill, first_step = [], [], []
    for _ in range(3 if quick else 7):
        m._sessions.clear()  # a bounded-memory merged deployment holds one graph at a time
        del session, step
        gc.collect()
        t = time.perf_counter()
        session = ort.InferenceSession(str(graph), m._options, providers=m._providers)
        create.append(time.perf_counter() - t)
        m._sessions["numbers"] = session
        ms, step = ort_step_fn(m, session, dict, spec)  # the new session's first run
        first_prefill.append(ms)
        t = time.perf_counter()
        step()
        first_step.append((time.perf_counter() - t) * 1e3)
    return {"session_create_s": median(create), "session_create_all_s": create,
            "first_prefill_after_create_ms": median(first_prefill), "first_prefill_all_ms": first_prefill,
            "warm_prefill_ms": median(warm_prefill),
            "first_step_after_create_ms": median(first_step), "first_step_all_ms": first_step,
            "steady_step_ms": steady["median_us"] / 1e3, "graph": str(graph)}


def worker_swap_torch(spec: dict, quick: bool) -> dict:
    import torch

    model, _ = load_torch(spec, ["numbers", "sentiment"])
    n = 500 if quick else 5000
    names = ["numbers", "sentiment"]
    i = [0]

    def set_alternating():
        i[0] += 1
        model.set_adapter(names[i[0] % 2])

    res = {"set_adapter_alternating": timeit_us(set_alternating, n)}
    ids = torch.tensor([spec["prompt_ids"]], dtype=torch.long)
    with torch.inference_mode():
        model.set_adapter("numbers")
        past = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True).cache
        step_ids = ids[:, -1:]
        mask1 = torch.ones((1, ids.shape[1] + 1), dtype=torch.long)
        pos = torch.tensor([[ids.shape[1]]])

        def step():
            model(input_ids=step_ids, attention_mask=mask1, position_ids=pos,
                  cache=past, use_cache=True)
            past.crop(-1)  # drop the new token: the cache stays at 32, every step does the same work

        def choose(name):
            def run():
                model.set_adapter(name)
                step()
            return run

        for _ in range(3):
            step()
        res["step_numbers_vs_sentiment"] = alternating_steps(choose("numbers"), choose("sentiment"),
                                                             15 if quick else 60)
        loads = []
        for k in range(2 if quick else 5):
            t = time.perf_counter()
            model.load_adapter(Path(spec["adapters_dir"]) / "numbers", adapter_name=f"tmp{k}")
            model.set_adapter(f"tmp{k}")
            loads.append(time.perf_counter() - t)
            model.set_adapter("numbers")
            model.delete_adapter(f"tmp{k}")
        res["load_adapter_from_disk_s"] = median(loads)
        res["load_adapter_all_s"] = loads
    return res


def worker_export(spec: dict) -> dict:
    from edgepeft.export import ExportConfig, export

    t = time.perf_counter()
    export(ExportConfig(base=Path(spec["base"]), out=Path(spec["out"]), mode=spec["mode"], force=True,
                        adapters=tuple((n, Path(p)) for n, p in spec["adapters"])), quiet=True)
    return {"export_s": time.perf_counter() - t}


def run_worker(name: str, spec: dict, quick: bool) -> dict:
    if name == "export":
        res = worker_export(spec)
    elif name in SYSTEMS:
        kind, adapter = SYSTEMS[name]
        res = worker_torch(spec, adapter) if kind == "torch" else worker_edgepeft(spec, kind, adapter)
    else:
        res = {"swap-side": worker_swap_side, "swap-merged": worker_swap_merged,
               "swap-torch": worker_swap_torch}[name](spec, quick)
    return {"worker": name, **res, **peak_rss()}


# ------------------------------------------------------------------ orchestration
def ensure_artifacts(base: Path, adapters_dir: Path, root: Path, reuse: bool) -> dict:
    """Export (or reuse) the side artifact (both adapters) and the merged one (``numbers``)."""
    want = {"side": ("side", ("numbers", "sentiment")), "merged": ("merged", ("numbers",))}
    out, times = {}, {}
    for key, (mode, names) in want.items():
        path = root / key
        adapters = tuple((n, adapters_dir / n) for n in names)
        if reuse and same_export(path, base, mode, adapters):
            log(f"reusing {path}")
        else:  # in a subprocess, so this process stays small (its RSS leaks into ru_maxrss of workers)
            log(f"exporting {mode} artifact to {path} (a few minutes) ...")
            res = spawn("export", {"base": str(base), "out": str(path), "mode": mode,
                                   "adapters": [[n, str(p)] for n, p in adapters]}, False)
            if "error" in res:
                raise SystemExit(f"export of {path} failed")
            times[key] = res["export_s"]
            log(f"  done in {times[key]:.0f}s")
        out[key] = str(path)
    return {"paths": out, "export_s": times}


def same_export(path: Path, base: Path, mode: str, adapters) -> bool:
    try:
        m = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return (m.get("mode") == mode and m.get("base", {}).get("source") == str(base)
            and {n: e.get("source") for n, e in m.get("adapters", {}).items()}
            == {n: str(p.resolve()) for n, p in adapters})


def artifact_sizes(paths: dict) -> dict:
    mb = lambda p: p.stat().st_size / 2**20  # noqa: E731
    side, merged = Path(paths["side"]), Path(paths["merged"])
    sizes = {"side/model.onnx": mb(side / "model.onnx"),
             "side/model.onnx.data": mb(side / "model.onnx.data")}
    for f in sorted((side / "adapters").glob("*.onnx_adapter")):
        sizes[f"side/adapters/{f.name}"] = mb(f)
    for f in sorted((merged / "merged").iterdir()):
        sizes[f"merged/merged/{f.name}"] = mb(f)
    return sizes


def source_sizes(base: Path, adapters_dir: Path) -> dict:
    out = {"hf base model.safetensors": (base / "model.safetensors").stat().st_size / 2**20}
    for n in ("numbers", "sentiment"):
        f = adapters_dir / n / "adapter_model.safetensors"
        if f.is_file():
            out[f"peft {n}/adapter_model.safetensors"] = f.stat().st_size / 2**20
    return out


def prompt_ids(base: Path) -> list[int]:
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(base / "tokenizer.json")).encode(PROMPT_TEXT).ids
    if len(ids) < PROMPT_LEN:
        raise SystemExit(f"prompt text has only {len(ids)} tokens; need {PROMPT_LEN}")
    return ids[:PROMPT_LEN]


def spawn(name: str, spec: dict, quick: bool) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--spec", json.dumps(spec)]
    if quick:
        cmd.append("--quick")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    wall = time.perf_counter() - t
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        log(f"worker {name} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
        return {"worker": name, "error": p.stderr[-3000:], "wall_s": wall}
    return {**json.loads(lines[-1]), "wall_s": wall}


def summarize(runs: list[dict]) -> dict:
    summary = {}
    for name in SYSTEMS:
        rs = [r for r in runs if r["worker"] == name and "error" not in r]
        if not rs:
            continue
        summary[name] = {k: median([r[k] for r in rs]) for k in
                         ("prefill_ms", "decode_tok_s", "step_ms_median", "decode_s", "total_s",
                          "load_s", "ready_s", "peak_rss_mb", "ru_maxrss_mb", "cpu_per_wall", "invol_ctx_switches", "loadavg_1m")}
        summary[name]["repeats"] = len(rs)
        summary[name]["decode_tok_s_all"] = [r["decode_tok_s"] for r in rs]
        summary[name]["forwards"] = rs[0]["forwards"]
    for ref_key, ref in (("vs_torch_peft", "torch-peft-numbers"), ("vs_merged", "edgepeft-merged-numbers")):
        for name, s in summary.items():
            if ref in summary:
                s[f"{ref_key}_ratio_of_medians"] = s["decode_tok_s"] / summary[ref]["decode_tok_s"]
                paired = [a["decode_tok_s"] / b["decode_tok_s"] for a, b in
                          zip([r for r in runs if r["worker"] == name and "error" not in r],
                              [r for r in runs if r["worker"] == ref and "error" not in r])]
                s[f"{ref_key}_paired_median"] = median(paired)
    return summary


def token_agreement(runs: list[dict], eos) -> dict:
    """How many leading generated tokens each system shares with its reference (sanity check).

    HF ``min_new_tokens`` masks EOS while edgepeft (``stop_at_eos=False``) keeps an argmax EOS,
    so sequences that reach EOS early part there; ``at_eos`` flags that case.
    """
    eos = set(eos if isinstance(eos, list) else [eos])
    first = {}
    for r in runs:
        if "tokens" in r and r["worker"] not in first:
            first[r["worker"]] = r["tokens"]

    def common(a, b):
        n = 0
        for x, y in zip(a, b):
            if x != y:
                break
            n += 1
        return n

    pairs = {"edgepeft-side-base~torch-base": ("edgepeft-side-base", "torch-base"),
             "edgepeft-side-numbers~torch-peft-numbers": ("edgepeft-side-numbers", "torch-peft-numbers"),
             "edgepeft-merged-numbers~torch-peft-numbers": ("edgepeft-merged-numbers", "torch-peft-numbers"),
             "edgepeft-side-numbers~edgepeft-merged-numbers": ("edgepeft-side-numbers", "edgepeft-merged-numbers")}
    out = {}
    for k, (a, b) in pairs.items():
        if a in first and b in first:
            n = common(first[a], first[b])
            out[k] = {"common": n, "at_eos": n < len(first[a]) and (first[a][n] in eos or first[b][n] in eos)}
    return out


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_tables(result: dict) -> None:
    s = result["summary"]
    n = result["config"]["repeats"]
    print(f"\nDecode, batch 1, {PROMPT_LEN}-token prompt + {NEW_TOKENS} greedy tokens, {THREADS} threads, "
          f"median of {n} (decode tok/s = {NEW_TOKENS - 1} steps / decode time)")
    head = (f"{'system':<26}{'prefill ms':>11}{'decode tok/s':>13}{'ms/step':>9}{'vs torch+peft':>14}"
            f"{'vs merged':>10}{'peak RSS MB':>12}{'load s':>8}{'ready s':>8}{'CPU/wall':>9}")
    print(head)
    print("-" * len(head))
    for name, v in s.items():
        print(f"{name:<26}{fmt(v['prefill_ms'], '11.1f')}{fmt(v['decode_tok_s'], '13.1f')}"
              f"{fmt(v['step_ms_median'], '9.2f')}{fmt(v.get('vs_torch_peft_ratio_of_medians'), '13.2f')}x"
              f"{fmt(v.get('vs_merged_ratio_of_medians'), '9.2f')}x{fmt(v['peak_rss_mb'], '12.0f')}"
              f"{fmt(v['load_s'], '8.2f')}{fmt(v['ready_s'], '8.2f')}{fmt(v['cpu_per_wall'], '9.2f')}")
    print("(ratios: decode tok/s of the row / that of the reference, ratio of medians; paired "
          "per-repeat ratios are in the JSON. load s: Model(...) / from_pretrained; ready s: process "
          "start (after Python itself) to model ready, incl. imports. CPU/wall: process CPU "
          f"seconds per wall second during the timed generate; well below {THREADS} = other jobs "
          "took the cores)")

    sw = result["swap"]
    print("\nAdapter swap")
    head = f"{'system / operation':<62}{'median':>14}"
    print(head)
    print("-" * len(head))
    rows = []
    side = sw.get("swap-side", {})
    if "error" not in side and side:
        rows += [("edgepeft side: _feeds(name), alternating 2 adapters",
                  f"{side['lora_feeds_name_alternating']['median_us']:.1f} us"),
                 ("edgepeft side: _feeds(None)", f"{side['lora_feeds_none']['median_us']:.1f} us"),
                 ("edgepeft side: _feeds(50/50 mix), uncached",
                  f"{side['lora_feeds_mix_uncached']['median_us']:.1f} us"),
                 ("edgepeft side: _feeds(50/50 mix), cached",
                  f"{side['lora_feeds_mix_cached']['median_us']:.1f} us")]
        for key, label in (("step_numbers_vs_sentiment", "numbers<->sentiment"),
                           ("step_numbers_vs_base", "numbers<->base"),
                           ("step_numbers_vs_mix", "numbers<->mix")):
            d = side[key]
            rows += [(f"edgepeft side: decode step after swap {label}", f"{d['after_swap_step_ms']:.2f} ms"),
                     ("    steady step (same adapter as previous call)", f"{d['steady_step_ms']:.2f} ms")]
    mg = sw.get("swap-merged", {})
    if "error" not in mg and mg:
        rows += [("merged: new InferenceSession for a merged graph (warm cache)",
                  f"{mg['session_create_s'] * 1e3:.0f} ms"),
                 ("    its first run (32-token prefill)", f"{mg['first_prefill_after_create_ms']:.1f} ms"),
                 ("    32-token prefill on a warm session", f"{mg['warm_prefill_ms']:.1f} ms"),
                 ("    its first decode step", f"{mg['first_step_after_create_ms']:.2f} ms"),
                 ("    steady decode step", f"{mg['steady_step_ms']:.2f} ms")]
    th = sw.get("swap-torch", {})
    if "error" not in th and th:
        d = th["step_numbers_vs_sentiment"]
        rows += [("torch+peft: set_adapter, alternating 2 adapters",
                  f"{th['set_adapter_alternating']['median_us']:.1f} us"),
                 ("torch+peft: decode step after set_adapter numbers<->sentiment",
                  f"{d['after_swap_step_ms']:.2f} ms"),
                 ("    steady step", f"{d['steady_step_ms']:.2f} ms"),
                 ("torch+peft: load_adapter from disk + set_adapter", f"{th['load_adapter_from_disk_s'] * 1e3:.0f} ms")]
    for label, val in rows:
        print(f"{label:<62}{val:>14}")

    print("\nSizes on disk (MB)")
    for k, v in {**result["artifacts"]["sizes_mb"], **result["artifacts"]["source_sizes_mb"]}.items():
        print(f"  {k:<50}{v:10.2f}")
    if result.get("token_agreement"):
        print(f"\nLeading generated tokens in common (of {NEW_TOKENS}; 'at EOS' = edgepeft keeps an "
              "argmax EOS, HF min_new_tokens masks it, so they part there by design):")
        for k, v in result["token_agreement"].items():
            print(f"  {k:<50}{v['common']:>3}{'  at EOS' if v['at_eos'] else ''}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 repeats and fewer swap iterations")
    ap.add_argument("--repeats", type=int, default=None, help="override the repeat count")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    ap.add_argument("--reuse", action="store_true", help="reuse exported artifacts when they exist")
    ap.add_argument("--adapters-dir", type=Path, default=DEFAULT_ADAPTERS,
                    help="folder with the numbers/ and sentiment/ peft adapters")
    ap.add_argument("--artifacts-dir", type=Path, default=HERE / "results" / "artifacts")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print(json.dumps(run_worker(args.worker, json.loads(args.spec), args.quick)), flush=True)
        return 0

    t_start = time.perf_counter()
    from edgepeft.demo.data import smollm2_dir

    base = Path(smollm2_dir())
    adapters_dir = args.adapters_dir.resolve()
    for n in ("numbers", "sentiment"):
        if not (adapters_dir / n / "adapter_config.json").is_file():
            raise SystemExit(f"{adapters_dir / n}: no peft adapter there; train the demo adapters "
                             "(python -m edgepeft.demo.train) or pass --adapters-dir")
    repeats = args.repeats or (2 if args.quick else 5)
    info = machine_info()
    log(f"{info['cpu_model']}, {info['cpus_usable']} usable cores, load avg {info['loadavg_start']}")
    arts = ensure_artifacts(base, adapters_dir, args.artifacts_dir.resolve(), args.reuse)
    gen_cfg = json.loads((base / "generation_config.json").read_text())
    spec = {"base": str(base), "adapters_dir": str(adapters_dir), "artifacts": arts["paths"],
            "prompt_ids": prompt_ids(base), "pad_token_id": gen_cfg.get("pad_token_id", 0)}

    runs = []
    names = list(SYSTEMS)
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            log(f"repeat {r + 1}/{repeats}: {name}")
            res = spawn(name, spec, args.quick)
            res["repeat"] = r
            runs.append(res)
            if "error" not in res:
                log(f"  prefill {res['prefill_ms']:.1f} ms, decode {res['decode_tok_s']:.1f} tok/s, "
                    f"peak RSS {res['peak_rss_mb']:.0f} MB")
    swap = {}
    for name in SWAP_WORKERS:
        log(f"swap: {name}")
        swap[name] = spawn(name, spec, args.quick)

    result = {
        "config": {"prompt_len": PROMPT_LEN, "new_tokens": NEW_TOKENS, "threads": THREADS,
                   "repeats": repeats, "quick": args.quick, "mix": MIX, "prompt_ids": spec["prompt_ids"],
                   "decode_tok_s_definition": f"{NEW_TOKENS - 1} one-token steps / (time from end of "
                                              "first forward to generate() returning)",
                   "prefill_definition": "generate() call to end of first forward (32-token prompt)"},
        "machine": {**info, "loadavg_end": os.getloadavg()},
        "artifacts": {**arts, "sizes_mb": artifact_sizes(arts["paths"]),
                      "source_sizes_mb": source_sizes(base, adapters_dir)},
        "summary": summarize(runs),
        "swap": swap,
        "token_agreement": token_agreement(runs, gen_cfg.get("eos_token_id")),
        "runs": runs,
    }
    result["total_s"] = time.perf_counter() - t_start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print_tables(result)
    print(f"\nTotal run time {result['total_s']:.0f} s; raw numbers in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
