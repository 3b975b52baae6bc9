"""Static-shape graphs for accelerators: one fixed-shape copy of the side graph per sequence bucket.

A profile with ``static_shapes = true`` (NNAPI, Core ML, QNN) gets, beside the dynamic
``model.onnx``, a graph ``model.s{S}.onnx`` per bucket ``S`` in which every axis is a number:

=================  ===========================  =====================================
input / output     dynamic graph                bucket graph (batch B, context C)
=================  ===========================  =====================================
input_ids          (batch, seq)                 (B, S)
attention_mask     (batch, total_seq)           (B, C)        decoders: the whole window
past.{i}.*         (batch, H, past_seq, D)      (B, H, C - S, D)
present.{i}.*      (batch, H, past_seq+seq, D)  (B, H, C, D)
LoRA / DoRA A, B   (r, in), (out, r)            (max_rank, in), (out, max_rank)
LoRA rows          (batch, 1, r), default ones  (B, 1, max_rank), default ones
scale offsets      (batch, 1, w), default zeros (B, 1, w), default zeros
bottleneck parts   (r, out), (r,), (out, r)     max_rank in place of r
encoders           input_ids / mask (batch, seq) (B, S)
=================  ===========================  =====================================

The bucket graphs are the dynamic graph's nodes with the shapes written in: they point at the
same weights file (``model.onnx.data``), so they cost a few kilobytes each; onnxruntime folds the
shape arithmetic at load (or in the ``.ort`` conversion) once the shapes are numbers. Zero rows
of A (columns of B) add nothing, so an adapter of rank ``r <= max_rank``, or a mix whose ranks
sum to at most ``max_rank``, zero-padded by the runtime, computes exactly what it computes
unpadded. The KV cache is a fixed window of ``C`` positions, newest last; the runtime keeps it,
slides it by ``S`` per call and masks the empty slots (``edgepeft.runtime.static``).

torch-free (``onnx`` only).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx

from edgepeft.contract.names import ROWS_AXIS, ROWS_PART
from edgepeft.errors import EdgepeftError

_RANK = re.compile(r"^rank_")


def bucket_file(seq: int) -> str:
    return f"model.s{seq}.onnx"


def bucket_dims(task: str, batch: int, seq: int, context: int | None) -> dict[str, int]:
    """The dynamic graph's named axes and their values in the graph of bucket ``seq``."""
    dims = {"batch": batch, "seq": seq, ROWS_AXIS: batch}  # per-row weights: one per row
    if task == "causal-lm":
        dims.update(past_seq=context - seq, total_seq=context)
    return dims


def _value(param: str, dims: dict[str, int], max_rank: int | None, where: str) -> int:
    if param in dims:
        return dims[param]
    if param.startswith(f"{ROWS_AXIS}."):  # a per-row input's own axis (contract.names.rows_axis): one per row
        return dims[ROWS_AXIS]
    if _RANK.match(param):
        if max_rank is None:
            raise EdgepeftError(f"{where}: axis {param!r} varies per adapter, and the target sets no "
                                "max_rank to fix it at. Add max_rank to the profile.")
        return max_rank
    if re.fullmatch(r"[A-Za-z_][\w]*( [+\-] [A-Za-z_][\w]*)+", param):  # e.g. "past_seq + seq"
        tokens = param.split()
        total = _value(tokens[0], dims, max_rank, where)
        for op, name in zip(tokens[1::2], tokens[2::2]):
            v = _value(name, dims, max_rank, where)
            total = total + v if op == "+" else total - v
        return total
    raise EdgepeftError(f"{where}: axis {param!r} cannot be fixed by the target's static shapes "
                        "(batch, sequence buckets, context_length, max_rank). "
                        + ("Prompt tuning on an encoder feeds a prompt of its own length; export it "
                           "with a target without static_shapes." if param == "prompt_len" else
                           "Export with a target without static_shapes."))


def fix_shapes(proto: onnx.ModelProto, dims: dict[str, int], max_rank: int | None,
               where: str) -> onnx.ModelProto:
    """A copy of ``proto`` (weights stay external, untouched) with every input and output axis fixed.

    Adapter inputs with a rank axis lose their default initializer (zero rank, which no longer
    fits): the runtime feeds zeros of the fixed shape for the adapters that do not use them.
    Intermediate shapes (``value_info``) are dropped; onnxruntime infers them from the inputs.

    Raises:
        EdgepeftError: an axis that none of ``dims`` / max_rank fixes (e.g. a prompt length).
    """
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    accelerator_rewrites(out.graph)  # needs the value types, which value_info has
    del out.graph.value_info[:]
    ranked = set()
    for v in list(out.graph.input) + list(out.graph.output):
        for d in v.type.tensor_type.shape.dim:
            if d.dim_param:
                if _RANK.match(d.dim_param):
                    ranked.add(v.name)
                d.dim_value = _value(d.dim_param, dims, max_rank, where)  # clears dim_param (oneof)
    keep = [t for t in out.graph.initializer if t.name not in ranked and not t.name.endswith(f".{ROWS_PART}")]
    # per-row inputs (``*.rows``) keep a default of the fixed shape, every row alike: ones for the
    # weights of rank columns, zeros for the offsets of scales (which have no rank axis)
    fixed = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in out.graph.input}
    keep += [onnx.numpy_helper.from_array(np.full(fixed[t.name], float(t.name in ranked), np.float32), t.name)
             for t in out.graph.initializer if t.name.endswith(f".{ROWS_PART}") and t.name in fixed]
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep)
    _expands_to_concats(out)
    return out


def _expands_to_concats(model: onnx.ModelProto) -> int:
    """``Expand`` that repeats one axis of size 1 ``n`` times -> ``Concat`` of ``n`` copies along it,
    in place; the same numbers. Grouped-query attention's ``repeat_kv`` exports as such an Expand
    (with a computed shape) in every layer, and neither NNAPI nor Core ML takes Expand, so each
    layer was a partition of its own. Shapes come from onnx's shape inference on the fixed graph;
    an Expand whose shapes it cannot tell, or that broadcasts more than one axis, stays.

    Returns:
        How many Expands were rewritten.
    """
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)

    def dims(v):
        d = [x.dim_value if x.HasField("dim_value") else None for x in v.type.tensor_type.shape.dim]
        return d if v.type.tensor_type.HasField("shape") and None not in d else None

    shapes = {v.name: dims(v) for v in list(inferred.graph.value_info) + list(inferred.graph.input)
              + list(inferred.graph.output)}
    done = 0
    for node in model.graph.node:
        if node.op_type != "Expand" or node.domain not in ("", "ai.onnx"):
            continue
        src, dst = shapes.get(node.input[0]), shapes.get(node.output[0])
        if not src or not dst or len(src) != len(dst):
            continue
        grown = [i for i, (a, b) in enumerate(zip(src, dst)) if a != b]
        if len(grown) != 1 or src[grown[0]] != 1:
            continue
        x = node.input[0]
        del node.input[:]
        node.input.extend([x] * dst[grown[0]])
        node.op_type = "Concat"
        del node.attribute[:]
        node.attribute.append(onnx.helper.make_attribute("axis", grown[0]))
        done += 1
    return done


def accelerator_rewrites(graph: onnx.GraphProto) -> dict[str, int]:
    """Rewrite ops that NNAPI / Core ML lack into ones they run, exactly (same IEEE results):

    - ``Reciprocal(x)`` -> ``Div(1, x)``: RMSNorm's ``rsqrt`` exports as Reciprocal(Sqrt), which
      NNAPI lacks, so every norm split the graph into another partition;
    - ``Neg(x)`` -> ``Mul(x, -1)``: rotary embeddings' ``rotate_half``; Core ML lacks Neg;
    - (after the shapes are fixed) ``Expand`` of one size-1 axis -> ``Concat`` of copies
      (:func:`_expands_to_concats`): grouped-query attention's ``repeat_kv``;
    - ``Where(IsNaN(p), 0, p)`` after ``p = Softmax(scores + bias)`` -> ``p``: the exporter's
      guard for rows where every key is masked (``-inf``); NNAPI and Core ML lack IsNaN, so each
      layer split the graph twice. Removed only when ``bias`` is ``Where(mask, 0, c)`` with a
      finite ``c`` (transformers uses the float minimum): then no row is all ``-inf``, ``p`` has
      no NaN from the mask, and the guard never fires.

    Returns:
        How many nodes of each op were rewritten.
    """
    from onnx import TensorProto, helper

    types = _elem_types(graph)
    counts = {"Reciprocal": 0, "Neg": 0, "IsNaN": _drop_nan_guards(graph)}
    consts = {}

    def const(value: float, dtype: int) -> str:
        name = f"edgepeft.const.{value:g}.{dtype}"
        if name not in consts:
            consts[name] = helper.make_tensor(name, dtype, [], [value])
        return name

    for node in graph.node:
        if node.op_type not in counts or node.domain not in ("", "ai.onnx"):
            continue
        dtype = types.get(node.input[0])
        if dtype not in (TensorProto.FLOAT, TensorProto.FLOAT16):
            continue  # integers (shape arithmetic), or a type the graph does not state: leave it
        if node.op_type == "Reciprocal":
            node.op_type, inputs = "Div", [const(1.0, dtype), node.input[0]]
        else:
            node.op_type, inputs = "Mul", [node.input[0], const(-1.0, dtype)]
        del node.input[:]
        node.input.extend(inputs)
        counts["Reciprocal" if node.op_type == "Div" else "Neg"] += 1
    graph.initializer.extend(consts.values())
    return counts


def _constant(graph: onnx.GraphProto, name: str, producer: dict):
    """The value of an initializer or Constant node output, else None."""
    from onnx import numpy_helper

    for t in graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t) if not t.external_data else None
    node = producer.get(name)
    if node is not None and node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
        return numpy_helper.to_array(node.attribute[0].t)
    return None


def _drop_nan_guards(graph: onnx.GraphProto) -> int:
    """Remove ``Where(IsNaN(p), 0, p)`` guards after masked softmaxes with a finite mask (see
    :func:`accelerator_rewrites`); returns how many."""
    import numpy as np

    producer = {o: n for n in graph.node for o in n.output}
    renamed, dropped = {}, set()
    for where in graph.node:
        if where.op_type != "Where" or len(where.input) != 3:
            continue
        guard, zero, p = (producer.get(where.input[0]), _constant(graph, where.input[1], producer), where.input[2])
        softmax = producer.get(p)
        if (guard is None or guard.op_type != "IsNaN" or guard.input[0] != p or zero is None
                or np.any(zero != 0) or softmax is None or softmax.op_type != "Softmax"):
            continue
        add = producer.get(softmax.input[0])
        if add is None or add.op_type != "Add":
            continue
        biases = [producer.get(i) for i in add.input]
        finite = False
        for b in biases:
            if b is not None and b.op_type == "Where" and len(b.input) == 3:
                on, off = _constant(graph, b.input[1], producer), _constant(graph, b.input[2], producer)
                finite = on is not None and off is not None and bool(np.all(np.isfinite(on)) and np.all(np.isfinite(off)))
        if not finite:
            continue
        renamed[where.output[0]] = p
        dropped.update({id(where), id(guard)})
    if not renamed:
        return 0
    keep = [n for n in graph.node if id(n) not in dropped]
    for n in keep:
        for i, name in enumerate(n.input):
            if name in renamed:
                n.input[i] = renamed[name]
    for o in graph.output:
        if o.name in renamed:  # never: a guard feeds the next MatMul, not an output
            raise ValueError(f"graph output {o.name} is a NaN guard")
    del graph.node[:]
    graph.node.extend(keep)
    return len(renamed)


def _elem_types(graph: onnx.GraphProto) -> dict[str, int]:
    """Element type of every value the graph declares (inputs, outputs, value_info, initializers)."""
    types = {v.name: v.type.tensor_type.elem_type for v in list(graph.input) + list(graph.output)
             + list(graph.value_info)}
    types.update({t.name: t.data_type for t in graph.initializer})
    return types


def write_bucket_graphs(root: Path, rel: str, task: str, batch: int, buckets: tuple[int, ...],
                        context: int | None, max_rank: int | None) -> list[tuple[int, str]]:
    """Write ``model.s{S}.onnx`` beside ``root/rel`` for every bucket, sharing its weights file.

    Returns:
        ``(seq, relative file)`` per bucket.

    Raises:
        EdgepeftError: a decoder without context_length, a bucket that leaves no room for past
            tokens, or an axis the target cannot fix.
    """
    if task == "causal-lm" and context is None:
        raise EdgepeftError("static shapes for a decoder need the target's context_length (the "
                            "fixed KV cache). Add it to the profile.")
    proto = onnx.load(str(root / rel), load_external_data=False)
    written = []
    for seq in buckets:
        if task == "causal-lm" and seq >= context:
            raise EdgepeftError(f"sequence bucket {seq} leaves no room in context_length {context}; "
                                "make context_length larger than every bucket.")
        fixed = fix_shapes(proto, bucket_dims(task, batch, seq, context), max_rank,
                           f"static shapes (bucket {seq})")
        name = (Path(rel).parent / bucket_file(seq)).as_posix()
        onnx.save_model(fixed, str(root / name))  # external data refs unchanged: model.onnx.data
        written.append((seq, name))
    return written
