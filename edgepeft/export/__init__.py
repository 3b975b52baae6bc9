"""``edgepeft export``: base model + PEFT adapters -> an artifact directory.

The artifact is written to a temporary sibling directory ``.OUT.tmp-XXXXXXXX`` (with a lock file
``.OUT.tmp-XXXXXXXX.lock`` held while the export runs), synced to disk and renamed into place at the
end, so OUT is either absent or complete, even when the process is killed; on any error the
temporary directory is removed. What a killed export leaves behind (its lock is released by the
kernel) is removed by the next export to the same OUT.
"""

from __future__ import annotations

import copy
import glob
import itertools
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

import edgepeft
from edgepeft.kinds import FEATURES, feature, kind_module, read_adapter, task_of
from edgepeft.kinds.common import peft_key, read_config, read_tensors
from edgepeft.errors import EdgepeftError
from edgepeft.export import causal_lm, encoder, fused
from edgepeft.export.calibrate import calibration_feeds
from edgepeft.export.base import (binding_mismatch, detect_task, fingerprint, load_causal_lm,
                                  load_classifier, save_tokenizer)
from edgepeft.export.slots import fix_ranks, input_specs, plan_slots, shared_defaults
from edgepeft.progress import bar, write
from edgepeft.quantize import QuantConfig, tied_table, quantize_graph, store_tied_table_once
from edgepeft.validate.budgets import BUDGETS
from edgepeft.targets import Target, check_ranks, load_target, quant_defaults
from edgepeft.contract import (FORMAT, FORMAT_VERSION, MANIFEST_NAME, base_tag, graph_entries,
                                       sha256_file)

try:
    import fcntl
except ImportError:  # not POSIX: temporary dirs of killed exports stay (clearly named)
    fcntl = None

MODES = ("side", "merged")
GRAPHS = ("generic", "fused")
TASKS = ("auto", "causal-lm", "classification")


@dataclass(frozen=True)
class ExportConfig:
    """What to export.

    Attributes:
        base: Hugging Face model folder of the base model.
        adapters: ``(name, PEFT adapter dir)`` pairs, at least one for ``merged``.
        out: artifact directory to create.
        mode: ``side`` (one base graph, adapters as run-time inputs) or ``merged`` (one graph per
            adapter with its delta folded into the weights).
        force: replace an existing OUT.
        opset: ONNX opset for the exporter; None: the target's (and if it names none, the
            exporter's default).
        task: ``causal-lm`` (``AutoModelForCausalLM``, KV cache, generation), ``classification``
            (``AutoModelForSequenceClassification``), or ``auto``: the adapters' PEFT task_type,
            else the base's architecture.
        quant: precision of the graphs and adapter files (``edgepeft.quantize``); None: the
            target's default precision and schemes.
        allow_base_mismatch: export adapters that record another base (see
            :func:`edgepeft.export.base.binding_mismatch`) instead of refusing them.
        target: the deployment profile (``edgepeft.targets``): providers recorded for the
            runtime, opset, default precision, ORT-format bundle, partition report, max_rank;
            None: ``cpu-x86_64``.
        graph: ``generic`` (the traced model: every architecture and adapter kind) or ``fused``
            (causal LMs of the Llama family with LoRA: a graph of onnxruntime's fused kernels,
            GroupQueryAttention with an in-place KV cache, q|k|v and gate|up packed;
            ``edgepeft.export.fused``). Fused decodes several times faster on CPU.
    """

    base: Path
    out: Path
    adapters: tuple[tuple[str, Path], ...] = field(default_factory=tuple)
    mode: str = "side"
    force: bool = False
    opset: int | None = None
    task: str = "auto"
    quant: QuantConfig | None = None
    allow_base_mismatch: bool = False
    target: Target | None = None
    graph: str = "generic"

    def __post_init__(self):
        if self.target is None:
            object.__setattr__(self, "target", load_target(None))
        if self.quant is None:
            object.__setattr__(self, "quant", QuantConfig(**quant_defaults(self.target, None, None, None)))
        if self.opset is None:
            object.__setattr__(self, "opset", self.target.opset)
        if self.task not in TASKS:
            raise EdgepeftError(f"--task {self.task!r}: choose one of {', '.join(TASKS)}.")
        if self.mode not in MODES:
            raise EdgepeftError(f"--mode {self.mode!r}: choose one of {', '.join(MODES)}.")
        if self.graph not in GRAPHS:
            raise EdgepeftError(f"--graph {self.graph!r}: choose one of {', '.join(GRAPHS)}.")
        if self.graph == "fused":
            if self.target.static_shapes:
                raise EdgepeftError(f"--graph fused with target {self.target.name!r}: fused graphs have "
                                    "dynamic shapes; use --graph generic for static-shape targets.")
            if self.quant.precision == "int8-static" or self.quant.protect:
                raise EdgepeftError("--graph fused: int8-static and --protect need calibration feeds "
                                    "of the generic graph; use --graph generic for them.")
        names = [n for n, _ in self.adapters]
        if len(set(names)) != len(names):
            raise EdgepeftError(f"--adapter: names repeat ({', '.join(names)}); give each a new name.")
        if self.mode == "merged" and not self.adapters:
            raise EdgepeftError("--mode merged needs at least one --adapter NAME=DIR.")
        if self.out.exists() and not self.force:
            raise EdgepeftError(f"{self.out}: already exists. Pass --force to replace it, or "
                                "choose another --out.")


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        write(f"[edgepeft] {msg}")  # on stderr, above any progress bar


PROBE_BATCHES = 4  # calibration batches (of 4 texts) run to measure each MatMul's sensitivity


def _calibration(cfg, quant: QuantConfig, task, model, adapters, sides, specs, cache, quiet):
    """``(feeds for int8-static or None, a few base feeds for sensitivity or None)``."""
    calibration = probe = None
    if quant.precision == "int8-static":
        calibration = calibration_feeds(cfg, task, model, adapters, sides, specs, cache, quiet)
    if quant.protect:  # the feeds come base first: the first batches run the base model
        probe = list(itertools.islice(calibration_feeds(cfg, task, model, [], {}, specs, cache, True), PROBE_BATCHES))
    return calibration, probe


def _save_graph(proto: onnx.ModelProto, root: Path, rel: str, quant: QuantConfig | None = None,
                adapter_inputs: list[str] = (), calibration=None, probe=None, quiet: bool = True) -> dict:
    """Write a graph to ``root/rel`` with its weights as external data beside it, quantized per
    ``quant`` (adapter branches kept float; ``quiet``: no bar over the quantization stages).

    Returns:
        Its manifest entry: files (relative to the artifact root), checksums, inputs, outputs,
        and what quantization did.
    """
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + ".data")
    quantized = None
    if quant is None or quant.precision == "fp32":
        store_tied_table_once(proto)
        data.unlink(missing_ok=True)  # onnx appends to an existing data file
        onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        staging = root / ".fp32"
        staging.mkdir(exist_ok=True)
        src = staging / path.name
        onnx.save_model(proto, src, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=src.name + ".data", size_threshold=1024)
        quantized = quantize_graph(src, path, quant, list(adapter_inputs), calibration, probe, quiet=quiet)
        shutil.rmtree(staging)
        proto = onnx.load(str(path), load_external_data=False)
        if tied_table(proto):  # a float tied head the quantizers left alone (checked without weights)
            proto = onnx.load(str(path))
            store_tied_table_once(proto)
            data.unlink()
            onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data.name, size_threshold=1024)
            proto = onnx.load(str(path), load_external_data=False)

    return _graph_entry(proto, root, rel, f"{rel}.data", quantized)


def _graph_entry(proto: onnx.ModelProto, root: Path, rel: str, data_rel: str, quantized: dict | None) -> dict:
    """The manifest entry of the graph ``root/rel`` (``proto``, its weights in ``root/data_rel``)."""
    def io(values):
        return [{"name": v.name, "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
                 "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name}
                for v in values]

    return {"file": rel, "data_file": data_rel,
            "sha256": sha256_file(root / rel), "data_sha256": sha256_file(root / data_rel),
            "inputs": io(proto.graph.input), "outputs": io(proto.graph.output),
            "opset": max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
            "ops": _op_counts(proto), "quantization": quantized}


def _static_graphs(target: Target, task: str, graph: dict, root: Path) -> dict:
    """Fixed-shape copies of the side graph, one per sequence bucket (``edgepeft.targets.static``),
    added to ``graph["buckets"]``; returns the manifest's ``static`` entry."""
    from edgepeft.targets.static import write_bucket_graphs

    context = target.context_length if task == "causal-lm" else None
    buckets = target.sequence_buckets
    if task == "classification":  # a classifier's input holds at least [CLS] and [SEP]
        buckets = tuple(s for s in buckets if s > 1) or buckets
    graph["buckets"] = []
    for seq, rel in write_bucket_graphs(root, graph["file"], task, target.batch, buckets,
                                        context, target.max_rank):
        proto = onnx.load(str(root / rel), load_external_data=False)
        graph["buckets"].append({"seq": seq, **_graph_entry(proto, root, rel, graph["data_file"],
                                                             graph["quantization"])})
    return {"batch": target.batch, "buckets": list(buckets), "context": context, "max_rank": target.max_rank}


def _op_counts(proto: onnx.ModelProto) -> dict[str, int]:
    """How many nodes of each op type the graph has (shows what quantization made of it)."""
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def _save_adapter(arrays: dict[str, np.ndarray], path: Path, precision: str = "fp32",
                  base_fp: str | None = None) -> dict:
    """Write one adapter's arrays twice: an onnxruntime ``.onnx_adapter`` file (AdapterFormat, read
    by the Python runtime) and a ``.safetensors`` file beside it (read by runtimes that have no
    AdapterFormat reader, e.g. onnxruntime's JavaScript API). Both are stored as fp16 when
    ``precision`` says so (the runtimes compute the branch in fp32) and tagged with the base they
    belong to (``adapter_version``; safetensors metadata ``base_tag``, see ``manifest.base_tag``).

    Returns:
        The manifest entry's file fields: ``file``, ``sha256`` and ``safetensors: {file, sha256}``.
    """
    import onnxruntime as ort
    from safetensors.numpy import save_file

    if precision == "fp16":
        arrays = {k: v.astype(np.float16) for k, v in arrays.items()}
    tag = base_tag(base_fp) if base_fp else 1

    values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in arrays.items()}  # alive until export
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(tag)
    fmt.set_model_version(FORMAT_VERSION)
    fmt.set_parameters(values)
    fmt.export_adapter(str(path))
    st = path.with_suffix(".safetensors")
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(st),
              metadata={"format": "edgepeft-adapter", "format_version": str(FORMAT_VERSION), "base_tag": str(tag)})
    os.chmod(st, path.stat().st_mode & 0o777)  # safetensors writes 0600; match the other files
    rel = f"{path.parent.name}/{path.name}"
    return {"file": rel, "sha256": sha256_file(path),
            "safetensors": {"file": f"{path.parent.name}/{st.name}", "sha256": sha256_file(st)}}


def _final_head_param(model) -> str | None:
    """The weight of the classifier's last linear layer (its rows are the labels), if any."""
    n = model.config.num_labels
    names = [name for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and m.out_features == n and not name.startswith(
                 model.base_model_prefix + ".")]
    return f"{names[-1]}.weight" if names else None


def _adapter_num_labels(model, adapters: tuple[tuple[str, Path], ...]) -> int | None:
    """num_labels of the head the adapters carry (they must agree), None if none carries one."""
    param = _final_head_param(model)
    if param is None:
        return None
    found = {}
    for name, path in adapters:
        _, tensors = read_tensors(path) if (path / "adapter_config.json").is_file() else (None, {})
        for key, t in tensors.items():
            if peft_key(key) == param and t.ndim == 2:
                found[name] = int(t.shape[0])
    if len(set(found.values())) > 1:
        raise EdgepeftError("the adapters' classification heads have different numbers of labels ("
                            + ", ".join(f"{n}: {k}" for n, k in found.items())
                            + "); export them into separate artifacts.")
    return next(iter(found.values()), None)


def load_base(cfg: ExportConfig) -> tuple[str, torch.nn.Module, list[str]]:
    """Load the base model for the task. Returns (task, model, freshly initialized params)."""
    for _, path in cfg.adapters:
        read_config(path)  # a readable error for a missing adapter dir before loading anything
    task = cfg.task if cfg.task != "auto" else detect_task(cfg.base, [task_of(p) for _, p in cfg.adapters])
    if task == "causal-lm":
        return task, load_causal_lm(cfg.base), []
    model, fresh = load_classifier(cfg.base)
    labels = _adapter_num_labels(model, cfg.adapters)
    if labels and labels != model.config.num_labels:
        model, fresh = load_classifier(cfg.base, labels)
    return task, model, fresh


def export(cfg: ExportConfig, quiet: bool = False) -> dict:
    """Export per ``cfg``; returns the manifest written to ``cfg.out``.

    Raises:
        EdgepeftError: bad base model, adapters, or an OUT that exists.
    """
    t0 = time.perf_counter()
    parent = cfg.out.resolve().parent
    if parent.is_dir():
        _remove_stale(parent, cfg.out.name)
    _log(f"loading base model {cfg.base}", quiet)
    task, model, fresh = load_base(cfg)
    base_fp = fingerprint(model, fresh)
    adapters = [read_adapter(name, path, model, task) for name, path in cfg.adapters]
    for name, path in cfg.adapters:  # after the shapes: a wrong shape has the more precise message
        why = binding_mismatch(path, cfg.base, base_fp)
        if why and not cfg.allow_base_mismatch:
            raise EdgepeftError(
                f"--adapter {name}={path}: {why}. An adapter applied to weights it was not trained "
                "on gives wrong outputs without any error. Export it with the base it was trained "
                "on, or pass --allow-base-mismatch if this base is the right one (e.g. the same "
                "model saved again).")
        if why:
            _log(f"warning: --adapter {name}: {why} (exported anyway: --allow-base-mismatch)", quiet)
    if fresh:
        for a in adapters:
            missing = sorted(set(fresh) - set(getattr(a, "head", {})))
            if missing:
                raise EdgepeftError(
                    f"{a.source}: the base model {cfg.base} has no trained classification head "
                    f"({', '.join(missing)} are freshly initialized) and adapter {a.name!r} does not "
                    "carry one. Train it with PEFT's task_type SEQ_CLS (which saves the head via "
                    "modules_to_save), or use a base with a trained head.")
    cache = causal_lm.probe_cache(model) if task == "causal-lm" else None

    parent.mkdir(parents=True, exist_ok=True)
    tmp, lock = _claim_temp(parent, cfg.out.name)
    try:
        manifest = _write(cfg, task, model, fresh, adapters, cache, base_fp, tmp, quiet)
        _sync_tree(tmp)
        if cfg.out.exists():  # --force: swap the old one out only once the new one is complete
            old = Path(f"{tmp}.old")  # covered by the same lock if this process dies here
            os.replace(cfg.out, old)
            try:
                os.replace(tmp, cfg.out)
            except BaseException:
                os.replace(old, cfg.out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, cfg.out)
        _sync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _release_temp(lock)
    _log(f"wrote {cfg.out} in {time.perf_counter() - t0:.1f}s", quiet)
    return manifest


def _bundle(target: Target, manifest: dict, tmp: Path, quiet: bool) -> None:
    """What the target adds to the artifact: ``.ort`` graphs + the minimal build's operator
    config, and ``partitions.json`` (estimated accelerator coverage); all listed with checksums
    under ``manifest["target"]["files"]``."""
    from edgepeft.targets.bundle import PARTITIONS, convert_to_ort, partition_report

    graphs = graph_entries(manifest)
    # Static artifacts run the bucket graphs; the dynamic one stays as the reference (and "before").
    runnable = manifest["graph"]["buckets"] if manifest.get("static") else graphs
    files = []
    if target.ort_format:
        _log(f"converting {len(runnable)} graph(s) to ORT format ({target.ort_optimization} optimizations)", quiet)
        files.append(convert_to_ort(tmp, runnable, target))
    if target.partition_report:
        _log(f"estimating partitions for {', '.join(target.partition_report)}", quiet)
        report = {g["file"]: partition_report(tmp / g["file"], target.partition_report) for g in graphs}
        (tmp / PARTITIONS).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        files.append({"file": PARTITIONS, "sha256": sha256_file(tmp / PARTITIONS)})
        manifest["target"]["partitions"] = report
    manifest["target"]["files"] = files
    for key, why in target.not_applied(manifest["mode"]).items():
        _log(f"target {target.name}: {key} not applied: {why}", quiet)


def _claim_temp(parent: Path, name: str) -> tuple[Path, tuple[int, Path]]:
    """A new empty directory ``parent/.NAME.tmp-XXXXXXXX`` and its lock file, locked (flock) by
    this process: the kernel releases the lock when the process dies, however it dies."""
    while True:
        fd, lock = tempfile.mkstemp(prefix=f".{name}.tmp-", suffix=".lock", dir=parent)
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_nlink == 0:  # a cleaner took it before the lock: draw another
                os.close(fd)
                continue
        tmp = Path(lock[:-len(".lock")])
        try:
            tmp.mkdir()
        except FileExistsError:
            os.close(fd)
            os.unlink(lock)
            continue
        return tmp, (fd, Path(lock))


def _release_temp(lock: tuple[int, Path]) -> None:
    fd, path = lock
    path.unlink(missing_ok=True)
    os.close(fd)


def _remove_stale(parent: Path, name: str) -> None:
    """Remove what killed exports to ``parent/name`` left: temp dirs whose lock nobody holds."""
    if fcntl is None:
        return
    for lock in parent.glob(f".{glob.escape(name)}.tmp-*.lock"):
        try:
            fd = os.open(lock, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # a live export
        try:
            tmp = str(lock)[:-len(".lock")]
            for stale in (Path(tmp), Path(f"{tmp}.old")):
                shutil.rmtree(stale, ignore_errors=True)
            lock.unlink(missing_ok=True)
        finally:
            os.close(fd)


def _sync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # not possible everywhere (Windows)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sync_tree(root: Path) -> None:
    """fsync every file and directory under ``root``, so the rename publishes complete files even
    if the machine goes down right after."""
    for dirpath, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                os.fsync(fh.fileno())
        _sync_dir(Path(dirpath))


def _max_length(model) -> int:
    n = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    if model.config.model_type in ("roberta", "xlm-roberta"):
        n -= 2  # positions start after padding_idx
    return n or 512


def _graph(task, model, slots, specs, head_params, cache, opset):
    if task == "causal-lm":
        return causal_lm.export_graph(model, slots, specs, cache, opset)
    return encoder.export_graph(model, slots, specs, head_params, opset)


def _write_fused(cfg, model, adapters, base_fp, manifest: dict, tmp: Path, quiet: bool) -> None:
    """The fused graph(s) and packed adapter files (``edgepeft.export.fused``), into ``manifest``."""
    quant = cfg.quant
    manifest["kv_cache"]["buffer"] = "shared"  # past and present are one preallocated buffer
    if cfg.mode == "merged":
        for i, a in enumerate(bar(adapters, desc="merged graphs", unit="graph", quiet=quiet)):
            _log(f"building fused merged graph {i + 1}/{len(adapters)}: {a.name}", quiet)
            merged = copy.deepcopy(model)
            kind_module(a).merge(merged, a)
            proto, _, _ = fused.build_graph(merged, {}, cfg.opset or 17)
            del merged
            graph = {**_save_graph(proto, tmp, f"merged/{a.name}.onnx", quant, [], quiet=quiet), "layout": "fused"}
            manifest["adapters"][a.name] = {**kind_module(a).manifest_entry(a), "graph": graph,
                                            "base_fingerprint": base_fp, "inputs": [], "prefix": None,
                                            "source": str(a.source.resolve())}
        manifest["graph"] = {"per_adapter": True, "layout": "fused"}
        return
    sides = {a.name: kind_module(a).side(a, model) for a in adapters}
    check_ranks(cfg.target, sides)
    _log("building fused graph", quiet)
    proto, defaults, used = fused.build_graph(model, sides, cfg.opset or 17)
    names = [n for n, _ in defaults]
    manifest["graph"] = {**_save_graph(proto, tmp, "model.onnx", quant, names, quiet=quiet), "layout": "fused"}
    manifest["slots"] = [{"layer": layer, "group": group, "modules": list(fused.GROUPS[group])} for layer, group in used]
    manifest["inputs"] = {n: {"shape": [int(d.shape[0]), None] if n.endswith(".AT") else [None, int(d.shape[1])],
                              "mix": "cat1" if n.endswith(".AT") else "cat0w"} for n, d in defaults}
    (tmp / "adapters").mkdir()
    outs, ins = fused.widths(model)
    for a in adapters:
        arrays = fused.pack_adapter(sides[a.name], used, outs, ins)
        path = tmp / "adapters" / f"{a.name}.onnx_adapter"
        files = _save_adapter(arrays, path, quant.adapter_precision, base_fp)
        manifest["adapters"][a.name] = {
            **kind_module(a).manifest_entry(a), **files, "base_fingerprint": base_fp, "inputs": sorted(arrays), "prefix": None, "source": str(a.source.resolve())}


def _write(cfg, task, model, fresh, adapters, cache, base_fp, tmp: Path, quiet: bool) -> dict:
    """Write graphs, adapter files, tokenizer and manifest into ``tmp``."""
    text_cfg = model.config.get_text_config()
    quant = cfg.quant
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "edgepeft_version": edgepeft.__version__,
        "task": task, "mode": cfg.mode, "precision": quant.precision,
        "adapter_precision": quant.adapter_precision, "target": cfg.target.manifest(cfg.mode),
        "quantization": asdict(quant), "budget": asdict(BUDGETS[quant.precision]),
        "base": {"source": str(cfg.base), "model_type": model.config.model_type,
                 "fingerprint": base_fp, "vocab_size": int(text_cfg.vocab_size)},
        "graph": None, "slots": [], "inputs": {}, "adapters": {}, "tokenizer": None,
    }
    if task == "causal-lm":
        manifest["base"]["eos_token_id"] = getattr(model.generation_config, "eos_token_id", None)
        manifest["kv_cache"] = {"layers": cache.layers, "kv_heads": list(cache.kv_heads),
                                "head_dims": list(cache.head_dims)}
    else:
        manifest["base"].update({"num_labels": int(model.config.num_labels), "head_trained": not fresh,
                                 "max_length": _max_length(model),
                                 "id2label": {str(k): v for k, v in model.config.id2label.items()}})
    tok = save_tokenizer(cfg.base, tmp / "tokenizer")
    if tok is None:
        shutil.rmtree(tmp / "tokenizer", ignore_errors=True)
    manifest["tokenizer"] = tok

    if cfg.graph == "fused":
        if task != "causal-lm":
            raise EdgepeftError(f"--graph fused is for causal LMs; {cfg.base} is a {task} model. "
                                "Use --graph generic.")
        _write_fused(cfg, model, adapters, base_fp, manifest, tmp, quiet)
    elif cfg.mode == "side":
        sides = {a.name: kind_module(a).side(a, model) for a in adapters}
        check_ranks(cfg.target, sides)  # before the slow graph export
        sides, fixed = fix_ranks(sides)
        slots = plan_slots(model, list(sides.values()))
        arrays = {name: side.arrays(FEATURES) for name, side in sides.items()}
        shared = shared_defaults(slots, arrays)
        head_modules = {p.rpartition(".")[0] for s in sides.values() for p in s.head}
        head_params = sorted(n for n, _ in model.named_parameters() if n.rpartition(".")[0] in head_modules)
        prompt_width = (int(model.get_input_embeddings().weight.shape[1])
                        if any(s.prompt is not None for s in sides.values()) else None)
        if cfg.target.static_shapes and prompt_width is not None and task == "classification":
            raise EdgepeftError(f"target {cfg.target.name!r} fixes every shape, but prompt tuning on an "
                                "encoder puts a prompt of the adapter's own length before the tokens. "
                                "Export prompt-tuning adapters with a target without static_shapes "
                                "(e.g. --target cpu-arm64).")
        specs = input_specs(slots, model, head_params, prompt_width, fixed=fixed, shared=shared)
        _log(f"exporting side-branch graph ({len(slots)} adapted layers, {len(specs)} adapter inputs)", quiet)
        calibration, probe = _calibration(cfg, quant, task, model, adapters, sides, specs, cache, quiet)
        manifest["graph"] = _save_graph(_graph(task, model, slots, specs, head_params, cache, cfg.opset),
                                        tmp, "model.onnx", quant, [x.name for x in specs], calibration, probe,
                                        quiet=quiet)
        if cfg.target.static_shapes:
            _log(f"writing fixed-shape graphs for sequence buckets {list(cfg.target.sequence_buckets)}", quiet)
            manifest["static"] = _static_graphs(cfg.target, task, manifest["graph"], tmp)
        manifest["slots"] = [{"module": s.module, "in": s.in_features, "out": s.out_features,
                              "features": list(s.features)} for s in slots]
        manifest["features"] = {f: feature(f).table(fixed.get(f)) for s in slots for f in s.features}
        manifest["inputs"] = {s.name: s.manifest() for s in specs}
        (tmp / "adapters").mkdir()
        for a in adapters:
            side = sides[a.name]
            # a shared input whose value is the graph's default stays out of the file
            uses = sorted(n for n, v in arrays[a.name].items() if n in shared and np.array_equal(v, shared[n]))
            own = {n: v for n, v in arrays[a.name].items() if n not in uses}
            path = tmp / "adapters" / f"{a.name}.onnx_adapter"
            files = _save_adapter(own, path, quant.adapter_precision, base_fp)
            prefix = None
            if side.prefix:
                prefix = {"length": int(side.prefix[0][0].shape[2]), "from_prompt": side.prefix_from_prompt}
            manifest["adapters"][a.name] = {
                **kind_module(a).manifest_entry(a), **files, "base_fingerprint": base_fp,
                "inputs": sorted(n for n in own if n in manifest["inputs"]), "prefix": prefix,
                **({"defaults": uses} if uses else {}), "source": str(a.source.resolve())}
    else:
        for i, a in enumerate(bar(adapters, desc="merged graphs", unit="graph", quiet=quiet)):
            _log(f"exporting merged graph {i + 1}/{len(adapters)}: {a.name}", quiet)
            merged = copy.deepcopy(model)
            kind_module(a).merge(merged, a)
            calibration, probe = _calibration(cfg, quant, task, merged, [], {}, [], cache, quiet)
            graph = _save_graph(_graph(task, merged, [], [], [], cache, cfg.opset), tmp, f"merged/{a.name}.onnx",
                                quant, [], calibration, probe, quiet=quiet)
            del merged
            manifest["adapters"][a.name] = {**kind_module(a).manifest_entry(a), "graph": graph,
                                            "base_fingerprint": base_fp, "inputs": [], "prefix": None,
                                            "source": str(a.source.resolve())}
        manifest["graph"] = {"per_adapter": True}
    _bundle(cfg.target, manifest, tmp, quiet)
    (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
