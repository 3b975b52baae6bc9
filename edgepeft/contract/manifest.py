"""The artifact contract: reading and checking ``manifest.json``. numpy-free, torch-free.

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

from pathlib import Path

from edgepeft.contract.features import MIX_RULES, RANK, WIDTHS
from edgepeft.contract.names import (FORMAT, FORMAT_VERSION, MANIFEST_NAME, MAX_MANIFEST_BYTES, read_json_file,
                                     LAYOUTS, check_adapter_name, head_input_name)
from edgepeft.errors import EdgepeftError


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
    m = read_json_file(path, MAX_MANIFEST_BYTES, "a manifest", "Export the artifact again.",
                       "; the artifact is damaged. Export it again.")
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
        pos = g.get("positions")
        need(pos is None or (isinstance(pos, int) and not isinstance(pos, bool) and pos > 0), f"{field}.positions",
             "a positive integer or null", pos)

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
    gguf = base.get("gguf")  # a base exported from a GGUF file: that file and its sha256
    need(gguf is None or (isinstance(gguf, dict) and is_str(gguf.get("file")) and is_str(gguf.get("sha256"))),
         "base.gguf", "absent, or {file, sha256} strings", gguf)
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
        need(spec.get("default") is None or (is_str(spec["default"]) and None not in shape),
             f"inputs[{name!r}].default", "absent, or the sha256 of a fixed-shape default", spec.get("default"))
    rows = m.get("rows", {})  # per-row weights input -> the adapter inputs whose rank columns it weights
    need(isinstance(rows, dict) and all(
        isinstance(v, dict) and isinstance(v.get("inputs"), list) and v["inputs"]
        and all(is_str(k) and k in inputs for k in v["inputs"]) and _is_int(v.get("axis"))
        and v["axis"] < len(inputs[v["inputs"][0]]["shape"]) for v in rows.values()), "rows",
         "{rows input: {'inputs': [adapter inputs it weights], 'axis': the first one's rank axis}}", rows)
    values = m.get("row_values", {})  # per-row offsets input -> the scale input it offsets, and its identity
    need(isinstance(values, dict) and all(
        isinstance(v, dict) and is_str(v.get("input")) and v["input"] in inputs
        and isinstance(v.get("identity"), (int, float)) and isinstance(v.get("fed", False), bool)
        for v in values.values()), "row_values",
         "{offsets input: {'input': the input it offsets, 'identity': that input's identity, 'fed': "
         "whether a per-row call feeds the input its identity (optional)}}", values)
    need(isinstance(m.get("slots", []), list), "slots", "a list", m.get("slots"))
    features = m.get("features", {})
    need(isinstance(features, dict) and all(
        isinstance(parts, list) and parts and all(
            isinstance(p, list) and len(p) in (3, 4) and is_str(p[0]) and isinstance(p[1], list)
            and all(s in (*WIDTHS, RANK) or _is_int(s, 1) for s in p[1]) and p[2] in MIX_RULES and p[3:] in ([], ["shared"])
            for p in parts)
        for parts in features.values()), "features",
         "{feature: [[part, [symbols or fixed sizes], mix rule(, 'shared')], ...]}", features)
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
        uses = e.get("defaults", [])
        need(isinstance(uses, list) and all(is_str(n) and "default" in inputs.get(n, {}) and n not in feeds
                                            for n in uses),
             f"{field}.defaults", "a list of inputs with a 'default' that the adapter does not feed", uses)
        mix = e.get("mix_of")  # written by `edgepeft adapter mix`: {adapter: weight}
        need(mix is None or (isinstance(mix, dict) and mix and all(
            is_str(k) and type(w) in (int, float) for k, w in mix.items())),
             f"{field}.mix_of", "null or {adapter: weight}", mix)
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


def genai_files(m: dict) -> list[dict]:
    """``{file, sha256}`` of what export wrote for onnxruntime-genai (``genai_config.json``,
    ``genai.onnx``); none when the artifact is not onnxruntime-genai-ready."""
    genai = m.get("genai")
    return list(genai.get("files", [])) if isinstance(genai, dict) and genai.get("ready") else []


def target_providers(m: dict) -> list[str]:
    """The execution providers the artifact's target asks for, in order (old manifests: CPU)."""
    target = m.get("target")
    providers = list(target.get("providers") or []) if isinstance(target, dict) else []
    return providers or ["CPUExecutionProvider"]




def mixes(manifest: dict, name: str) -> bool:
    """Whether adapter ``name`` combines with others by weight in one call: it feeds graph inputs,
    every one of them (its carried head's aside: one adapter of a mix may set the head) has a
    mix rule other than ``one``, and it seeds no KV cache.

    Args:
        manifest: a side-mode manifest (``inputs`` records each input's rule).
        name: one of its adapters.
    """
    entry = manifest["adapters"][name]
    head = {head_input_name(p) for p in entry.get("head") or []}
    body = [k for k in entry.get("inputs") or [] if k not in head]
    return bool(body) and not entry.get("prefix") and all(manifest["inputs"][k]["mix"] != "one" for k in body)
