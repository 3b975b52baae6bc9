"""Where a fused int4 side decode step of SmolLM2 spends its time, and graph/session variants of it.

Run from the repo root after ``bench_speed.py --only fused-int4-side`` exported the artifact::

    python benchmarks/fused_int4_profile.py profile        # per op type / category, bytes per step
    python benchmarks/fused_int4_profile.py compare --rounds 5 [--peer-python P]   # variants, interleaved
    python benchmarks/fused_int4_profile.py accuracy --variants offset4 offset4x2 nooffset   # KL vs exported

A benchmark-only experiment: the variants are rewrites of the exported ``model.onnx`` (saved beside
it, sharing its ``model.onnx.data``), never changes to ``edgepeft/export/fused.py``:

- ``base``: the artifact as exported (packed LoRA, block-diagonal q|k|v B);
- ``perproj``: the q|k|v group's B as one input per projection (``Split`` of the rank, three MatMuls,
  ``Concat``) instead of the block-diagonal packed B: no zeros read;
- ``nospin``: ``base`` with ``session.intra_op.allow_spinning = 0``;
- ``t1``: ``base`` with 1 intra-op thread;
- ``reducesum``: HQQ's block sums as ``Reshape + ReduceSum`` instead of a MatMul with the 0/1 matrix E;
- ``offset8``: HQQ's offset ``(x E) C`` with ``C`` as an 8-bit ``MatMulNBits`` (compute in float)
  instead of an fp32 MatMul: a quarter of the offset bytes (NOT exact: ``C`` rounded to 8 bits);
- ``offset4`` / ``offset4x2``: HQQ's offset ``(x E) C`` moved into the 4-bit MatMul: the block
  sums appended to ``x`` (``Concat``) and ``-C`` as one (two: its rounding residual too) extra
  block(s) of 4-bit rows of the weight, so no fp32 ``C`` is read (NOT exact: ``C`` on a 4-bit grid,
  and the block sums quantized to int8 as activations at accuracy level 4);
- ``norows``: the per-row weighting of the LoRA rank columns (``Mul`` by ``lora.{i}.{g}.rows``)
  dropped: exact while every row runs the same adapter, as here; an upper bound of what folding the
  rows into ``BT`` (a batched ``(N, R, out)`` B) could win;
- ``einsum``: each LoRA group's ``MatMul(x, AT)``, rows ``Mul`` and ``MatMul(., BT)`` as one ``Einsum``
  (``...i,ir,...r,ro->...o``): one kernel launch instead of three, the same sums;
- ``prepackfile``: ``base`` as onnxruntime's optimized model with its prepacked weights written
  into the weights file (``session.save_external_prepacked_constant_initializers``, once, on this
  CPU: the prepacked layout is the CPU's), so a load maps them instead of packing a heap copy;
- ``nooffset``: HQQ's exact offset terms dropped (NOT exact: an upper bound of what removing their
  cost, e.g. by folding them elsewhere or integer zero points that need none, could win).

Memory per variant: ``load_anon_mb`` / ``load_file_mb`` are what creating the session added
(anonymous: prepacked copies and heap; file-backed: the mapped weights file); ``peak_rss_mb`` is the
worker's peak (raw onnxruntime, the adapter's packed arrays, no tokenizer; bench_speed's workers run
the edgepeft ``Model``).

Each (variant, round) runs in its own process: prefill 32 tokens, 64 greedy decode steps, ``--runs``
times, decode tok/s = median; ``llama.cpp`` (the same LoRA, ``bench_speed``'s worker under
``--peer-python``) takes its turn in each round. Output: ``benchmarks/results/fused_int4_profile.json``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ART = RESULTS / "speed" / "fused-int4-side"
VARIANTS = ("base", "perproj", "reducesum", "norows", "einsum", "prepackfile", "nooffset", "offset8", "offset4", "offset4x2", "nospin", "t1")
_DTYPE_BYTES = {1: 4, 2: 1, 3: 1, 6: 4, 7: 8, 10: 2, 16: 2, 21: 0.5, 22: 0.5}


# ------------------------------------------------------------------ graph variants
def _load():
    import onnx

    return onnx.load(str(ART / "model.onnx"), load_external_data=False)


def _save(proto, name: str) -> Path:
    import onnx

    path = ART / f"model.exp-{name}.onnx"
    onnx.save(proto, str(path))  # external tensors keep pointing at model.onnx.data beside it
    return path


def perproj(proto, ranks: dict[int, list[int]], outs: list[int]):
    """q|k|v LoRA B per projection: ``lora.{i}.qkv.BT`` (R, out) becomes ``.BT.{q,k,v}`` (r_p, out_p)."""
    from onnx import TensorProto, helper, numpy_helper

    g = proto.graph
    new_nodes = []
    for node in g.node:
        bt = next((x for x in node.input if x.startswith("lora.") and x.endswith(".qkv.BT")), None)
        if node.op_type != "MatMul" or bt is None:
            new_nodes.append(node)
            continue
        layer = int(bt.split(".")[1])
        t = node.input[0]
        split = f"{bt}.split"
        g.initializer.append(numpy_helper.from_array(np.array(ranks[layer], np.int64), split))
        parts = [f"{node.name}/t{p}" for p in "qkv"]
        new_nodes.append(helper.make_node("Split", [t, split], parts, name=f"{node.name}/split", axis=-1))
        ys = []
        for p, part, o in zip("qkv", parts, outs):
            name = f"{bt}.{p}"
            g.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [ranks[layer]["qkv".index(p)], o]))
            ys.append(f"{node.name}/y{p}")
            new_nodes.append(helper.make_node("MatMul", [part, name], [ys[-1]], name=f"{node.name}/{p}"))
        new_nodes.append(helper.make_node("Concat", ys, list(node.output), name=f"{node.name}/concat", axis=-1))
    drop = {f"lora.{i}.qkv.BT" for i in ranks}
    keep_in = [i for i in g.input if i.name not in drop]
    del g.input[:]
    g.input.extend(keep_in)
    keep_init = [i for i in g.initializer if i.name not in drop]
    del g.initializer[:]
    g.initializer.extend(keep_init)
    del g.node[:]
    g.node.extend(new_nodes)
    return proto


def reducesum(proto):
    """``MatMul(x, E)`` block sums (E: (K, K/32) of 0/1) as ``Reshape(x, (.., K/32, 32)) + ReduceSum``."""
    from onnx import helper, numpy_helper

    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    new_nodes = []
    for node in g.node:
        if node.op_type == "MatMul" and node.name.endswith("/block_sums"):
            e = inits[node.input[1]]
            k, blocks = e.dims
            shape = f"bs_shape_{blocks}"
            if shape not in inits:
                inits[shape] = numpy_helper.from_array(np.array([0, 0, blocks, k // blocks], np.int64), shape)
                g.initializer.append(inits[shape])
                inits["bs_axes"] = numpy_helper.from_array(np.array([-1], np.int64), "bs_axes")
                g.initializer.append(inits["bs_axes"])
            r = f"{node.name}/r"
            new_nodes += [helper.make_node("Reshape", [node.input[0], shape], [r], name=r),
                          helper.make_node("ReduceSum", [r, "bs_axes"], list(node.output), name=f"{node.name}/sum",
                                           keepdims=0)]
        else:
            new_nodes.append(node)
    del g.node[:]
    g.node.extend(new_nodes)
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in used or i.name in {x.name for x in g.input}]
    del g.initializer[:]
    g.initializer.extend(keep)
    return proto


def offset8(proto, block: int = 16, accuracy: int = 0):
    """HQQ's offset ``(x E) C`` with ``C`` as 8-bit ``MatMulNBits`` (per-block scale and zero point
    along the block axis) instead of an fp32 MatMul: a quarter of the bytes, error at most
    ``scale / 2`` of ``C``'s 8-bit grid (NOT exact)."""
    from onnx import helper, numpy_helper

    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    new_nodes = []
    for node in g.node:
        if node.op_type == "MatMul" and node.name.endswith("/offset"):
            c = numpy_helper.to_array(inits[node.input[1]], str(ART)).astype(np.float32)  # (blocks, N)
            k, n = c.shape
            nb = -(-k // block)
            ct = np.zeros((n, nb * block), np.float32)
            ct[:, :k] = c.T
            b = ct.reshape(n, nb, block)
            lo, hi = np.minimum(b.min(-1), 0), np.maximum(b.max(-1), 0)
            scale = np.where(hi > lo, (hi - lo) / 255.0, 1.0).astype(np.float32)
            zp = np.clip(np.round(-lo / scale), 0, 255).astype(np.uint8)
            q = np.clip(np.round(b / scale[..., None]) + zp[..., None], 0, 255).astype(np.uint8)
            name = node.input[1]
            g.initializer.extend([numpy_helper.from_array(q, f"{name}_q8"),
                                  numpy_helper.from_array(scale.reshape(-1), f"{name}_s8"),
                                  numpy_helper.from_array(zp.reshape(-1), f"{name}_z8")])
            new_nodes.append(helper.make_node("MatMulNBits", [node.input[0], f"{name}_q8", f"{name}_s8", f"{name}_z8"],
                                              list(node.output), name=node.name, domain="com.microsoft", K=k, N=n,
                                              bits=8, block_size=block, accuracy_level=accuracy))
        else:
            new_nodes.append(node)
    return _replace_nodes(proto, new_nodes)


def _replace_nodes(proto, nodes):
    """``proto`` with ``nodes`` as its graph's nodes and the initializers they no longer read dropped."""
    g = proto.graph
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    return proto


def offset4(proto, levels: int = 1):
    """HQQ's offset ``- (x E) C`` inside the 4-bit MatMul: ``MatMulNBits(x; q) - (x E) C`` becomes
    ``MatMulNBits([x, x E'] ; [q; q_C])`` with ``-C`` as extra rows of the 4-bit weight (one block of
    32 rows per 32 blocks of ``x``; ``E'`` pads the block sums to it), quantized per output column
    round-to-nearest with an integer zero point; ``levels`` 2 adds the rounding residual as a second
    block (NOT exact: error at most ``scale / 2`` of ``C``'s 4-bit grid per level)."""
    from onnx import helper, numpy_helper

    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    drop, new_nodes, replaced = set(), [], {}
    for node in g.node:
        if not node.name.endswith("/exact"):
            continue
        mm, off = producer[node.input[0]], producer[node.input[1]]
        bs = producer[off.input[0]]
        a = {x.name: helper.get_attribute_value(x) for x in mm.attribute}
        k, n, block = a["K"], a["N"], a["block_size"]
        c = numpy_helper.to_array(inits[off.input[1]], str(ART)).astype(np.float64)  # (blocks, N)
        blocks = c.shape[0]
        extra = -(-blocks // block)  # extra K blocks per level
        rows = extra * block
        e = np.zeros((k, rows), np.float32)
        e[:, :blocks] = numpy_helper.to_array(inits[bs.input[1]], str(ART))
        qs, ss, zs = [], [], []
        resid = -c.T  # (N, blocks)
        for _ in range(levels):
            lo, hi = resid.min(1, keepdims=True), resid.max(1, keepdims=True)
            scale = np.where(hi > lo, (hi - lo) / 15.0, 1.0)
            zp = np.clip(np.round(-lo / scale), 0, 15)
            q = np.clip(np.round(resid / scale) + zp, 0, 15)
            full = np.zeros((n, rows)); full[:, :blocks] = q; full[:, blocks:] = zp  # padding: exactly 0
            qs.append(full); ss.append(np.repeat(scale, extra, 1)); zs.append(np.repeat(zp, extra, 1))
            resid = resid - (q - zp) * scale
        # the base weight's packed blobs (N, k_blocks, 16), scales (N*k_blocks,), zero points (N, ceil(k_blocks/2))
        qb = numpy_helper.to_array(inits[mm.input[1]], str(ART))
        sb = numpy_helper.to_array(inits[mm.input[2]], str(ART)).reshape(n, -1)
        zb = numpy_helper.to_array(inits[mm.input[3]], str(ART))
        kb = k // block
        zfull = np.stack([(zb >> 4 * (j % 2))[:, j // 2] & 15 for j in range(kb)], 1)
        q_new = np.concatenate(qs, 1).astype(np.uint8).reshape(n, -1, block)  # (N, extra*levels, block)
        blobs = (q_new[..., 0::2] | (q_new[..., 1::2] << 4)).astype(np.uint8)
        qb2 = np.concatenate([qb, blobs], 1)
        sb2 = np.concatenate([sb] + ss, 1).astype(np.float32)
        z2 = np.concatenate([zfull] + zs, 1).astype(np.uint8)
        kb2 = z2.shape[1]
        zp2 = np.zeros((n, (kb2 + 1) // 2), np.uint8)
        for j in range(kb2):
            zp2[:, j // 2] |= z2[:, j] << (4 * (j % 2))
        name = mm.name
        g.initializer.extend([numpy_helper.from_array(qb2, f"{name}_q4x"), numpy_helper.from_array(sb2.reshape(-1), f"{name}_s4x"),
                              numpy_helper.from_array(zp2.reshape(-1) if zb.ndim == 1 else zp2, f"{name}_z4x")])
        ename = f"blocksum_pad_{k}x{rows}"
        if ename not in inits:
            inits[ename] = numpy_helper.from_array(e, ename)
            g.initializer.append(inits[ename])
        x = mm.input[0]
        ins = [x] + [f"{name}/bs"] * levels
        replaced[node.name] = [helper.make_node("MatMul", [x, ename], [f"{name}/bs"], name=f"{name}/bs"),
                               helper.make_node("Concat", ins, [f"{name}/xa"], name=f"{name}/xa", axis=-1),
                               helper.make_node("MatMulNBits", [f"{name}/xa", f"{name}_q4x", f"{name}_s4x", f"{name}_z4x"],
                                                list(node.output), name=name, domain="com.microsoft",
                                                **{**a, "K": k + rows * levels})]
        drop |= {mm.name, off.name, bs.name}
    for node in g.node:
        if node.name in replaced:
            new_nodes += replaced[node.name]
        elif node.name not in drop:
            new_nodes.append(node)
    return _replace_nodes(proto, new_nodes)


def nooffset(proto):
    """Drop HQQ's ``- (x E) C`` terms: each ``Sub`` of an ``/exact`` node becomes an Identity."""
    from onnx import helper

    g = proto.graph
    new_nodes = []
    for node in g.node:
        if node.name.endswith(("/block_sums", "/offset")):
            continue
        if node.name.endswith("/exact"):
            node = helper.make_node("Identity", [node.input[0]], list(node.output), name=node.name)
        new_nodes.append(node)
    return _replace_nodes(proto, new_nodes)


def norows(proto):
    """Drop the ``Mul`` of each LoRA group's rank columns by its per-row weights (``.rows`` inputs)."""
    from onnx import helper

    rows = {i.name for i in proto.graph.input if i.name.endswith(".rows")}
    new_nodes = []
    for node in proto.graph.node:
        if node.op_type == "Mul" and node.input[1] in rows:
            node = helper.make_node("Identity", [node.input[0]], list(node.output), name=node.name)
        new_nodes.append(node)
    return _replace_nodes(proto, new_nodes)


def einsum(proto):
    """``MatMul(x, AT) -> Mul(., rows) -> MatMul(., BT)`` of each LoRA group as one ``Einsum``."""
    from onnx import helper

    nodes = list(proto.graph.node)
    by_out = {o: n for n in nodes for o in n.output}
    drop, new_nodes = set(), []
    for node in nodes:
        bt = node.input[1] if node.op_type == "MatMul" else ""
        if not bt.endswith(".BT"):
            continue
        mul = by_out[node.input[0]]
        first = by_out[mul.input[0]]
        drop |= {id(mul), id(first)}
        node.CopyFrom(helper.make_node("Einsum", [first.input[0], first.input[1], mul.input[1], bt], list(node.output),
                                       name=node.name, equation="...i,ir,...r,ro->...o"))
    for node in nodes:
        if id(node) not in drop:
            new_nodes.append(node)
    return _replace_nodes(proto, new_nodes)


def _adapter(name: str = "numbers") -> dict[str, np.ndarray]:
    """The adapter's fused feeds, packed by the runtime once and kept in ``ART/feeds-NAME.npz``:
    a worker reads that file instead of opening a ``Model`` (whose session would count in its RSS)."""
    cache = ART / f"feeds-{name}.npz"
    manifest = ART / "manifest.json"
    if not cache.is_file() or cache.stat().st_mtime < manifest.stat().st_mtime:
        from edgepeft.runtime import Model

        feeds = Model(ART)._store.feeds(name)[0]
        np.savez(cache, **{k: np.ascontiguousarray(v) for k, v in feeds.items()})
    with np.load(cache) as z:
        return {k: z[k] for k in z.files}


def _qkv_shape(feeds) -> tuple[dict[int, list[int]], list[int]]:
    """Per layer the q/k/v ranks of the packed B (its non-zero blocks) and the q/k/v widths."""
    import onnx

    proto = _load()
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    kv = shapes["past.0.key"]
    heads_out = None
    ranks = {}
    for name, bt in feeds.items():
        if not name.endswith(".qkv.BT") or bt.ndim != 2 or bt.shape[0] == 0:
            continue
        layer = int(name.split(".")[1])
        out_total = bt.shape[1]
        kvw = kv[1] * kv[3]
        q = out_total - 2 * kvw
        heads_out = [q, kvw, kvw]
        r = bt.shape[0] // 3
        edges = np.cumsum([0] + heads_out)
        for j in range(3):  # the packed B is block-diagonal: check, then the ranks are equal thirds
            off = np.delete(bt[j * r:(j + 1) * r], np.s_[edges[j]:edges[j + 1]], axis=1)
            assert not off.any(), f"{name}: not block-diagonal with equal ranks"
        ranks[layer] = [r, r, r]
    del onnx
    return ranks, heads_out


# variants that are a rewrite of the exported graph: name -> rewrite(proto) -> proto
REWRITES = {"reducesum": reducesum, "norows": norows, "einsum": einsum, "nooffset": nooffset, "offset8": offset8,
            "offset4": offset4, "offset4x2": lambda p: offset4(p, 2)}


def variant_model(name: str) -> tuple[Path, dict[str, np.ndarray], dict[str, str]]:
    """(model path, adapter feeds, session config entries) of one variant."""
    feeds = _adapter()
    config = {}
    if name == "perproj":
        ranks, outs = _qkv_shape(feeds)
        path = ART / "model.exp-perproj.onnx"
        if not path.is_file():
            _save(perproj(_load(), ranks, outs), "perproj")
        edges = np.cumsum([0] + outs)
        for layer, rs in ranks.items():
            bt = feeds.pop(f"lora.{layer}.qkv.BT")
            r0 = 0
            for j, p in enumerate("qkv"):
                feeds[f"lora.{layer}.qkv.BT.{p}"] = np.ascontiguousarray(bt[r0:r0 + rs[j], edges[j]:edges[j + 1]])
                r0 += rs[j]
        return path, feeds, config
    if name in REWRITES:
        path = ART / f"model.exp-{name}.onnx"
        if not path.is_file():
            _save(REWRITES[name](_load()), name)
        return path, feeds, config
    if name == "prepackfile":
        path = ART / "model.exp-prepackfile.onnx"
        if not path.is_file():
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.log_severity_level = 3
            so.optimized_model_filepath = str(path)
            for k, v in {"session.optimized_model_external_initializers_file_name": path.name + ".data",
                         "session.optimized_model_external_initializers_min_size_in_bytes": "1024",
                         "session.save_external_prepacked_constant_initializers": "1"}.items():
                so.add_session_config_entry(k, v)
            ort.InferenceSession(str(ART / "model.onnx"), so, providers=["CPUExecutionProvider"])
        return path, feeds, config
    if name == "nospin":
        config["session.intra_op.allow_spinning"] = "0"
    return ART / "model.onnx", feeds, config


# ------------------------------------------------------------------ worker: one variant, one process
def run_variant(name: str, threads: int, runs: int, prompt: list[int], new_tokens: int, profile: bool) -> dict:
    import onnxruntime as ort
    from bench_speed import proc_status as _status  # this script's folder is on sys.path

    from edgepeft.contract import past_names, present_names

    path, feeds, config = variant_model(name)
    before = _status()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1 if name == "t1" else threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # not the "initializer in graph inputs" warning per LoRA input
    for k, v in config.items():
        so.add_session_config_entry(k, v)
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = str(RESULTS / f"ortprof-{name}")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    loaded = _status()
    shapes = {i.name: i.shape for i in sess.get_inputs()}
    vocab = sess.get_outputs()[0].shape[2]  # logits (B, S, V)
    n_layers = sum(1 for n in shapes if n.startswith("past.") and n.endswith(".key"))
    _, h, _, d = shapes["past.0.key"]
    slots = len(prompt) + new_tokens + 8
    names = {i.name for i in sess.get_inputs()} | {i.name for i in sess.get_overridable_initializers()}
    values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in feeds.items() if k in names}
    unbound = [k for k in feeds if k not in values]
    assert not unbound, f"adapter arrays with no graph input: {unbound[:3]}"

    def generate(n: int) -> tuple[list[float], list[int]]:
        b = sess.io_binding()
        bufs = []
        for i in range(n_layers):
            for past, present in zip(past_names(i), present_names(i)):
                buf = np.zeros((1, h, slots, d), np.float32)
                v = ort.OrtValue.ortvalue_from_numpy(buf)
                bufs.append((buf, v))
                b.bind_ortvalue_input(past, v)
                b.bind_ortvalue_output(present, v)
        for k, v in values.items():
            b.bind_ortvalue_input(k, v)
        ids = np.asarray([prompt], np.int64)
        b.bind_cpu_input("input_ids", ids)
        b.bind_cpu_input("seqlens_k", np.array([len(prompt) - 1], np.int32))
        b.bind_cpu_input("total_sequence_length", np.array(len(prompt), np.int32))
        b.bind_output("logits")
        sess.run_with_iobinding(b)
        tok = int(b.get_outputs()[0].numpy()[0, -1].argmax())
        out, stamps = [tok], [time.perf_counter()]
        step_ids, seqlens, total = np.zeros((1, 1), np.int64), np.zeros(1, np.int32), np.zeros((), np.int32)
        logits = np.zeros((1, 1, vocab), np.float32)
        b.bind_ortvalue_input("input_ids", ort.OrtValue.ortvalue_from_numpy(step_ids))
        b.bind_ortvalue_input("seqlens_k", ort.OrtValue.ortvalue_from_numpy(seqlens))
        b.bind_ortvalue_input("total_sequence_length", ort.OrtValue.ortvalue_from_numpy(total))
        b.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        length = len(prompt)
        for _ in range(n - 1):
            step_ids[0, 0] = out[-1]
            length += 1
            seqlens[0] = length - 1
            total[...] = length
            sess.run_with_iobinding(b)
            out.append(int(logits[0, 0].argmax()))
            stamps.append(time.perf_counter())
        del bufs
        return stamps, out

    generate(8)
    rates, tokens = [], None
    for _ in range(runs):
        stamps, tokens = generate(new_tokens)
        rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    end = _status()
    res = {"decode_tok_s": statistics.median(rates), "rates": rates, "tokens": tokens,
           "peak_rss_mb": end["VmHWM"], "rss_mb": end["VmRSS"],  # loading added (adapter arrays: numpy, before):
           "load_anon_mb": loaded["RssAnon"] - before["RssAnon"], "load_file_mb": loaded["RssFile"] - before["RssFile"]}
    if profile:
        res["profile"] = sess.end_profiling()
    return res


# ------------------------------------------------------------------ profile: per op type, per category, bytes
def _category(node_name: str, op: str, inputs: list[str]) -> str:
    if any(i.startswith("lora.") for i in inputs) or "/y" in node_name or node_name.endswith(("/split", "/concat")) \
            and "lora" in node_name:
        return "LoRA MatMuls"
    if node_name.endswith(("/block_sums", "/offset", "/exact", "/sum", "/r")):
        return "HQQ offsets (block sums, offset MatMul, Sub)"
    if op == "MatMulNBits":
        return "MatMulNBits"
    return op


def bytes_per_step(feeds: dict[str, np.ndarray]) -> dict[str, float]:
    """Bytes of weights each category reads per decode step (initializers + bound LoRA arrays)."""
    proto = _load()
    size = {}
    for t in proto.graph.initializer:
        n = int(np.prod(t.dims)) if t.dims else 1
        size[t.name] = n * _DTYPE_BYTES.get(t.data_type, 4)
    for k, v in feeds.items():
        size[k] = v.nbytes
    producer = {o: n for n in proto.graph.node for o in n.output}
    head = producer["logits"]
    head_names = {head.name}
    while head.op_type == "Sub":  # HQQ exact head: MatMulNBits/int_zp - offset
        head = producer[head.input[0]]
        head_names.add(head.name)
    out = collections.Counter()
    seen = set()
    for node in proto.graph.node:
        if node.op_type == "Gather" or node.op_type == "GatherBlockQuantized":
            cat = "token table (one row per step)"
        elif node.name in head_names or node.name.split("/")[0] in head_names:
            cat = "LM head"
        elif any(i.startswith("lora.") for i in node.input):
            cat = "LoRA (packed A^T, B^T as bound)"
        elif node.name.endswith(("/block_sums", "/offset")):
            cat = "HQQ offsets (E shared per K, C per weight)"
        elif node.op_type == "MatMulNBits":
            cat = "base MatMulNBits (int4 + scales + zero points)"
        else:
            cat = "other (norms, rotary tables, ...)"
        for i in node.input:
            if i in size and i not in seen:
                seen.add(i)
                out[cat] += size[i] if cat != "token table (one row per step)" else 0
    return {k: v / 2**20 for k, v in out.most_common()}


def profile(args) -> dict:
    import onnx

    r = run_variant("base", args.threads, 1, _prompt(args), args.new_tokens, True)
    events = json.loads(Path(r["profile"]).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    decode_start = runs[-args.new_tokens + 1]["ts"]  # the last generation's decode steps
    steps = args.new_tokens - 1
    proto = _load()
    inputs = {n.name: list(n.input) for n in proto.graph.node}
    ops = {n.name: n.op_type for n in proto.graph.node}
    by_op, by_cat = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") != "Node" or e["ts"] < decode_start or not e["name"].endswith("_kernel_time"):
            continue
        node = e["name"][: -len("_kernel_time")]
        op = e.get("args", {}).get("op_name", ops.get(node, "?"))
        by_op[op] += e["dur"]
        by_cat[_category(node, op, inputs.get(node, []))] += e["dur"]
    step_ms = statistics.median(
        (b["ts"] - a["ts"]) / 1e3 for a, b in zip(runs[-steps - 1:-1], runs[-steps:]))
    run_ms = statistics.median(x["dur"] for x in runs[-steps:]) / 1e3
    feeds = _adapter()
    del onnx
    return {"decode_tok_s_profiled": r["decode_tok_s"], "model_run_ms_median": run_ms, "step_interval_ms": step_ms,
            "per_op_ms_per_step": {k: v / 1e3 / steps for k, v in by_op.most_common()},
            "per_category_ms_per_step": {k: v / 1e3 / steps for k, v in by_cat.most_common()},
            "mb_per_step": bytes_per_step(feeds), "profile_file": r["profile"]}


def _prompt(args) -> list[int]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_speed import _prompt_ids

    return _prompt_ids(args.prompt_tokens)


def _spawn(cmd: list[str]) -> dict:
    before = os.getloadavg()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    load = {"load_before": before[0], "load_after": os.getloadavg()[0]}
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-3:], **load}
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), **load}


def compare(args) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_speed

    prompt = _prompt(args)
    _adapter()  # packed here once, so no worker opens a Model for it
    spec = {"runs": args.runs, "new_tokens": args.new_tokens, "threads": args.threads, "prompt": prompt,
            "swap_pairs": 5}
    bench = bench_speed.bench_model("smollm2")
    lspec = bench_speed._llamacpp_spec(spec, bench, args.peer_python)
    jobs = {v: [sys.executable, __file__, "--worker", v, json.dumps(spec)] for v in args.variants}
    if isinstance(lspec, dict):
        jobs["llama.cpp"] = [args.peer_python, bench_speed.__file__, "--worker", "llamacpp", json.dumps(lspec)]
    rounds = {k: [] for k in jobs}
    for r in range(args.rounds):
        for k, cmd in jobs.items():
            print(f"[profile] round {r + 1}/{args.rounds}: {k}", file=sys.stderr, flush=True)
            rounds[k].append(_spawn(cmd))
    out = {}
    base = None
    for k, rs in rounds.items():
        ok = [x["decode_tok_s"] for x in rs if "decode_tok_s" in x]
        out[k] = {"decode_tok_s": statistics.median(ok) if ok else None, "rounds": ok,
                  "load": [(x["load_before"], x["load_after"]) for x in rs],
                  "errors": [x["error"] for x in rs if "error" in x],
                  "tokens_same_as_base": None}
        for m in ("peak_rss_mb", "rss_mb", "load_anon_mb", "load_file_mb"):
            vals = [x[m] for x in rs if m in x]
            if vals:
                out[k][m] = statistics.median(vals)
        if k == "base":
            base = rs[-1].get("tokens")
    for k, rs in rounds.items():
        if k != "llama.cpp" and base is not None and "tokens" in rs[-1]:
            out[k]["tokens_same_as_base"] = rs[-1]["tokens"] == base
    return out


def _teacher_forced_logits(path: Path, feeds: dict[str, np.ndarray], ids: list[int], chunk: int = 120) -> np.ndarray:
    """Log-softmax logits of ``ids`` run through the graph at ``path`` in chunks of ``chunk`` tokens,
    each chunk from an empty KV cache: ``(len(ids), vocab)``."""
    import onnxruntime as ort

    from edgepeft.contract import past_names

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    shapes = {i.name: i.shape for i in sess.get_inputs()}
    layers = sum(1 for n in shapes if n.startswith("past.") and n.endswith(".key"))
    _, h, _, d = shapes["past.0.key"]
    names = {i.name for i in sess.get_inputs()} | {i.name for i in sess.get_overridable_initializers()}
    out = []
    for start in range(0, len(ids), chunk):
        seq = ids[start:start + chunk]
        f = {k: v for k, v in feeds.items() if k in names}
        f.update({p: np.zeros((1, h, len(seq), d), np.float32) for i in range(layers) for p in past_names(i)})
        f.update(input_ids=np.array([seq], np.int64), seqlens_k=np.array([len(seq) - 1], np.int32),
                 total_sequence_length=np.array(len(seq), np.int32))
        out.append(sess.run(["logits"], f)[0][0])
    x = np.concatenate(out).astype(np.float64)
    x -= x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _accuracy_level(path: Path, level: int) -> Path:
    """A copy of the graph at ``path`` (beside it, same data file) with every MatMulNBits at
    ``accuracy_level`` ``level``."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    for node in proto.graph.node:
        for a in node.attribute:
            if node.op_type == "MatMulNBits" and a.name == "accuracy_level":
                a.i = level
    dst = path.with_name(f"{path.stem}.level{level}.onnx")
    onnx.save(proto, str(dst))
    return dst


def accuracy(args) -> dict:
    """KL and top-1 agreement of each variant against the graph as exported (``base``, exact
    offsets), teacher-forced on the held-out calibration text, with the numbers adapter and the
    base; at the exported accuracy level (int8 activations) and at level 0 (float activations),
    which separates the error of a variant's weights from that of quantizing its activations."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ART / "tokenizer" / "tokenizer.json"))
    text = (ROOT / "edgepeft" / "calibration" / "heldout.txt").read_text()
    ids = tok.encode(text).ids[:args.positions]
    out = {"positions": len(ids)}
    for level in (None, 0):
        ref_path = ART / "model.onnx" if level is None else _accuracy_level(ART / "model.onnx", level)
        for adapter in ("numbers", None):
            feeds = _adapter(adapter) if adapter else {}
            ref = _teacher_forced_logits(ref_path, feeds, ids)
            for name in args.variants:
                if name in ("base", "nospin", "t1"):
                    continue
                path, _, _ = variant_model(name)
                if level is not None:
                    path = _accuracy_level(path, level)
                got = _teacher_forced_logits(path, feeds, ids)
                kl = (np.exp(ref) * (ref - got)).sum(-1)
                out[f"{name}/{adapter or 'base'}/level{'-as-exported' if level is None else level}"] = {
                    "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
                    "top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).mean())}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("profile", "compare", "accuracy"), nargs="?", default="profile")
    ap.add_argument("--positions", type=int, default=480, help="accuracy: held-out tokens, teacher-forced")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--peer-python", default=os.environ.get("EDGEPEFT_BENCH_PYTHON", sys.executable))
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        s = json.loads(args.worker[1])
        r = run_variant(args.worker[0], s["threads"], s["runs"], s["prompt"], s["new_tokens"], False)
        print(json.dumps(r))
        return 0
    RESULTS.mkdir(parents=True, exist_ok=True)
    dst = RESULTS / "fused_int4_profile.json"
    res = json.loads(dst.read_text()) if dst.is_file() else {}
    res[args.what] = {"date": time.strftime("%Y-%m-%d %H:%M"), "loadavg_start": os.getloadavg(),
                      **{"profile": profile, "compare": compare, "accuracy": accuracy}[args.what](args),
                      "loadavg_end": os.getloadavg()}
    dst.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res[args.what], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
