"""`edgepeft serve` under load: SmolLM2-135M int4 fused with 8 LoRA adapters (bench_per_row.py's
artifact), many clients at once against the server on 127.0.0.1.

    python benchmarks/bench_serve.py [--clients 32] [--requests 50] [--rounds 3] [--max-batch 8]

Requests: a random adapter (one of the 8, the base, or a two-adapter mix), a prompt of 8-24 random
token ids and 4-24 new tokens (greedy, EOS ignored), drawn from a pool of ``--pool`` distinct
requests whose single-request answers the benchmark computes first with the runtime itself
(``Model.generate``, one request alone), so every answer is checked.

- ``load``: ``--clients`` clients, each ``--requests`` streamed requests back to back; every answer
  checked (wrong or lost ones counted); time to first token and per-token latency (p50 / p99);
  the server's RSS every second: after warm-up (once a tenth of the load run is done) and at the end.
- ``rounds``: ``--rounds`` interleaved rounds of the same ``--round-requests`` requests sent by
  ``--clients`` clients at once (``concurrent``) and one at a time (``sequential``); tokens/s of
  each, medians and spread.

Load average before and after; JSON and a table in ``docs/bench/serve.{json,md}``. The
artifact must exist (run bench_per_row.py first).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine_info, spread, spread_rows, write_result  # noqa: E402

ART = REPO / "benchmarks" / "results" / "per-row" / "side-int4"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=50, help="requests per client in the load run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--round-requests", type=int, default=64)
    ap.add_argument("--pool", type=int, default=48)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--port", type=int, default=8431)
    args = ap.parse_args()

    import httpx2 as httpx
    import numpy as np

    from edgepeft.runtime import Model

    if not (ART / "manifest.json").is_file():
        raise SystemExit(f"{ART}: run benchmarks/bench_per_row.py first")
    model = Model(ART, threads=args.threads)
    names = model.adapters
    rng = np.random.default_rng(0)
    choices = [*names, None, {names[0]: 0.5, names[-1]: 0.5}]
    pool = []
    for i in range(args.pool):
        c = choices[i % len(choices)]
        pool.append({"prompt": rng.integers(100, 40000, int(rng.integers(8, 25))).tolist(),
                     "adapter": c, "max_tokens": int(rng.integers(4, 25))})
    t = time.perf_counter()
    for r in pool:  # the single-request answers
        ids = model.generate([r["prompt"]], r["max_tokens"], r["adapter"], stop_at_eos=False)[0, len(r["prompt"]):]
        r["want"] = model.tokenizer.decode(ids.tolist(), skip_special_tokens=True)
    reference_s = time.perf_counter() - t
    del model

    url = f"http://127.0.0.1:{args.port}"
    proc = subprocess.Popen([sys.executable, "-m", "edgepeft", "serve", str(ART), "--port", str(args.port),
                             "--max-batch", str(args.max_batch), "--threads", str(args.threads), "--context", "64"],
                            stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        client = httpx.Client(timeout=300, limits=httpx.Limits(max_connections=args.clients * 2))

        def one(r) -> dict:
            """One streamed request: its text, tokens, time to first token and per-token time."""
            body = {"model": "side-int4", "prompt": r["prompt"], "max_tokens": r["max_tokens"], "temperature": 0,
                    "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
            if r["adapter"] is not None:
                body["adapter"] = r["adapter"]
            t0 = time.perf_counter()
            first = last = None
            text, usage = [], None
            try:
                with client.stream("POST", f"{url}/v1/completions", content=json.dumps(body)) as resp:
                    for line in resp.iter_lines():
                        if not line.startswith("data: {"):
                            continue
                        e = json.loads(line[6:])
                        if e.get("usage"):
                            usage = e["usage"]
                        for c in e.get("choices", []):
                            if c.get("text"):
                                now = time.perf_counter()
                                first = first or now
                                last = now
                                text.append(c["text"])
            except httpx.HTTPError as e:
                return {"ok": False, "lost": True, "error": str(e)}
            n = usage["completion_tokens"] if usage else 0
            return {"ok": "".join(text) == r["want"] and n == r["max_tokens"], "lost": usage is None, "tokens": n,
                    "ttft": (first or t0) - t0, "per_token": ((last - first) / (n - 1)) if first and n > 1 else None,
                    "seconds": time.perf_counter() - t0}

        def run(reqs: list[dict], clients: int) -> tuple[float, list[dict]]:
            t0 = time.perf_counter()
            if clients == 1:
                out = [one(r) for r in reqs]
            else:
                with ThreadPoolExecutor(clients) as ex:
                    out = list(ex.map(one, reqs))
            return time.perf_counter() - t0, out

        warm_s, warm = run(pool + pool, args.clients)  # warm-up: every pool entry twice, concurrently
        load = [os.getloadavg()]

        # rounds: the same requests concurrently and one at a time, interleaved
        round_reqs = [pool[int(i)] for i in rng.integers(0, len(pool), args.round_requests)]
        rates = {"concurrent": [], "sequential": []}
        wrong_rounds = 0
        for _ in range(args.rounds):
            for k, clients in (("concurrent", args.clients), ("sequential", 1)):
                s, out = run(round_reqs, clients)
                rates[k].append(sum(o.get("tokens", 0) for o in out) / s)
                wrong_rounds += sum(not o["ok"] for o in out)

        # the load run: clients x requests, random picks from the pool, back to back per client
        picks = [[pool[int(i)] for i in rng.integers(0, len(pool), args.requests)] for _ in range(args.clients)]
        results: list[dict] = []
        lock = threading.Lock()
        rss_samples = []

        def client_run(reqs):
            for r in reqs:
                o = one(r)
                with lock:
                    results.append(o)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client_run, args=(p,)) for p in picks]
        for th in threads:
            th.start()
        while any(th.is_alive() for th in threads):
            rss_samples.append((len(results), rss_mb(proc.pid)))  # (requests done, MB)
            time.sleep(1.0)
        for th in threads:
            th.join()
        load_s = time.perf_counter() - t0
        rss_end = rss_mb(proc.pid)
        # after warm-up: once a tenth of the load run is done (the batch then holds every adapter's
        # columns, its largest set: memory is at its working size)
        rss_warm = next(mb for done, mb in rss_samples if done >= len(results) // 10)
        load.append(os.getloadavg())
        health = httpx.get(f"{url}/health").json()
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(120)

    ok = [o for o in results if o["ok"]]
    ttft = [o["ttft"] for o in results if not o["lost"]]
    per_token = [o["per_token"] for o in results if o.get("per_token") is not None]
    med = {k: statistics.median(v) for k, v in rates.items()}
    res = {
        "machine": machine_info(), "loadavg": load, "artifact": str(ART.relative_to(REPO)), "clients": args.clients,
        "requests_per_client": args.requests, "max_batch": args.max_batch, "threads": args.threads,
        "pool": args.pool, "reference_s": reference_s, "warmup_s": warm_s,
        "warmup_wrong": sum(not o["ok"] for o in warm),
        "load": {"requests": len(results), "right": len(ok), "wrong": sum(not o["ok"] and not o["lost"] for o in results),
                 "lost": sum(o["lost"] for o in results), "seconds": load_s,
                 "tok_s": sum(o.get("tokens", 0) for o in results) / load_s,
                 "ttft_s": {"p50": pct(ttft, 0.5), "p99": pct(ttft, 0.99)},
                 "per_token_s": {"p50": pct(per_token, 0.5), "p99": pct(per_token, 0.99)},
                 "rss_mb": {"after_warmup": rss_warm, "end": rss_end, "max": max([mb for _, mb in rss_samples] + [rss_end]),
                            "end / after_warmup": rss_end / rss_warm, "samples": rss_samples}},
        "rounds": {"n": args.rounds, "requests": args.round_requests, "wrong": wrong_rounds,
                   "tok_s": spread(rates),
                   "concurrent / sequential": med["concurrent"] / med["sequential"]},
        "server": {"health": health, "exit_code": code},
    }
    L = res["load"]
    lines = [f"| load run ({args.clients} clients x {args.requests} requests) | value |", "|---|---|",
             f"| requests right / wrong / lost | {L['right']} / {L['wrong']} / {L['lost']} |",
             f"| tokens/s | {L['tok_s']:.1f} |",
             f"| time to first token p50 / p99 | {L['ttft_s']['p50'] * 1e3:.0f} / {L['ttft_s']['p99'] * 1e3:.0f} ms |",
             f"| per-token latency p50 / p99 | {L['per_token_s']['p50'] * 1e3:.1f} / {L['per_token_s']['p99'] * 1e3:.1f} ms |",
             f"| RSS after warm-up / end (max) | {L['rss_mb']['after_warmup']:.0f} / {L['rss_mb']['end']:.0f} "
             f"({L['rss_mb']['max']:.0f}) MB, end/warm-up {L['rss_mb']['end / after_warmup']:.3f} |",
             "", f"| {args.round_requests} requests, {args.rounds} interleaved rounds | tok/s median | min | max |",
             "|---|---|---|---|"]
    lines += spread_rows(rates)
    lines += ["", f"concurrent / sequential: {res['rounds']['concurrent / sequential']:.2f}x; wrong in rounds: "
              f"{wrong_rounds}; load average {load[0][0]:.2f} -> {load[1][0]:.2f}; server exit code {code}"]
    write_result("serve", res, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
