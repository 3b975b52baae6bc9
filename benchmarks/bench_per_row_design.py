"""Per-row adapters, the two graph designs side by side: the LoRA branches of SmolLM2-135M alone
(30 layers x q, k, v, o, gate, up, down) for one decode step of 8 rows, each row on its own adapter.

    python benchmarks/bench_per_row_design.py [--rounds 5]

- ``rows`` (what edgepeft builds): the 8 adapters concatenated along the rank axis (ranks 8, 8,
  16, 16, 16, 32, 32, 32: R = 168), ``((x A^T) * rows) B^T`` with ``rows (8, 1, R)`` zero outside
  each row's own columns. Every row computes all R columns.
- ``gather``: the adapters stacked at the largest rank ``(8, in, 32)`` / ``(8, 32, out)`` and
  gathered per row by an index, then a batched MatMul: each row computes only its own 32 columns,
  but the Gather copies each row's A and B every step.
- ``uniform_r32``: every row on one rank-32 adapter (the one-adapter path), the reference.

Times are the median ms of one onnxruntime run (2 threads) over interleaved rounds; JSON and a
table in ``docs/bench/per-row-design.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, spread, spread_rows, write_result  # noqa: E402

HIDDEN, INTER, KV, LAYERS = 576, 1536, 192, 30
SLOTS = {"q": (HIDDEN, HIDDEN), "k": (HIDDEN, KV), "v": (HIDDEN, KV), "o": (HIDDEN, HIDDEN),
         "gate": (HIDDEN, INTER), "up": (HIDDEN, INTER), "down": (INTER, HIDDEN)}
RANKS = (8, 8, 16, 16, 16, 32, 32, 32)
ROWS = 8


def graph(design: str) -> tuple[bytes, dict[str, np.ndarray]]:
    """The model and its feeds: every slot's branch on its own input, outputs summed per width."""
    rng = np.random.default_rng(0)
    nodes, inputs, feeds, outs = [], [], {}, []
    for width in (HIDDEN, INTER):
        inputs.append(helper.make_tensor_value_info(f"x{width}", TensorProto.FLOAT, [ROWS, 1, width]))
        feeds[f"x{width}"] = rng.standard_normal((ROWS, 1, width)).astype(np.float32)
    if design == "gather":
        inputs.append(helper.make_tensor_value_info("idx", TensorProto.INT64, [ROWS]))
        feeds["idx"] = np.arange(ROWS, dtype=np.int64)
    total = sum(RANKS)
    rows = np.zeros((ROWS, 1, total), np.float32)
    start = 0
    for b, r in enumerate(RANKS):
        rows[b, 0, start:start + r] = 1
        start += r
    if design == "rows":
        inputs.append(helper.make_tensor_value_info("rows", TensorProto.FLOAT, [ROWS, 1, total]))
        feeds["rows"] = rows
    for layer in range(LAYERS):
        for slot, (i, o) in SLOTS.items():
            p = f"{layer}.{slot}"
            if design == "rows":
                a, bb = (rng.standard_normal((i, total)) * 0.02, rng.standard_normal((total, o)) * 0.02)
                nodes += [helper.make_node("MatMul", [f"x{i}", f"{p}.A"], [f"{p}.t"]),
                          helper.make_node("Mul", [f"{p}.t", "rows"], [f"{p}.tr"]),
                          helper.make_node("MatMul", [f"{p}.tr", f"{p}.B"], [f"{p}.d"])]
            elif design == "gather":
                a, bb = (rng.standard_normal((ROWS, i, 32)) * 0.02, rng.standard_normal((ROWS, 32, o)) * 0.02)
                nodes += [helper.make_node("Gather", [f"{p}.A", "idx"], [f"{p}.Ag"], axis=0),
                          helper.make_node("Gather", [f"{p}.B", "idx"], [f"{p}.Bg"], axis=0),
                          helper.make_node("MatMul", [f"x{i}", f"{p}.Ag"], [f"{p}.t"]),
                          helper.make_node("MatMul", [f"{p}.t", f"{p}.Bg"], [f"{p}.d"])]
            else:
                a, bb = (rng.standard_normal((i, 32)) * 0.02, rng.standard_normal((32, o)) * 0.02)
                nodes += [helper.make_node("MatMul", [f"x{i}", f"{p}.A"], [f"{p}.t"]),
                          helper.make_node("MatMul", [f"{p}.t", f"{p}.B"], [f"{p}.d"])]
            for name, v in ((f"{p}.A", a), (f"{p}.B", bb)):
                inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(v.shape)))
                feeds[name] = v.astype(np.float32)
            outs.append((o, f"{p}.d"))
    outputs = []
    for width in (HIDDEN, INTER, KV):
        names = [n for o, n in outs if o == width]
        nodes.append(helper.make_node("Sum", names, [f"y{width}"]))
        outputs.append(helper.make_tensor_value_info(f"y{width}", TensorProto.FLOAT, None))
    model = helper.make_model(helper.make_graph(nodes, design, inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 17)])
    return model.SerializeToString(), feeds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=20, help="runs per round (median taken)")
    args = ap.parse_args()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    cases = {}
    for design in ("rows", "gather", "uniform_r32"):
        model, feeds = graph(design)
        sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        vals = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in feeds.items()}  # bound once, as the runtime does
        binding = sess.io_binding()
        for k, v in vals.items():
            binding.bind_ortvalue_input(k, v)
        for o in sess.get_outputs():
            binding.bind_output(o.name)
        sess.run_with_iobinding(binding)
        cases[design] = (sess, binding, vals)
    check = {d: [o.numpy() for o in c[1].get_outputs()] for d, c in cases.items()}
    # rows and gather give each row the same branch (row b: adapter b) only where the weights match;
    # here they are drawn independently, so only the shapes are compared
    assert [x.shape for x in check["rows"]] == [x.shape for x in check["gather"]]
    load = [os.getloadavg()]
    ms: dict[str, list[float]] = {d: [] for d in cases}
    for _ in range(args.rounds):
        for d, (sess, binding, _) in cases.items():
            times = []
            for _ in range(args.runs):
                t = time.perf_counter()
                sess.run_with_iobinding(binding)
                times.append((time.perf_counter() - t) * 1e3)
            ms[d].append(statistics.median(times))
    load.append(os.getloadavg())
    mb = {"rows": sum(RANKS), "gather": ROWS * 32, "uniform_r32": 32}
    res = {"machine": machine_info(), "loadavg": load, "rounds": args.rounds, "runs_per_round": args.runs,
           "rows": ROWS, "ranks": list(RANKS),
           "adapter_mb": {d: r * sum(i + o for i, o in SLOTS.values()) * LAYERS * 4 / 2**20 for d, r in mb.items()},
           "ms": spread(ms)}
    lines = ["| design | ms per step (median) | min | max | adapter weights read, MB |", "|---|---|---|---|---|"]
    lines += spread_rows(ms, 2, lambda d: f" {res['adapter_mb'][d]:.0f} |")
    lines += ["", f"LoRA branches only (30 layers x 7 slots of SmolLM2-135M), 8 rows, one decode step; "
              f"{args.rounds} interleaved rounds of {args.runs} runs; load average {load[0][0]:.2f} -> {load[1][0]:.2f}"]
    write_result("per-row-design", res, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
