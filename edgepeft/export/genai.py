"""What onnxruntime-genai needs to run a fused causal-LM artifact: ``genai_config.json`` and
``genai.onnx``, written at export when the artifact allows it (:func:`not_ready` says why not).

onnxruntime-genai (0.18) feeds a GroupQueryAttention decoder that has no ``attention_mask`` two
int32 inputs of its own, ``past_sequence_length (1, 1)`` (the total length - 1: the fused graph's
``seqlens_k``) and ``current_sequence_length (1,)`` (the fused graph's ``total_sequence_length``),
batch 1 only. Their values are the fused graph's, their ranks are not (the fused graph takes
``seqlens_k (B,)`` and a scalar), and onnxruntime refuses an input of another rank. So
``genai.onnx`` is the fused graph's proto with those two inputs replaced by onnxruntime-genai's,
each reshaped into the old name by one ``Reshape``: the same nodes and initializers, the weights
read from the fused graph's own external data file (no copy). Everything else is the fused graph
as edgepeft's runtime runs it: ``past.%d.key|value`` / ``present.%d.key|value`` one shared
buffer (``past_present_share_buffer``), the adapter inputs left at their identity defaults when
no adapter is active, and the artifact's ``.onnx_adapter`` files loadable with
``og.Adapters(model).load(path, name)`` because their parameter names are the graph's inputs.

Ready only when every adapter input of the graph is a low-rank one (the fused forms in
``edgepeft.contract.features.FUSED_LOW_RANK``), stored in the graph's input dtype, with one KV head
count and head size for every layer. Torch-free (onnx + the manifest); names no kind or family.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgepeft.contract.features import FUSED_LOW_RANK
from edgepeft.contract.names import GENAI_CONFIG, GENAI_GRAPH, inside, sha256_file

# the fused graph's inputs -> onnxruntime-genai's (genai_config's decoder.inputs key and graph
# input name), with the shape onnxruntime-genai feeds and the shape the fused graph reads
_LENGTHS = {"seqlens_k": ("past_sequence_length", [1, 1], [-1]),
            "total_sequence_length": ("current_sequence_length", [1], [])}
_DTYPES = {"fp32": "float32", "fp16": "float16"}  # adapter_precision -> the dtype of its arrays
# onnxruntime-genai measures a prompt up to its first pad_token_id on this path (batch 1, no
# padding): name a pad id no token has, so a prompt that contains the tokenizer's pad (or EOS) id
# is read whole.
_NO_PAD = -1


def not_ready(manifest: dict) -> str | None:
    """Why onnxruntime-genai cannot run this artifact as :func:`write_genai` writes it, or None."""
    if manifest.get("task") != "causal-lm":
        return f"a {manifest.get('task')} artifact (onnxruntime-genai runs causal LMs)"
    if manifest.get("mode") != "side":
        return "a merged artifact (one graph per adapter); export with --mode side"
    graph = manifest.get("graph") or {}
    if graph.get("layout") != "fused":
        return ("not the fused graph (the traced graph takes attention_mask and grows its KV cache by "
                "concatenation); export with --graph fused")
    kv = manifest.get("kv_cache") or {}
    if len(set(kv.get("kv_heads", []))) != 1 or len(set(kv.get("head_dims", []))) != 1:
        return "layers with different KV head counts or head sizes (onnxruntime-genai takes one of each)"
    feeds = {}
    for name, entry in manifest.get("adapters", {}).items():
        for i in entry.get("inputs", []):
            feeds.setdefault(i, (name, entry.get("kind")))
    dtypes = {v["name"]: v.get("dtype") for v in graph.get("inputs", [])}
    want = _DTYPES.get(manifest.get("adapter_precision", "fp32"))
    for i in manifest.get("inputs", {}):
        place = i.rpartition(".")[2]
        if place not in FUSED_LOW_RANK:
            who = feeds.get(i)
            by = f"adapter {who[0]!r} ({who[1]}) feeds" if who else "the graph takes"
            return (f"{by} {i}, not a low-rank (LoRA) input; edgepeft writes onnxruntime-genai files for "
                    "artifacts whose adapters are all LoRA-family")
        if dtypes.get(i) != want:
            return (f"adapter files store {want} where the graph input {i} is {dtypes.get(i)} (onnxruntime-genai "
                    "feeds adapter arrays as stored); export with --adapter-precision fp32")
    if _eos(manifest) is None:
        return "the base model names no EOS token (onnxruntime-genai needs eos_token_id)"
    names = {v["name"] for v in graph.get("inputs", [])}
    missing = [n for n in ("input_ids", *_LENGTHS) if n not in names]
    if missing:
        return f"the graph has no {', '.join(missing)} input"
    return None


def write_genai(manifest: dict, root: Path) -> dict:
    """Write ``genai.onnx`` then ``genai_config.json`` into ``root`` if :func:`not_ready` finds
    nothing; return the manifest's ``genai`` entry: ``{"ready": true, "files": [{file, sha256}],
    "tokenizer": dir | None}`` or ``{"ready": false, "reason": ...}`` (nothing written)."""
    why = not_ready(manifest)
    if why:
        return {"ready": False, "reason": why}
    graph = manifest["graph"]
    _write_graph(inside(root, graph["file"], "genai"), root / GENAI_GRAPH)
    tok = manifest.get("tokenizer") or {}
    tok_dir = tok.get("dir") if tok and all(
        (root / tok["dir"] / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")) else None
    config = genai_config(manifest, tok_dir)
    (root / GENAI_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")  # last
    return {"ready": True, "files": [{"file": f, "sha256": sha256_file(root / f)} for f in (GENAI_GRAPH, GENAI_CONFIG)],
            "tokenizer": tok_dir}


def genai_config(manifest: dict, tokenizer_dir: str | None) -> dict:
    """The ``genai_config.json`` of a ready artifact (CPU; greedy by default; context = the rows of
    the graph's rotary tables)."""
    kv, eos = manifest["kv_cache"], _eos(manifest)
    bos = (manifest.get("tokenizer") or {}).get("bos_token_id")
    context = int(manifest["graph"]["positions"])
    inputs = {"input_ids": "input_ids", "past_key_names": "past.%d.key", "past_value_names": "past.%d.value",
              **{og: og for og, _, _ in _LENGTHS.values()}}
    model = {"type": "decoder", "context_length": context, "vocab_size": int(manifest["base"]["vocab_size"]),
             **({} if bos is None else {"bos_token_id": int(bos)}),
             "eos_token_id": [int(e) for e in eos] if isinstance(eos, list) else int(eos),
             "pad_token_id": _NO_PAD,
             "decoder": {"filename": GENAI_GRAPH,
                         "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                         "head_size": int(kv["head_dims"][0]), "num_key_value_heads": int(kv["kv_heads"][0]),
                         "num_hidden_layers": int(kv["layers"]),
                         "inputs": inputs,
                         "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                                     "present_value_names": "present.%d.value"}}}
    if tokenizer_dir:
        model["tokenizer_dir"] = tokenizer_dir
    return {"model": model,
            "search": {"do_sample": False, "max_length": context, "num_beams": 1, "num_return_sequences": 1,
                       "past_present_share_buffer": True, "top_k": 1, "top_p": 1.0, "temperature": 1.0,
                       "repetition_penalty": 1.0, "min_length": 0}}


def _eos(manifest: dict):
    """The tokens that end a generation where edgepeft's runtime stops: the base model's EOS (one
    id or a list); None when it names none."""
    eos = manifest["base"].get("eos_token_id")
    return None if eos is None or eos == [] else eos


def _write_graph(src: Path, dst: Path) -> None:
    """The fused graph with onnxruntime-genai's length inputs, reshaped into the fused graph's
    (the initializers keep pointing at the fused graph's external data file, beside it)."""
    proto = onnx.load(str(src), load_external_data=False)
    g = proto.graph
    inputs, nodes = [], []
    for v in g.input:
        if v.name not in _LENGTHS:
            inputs.append(v)
            continue
        name, fed, shape = _LENGTHS[v.name]
        inputs.append(helper.make_tensor_value_info(name, TensorProto.INT32, fed))
        g.initializer.append(numpy_helper.from_array(np.array(shape, np.int64), f"genai.{v.name}.shape"))
        nodes.append(helper.make_node("Reshape", [name, f"genai.{v.name}.shape"], [v.name], name=f"genai.{v.name}"))
    del g.input[:]
    g.input.extend(inputs)
    old = list(g.node)
    del g.node[:]
    g.node.extend(nodes + old)
    onnx.save(proto, str(dst))
