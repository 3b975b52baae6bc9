"""The artifact contract: ``manifest.json`` names, reading and checking. numpy-free, torch-free.

The exporter writes what this module reads; both sides use these names so they cannot drift.

Layout of an artifact dir::

    manifest.json
    model.onnx, model.onnx.data            side mode: one base graph, adapter weights as inputs
    model.ort                              targets with ort_format: the same graph in ORT format
    required_operators_and_types.config    ... and the operators an ORT minimal build must include
    partitions.json                        targets with partition_report: accelerator coverage
    merged/NAME.onnx, merged/NAME.onnx.data merged mode: one graph per adapter
    adapters/NAME.onnx_adapter             side mode: adapter arrays (onnxruntime AdapterFormat):
                                           graph inputs by name, plus ``prefix.{i}.key|value``
                                           for prefix / decoder prompt tuning (a KV-cache seed)
    adapters/NAME.safetensors              the same arrays as safetensors (metadata ``base_tag``), for
                                           runtimes without an AdapterFormat reader (JavaScript)
    tokenizer/tokenizer.json, ...          when the base model has a fast tokenizer
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from edgepeft.errors import EdgepeftError

FORMAT = "edgepeft-artifact"
FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20  # a manifest is tens of KB; refuse absurd sizes before reading
ADAPTER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


# The side branch of one adapted linear layer is a composition of features; each adds graph inputs
# named ``{feature}.{module}.{part}``. Per part: its mixing rule when several adapters are active,
#   cat0  concatenate along axis 0 (A, down-projections: the rank axis)
#   cat1w concatenate along axis 1 after multiplying by the adapter's weight (B, up-projections)
#   cat1  concatenate along axis 1 (A^T of the fused graph: its rank axis is the last)
#   cat0w concatenate along axis 0 after multiplying by the adapter's weight (B^T of the fused graph)
#   sumw  weighted sum (up-projection biases)
#   one   at most one active adapter may feed it, with weight 1 (non-linear in the weights).
# See edgepeft/export/slots.py for the maths.
FEATURE_PARTS = {
    "lora": (("A", "cat0"), ("B", "cat1w")),
    "dora": (("A", "one"), ("B", "one"), ("mag", "one")),
    "ia3_in": (("scale", "one"),),
    "ia3_out": (("scale", "one"),),
    "bottleneck_relu": (("down", "cat0"), ("down_bias", "cat0"), ("up", "cat1w"), ("up_bias", "sumw")),
    "bottleneck_gelu": (("down", "cat0"), ("down_bias", "cat0"), ("up", "cat1w"), ("up_bias", "sumw")),
    "bottleneck_silu": (("down", "cat0"), ("down_bias", "cat0"), ("up", "cat1w"), ("up_bias", "sumw")),
}
MIX_RULES = ("cat0", "cat1w", "cat1", "cat0w", "sumw", "one")
# A graph's layout: None (the traced model: attention_mask, position_ids, past grows by concat) or
# "fused" (edgepeft.export.fused: seqlens_k, total_sequence_length, right padding, one KV buffer).
LAYOUTS = (None, "fused")
PROMPT_INPUT = "prompt.embeds"  # encoder prompt tuning: (n_virtual, hidden), rule "one"


def slot_input_name(feature: str, module: str, part: str) -> str:
    """Graph input name of one part of a feature of an adapted layer."""
    return f"{feature}.{module}.{part}"


def lora_input_names(module: str) -> tuple[str, str]:
    """Graph input names of one LoRA slot: ``A (r, in)`` and ``B (out, r)``."""
    return slot_input_name("lora", module, "A"), slot_input_name("lora", module, "B")


def head_input_name(param: str) -> str:
    """Graph input of one classification-head parameter (PEFT ``modules_to_save``), rule "one"."""
    return f"head.{param}"


def prefix_names(layer: int) -> tuple[str, str]:
    """Adapter-file arrays that seed the KV cache of one decoder layer, each ``(1, kv_heads, p, head_dim)``."""
    return f"prefix.{layer}.key", f"prefix.{layer}.value"


def past_names(layer: int) -> tuple[str, str]:
    """KV-cache input names of one decoder layer, each ``(batch, kv_heads, past, head_dim)``."""
    return f"past.{layer}.key", f"past.{layer}.value"


def present_names(layer: int) -> tuple[str, str]:
    """KV-cache output names of one decoder layer, each ``(batch, kv_heads, past+seq, head_dim)``."""
    return f"present.{layer}.key", f"present.{layer}.value"


def check_adapter_name(name: str, where: str) -> str:
    """Adapter names become file names: keep them short, plain and inside the artifact.

    Raises:
        EdgepeftError: the name has path separators, dots at the start, or other characters.
    """
    if not ADAPTER_NAME_RE.match(name):
        raise EdgepeftError(f"{where}: adapter name {name!r} is not allowed. Use letters, digits, "
                            "'_', '-', '.' (not first), at most 64 characters.")
    return name


def base_tag(fingerprint: str) -> int:
    """The number an ``.onnx_adapter`` file carries as its AdapterFormat ``adapter_version``: 31 bits
    of the base weights' fingerprint, so the file itself names the base it was exported for.

    0 and 1 are never produced (files written before the tag carry 1).
    """
    tag = int(fingerprint.rpartition(":")[2][:8], 16) >> 1
    return tag if tag > 1 else tag + 2


UNTAGGED = (0, 1)  # adapter_version of files that carry no base tag


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def inside(root: Path, rel: str, where: str) -> Path:
    """Resolve ``rel`` under ``root``; refuse absolute paths and ``..`` escapes.

    Raises:
        EdgepeftError: the path leaves the artifact directory.
    """
    p = (root / rel).resolve()
    if Path(rel).is_absolute() or not p.is_relative_to(root.resolve()):
        raise EdgepeftError(f"{where}: path {rel!r} points outside the artifact directory {root}; "
                            "the artifact is corrupt or tampered with. Export it again.")
    return p


def read_manifest(root: Path) -> dict:
    """Load and sanity-check ``manifest.json`` of an artifact dir.

    Args:
        root: the artifact directory.

    Returns:
        The manifest dict.

    Raises:
        EdgepeftError: missing, not JSON, another format or a newer format version, or missing keys.
    """
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise EdgepeftError(f"{root}: artifact directory not found. Create one with `edgepeft export`.")
    if not path.is_file():
        raise EdgepeftError(f"{path}: missing; {root} is not an edgepeft artifact (or its export "
                            "did not finish). Export it again.")
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise EdgepeftError(f"{path}: {size:,} bytes, too large for a manifest (at most "
                            f"{MAX_MANIFEST_BYTES:,}); the artifact is damaged. Export it again.")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # JSON and UTF-8 errors, over-long numbers, deep nesting
        raise EdgepeftError(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:200]}). Export the "
                            "artifact again.") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise EdgepeftError(f"{path}: not an edgepeft manifest (format != {FORMAT!r}).")
    if type(m.get("format_version")) is not int or m["format_version"] != FORMAT_VERSION:
        raise EdgepeftError(f"{path}: format_version {_short(m.get('format_version'))}; this edgepeft "
                            f"reads version {FORMAT_VERSION}. Use the matching edgepeft version.")
    for key in ("task", "mode", "base", "graph", "adapters"):
        if key not in m:
            raise EdgepeftError(f"{path}: key {key!r} missing. Export the artifact again.")
    _check_fields(m, path)
    for name in m["adapters"]:
        check_adapter_name(name, str(path))
    return m


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_int(v, minimum: int = 0) -> bool:
    return type(v) is int and minimum <= v < 2**63


def _check_fields(m: dict, path: Path) -> None:
    """The types of every field the runtime, ``verify`` and ``inspect`` rely on.

    A manifest is data: one edited by hand or damaged must end in a readable refusal here, not in a
    KeyError or TypeError deep inside the runtime.

    Raises:
        EdgepeftError: naming the first field that is missing or of the wrong type.
    """
    def need(ok: bool, field: str, what: str, value=None) -> None:
        if not ok:
            raise EdgepeftError(f"{path}: {field} = {_short(value)}: expected {what}. The manifest was "
                                "edited or damaged; export the artifact again.")

    def is_str(v) -> bool:
        return isinstance(v, str)

    def graph(g, field: str) -> None:
        need(isinstance(g, dict), field, "an object", g)
        for key in ("file", "data_file", "sha256", "data_sha256"):
            need(is_str(g.get(key)), f"{field}.{key}", "a string", g.get(key))
        for key in ("ops", "quantization"):
            need(g.get(key) is None or isinstance(g[key], dict), f"{field}.{key}", "an object or null", g.get(key))
        ort = g.get("ort")
        need(ort is None or (isinstance(ort, dict) and is_str(ort.get("file")) and is_str(ort.get("sha256"))),
             f"{field}.ort", "null or {file, sha256} strings", ort)
        need(g.get("layout") in LAYOUTS, f"{field}.layout", f"one of {LAYOUTS}", g.get("layout"))

    need(m["task"] in ("causal-lm", "classification") if is_str(m["task"]) else False, "task",
         "'causal-lm' or 'classification'", m["task"])
    need(m["mode"] in ("side", "merged") if is_str(m["mode"]) else False, "mode", "'side' or 'merged'", m["mode"])
    for key in ("precision", "edgepeft_version"):
        need(is_str(m.get(key)), key, "a string", m.get(key))
    base = m["base"]
    need(isinstance(base, dict), "base", "an object", base)
    for key in ("fingerprint", "model_type"):
        need(is_str(base.get(key)), f"base.{key}", "a string", base.get(key))
    need(_is_int(base.get("vocab_size"), 1), "base.vocab_size", "an integer >= 1", base.get("vocab_size"))
    eos = base.get("eos_token_id")
    need(eos is None or _is_int(eos) or (isinstance(eos, list) and all(_is_int(e) for e in eos)),
         "base.eos_token_id", "null, a token id or a list of them", eos)
    if m["task"] == "classification":
        need(_is_int(base.get("num_labels"), 1), "base.num_labels", "an integer >= 1", base.get("num_labels"))
        need(isinstance(base.get("head_trained", True), bool), "base.head_trained", "true or false",
             base.get("head_trained"))
        need(_is_int(base.get("max_length", 512), 1), "base.max_length", "an integer >= 1", base.get("max_length"))
        need(isinstance(base.get("id2label") or {}, dict), "base.id2label", "an object", base.get("id2label"))
    else:
        kv = m.get("kv_cache")
        need(isinstance(kv, dict), "kv_cache", "an object", kv)
        heads, dims = kv.get("kv_heads"), kv.get("head_dims")
        need(isinstance(heads, list) and all(_is_int(h, 1) for h in heads), "kv_cache.kv_heads",
             "a list of integers >= 1", heads)
        need(isinstance(dims, list) and all(_is_int(d, 1) for d in dims) and len(dims) == len(heads),
             "kv_cache.head_dims", f"a list of {len(heads)} integers >= 1", dims)
        need(kv.get("layers") == len(heads) and _is_int(kv.get("layers")), "kv_cache.layers",
             f"the integer {len(heads)}", kv.get("layers"))
    tok = m.get("tokenizer")
    need(tok is None or (isinstance(tok, dict) and is_str(tok.get("dir"))), "tokenizer",
         "null or an object with a 'dir' string", tok)
    if tok:
        for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
            need(tok.get(key) is None or _is_int(tok[key]), f"tokenizer.{key}", "null or a token id", tok.get(key))
    inputs = m.get("inputs", {})
    need(isinstance(inputs, dict), "inputs", "an object", inputs)
    for name, spec in inputs.items():
        need(isinstance(spec, dict) and spec.get("mix") in MIX_RULES if isinstance(spec, dict)
             and is_str(spec.get("mix")) else False, f"inputs[{name!r}].mix", f"one of {MIX_RULES}", spec)
        shape = spec.get("shape")
        need(isinstance(shape, list) and all(d is None or _is_int(d) for d in shape),
             f"inputs[{name!r}].shape", "a list of sizes (null: varies per adapter)", shape)
    need(isinstance(m.get("slots", []), list), "slots", "a list", m.get("slots"))
    need(m.get("budget") is None or isinstance(m["budget"], dict), "budget", "an object", m.get("budget"))
    target = m.get("target")
    need(target is None or is_str(target) or isinstance(target, dict), "target", "a name or an object", target)
    if isinstance(target, dict):
        need(is_str(target.get("name")), "target.name", "a string", target.get("name"))
        providers = target.get("providers", [])
        need(isinstance(providers, list) and all(is_str(p) for p in providers), "target.providers",
             "a list of provider names", providers)
        files = target.get("files", [])
        need(isinstance(files, list) and all(isinstance(f, dict) and is_str(f.get("file")) and
                                             is_str(f.get("sha256")) for f in files),
             "target.files", "a list of {file, sha256}", files)
    if m["mode"] == "side":
        graph(m["graph"], "graph")
        static = m.get("static")
        need(static is None or (isinstance(static, dict) and _is_int(static.get("batch"), 1)
                                and _is_int(static.get("max_rank"), 1)
                                and (static.get("context") is None or _is_int(static["context"], 2))),
             "static", "null or {batch, max_rank, context} integers", static)
        buckets = m["graph"].get("buckets")
        if static is not None:
            need(isinstance(buckets, list) and buckets and [isinstance(b, dict) and b.get("seq") for b in buckets]
                 == static.get("buckets") and all(_is_int(b["seq"], 1) for b in buckets),
                 "graph.buckets", "one graph per static.buckets length, in order", buckets)
            for i, b in enumerate(buckets):
                graph(b, f"graph.buckets[{i}]")
                if m["task"] == "causal-lm":
                    need(static.get("context") is not None and b["seq"] < static["context"],
                         f"graph.buckets[{i}].seq", "a length below static.context", b["seq"])
        else:
            need(buckets is None, "graph.buckets", "absent without 'static'", buckets)
    adapters = m["adapters"]
    need(isinstance(adapters, dict), "adapters", "an object {name: entry}", adapters)
    for name, e in adapters.items():
        field = f"adapters[{name!r}]"
        need(isinstance(e, dict), field, "an object", e)
        need(is_str(e.get("kind")), f"{field}.kind", "a string", e.get("kind"))
        for key in ("targets", "head"):
            need(isinstance(e.get(key, []), list), f"{field}.{key}", "a list", e.get(key))
        if m["mode"] == "merged":
            graph(e.get("graph"), f"{field}.graph")
            continue
        for key in ("file", "sha256", "base_fingerprint"):
            need(is_str(e.get(key)), f"{field}.{key}", "a string", e.get(key))
        st = e.get("safetensors")
        need(st is None or (isinstance(st, dict) and is_str(st.get("file")) and is_str(st.get("sha256"))),
             f"{field}.safetensors", "null or {file, sha256} strings", st)
        feeds = e.get("inputs", [])
        need(isinstance(feeds, list) and all(is_str(n) and n in inputs for n in feeds), f"{field}.inputs",
             "a list of names from 'inputs'", feeds)
        prefix = e.get("prefix")
        need(prefix is None or (isinstance(prefix, dict) and _is_int(prefix.get("length"), 1)
                                and isinstance(prefix.get("from_prompt"), bool)),
             f"{field}.prefix", "null or {length: integer >= 1, from_prompt: true/false}", prefix)


def graph_entries(m: dict) -> list[dict]:
    """Every graph entry of a manifest: the side graph and its static buckets, or one per merged
    adapter."""
    if m["mode"] != "side":
        return [e["graph"] for e in m["adapters"].values()]
    return [m["graph"], *(m["graph"].get("buckets") or [])]


def target_files(m: dict) -> list[dict]:
    """``{file, sha256}`` of the files a target added (ORT operator config, partitions.json)."""
    target = m.get("target")
    return list(target.get("files", [])) if isinstance(target, dict) else []


def target_providers(m: dict) -> list[str]:
    """The execution providers the artifact's target asks for, in order (old manifests: CPU)."""
    target = m.get("target")
    providers = list(target.get("providers") or []) if isinstance(target, dict) else []
    return providers or ["CPUExecutionProvider"]


def verify(root: Path) -> list[str]:
    """Check every file the manifest names: present, inside ``root``, sha256 as recorded; and
    every shape the manifest states: graph inputs and outputs as in the ONNX files, adapter
    inputs, adapted layers, KV cache and vocabulary against the graph, each adapter file's arrays
    against the inputs it feeds (and its base tag against the base fingerprint).

    Args:
        root: the artifact directory.

    Returns:
        One line per problem; empty when the artifact is intact.

    Raises:
        EdgepeftError: the manifest itself is missing or unreadable.
    """
    m = read_manifest(root)
    where = str(root / MANIFEST_NAME)
    graphs = graph_entries(m)
    files = [(g["file"], g["sha256"]) for g in graphs]
    files += list(dict.fromkeys((g["data_file"], g["data_sha256"]) for g in graphs))  # buckets share one
    files += [(e["file"], e["sha256"]) for e in m["adapters"].values() if "file" in e]
    files += [(e["safetensors"]["file"], e["safetensors"]["sha256"]) for e in m["adapters"].values()
              if e.get("safetensors")]
    files += [(g["ort"]["file"], g["ort"]["sha256"]) for g in graphs if g.get("ort")]
    files += [(f["file"], f["sha256"]) for f in target_files(m)]
    problems = []
    for rel, digest in files:
        try:
            path = inside(root, rel, where)
        except EdgepeftError as e:
            problems.append(str(e))
            continue
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif sha256_file(path) != digest:
            problems.append(f"{path}: sha256 differs from the manifest (changed or damaged)")
    try:
        problems += _shape_problems(root, m, graphs)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        problems.append(f"{where}: malformed ({type(e).__name__}: {e})")
    return problems


def _graph_io(path: Path) -> tuple[dict[str, dict], dict[str, dict]] | str:
    """Inputs and outputs of an ONNX file as the exporter records them, or why it cannot be read."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError, OSError, ...
        return f"{path}: not a readable ONNX file ({type(e).__name__})"

    def io(values):
        return {v.name: {"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(
                    v.type.tensor_type.elem_type).name,
                         "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]}
                for v in values}
    return io(proto.graph.input), io(proto.graph.output)


def _slot_shapes(slot: dict):
    """(input name, shape) each feature of an adapted layer needs (None: a rank axis), from its in / out."""
    i, o, mod = slot["in"], slot["out"], slot["module"]
    for f in slot["features"]:
        if f in ("lora", "dora"):
            parts = {"A": [None, i], "B": [o, None]} | ({"mag": [o]} if f == "dora" else {})
        elif f in ("ia3_in", "ia3_out"):
            parts = {"scale": [i if f == "ia3_in" else o]}
        else:  # bottleneck_<act>, on the layer's output
            parts = {"down": [None, o], "down_bias": [None], "up": [o, None], "up_bias": [o]}
        for part, shape in parts.items():
            yield slot_input_name(f, mod, part), shape


def _shape_problems(root: Path, m: dict, graphs: list[dict]) -> list[str]:
    where = str(root / MANIFEST_NAME)
    problems = []
    actual = {}
    for g in graphs:
        try:
            path = inside(root, g["file"], where)
        except EdgepeftError:
            continue  # reported with the checksums
        if not path.is_file():
            continue
        io = _graph_io(path)
        if isinstance(io, str):
            problems.append(io)
            continue
        actual[g["file"]] = io
        for side, listed, found in (("input", g["inputs"], io[0]), ("output", g["outputs"], io[1])):
            names = [e["name"] for e in listed]
            for e in listed:
                f = found.get(e["name"])
                if f is None:
                    problems.append(f"{where}: graph {g['file']} has no {side} {e['name']!r}")
                elif e["shape"] != f["shape"] or e["dtype"] != f["dtype"]:
                    problems.append(f"{where}: {side} {e['name']} of {g['file']} is listed as "
                                    f"{e['dtype']} {e['shape']}, the graph has {f['dtype']} {f['shape']}")
            for extra in sorted(set(found) - set(names)):
                problems.append(f"{where}: {side} {extra!r} of {g['file']} is not listed in the manifest")
    vocab, labels = m["base"].get("vocab_size"), m["base"].get("num_labels")
    for g in graphs:
        io = actual.get(g["file"])
        if io is None:
            continue
        logits = io[1].get("logits")
        last = logits["shape"][-1] if logits and logits["shape"] else None
        want = vocab if m["task"] == "causal-lm" else labels
        if logits is None or last != want:
            problems.append(f"{where}: the graph {g['file']} has logits {logits and logits['shape']}, "
                            f"the manifest's base says {'vocab_size' if m['task'] == 'causal-lm' else 'num_labels'} {want}")
        kv = m.get("kv_cache")
        if kv:
            for i, (h, d) in enumerate(zip(kv["kv_heads"], kv["head_dims"])):
                for n in past_names(i):
                    s = (io[0].get(n) or {}).get("shape")
                    if not s or len(s) != 4 or s[1] != h or s[3] != d:
                        problems.append(f"{where}: kv_cache says layer {i} has {h} heads of {d}, the graph "
                                        f"{g['file']} takes {n} {s}")
    if m["mode"] != "side":
        return problems
    inputs = m.get("inputs", {})
    graph_in = actual[m["graph"]["file"]][0] if m["graph"]["file"] in actual else None
    for name, spec in inputs.items() if graph_in is not None else ():
        g = graph_in.get(name)
        s = spec["shape"]
        if g is None:
            problems.append(f"{where}: adapter input {name} is not an input of the graph")
        elif len(g["shape"]) != len(s) or any((e is None) != isinstance(d, str) or (e is not None and e != d)
                                              for e, d in zip(s, g["shape"])):
            problems.append(f"{where}: adapter input {name} is listed as "
                            f"{tuple('n' if d is None else d for d in s)}, the graph takes {g['shape']}")
    static = m.get("static")
    for b in m["graph"].get("buckets") or [] if static else ():
        io = actual.get(b["file"])
        for name, spec in inputs.items() if io is not None else ():
            want = [static["max_rank"] if d is None else d for d in spec["shape"]]
            got = (io[0].get(name) or {}).get("shape")
            if got != want:
                problems.append(f"{where}: adapter input {name} should be {want} in the fixed-shape graph "
                                f"{b['file']} (ranks padded to max_rank {static['max_rank']}), it is {got}")
    for slot in m.get("slots", []):
        for name, s in _slot_shapes(slot):
            spec = inputs.get(name)
            if spec is None or spec["shape"] != s:
                problems.append(f"{where}: layer {slot['module']} ({slot['in']} -> {slot['out']}) needs "
                                f"{name} of shape {tuple('n' if d is None else d for d in s)}, the "
                                f"manifest lists {spec and tuple('n' if d is None else d for d in spec['shape'])}")
    kv = m.get("kv_cache") or {"kv_heads": [], "head_dims": []}
    for name, entry in m["adapters"].items():
        problems += _adapter_file_problems(root, name, entry, m, inputs, kv)
    return problems


_ST_DTYPES = {"F32": "tensor(float)", "F16": "tensor(float16)"}


def _present(root: Path, rel: str, where: str) -> Path | None:
    """The file ``rel`` inside ``root`` when it is there; None when it is missing or outside (the
    file checks of :func:`verify` report those)."""
    try:
        path = inside(root, rel, where)
    except EdgepeftError:
        return None
    return path if path.is_file() else None


def _safetensors_problems(root: Path, entry: dict, params: dict, tag: int, where: str) -> list[str]:
    """The ``.safetensors`` twin of an adapter file holds the same names, shapes and dtypes (header
    only: 8-byte little-endian length, then JSON) and the same base tag."""
    st = entry.get("safetensors")
    path = _present(root, st["file"], where) if st else None
    if path is None:
        return []
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > MAX_MANIFEST_BYTES:
                raise ValueError(f"header of {n:,} bytes")
            header = json.loads(f.read(n))
        meta = header.pop("__metadata__", {}) or {}
        got = {k: (_ST_DTYPES.get(v["dtype"], v["dtype"]), list(v["shape"])) for k, v in header.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return [f"{path}: not a readable safetensors file ({type(e).__name__}: {e})"]
    want = {k: (v.data_type(), list(v.shape())) for k, v in params.items()}
    problems = []
    if got != want:
        diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        problems.append(f"{path}: differs from {entry['file']} in {', '.join(diff[:5])} ({where})")
    if meta.get("base_tag") != str(tag):
        problems.append(f"{path}: base tag {meta.get('base_tag')}, {entry['file']} has {tag} ({where})")
    return problems


def _adapter_file_problems(root: Path, name: str, entry: dict, m: dict, inputs: dict, kv: dict) -> list[str]:
    """An adapter file's arrays against the inputs it feeds, its prefix, and its base tag."""
    where = f"adapter {name!r} of {root / MANIFEST_NAME}"
    path = _present(root, entry["file"], where)
    if path is None:
        return []
    import onnxruntime as ort

    try:
        fmt = ort.AdapterFormat.read_adapter(str(path))
        params = fmt.get_parameters()
    except Exception as e:  # onnxruntime raises its own types
        return [f"{path}: not a readable adapter file ({e})"]
    problems = []
    tag = fmt.get_adapter_version()
    if tag not in UNTAGGED and tag != base_tag(m["base"]["fingerprint"]):
        problems.append(f"{path}: exported for another base (tag {tag}), not this artifact's "
                        f"{m['base']['fingerprint'][:23]}...")
    if entry.get("base_fingerprint") != m["base"]["fingerprint"]:
        problems.append(f"{path}: {where} says base {entry.get('base_fingerprint')}, the artifact's is "
                        f"{m['base']['fingerprint']}")
    fed = sorted(k for k in params if k in inputs)
    if fed != sorted(entry.get("inputs", [])):
        problems.append(f"{path}: feeds {', '.join(fed) or 'nothing'}; the manifest lists "
                        f"{', '.join(entry.get('inputs', [])) or 'nothing'} ({where})")
    dtypes = ("tensor(float)", "tensor(float16)")
    for k, v in params.items():
        shape = list(v.shape())
        spec = inputs.get(k)
        if spec is not None:
            s = spec["shape"]
            if v.data_type() not in dtypes or len(shape) != len(s) or any(
                    e is not None and e != d for e, d in zip(s, shape)):
                problems.append(f"{path}: {k} has shape {tuple(shape)} {v.data_type()}, the graph takes "
                                f"{tuple('n' if d is None else d for d in s)} float ({where})")
        elif not k.startswith("prefix."):
            problems.append(f"{path}: {k!r} is not an adapter input of this graph ({where})")
    problems += _safetensors_problems(root, entry, params, tag, where)
    prefix = entry.get("prefix")
    for i, (h, d) in enumerate(zip(kv["kv_heads"], kv["head_dims"])):
        for n in prefix_names(i):
            if n not in params:
                if prefix:
                    problems.append(f"{path}: prefix adapter without {n} ({where})")
                continue
            s = list(params[n].shape())
            p = prefix["length"] if prefix else None
            if len(s) != 4 or s[:2] != [1, h] or s[3] != d or s[2] != p:
                problems.append(f"{path}: {n} has shape {tuple(s)}, the manifest says (1, {h}, {p}, {d}) "
                                f"({where})")
    return problems
