"""``edgepeft bench``: speed, memory and size of an artifact, per adapter and mix, side by side
with its merged graph and PyTorch eager + peft, all measured in one run.

What runs (every row of a repeat is a fresh subprocess, :mod:`edgepeft.bench.workers`, so each
process's peak RSS is its own; rows run one after another, never in parallel, and the repeats go
round-robin over the rows with the order rotated each repeat, so load on a shared machine hits
every row alike; reported numbers are medians over the repeats, latency percentiles over all
samples of all repeats):

- rows: ``edgepeft-side`` (the artifact) for the base model (causal LMs; classifiers only with
  a trained base head), each adapter, and a mix of its LoRA adapters (equal weights);
  ``edgepeft-merged`` for one adapter (see below); ``torch`` (PyTorch eager fp32 + peft,
  unmerged; edgepeft's own module for bottleneck adapters; a mix through peft's
  ``add_weighted_adapter(..., "cat")``) for the same choices, with ``--compare-torch BASE``.
- causal LM, batch 1, a fixed prompt: prefill latency (the prompt's forward with an empty cache,
  p50 / p95 over ``prefill_samples`` calls per repeat) and greedy decoding of ``new_tokens``
  tokens (decode tokens/s = one-token steps / time from the end of the first forward to the
  call returning; EOS does not stop it). Classifiers: latency per batch (token ids in, logits
  out) at each batch size, p50 / p95.
- load time (``Model(...)`` / ``from_pretrained``), peak RSS (``VmHWM``: load + warm-up + timed
  calls, with the libraries each system needs).
- adapter swap latency: side artifact: the feeds for another adapter (what a call with another
  ``adapter=`` costs before running), an uncached and a cached mix, a model step right after a
  swap vs a steady one; merged: a new ``InferenceSession`` for another adapter's graph; torch:
  ``set_adapter`` and the step after it, ``load_adapter`` from disk.
- resident memory added per loaded adapter: RSS before / after loading one more copy of each
  adapter (side: ``Model.add_adapter``; merged: one more session; torch: ``load_adapter``).
- sizes on disk: the graph, each adapter file, the merged graph, the PEFT folders' safetensors.

"vs merged": a side artifact's rows are compared with a merged graph of one adapter (the
mergeable one with the largest file, or ``merged_adapter``) at the artifact's precision. It is
taken from ``merged`` (an existing merged artifact) or exported once into
``$XDG_CACHE_HOME/edgepeft/bench-merged/`` (default ``~/.cache``), keyed by base fingerprint,
adapter checksum and precision, when the base model folder is available (``--compare-torch`` or
the one recorded at export). Ratios are speed ratios of medians: a row's decode tokens/s over the
reference's, the reference's latency over the row's; above 1 the row is faster.

The result dict is written as ``bench.json`` with ``bench.png`` (the plots) into ``out``
(default ``ARTIFACT/bench``). This module runs no model in its own process: the torch and export
workers do, in theirs. Which adapters mix, merge or run a PyTorch mix is read from the kinds'
descriptions (:mod:`edgepeft.kinds`: ``MERGEABLE``, ``REFERENCE``), imported only when asked,
since the kind modules import torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from edgepeft.errors import EdgepeftError
from edgepeft.runtime.adapters import case_name

PROMPT_TEXT = ("The quick brown fox jumps over the lazy dog while the old farmer counts his sheep, "
               "one, two, three, four, five, and then he writes the numbers down in a small book "
               "that he keeps in the pocket of his coat. ")
TEXTS = ("a warm, funny and surprisingly moving film", "dull, overlong and painfully unfunny",
         "the cast is terrific but the script lets them down", "an instant classic",
         "I wanted to like it more than I did", "visually stunning, emotionally empty",
         "a clever thriller that keeps you guessing until the very last scene",
         "not worth the price of the ticket")


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        from edgepeft.progress import write

        write(f"[bench {time.strftime('%H:%M:%S')}] {msg}")


def percentile(xs: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(xs, float), q)) if xs else None


def median(xs):
    xs = [x for x in xs if x is not None]
    return float(np.median(xs)) if xs else None


# ------------------------------------------------------------------ inputs
def _tokenizer(root: Path, manifest: dict):
    tok = manifest.get("tokenizer")
    if not tok:
        return None
    from tokenizers import Tokenizer

    from edgepeft.contract import inside

    file = inside(root, f"{tok['dir']}/tokenizer.json", str(root / "manifest.json"))
    try:
        t = Tokenizer.from_file(str(file))
    except Exception:  # noqa: BLE001 - a text-less artifact still benchmarks on token ids
        return None
    t.no_padding()
    t.no_truncation()
    return t


def prompt_ids(root: Path, manifest: dict, n: int) -> list[int]:
    """``n`` token ids of a fixed English text (random ids, seeded, without a tokenizer)."""
    tok = _tokenizer(root, manifest)
    if tok is not None:
        ids = tok.encode(PROMPT_TEXT * (1 + n // 20)).ids
        if len(ids) >= n:
            return ids[:n]
    vocab = manifest["base"]["vocab_size"]
    return np.random.default_rng(0).integers(min(3, vocab - 1), vocab, n).tolist()


def classifier_batches(root: Path, manifest: dict, sizes: list[int]) -> dict:
    """Right-padded ``{"ids", "mask"}`` per batch size, from fixed review-like texts."""
    tok = _tokenizer(root, manifest)
    pad = (manifest.get("tokenizer") or {}).get("pad_token_id") or 0
    vocab = manifest["base"]["vocab_size"]
    rng = np.random.default_rng(0)
    out = {}
    for b in sizes:
        if tok is not None:
            rows = [e.ids for e in tok.encode_batch([TEXTS[i % len(TEXTS)] for i in range(b)])]
        else:
            rows = [rng.integers(min(3, vocab - 1), vocab, 8 + (i % 5) * 3).tolist() for i in range(b)]
        longest = max(len(r) for r in rows)
        ids = np.full((b, longest), pad, np.int64)
        mask = np.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = r, 1
        out[str(b)] = {"ids": ids.tolist(), "mask": mask.tolist(), "tokens": int(mask.sum())}
    return out


def bench_choices(manifest: dict) -> list:
    """What is measured: base (causal LM, or a classifier with a trained head), each adapter,
    and an equal-weight mix of the adapters that mix by weight (:func:`edgepeft.contract.mixes`),
    of the first one's kind, without a head (two or more; read from the manifest alone, so the
    runtime install benches mixes too)."""
    from edgepeft.contract import mixes

    entries = manifest["adapters"]
    if manifest["mode"] == "merged":
        return list(entries)
    base_ok = manifest["task"] == "causal-lm" or manifest["base"].get("head_trained", True)
    choices: list = ([None] if base_ok else []) + list(entries)
    names = [n for n in entries if mixes(manifest, n) and not entries[n].get("head")]
    group = [n for n in names if entries[n]["kind"] == entries[names[0]]["kind"]] if names else []
    if len(group) >= 2:
        choices.append({n: round(1 / len(group), 4) for n in group})
    return choices


# ------------------------------------------------------------------ workers
def _spawn(worker: str, spec: dict) -> dict:
    """Run one worker in a fresh interpreter on this same edgepeft; its JSON result."""
    import edgepeft

    what = f"{worker} ({spec['system']} {case_name(spec['choice'])})" if worker == "run" else worker
    root = str(Path(edgepeft.__file__).resolve().parent.parent)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
           "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    t = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-m", "edgepeft.bench.workers"], capture_output=True, text=True,
                           env=env, input=json.dumps({"worker": worker, "spec": spec}), timeout=3600)
    except subprocess.TimeoutExpired:
        raise EdgepeftError(f"bench worker {what} took over an hour; stopped.") from None
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    res = json.loads(lines[-1]) if lines else {"error": f"exit code {p.returncode}"}
    if "user_error" in res:
        raise EdgepeftError(res["user_error"])
    if "error" in res:
        tail = " | ".join(p.stderr.strip().splitlines()[-3:])[-600:]
        raise EdgepeftError(f"bench worker {what} failed: {res['error']}" + (f" [{tail}]" if tail else ""))
    return {**res, "wall_s": time.perf_counter() - t}


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgepeft" / "bench-merged"


def _mergeable_kinds() -> list[str]:
    """Manifest kinds whose module can merge (``MERGEABLE``), in registry order."""
    from edgepeft.kinds import BY_NAME

    return [k for k, m in BY_NAME.items() if m.MERGEABLE]


def _pick_merged_adapter(manifest: dict, root: Path, wanted: str | None) -> str | None:
    from edgepeft.kinds import kind_module

    entries = manifest["adapters"]
    if wanted is not None:
        if wanted not in entries:
            raise EdgepeftError(f"--merged-adapter {wanted!r}: not in {root}; it has: {', '.join(entries)}.")
        if not kind_module(entries[wanted]["kind"]).MERGEABLE:
            raise EdgepeftError(f"--merged-adapter {wanted!r}: a {entries[wanted]['kind']} adapter cannot "
                                f"be merged (only {', '.join(_mergeable_kinds())}).")
        return wanted
    from edgepeft.contract import inside

    ok = [n for n, e in entries.items() if kind_module(e["kind"]).MERGEABLE]

    def size(n):
        f = inside(root, entries[n]["file"], str(root / "manifest.json"))
        return f.stat().st_size if f.is_file() else 0

    return max(ok, key=size) if ok else None


def _merged_artifact(root: Path, manifest: dict, merged: str | Path, adapter: str | None, base: Path | None,
                     adapter_dirs: dict, quiet: bool) -> tuple[Path | None, str | None, str]:
    """(merged artifact dir or None, its adapter, a note on where it came from / why none)."""
    from edgepeft.contract import read_manifest

    if manifest["mode"] != "side" or merged == "no":
        return None, None, "not compared" if merged == "no" else "the artifact is merged itself"
    if merged != "auto":
        path = Path(merged)
        m = read_manifest(path)
        if m["mode"] != "merged":
            raise EdgepeftError(f"--merged {path}: a {m['mode']} artifact; pass a merged one "
                                "(edgepeft export --mode merged).")
        if m["base"]["fingerprint"] != manifest["base"]["fingerprint"]:
            raise EdgepeftError(f"--merged {path}: exported from another base model than {root}.")
        if adapter is None:
            adapter = next(iter(m["adapters"]), None)
        if adapter not in m["adapters"]:
            raise EdgepeftError(f"--merged {path}: holds {', '.join(m['adapters'])}, not {adapter!r}.")
        return path, adapter, f"given: {path}"
    from edgepeft.toolchain import TOOLCHAIN_PIP, missing_toolchain

    if missing_toolchain():
        return None, None, f"not compared: --merged auto exports one, which needs the toolchain ({TOOLCHAIN_PIP})"
    adapter = _pick_merged_adapter(manifest, root, adapter)
    if adapter is None:
        return None, None, f"no mergeable adapter ({', '.join(_mergeable_kinds())}) in the artifact"
    if base is None or not (base / "config.json").is_file():
        return None, adapter, (f"base model folder {base} not found: pass --compare-torch BASE or "
                               "--merged DIR")
    src = Path(adapter_dirs.get(adapter, ""))
    if not (src / "adapter_config.json").is_file():
        return None, adapter, f"adapter folder {src} of {adapter!r} not found: pass --adapter {adapter}=DIR"
    entry = manifest["adapters"][adapter]
    graph = "fused" if manifest["graph"].get("layout") == "fused" else "generic"  # compare like with like
    key = hashlib.sha256(json.dumps([manifest["base"]["fingerprint"], entry["sha256"], manifest["precision"],
                                     manifest.get("quantization"), graph], sort_keys=True).encode()).hexdigest()[:16]
    path = _cache_dir() / f"{adapter}-{manifest['precision']}-{key}"
    try:
        ok = read_manifest(path)["mode"] == "merged"
    except EdgepeftError:
        ok = False
    if ok:
        return path, adapter, f"cached: {path}"
    _log(f"exporting a merged graph of {adapter!r} to {path} (once; reused by later runs) ...", quiet)
    path.parent.mkdir(parents=True, exist_ok=True)
    res = _spawn("export-merged", {"base": str(base), "out": str(path), "adapter": adapter,
                                   "adapter_dir": str(src), "precision": manifest["precision"],
                                   "quantization": manifest.get("quantization"), "graph": graph})
    return path, adapter, f"exported in {res['export_s']:.0f} s: {path}"


def _torch_runs(manifest: dict, choice) -> bool:
    """Whether PyTorch has a row for ``choice``: always, except a mix, which needs its adapters of
    one kind whose reference can combine them (``Reference.combine``)."""
    if not isinstance(choice, dict):
        return True
    from edgepeft.kinds import kind_module

    kinds = {kind_module(manifest["adapters"][n]["kind"]) for n in choice}
    return len(kinds) == 1 and next(iter(kinds)).REFERENCE.combine is not None


# ------------------------------------------------------------------ summary
def summarize(rows: list[dict], runs: list[dict], task: str, batch_sizes: list[int]) -> dict:
    out = {}
    for row in rows:
        rs = [r for r in runs if r["row"] == row["key"]]
        s = {"system": row["system"], "case": row["case"], "choice": row["choice"], "repeats": len(rs),
             "load_s": median([r["load_s"] for r in rs]), "peak_rss_mb": median([r["peak_rss_mb"] for r in rs])}
        if task == "causal-lm":
            pre = [x for r in rs for x in r["prefill_ms"]]
            s.update(prefill_ms_p50=percentile(pre, 50), prefill_ms_p95=percentile(pre, 95),
                     prefill_samples=len(pre), decode_tok_s=median([r["decode_tok_s"] for r in rs]),
                     decode_tok_s_all=[r["decode_tok_s"] for r in rs],
                     step_ms_median=median([r["step_ms_median"] for r in rs]),
                     cpu_per_wall=median([r["cpu_per_wall"] for r in rs]))
        else:
            for b in batch_sizes:
                xs = [x for r in rs for x in r[f"batch{b}_ms"]]
                s[f"batch{b}_ms_p50"], s[f"batch{b}_ms_p95"] = percentile(xs, 50), percentile(xs, 95)
            s["cpu_per_wall"] = median([r.get("cpu_per_wall") for r in rs])
        out[row["key"]] = s
    return out


def _speed(task: str, batch_sizes: list[int]) -> list[tuple[str, str, bool]]:
    """(ratio name, summary field, higher is faster)."""
    if task == "causal-lm":
        return [("decode", "decode_tok_s", True), ("prefill", "prefill_ms_p50", False)]
    return [(f"batch{b}", f"batch{b}_ms_p50", False) for b in batch_sizes]


def add_ratios(summary: dict, task: str, batch_sizes: list[int], merged_key: str | None) -> None:
    """Speed ratios of medians (>1: the row is faster): ``vs_torch`` against the torch row of the
    same choice, ``vs_merged`` against the merged row."""
    for key, s in summary.items():
        refs = {"vs_torch": f"torch:{s['case']}", "vs_merged": merged_key}
        for label, ref in refs.items():
            r = summary.get(ref) if ref else None
            if r is None or s["system"] == "torch" and label == "vs_torch":
                continue
            s[label] = {}
            for name, field, higher in _speed(task, batch_sizes):
                a, b = s.get(field), r.get(field)
                if a and b:
                    s[label][name] = a / b if higher else b / a


def sizes_mb(root: Path, manifest: dict, merged: Path | None, adapter_dirs: dict) -> dict:
    from edgepeft.contract import inside

    mb = lambda p: p.stat().st_size / 2**20 if p.is_file() else None  # noqa: E731
    where = str(root / "manifest.json")
    out: dict = {}
    if manifest["mode"] == "side":
        g = manifest["graph"]
        out["graph"] = sum(filter(None, (mb(inside(root, g[k], where)) for k in ("file", "data_file"))))
        for n, e in manifest["adapters"].items():
            out[f"adapter {n}"] = mb(inside(root, e["file"], where))
    else:
        for n, e in manifest["adapters"].items():
            g = e["graph"]
            out[f"merged graph {n}"] = sum(filter(None, (mb(inside(root, g[k], where)) for k in ("file", "data_file"))))
    if merged is not None:
        m = json.loads((merged / "manifest.json").read_text())
        for n, e in m["adapters"].items():
            g = e["graph"]
            out[f"merged graph {n}"] = sum(filter(None, (mb(merged / g[k]) for k in ("file", "data_file"))))
    for n, d in adapter_dirs.items():
        f = Path(d) / "adapter_model.safetensors"
        if f.is_file():
            out[f"peft {n}/adapter_model.safetensors"] = mb(f)
    out["artifact total"] = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()
                                and "bench" not in p.relative_to(root).parts[:1]) / 2**20
    return out


# ------------------------------------------------------------------ main entry
def run_bench(artifact: Path, out: Path | None = None, compare_torch: Path | None = None,
              merged: str | Path = "auto", merged_adapter: str | None = None, repeats: int = 5,
              prefill_samples: int = 10, new_tokens: int = 64, prompt_tokens: int = 32,
              batch_sizes: tuple[int, ...] = (1, 16), batch_samples: int = 20, threads: int | None = None,
              adapter_dirs: dict[str, Path] | None = None, quiet: bool = False) -> dict:
    """Benchmark an artifact (see the module docstring); writes ``bench.json`` and ``bench.png``.

    Args:
        artifact: an ``edgepeft export`` directory (side or merged; causal LM or classifier).
        out: folder for ``bench.json`` and ``bench.png``; default ``artifact/bench``.
        compare_torch: the base model folder: adds PyTorch eager + peft rows (and lets the merged
            reference be exported).
        merged: ``"auto"`` (a cached merged export when the base folder is available), ``"no"``, or
            an existing merged artifact directory.
        merged_adapter: the adapter of the merged reference; default the largest mergeable one.
        repeats: fresh processes per row (round-robin).
        prefill_samples / batch_samples: timed calls per process for the latency percentiles.
        new_tokens: greedy tokens per timed generation (causal LM).
        prompt_tokens: prompt length (causal LM).
        batch_sizes: classifier batch sizes.
        threads: onnxruntime intra-op and torch threads; default the usable cores.
        adapter_dirs: PEFT folders per adapter for torch; default the ones recorded at export.
        quiet: no progress on stderr.

    Raises:
        EdgepeftError: not an artifact, a missing base or adapter folder, bad options, a base
            that is not the artifact's, or a worker that failed.
    """
    from edgepeft.progress import bar
    from edgepeft.contract import read_manifest

    t_start = time.perf_counter()
    root = Path(artifact)
    manifest = read_manifest(root)
    task = manifest["task"]
    if task not in ("causal-lm", "classification"):
        raise EdgepeftError(f"{root}: task {task!r} cannot be benchmarked by this edgepeft version.")
    for name, v, lo in (("--repeats", repeats, 1), ("--prefill-samples", prefill_samples, 1),
                        ("--new-tokens", new_tokens, 2), ("--prompt-tokens", prompt_tokens, 1),
                        ("--batch-samples", batch_samples, 1)):
        if v < lo:
            raise EdgepeftError(f"{name} must be at least {lo}; got {v}.")
    batch_sizes = sorted(set(batch_sizes))
    if not batch_sizes or min(batch_sizes) < 1:
        raise EdgepeftError(f"--batch-sizes must be positive integers; got {batch_sizes}.")
    if task == "classification" and 1 not in batch_sizes:
        batch_sizes = [1, *batch_sizes]  # the swap step runs batch 1
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    out = Path(out) if out is not None else root / "bench"
    dirs = {n: str(e.get("source") or "") for n, e in manifest["adapters"].items()}
    dirs.update({n: str(p) for n, p in (adapter_dirs or {}).items()})
    unknown = sorted(set(adapter_dirs or {}) - set(manifest["adapters"]))
    if unknown:
        raise EdgepeftError(f"--adapter {unknown[0]}=...: no adapter {unknown[0]!r} in {root}; it has: "
                            f"{', '.join(manifest['adapters']) or '(none)'}.")
    base = None
    if compare_torch is not None:
        base = Path(compare_torch)
        if not (base / "config.json").is_file():
            raise EdgepeftError(f"--compare-torch {base}: not a Hugging Face model folder (no config.json). "
                                "Pass the base model folder the artifact was exported from.")
        for n, d in dirs.items():
            if not (Path(d) / "adapter_config.json").is_file():
                raise EdgepeftError(f"{d or '(no path recorded)'}: adapter {n!r}'s PEFT folder is not there "
                                    f"(PyTorch needs it). Pass --adapter {n}=DIR.")
    elif manifest["base"].get("source"):
        src = Path(manifest["base"]["source"])
        base = src if (src / "config.json").is_file() else None
    merged_path, merged_name, merged_note = _merged_artifact(root, manifest, merged, merged_adapter, base,
                                                             dirs, quiet)

    choices = bench_choices(manifest)
    own = "edgepeft-merged" if manifest["mode"] == "merged" else "edgepeft-side"
    rows = [{"system": own, "choice": c} for c in choices]
    if merged_path is not None:
        rows.append({"system": "edgepeft-merged", "choice": merged_name})
    if compare_torch is not None:
        rows += [{"system": "torch", "choice": c} for c in choices if _torch_runs(manifest, c)]
    for r in rows:
        r["case"] = case_name(r["choice"])
        r["key"] = f"{r['system']}:{r['case']}"
    merged_key = f"edgepeft-merged:{merged_name}" if merged_path is not None else None

    merged_dir = root if manifest["mode"] == "merged" else merged_path  # what "merged" rows load
    spec = {"artifact": str(root), "merged": str(merged_dir) if merged_dir else None, "task": task,
            "threads": threads, "base": str(base) if base else None, "adapter_dirs": dirs,
            "adapters": [n for n in manifest["adapters"]], "fingerprint": manifest["base"]["fingerprint"],
            "kinds": {n: e["kind"] for n, e in manifest["adapters"].items()},
            "num_labels": manifest["base"].get("num_labels"), "merged_adapter": merged_name,
            "mix": next((c for c in choices if isinstance(c, dict)), None),
            "swap_iters": 2000, "swap_pairs": 20, "session_repeats": 3}
    if task == "causal-lm":
        spec.update(prompt_ids=prompt_ids(root, manifest, prompt_tokens), new_tokens=new_tokens,
                    prefill_samples=prefill_samples,
                    pad_token_id=(manifest.get("tokenizer") or {}).get("pad_token_id") or 0)
    else:
        spec.update(batches=classifier_batches(root, manifest, batch_sizes), batch_samples=batch_samples)

    swaps = []
    if compare_torch is not None:
        swaps.append("swap-torch")  # first: it checks the base fingerprint, so a wrong BASE fails early
    if manifest["mode"] == "side":
        swaps.append("swap-side")
    if merged_path is not None:
        swaps.append("swap-merged")
    _log(f"{root}: {task} {manifest['mode']} {manifest['precision']}; {len(rows)} rows x {repeats} repeats "
         f"+ {len(swaps)} swap workers, {threads} threads; merged reference: {merged_note}", quiet)
    progress = bar(total=len(swaps) + len(rows) * repeats, desc="bench", quiet=quiet, unit="proc")
    swap: dict = {}
    runs: list[dict] = []
    try:
        for w in swaps:
            progress.set_postfix_str(w)
            swap[w] = _spawn(w, spec)
            progress.update()
        for rep in range(repeats):
            k = rep % len(rows)
            for row in rows[k:] + rows[:k]:
                progress.set_postfix_str(f"{rep + 1}/{repeats} {row['key']}")
                res = _spawn("run", {**spec, "system": row["system"].removeprefix("edgepeft-"),
                                     "choice": row["choice"]})
                runs.append({"row": row["key"], "repeat": rep, **res})
                progress.update()
    finally:
        progress.close()

    summary = summarize(rows, runs, task, batch_sizes)
    add_ratios(summary, task, batch_sizes, merged_key)
    result = {
        "artifact": str(root), "task": task, "mode": manifest["mode"], "precision": manifest["precision"],
        "config": {"repeats": repeats, "threads": threads, "compare_torch": str(base) if compare_torch else None,
                   "merged": str(merged_path) if merged_path else None, "merged_adapter": merged_name,
                   "merged_note": merged_note,
                   **({"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "batch": 1,
                       "prefill_samples_per_repeat": prefill_samples} if task == "causal-lm" else
                      {"batch_sizes": batch_sizes, "batch_tokens": {b: spec["batches"][str(b)]["tokens"]
                                                                    for b in batch_sizes},
                       "batch_samples_per_repeat": batch_samples})},
        "definitions": {
            "ratio": "speed ratio of medians, >1 = the row is faster: decode tok/s row / reference; "
                     "latency reference / row. vs_torch: the torch row of the same case; vs_merged: the "
                     "merged row",
            "prefill_ms": "forward of the prompt with an empty KV cache, batch 1; p50/p95 over all samples",
            "decode_tok_s": "(new_tokens - 1) one-token steps / time from the end of the first forward "
                            "to generate returning; median over repeats",
            "peak_rss_mb": "VmHWM of the row's own process (load, warm-up, timed calls); median",
            "memory_per_adapter": "RSS added by loading one more copy of the adapter",
        },
        "summary": summary, "swap": swap, "sizes_mb": sizes_mb(root, manifest, merged_path,
                                                                 dirs if compare_torch is not None else {}),
        "runs": runs,
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0],
                    "cpu": _cpu_model(),
                    "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                    "loadavg_end": os.getloadavg()},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=1) + "\n")
    result["files"] = {"json": str(out / "bench.json")}
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        result["files"]["png_not_drawn"] = "matplotlib is part of the toolchain (edgepeft[export])"
    else:
        from edgepeft.bench.plot import write_png

        write_png(result, out / "bench.png")
        result["files"]["png"] = str(out / "bench.png")
    return result


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ------------------------------------------------------------------ text
def _f(x, spec: str, suffix: str = "") -> str:
    return "-" if x is None else format(x, spec) + suffix


def format_bench(result: dict) -> str:
    """The tables printed by ``edgepeft bench``."""
    c, s, task = result["config"], result["summary"], result["task"]
    lines = []
    if task == "causal-lm":
        lines.append(f"{result['artifact']}: causal LM, {result['mode']}, {result['precision']}; batch 1, "
                     f"{c['prompt_tokens']}-token prompt, {c['new_tokens']} greedy tokens, {_threads(c['threads'])}; "
                     f"medians of {c['repeats']} fresh processes per row (round-robin)")
        head = (f"{'system':<16}{'case':<30}{'prefill p50':>12}{'p95 ms':>8}{'decode tok/s':>13}"
                f"{'vs torch':>9}{'vs merged':>10}{'load s':>8}{'peak RSS MB':>12}{'CPU/wall':>9}")
    else:
        bs = c["batch_sizes"]
        lines.append(f"{result['artifact']}: classifier, {result['mode']}, {result['precision']}; latency per "
                     f"batch (token ids in, logits out), batch sizes {', '.join(map(str, bs))}; "
                     f"{_threads(c['threads'])}; medians of {c['repeats']} fresh processes per row (round-robin)")
        head = f"{'system':<16}{'case':<30}" + "".join(f"{f'b{b} p50':>9}{'p95 ms':>8}{'vs torch':>9}{'vs merged':>10}"
                                                      for b in bs) + f"{'load s':>8}{'peak RSS MB':>12}{'CPU/wall':>9}"
    lines += [head, "-" * len(head)]
    for v in s.values():
        line = f"{v['system']:<16}{v['case'][:29]:<30}"
        vt, vm = v.get("vs_torch", {}), v.get("vs_merged", {})
        if task == "causal-lm":
            line += (f"{_f(v['prefill_ms_p50'], '12.1f')}{_f(v['prefill_ms_p95'], '8.1f')}"
                     f"{_f(v['decode_tok_s'], '13.1f')}{_f(vt.get('decode'), '8.2f', 'x'):>9}"
                     f"{_f(vm.get('decode'), '9.2f', 'x'):>10}")
        else:
            for b in c["batch_sizes"]:
                line += (f"{_f(v[f'batch{b}_ms_p50'], '9.2f')}{_f(v[f'batch{b}_ms_p95'], '8.2f')}"
                         f"{_f(vt.get(f'batch{b}'), '8.2f', 'x'):>9}{_f(vm.get(f'batch{b}'), '9.2f', 'x'):>10}")
        line += f"{_f(v['load_s'], '8.2f')}{_f(v['peak_rss_mb'], '12.0f')}{_f(v.get('cpu_per_wall'), '9.2f')}"
        lines.append(line)
    lines.append("(vs torch / vs merged: speed ratio of medians, >1 = this row is faster; "
                 + ("decode tok/s" if task == "causal-lm" else "latency") + f". Merged reference: {c['merged_note']}."
                 f" CPU/wall: CPU seconds per second of the timed calls; well below {_threads(c['threads'])} means "
                 "other processes took the cores)")
    sw = result["swap"]
    rows = swap_rows(result)
    if rows:
        lines += ["", f"{'adapter swap':<64}{'median':>12}", "-" * 76]
        lines += [f"{k:<64}{v:>12}" for k, v in rows]
    mem = memory_rows(sw)
    if mem:
        lines += ["", f"{'resident memory added per loaded adapter':<64}{'MB':>12}", "-" * 76]
        lines += [f"{k:<64}{v:>12}" for k, v in mem]
    lines += ["", f"{'sizes on disk':<64}{'MB':>12}", "-" * 76]
    lines += [f"{k:<64}{_f(v, '12.2f')}" for k, v in result["sizes_mb"].items()]
    if "files" in result:
        f = result["files"]
        lines += ["", f"wrote {f['json']}" + (f" and {f['png']}" if "png" in f else f" (no bench.png: {f['png_not_drawn']})")
                  + f" ({result['seconds']:.0f} s)"]
    return "\n".join(lines)


def _threads(n: int) -> str:
    return f"{n} thread" + ("s" if n != 1 else "")


def _t(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms * 1e3:.1f} us" if ms < 1 else f"{ms:.2f} ms" if ms < 100 else f"{ms:.0f} ms"


def swap_rows(result: dict) -> list[tuple[str, str]]:
    sw, step = result["swap"], "decode step" if result["task"] == "causal-lm" else "batch-1 call"
    rows = []
    side = sw.get("swap-side") or {}
    if "feeds_alternating_us" in side:
        rows.append(("edgepeft side: switch adapter (feeds for another name)", _t(side["feeds_alternating_us"] / 1e3)))
    if "steps" in side:
        rows.append((f"edgepeft side: {step} right after a switch / steady",
                     f"{_t(side['steps']['after_swap_ms'])} / {_t(side['steps']['steady_ms'])}"))
    if "mix_uncached_us" in side:
        rows.append(("edgepeft side: build an uncached mix / cached",
                     f"{_t(side['mix_uncached_us'] / 1e3)} / {_t(side['mix_cached_us'] / 1e3)}"))
    mg = sw.get("swap-merged") or {}
    if "session_create_ms" in mg:
        rows.append(("merged: new InferenceSession for another adapter's graph", _t(mg["session_create_ms"])))
    th = sw.get("swap-torch") or {}
    if "set_adapter_alternating_us" in th:
        rows.append(("torch + peft: set_adapter", _t(th["set_adapter_alternating_us"] / 1e3)))
    if "steps" in th:
        rows.append((f"torch + peft: {step} right after set_adapter / steady",
                     f"{_t(th['steps']['after_swap_ms'])} / {_t(th['steps']['steady_ms'])}"))
    loads = [v["load_adapter_ms"] for v in (th.get("memory_per_adapter") or {}).values()]
    if loads:
        rows.append(("torch + peft: load_adapter from disk", _t(median(loads))))
    return rows


def memory_rows(sw: dict) -> list[tuple[str, str]]:
    rows = []
    for n, v in ((sw.get("swap-side") or {}).get("memory_per_adapter") or {}).items():
        rows.append((f"edgepeft side: {n} (RSS added; its arrays)", f"{v['rss_added_mb']:.1f} ({v['arrays_mb']:.1f})"))
    mg = sw.get("swap-merged") or {}
    if "memory_per_adapter_mb" in mg:
        rows.append(("merged: one more adapter = one more session", f"{mg['memory_per_adapter_mb']:.1f}"))
    for n, v in ((sw.get("swap-torch") or {}).get("memory_per_adapter") or {}).items():
        rows.append((f"torch + peft: load_adapter {n}", f"{v['rss_added_mb']:.1f}"))
    return rows
