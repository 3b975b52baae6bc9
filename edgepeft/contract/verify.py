"""``edgepeft verify``: every file the manifest names and every shape it states, checked against
the artifact on disk. torch-free (onnx and onnxruntime are imported when needed).
"""

from __future__ import annotations

import json
from pathlib import Path

from edgepeft.contract.features import table_parts, widths
from edgepeft.contract.manifest import graph_entries, genai_files, read_manifest, target_files
from edgepeft.contract.names import (MANIFEST_NAME, MAX_MANIFEST_BYTES, UNTAGGED, base_tag, inside, past_names, prefix_names,
                                     sha256_file, shared_input_name, slot_input_name, value_digest)
from edgepeft.errors import EdgepeftError


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
    files += [(f["file"], f["sha256"]) for f in genai_files(m)]
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
    features = m.get("features") or {}
    for slot in m.get("slots", []):
        if "features" not in slot:
            continue  # the fused layout's slots name projection groups; its inputs are checked above
        for f in slot["features"]:
            if f not in features:
                problems.append(f"{where}: layer {slot['module']} has feature {f!r}, which the manifest's "
                                "features table does not describe. Export the artifact again.")
                continue
            for (part, s, shared), entry in zip(table_parts(features[f], slot["in"], slot["out"]), features[f]):
                name = (shared_input_name(f, part, widths(entry[1], slot["in"], slot["out"])) if shared
                        else slot_input_name(f, slot["module"], part))
                spec = inputs.get(name)
                if spec is None or spec["shape"] != s:
                    problems.append(f"{where}: layer {slot['module']} ({slot['in']} -> {slot['out']}) needs "
                                    f"{name} of shape {tuple('n' if d is None else d for d in s)}, the "
                                    f"manifest lists {spec and tuple('n' if d is None else d for d in spec['shape'])}")
    problems += _default_problems(root, m, inputs, graphs)
    kv = m.get("kv_cache") or {"kv_heads": [], "head_dims": []}
    for name, entry in m["adapters"].items():
        problems += _adapter_file_problems(root, name, entry, m, inputs, kv)
    return problems


def _default_problems(root: Path, m: dict, inputs: dict, graphs: list[dict]) -> list[str]:
    """Shared inputs (``inputs[name]["default"]``): each graph's default initializer has the value
    the manifest names, since adapter files that list the input under ``defaults`` leave it out."""
    where = str(root / MANIFEST_NAME)
    wanted = {n: spec["default"] for n, spec in inputs.items() if "default" in spec}
    if not wanted:
        return []
    import onnx
    from onnx import numpy_helper

    problems = []
    for g in graphs:
        path = _present(root, g["file"], where)
        if path is None:
            continue
        found = {t.name: t for t in onnx.load(str(path), load_external_data=False).graph.initializer
                 if t.name in wanted}
        for name, digest in wanted.items():
            t = found.get(name)
            try:
                ok = t is not None and value_digest(numpy_helper.to_array(t, base_dir=str(path.parent))) == digest
            except (OSError, ValueError) as e:  # external data missing or short
                problems.append(f"{path}: the default of {name} cannot be read ({type(e).__name__}: {e})")
                continue
            if not ok:
                problems.append(f"{where}: the graph {g['file']} has {'another default' if t is not None else 'no default'} "
                                f"for {name} than the manifest's (adapter files that use it leave it out)")
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
    for k in entry.get("defaults", []):
        if k in params or "default" not in inputs.get(k, {}):
            problems.append(f"{path}: {where} uses the graph's default of {k}, which "
                            + ("the file feeds" if k in params else "is not a shared input with a default"))
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
