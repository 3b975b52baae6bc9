"""Measuring workers of ``edgepeft bench``: each runs in a fresh process, so its RSS is its own.

``python -m edgepeft.bench.workers`` reads ``{"worker": ..., "spec": {...}}`` as JSON on stdin
and prints one JSON line on stdout. onnxruntime workers never import torch; torch workers import
it (with transformers and peft) only inside their functions.

Workers:

- ``run``: one (system, choice) row: load time, prefill latency samples (causal LM) or per-batch
  latency samples (classifier), one timed greedy generation (decode tokens/s), peak RSS.
- ``swap-side`` / ``swap-merged`` / ``swap-torch``: adapter swap latency and resident memory added
  per loaded adapter (RSS before / after loading one more) in a side artifact, a merged
  deployment (one more session) and PyTorch + peft (``load_adapter``).
- ``export-merged``: a merged artifact of one adapter, the reference for "vs merged".
"""

from __future__ import annotations

import gc
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

T_ENTRY = time.perf_counter()  # before onnxruntime / torch are imported


class UserError(Exception):
    """Bad input found inside a worker (e.g. another base model); the parent raises it as an
    EdgepeftError with this message."""


# ------------------------------------------------------------------ helpers
def status_mb(field: str) -> float | None:
    """A ``/proc/self/status`` field (VmRSS, VmHWM) in MB; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """This process's own high-water mark (VmHWM). ``ru_maxrss`` is only a fallback: on Linux it
    inherits the parent's peak through fork + exec."""
    hwm = status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    gc.collect()
    v = status_mb("VmRSS")
    return v if v is not None else peak_rss_mb()


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def timeit_us(fn, n: int) -> dict:
    """Call ``fn`` n times; median, p10, p90 in microseconds."""
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e6)
    ts.sort()
    return {"median_us": median(ts), "p10_us": ts[len(ts) // 10], "p90_us": ts[9 * len(ts) // 10], "n": n}


def cpu_per_wall(before: tuple[float, float]) -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return (ru.ru_utime + ru.ru_stime - before[0]) / max(time.perf_counter() - before[1], 1e-9)


def cpu_mark() -> tuple[float, float]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime, time.perf_counter()


def timing_from_stamps(t0: float, stamps: list[float], t_end: float) -> dict:
    """Prefill / decode split from forward-end time stamps: prefill = call to end of the first
    forward (which also yields new token 1); decode tokens/s = the remaining one-token steps /
    the time from there to the call returning."""
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    decode_s = t_end - stamps[0]
    return {"gen_prefill_ms": (stamps[0] - t0) * 1e3, "decode_s": decode_s,
            "decode_tok_s": (len(stamps) - 1) / decode_s if decode_s > 0 else None,
            "step_ms_median": median(steps) * 1e3 if steps else None, "forwards": len(stamps)}


def choice_of(c):
    """JSON choice -> runtime choice: None, a name, or {name: weight}."""
    return c if c is None or isinstance(c, str) else dict(c)


def alternating(step_a, step_b, pairs: int) -> dict:
    """Pattern A A B B ...: the first of each pair runs right after a switch, the second is steady."""
    after, steady = [], []
    step_b()
    for i in range(2 * pairs):
        fn = step_a if i % 2 == 0 else step_b
        for bucket in (after, steady):
            t = time.perf_counter()
            fn()
            bucket.append((time.perf_counter() - t) * 1e3)
    return {"after_swap_ms": median(after), "steady_ms": median(steady), "pairs": pairs}


# ------------------------------------------------------------------ onnxruntime rows
def _ort_model(spec: dict, system: str):
    from edgepeft.runtime import Model

    t = time.perf_counter()
    m = Model(spec["merged"] if system == "merged" else spec["artifact"], threads=spec["threads"])
    return m, time.perf_counter() - t


def run_ort(spec: dict, system: str, choice) -> dict:
    import numpy as np

    m, load_s = _ort_model(spec, system)
    res = {"load_s": load_s, "ready_s": time.perf_counter() - T_ENTRY}
    if spec["task"] == "classification":
        return {**res, **_classify_rows(spec, lambda ids, mask: m.classify_logits(ids, choice, mask))}
    ids = np.asarray([spec["prompt_ids"]], np.int64)
    m.logits(ids, adapter=choice)  # warm-up
    prefill = []
    for _ in range(spec["prefill_samples"]):
        t = time.perf_counter()
        m.logits(ids, adapter=choice)
        prefill.append((time.perf_counter() - t) * 1e3)
    stamps: list[float] = []

    class timed:
        """The session, with a time stamp after each run (fused graphs run with I/O binding)."""

        def __init__(self, real):
            self.real = real

        def __getattr__(self, name):
            return getattr(self.real, name)

        def run(self, *a, **kw):
            out = self.real.run(*a, **kw)
            stamps.append(time.perf_counter())
            return out

        def run_with_iobinding(self, *a, **kw):
            out = self.real.run_with_iobinding(*a, **kw)
            stamps.append(time.perf_counter())
            return out

    if m._static:  # one session per sequence bucket: time them all
        m._buckets = {s: timed(sess) for s, sess in m._buckets.items()}
    else:
        key = None if system == "side" else choice
        m._sessions[key] = timed(m._sessions[key])
    n = spec["new_tokens"]
    m.generate(ids, n, adapter=choice, stop_at_eos=False)  # warm-up
    stamps.clear()
    mark = cpu_mark()
    t0 = time.perf_counter()
    out = m.generate(ids, n, adapter=choice, stop_at_eos=False)
    t_end = time.perf_counter()
    return {**res, "prefill_ms": prefill, **timing_from_stamps(t0, stamps, t_end),
            "cpu_per_wall": cpu_per_wall(mark), "tokens": out[0, ids.shape[1]:].tolist()}


def _classify_rows(spec: dict, call) -> dict:
    """Latency samples per batch size for ``call(ids, mask)`` (token ids in, logits out)."""
    import numpy as np

    out = {}
    mark = cpu_mark()
    for b, batch in spec["batches"].items():
        ids, mask = np.asarray(batch["ids"], np.int64), np.asarray(batch["mask"], np.int64)
        call(ids, mask)  # warm-up
        ts = []
        for _ in range(spec["batch_samples"]):
            t = time.perf_counter()
            call(ids, mask)
            ts.append((time.perf_counter() - t) * 1e3)
        out[f"batch{b}_ms"] = ts
    out["cpu_per_wall"] = cpu_per_wall(mark)
    return out


# ------------------------------------------------------------------ torch rows
def _reference(spec: dict, name: str):
    """The PyTorch reference description (``Reference``) of adapter ``name``'s kind."""
    from edgepeft.kinds import kind_module

    return kind_module(spec["kinds"][name]).REFERENCE


def _torch_reference(spec: dict, names: list[str], check: bool = False):
    """(model, load seconds): the base in fp32 eval with the named adapters loaded the way their
    trainer would, as the first one's kind describes (``Reference``: peft, or edgepeft's module
    for bottleneck adapters); more than one name needs a kind whose model holds several."""
    import torch

    from edgepeft.export.base import fingerprint, load_causal_lm, load_classifier

    torch.set_num_threads(spec["threads"])
    base_dir = Path(spec["base"])
    t = time.perf_counter()
    if spec["task"] == "causal-lm":
        model, fresh = load_causal_lm(base_dir), []
    else:
        model, fresh = load_classifier(base_dir, spec.get("num_labels"))
    if check:
        fp = fingerprint(model, fresh)
        if fp != spec["fingerprint"]:
            raise UserError(f"{base_dir}: its weights (fingerprint {fp[:19]}...) are not the base the "
                            f"artifact was exported from ({spec['fingerprint'][:19]}...). Pass the "
                            "base folder that export used to --compare-torch.")
    if names:
        dirs = {n: Path(spec["adapter_dirs"][n]) for n in names}
        ref = _reference(spec, names[0])
        if len(names) > 1 and ref.add is None:
            raise UserError(f"adapter {names[0]!r} is a {spec['kinds'][names[0]]} adapter: its PyTorch model "
                            f"holds one adapter, so {', '.join(names)} cannot be loaded together.")
        model = ref.load(model, dirs[names[0]], names[0])
        for n in names[1:]:
            ref.add(model, dirs[n], n)
        if ref.select is not None:
            ref.select(model, names[0])
    model.eval()
    return model, time.perf_counter() - t


def _torch_for_choice(spec: dict, choice):
    if choice is None or isinstance(choice, str):
        return _torch_reference(spec, [] if choice is None else [choice])
    # a mix: the kind's own weighted combination (LoRA: peft's, ranks concatenated as edgepeft mixes)
    t = time.perf_counter()
    model, _ = _torch_reference(spec, list(choice))
    _reference(spec, next(iter(choice))).combine(model, dict(choice), "bench_mix")
    return model.eval(), time.perf_counter() - t


def run_torch(spec: dict, choice) -> dict:
    import torch

    model, load_s = _torch_for_choice(spec, choice)
    res = {"load_s": load_s, "ready_s": time.perf_counter() - T_ENTRY,
           "torch_threads": torch.get_num_threads()}
    if spec["task"] == "classification":
        def call(ids, mask):
            with torch.inference_mode():
                return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
        return {**res, **_classify_rows(spec, call)}
    ids = torch.tensor([spec["prompt_ids"]], dtype=torch.long)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask, use_cache=True)  # warm-up
        prefill = []
        for _ in range(spec["prefill_samples"]):
            t = time.perf_counter()
            model(input_ids=ids, attention_mask=mask, use_cache=True)
            prefill.append((time.perf_counter() - t) * 1e3)
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    stamps: list[float] = []
    lm.register_forward_hook(lambda *_: stamps.append(time.perf_counter()))
    n = spec["new_tokens"]
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
              use_cache=True, pad_token_id=spec["pad_token_id"])
    with torch.inference_mode():
        model.generate(**kw)  # warm-up
        stamps.clear()
        mark = cpu_mark()
        t0 = time.perf_counter()
        out = model.generate(**kw)
        t_end = time.perf_counter()
    return {**res, "prefill_ms": prefill, **timing_from_stamps(t0, stamps, t_end),
            "cpu_per_wall": cpu_per_wall(mark), "tokens": out[0, ids.shape[1]:].tolist()}


# ------------------------------------------------------------------ swap + memory
def _step_fn(m, session, feeds_of, spec):
    """A callable running one model step for the current adapter: a one-token decode step on the
    prompt's KV cache, fixed (causal LM), or the batch-1 classification."""
    import numpy as np

    from edgepeft.contract import past_names

    if spec["task"] == "classification":
        b = spec["batches"]["1"]
        ids, mask = np.asarray(b["ids"], np.int64), np.asarray(b["mask"], np.int64)
        return lambda: session.run(["logits"], {"input_ids": ids, "attention_mask": mask, **feeds_of()})
    ids = np.asarray([spec["prompt_ids"]], np.int64)
    mask = np.ones_like(ids)
    if m.fused:  # one KV buffer; each step rebinds the current adapter and runs the next token
        from edgepeft.runtime import fused

        kv = fused.Cache(session, m._cache, 1, ids.shape[1] + 1)
        kv.bind_adapter(m._values(feeds_of()))
        kv.run(ids, np.array([ids.shape[1]]))
        step_ids, total = ids[:, -1:], np.array([ids.shape[1] + 1])

        def step():  # always the same slot: every step is the first after the prompt
            kv.bind_adapter(m._values(feeds_of()))
            return kv.run(step_ids, total)
        return step
    if m._static:  # the fixed KV window after the prompt; each step starts from it again
        ids, mask = next(m._row_groups(ids, mask))
        _, (kv, wmask) = m._static_prefill(feeds_of(), ids, mask, None)
        pad = np.zeros((ids.shape[0], min(m._buckets) - 1), np.int64)
        step_ids = np.concatenate([pad, ids[:, -1:]], 1)
        step_mask = np.concatenate([pad, np.ones((ids.shape[0], 1), np.int64)], 1)
        return lambda: m._static_step(feeds_of(), step_ids, step_mask, [kv, wmask])
    _, *present = m._run(session, feeds_of(), ids, mask, m._start(1, mask, None)[0])
    past = {n: v for i in range(len(m._cache)) for n, v in zip(past_names(i), present[2 * i:2 * i + 2])}
    step_ids, mask1 = ids[:, -1:], np.ones((1, ids.shape[1] + 1), np.int64)
    return lambda: m._run(session, feeds_of(), step_ids, mask1, past)


def swap_side(spec: dict) -> dict:
    from edgepeft.runtime import Model

    m = Model(spec["artifact"], threads=spec["threads"])
    names = [n for n in spec["adapters"] if not m.manifest["adapters"][n].get("prefix")] or spec["adapters"]
    res: dict = {}
    if len(names) >= 2:
        i = [0]

        def feeds_alternating():
            i[0] += 1
            return m._feeds(names[i[0] % 2])

        res["feeds_alternating_us"] = timeit_us(feeds_alternating, spec["swap_iters"])["median_us"]
        cur = [names[0]]
        step = _step_fn(m, m._sessions[None], lambda: m._feeds(cur[0])[0], spec)

        def choose(n):
            def run():
                cur[0] = n
                step()
            return run

        for _ in range(3):
            step()
        res["steps"] = alternating(choose(names[0]), choose(names[1]), spec["swap_pairs"])
    if spec.get("mix"):
        mix = choice_of(spec["mix"])

        def uncached():
            m._mixes.clear()
            return m._feeds(mix)

        res["mix_uncached_us"] = timeit_us(uncached, max(10, spec["swap_iters"] // 10))["median_us"]
        res["mix_cached_us"] = timeit_us(lambda: m._feeds(mix), spec["swap_iters"])["median_us"]
    # resident memory per adapter: load each one more time under another name
    per = {}
    for n in spec["adapters"]:
        before = rss_mb()
        new = m.add_adapter(spec["artifact"], n, as_name=f"{n}-bench-copy")
        after = rss_mb()
        arrays = m._loaded[new]
        nbytes = sum(v.nbytes for v in arrays.graph.values()) + sum(
            k.nbytes + v.nbytes for k, v in (arrays.prefix or []))
        per[n] = {"rss_added_mb": after - before, "arrays_mb": nbytes / 2**20}
    res["memory_per_adapter"] = per
    return res


def swap_merged(spec: dict) -> dict:
    import onnxruntime as ort

    from edgepeft.runtime import Model

    m = Model(spec["merged"], threads=spec["threads"])
    name = spec["merged_adapter"]
    graph = Path(spec["merged"]) / m.manifest["adapters"][name]["graph"]["file"]
    create, added = [], []
    keep = [m._sessions[name]]
    for _ in range(spec["session_repeats"]):
        before = rss_mb()
        t = time.perf_counter()
        s = ort.InferenceSession(str(graph), m._options, providers=m._providers)
        create.append(time.perf_counter() - t)
        step = _step_fn(m, s, dict, spec)  # its first run allocates too
        step()
        added.append(rss_mb() - before)
        keep.append(s)
        if len(keep) > 2:  # hold at most two sessions: the measure is one more session
            keep.pop(1)
            gc.collect()
    return {"session_create_ms": median(create) * 1e3, "memory_per_adapter_mb": median(added),
            "repeats": len(create)}


def swap_torch(spec: dict) -> dict:
    import torch

    names = list(spec["adapters"])
    model, _ = _torch_reference(spec, names[:1], check=True)
    res: dict = {}
    from edgepeft.kinds.common import read_config

    swappable = [n for n in names if _reference(spec, n).add is not None]  # a model holds several
    if not swappable:
        return {"note": "no peft adapters to swap"}
    per = {}
    loaded = [names[0]]
    ref = _reference(spec, names[0])
    for n in swappable:
        if n in loaded:
            continue
        kind = read_config(Path(spec["adapter_dirs"][n])).get("peft_type")
        if kind != read_config(Path(spec["adapter_dirs"][names[0]])).get("peft_type"):
            continue  # peft holds one kind family per model (LoRA with IA3 or a prompt: no)
        before = rss_mb()
        t = time.perf_counter()
        ref.add(model, Path(spec["adapter_dirs"][n]), n)
        load_ms = (time.perf_counter() - t) * 1e3
        per[n] = {"rss_added_mb": rss_mb() - before, "load_adapter_ms": load_ms}
        loaded.append(n)
    res["memory_per_adapter"] = per
    if len(loaded) >= 2:
        i = [0]

        def set_alternating():
            i[0] += 1
            ref.select(model, loaded[i[0] % 2])

        res["set_adapter_alternating_us"] = timeit_us(set_alternating, spec["swap_iters"] // 5)["median_us"]
        with torch.inference_mode():
            if spec["task"] == "classification":
                b = spec["batches"]["1"]
                ids, mask = torch.tensor(b["ids"]), torch.tensor(b["mask"])

                def step():
                    model(input_ids=ids, attention_mask=mask)
            else:
                ids = torch.tensor([spec["prompt_ids"]], dtype=torch.long)
                ref.select(model, loaded[0])
                past = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True).cache
                step_ids, mask1 = ids[:, -1:], torch.ones((1, ids.shape[1] + 1), dtype=torch.long)
                pos = torch.tensor([[ids.shape[1]]])

                def step():
                    model(input_ids=step_ids, attention_mask=mask1, position_ids=pos, cache=past,
                          use_cache=True)
                    past.crop(-1)  # drop the new token: the cache stays at the prompt: every step does the same work

            def choose(n):
                def run():
                    ref.select(model, n)
                    step()
                return run

            for _ in range(3):
                step()
            res["steps"] = alternating(choose(loaded[0]), choose(loaded[1]), spec["swap_pairs"])
    return res


def export_merged(spec: dict) -> dict:
    from dataclasses import fields

    from edgepeft.export import ExportConfig, export
    from edgepeft.quantize import QuantConfig

    known = {f.name for f in fields(QuantConfig)}
    q = {k: v for k, v in (spec.get("quantization") or {}).items() if k in known}
    q["precision"] = spec["precision"]
    t = time.perf_counter()
    export(ExportConfig(base=Path(spec["base"]), out=Path(spec["out"]), mode="merged", force=True,
                        adapters=((spec["adapter"], Path(spec["adapter_dir"])),), quant=QuantConfig(**q),
                        graph=spec.get("graph", "generic")), quiet=True)
    return {"export_s": time.perf_counter() - t}


def run_worker(worker: str, spec: dict) -> dict:
    if worker == "run":
        system, choice = spec["system"], choice_of(spec["choice"])
        res = run_torch(spec, choice) if system == "torch" else run_ort(spec, system, choice)
    else:
        res = {"swap-side": swap_side, "swap-merged": swap_merged, "swap-torch": swap_torch,
               "export-merged": export_merged}[worker](spec)
    return {**res, "peak_rss_mb": peak_rss_mb()}


def main() -> int:
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    job = json.loads(sys.stdin.read())
    try:
        out = run_worker(job["worker"], job["spec"])
    except UserError as e:
        out = {"user_error": str(e)}
    except Exception as e:  # noqa: BLE001 - reported by the parent as one message
        from edgepeft.errors import EdgepeftError

        if isinstance(e, EdgepeftError):
            out = {"user_error": str(e)}
        else:
            import traceback

            traceback.print_exc()
            out = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
