"""``edgepeft validate``: does the artifact still agree with the PyTorch (peft) model?

Per case (no adapter, each adapter, a weighted LoRA mix, a LoRA + prefix composition, and one
batch whose rows each run another of those, :func:`per_row_choices`) both sides run the same
inputs. The PyTorch side of each adapter is built as its kind describes
(``kind_module(entry["kind"]).REFERENCE``, :class:`edgepeft.kinds.common.Reference`); which
adapters mix and which prefix composes is read from the manifest and those descriptions.
Causal LMs: a left-padded batch, real-token positions compared: max |Δlogits|, mean
KL(torch || artifact), top-1 agreement, and greedy generations (the torch side recomputes the
whole sequence each step, no cache, so the artifact's KV cache is checked too); with labelled
prompts (``{"prompt", "target"}``) the task scores of both sides' greedy completions, exact match
and token F1. PEFT's prompt-learning models ignore position ids, which makes their padded rows
depend on the padding, so those references run each row unpadded. Classifiers: the same metrics
on the class logits, plus accuracy on both sides when given a labelled file. Every case is
checked and all failures are reported together.

Several artifacts of one base (the fp32, int4 and NNAPI builds of the same adapters) go in one
report, a row per artifact and case. The cases run here one after another, or as Ray tasks
(``ray=``, :mod:`edgepeft.validate.scale`); a case's numbers are the same either way
(:mod:`edgepeft.validate.cases`).

Besides ``report.json``, validate writes ``report.md`` and a self-contained ``report.html`` (plots
of the per-position distributions, see :mod:`edgepeft.validate.report`). ``report.json`` keeps
those distributions summarized (histograms, per-position means), never the raw arrays.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from edgepeft.contract import read_manifest
from edgepeft.data import load_texts
from edgepeft.errors import EdgepeftError
from edgepeft.gguf import resolve_base
from edgepeft.progress import bar
from edgepeft.quantize.budgets import BUDGETS, Budget
from edgepeft.runtime.adapters import case_name
from edgepeft.validate.cases import BATCH, DEFAULT_PROMPTS, TEXT_TOKENS, CaseResult, PerRow, Settings, TaskSet

__all__ = ["BATCH", "BUDGETS", "DEFAULT_PROMPTS", "DEFAULT_TEXTS", "TEXT_TOKENS", "Budget", "CaseResult",
           "default_choices", "format_report", "per_row_choices", "read_labelled", "read_tasks", "validate",
           "validate_many"]

# Held-out texts whose every position is compared (teacher-forced) when the caller gives none:
# edgepeft/calibration/heldout.txt, never used for calibration. Enough positions (~1,700 on SmolLM2) that
# a 99 % top-1 bound is not decided by one near-tie.
DEFAULT_TEXTS = "heldout"
MULTI_REPORT = "validate-report.json"  # several artifacts: the report's default path (current directory)


def default_choices(manifest: dict) -> list:
    """What validate compares: the base, each adapter, a LoRA mix, a LoRA + prefix composition.

    The mix: the adapters of :func:`edgepeft.kinds.mix_group` (mixable by the manifest's rules,
    with a PyTorch mix reference; today LoRA) without a head, plus one with a head on a
    classifier. The composition: the mix's first adapter with the first prefix that is not a
    decoder prompt (prompt tuning's seed went through the base weights). Merged artifacts: each
    adapter. Classifiers: the base only when it has a trained head.
    """
    from edgepeft.kinds import mix_group

    entries = manifest["adapters"]
    names = list(entries)
    if manifest["mode"] == "merged":
        return names
    causal = manifest["task"] == "causal-lm"
    base_ok = causal or manifest["base"].get("head_trained", True)
    choices: list = ([None] if base_ok else []) + names
    group = mix_group(manifest)
    loras = [n for n in group if not entries[n].get("head")]
    if not causal:
        with_head = [n for n in group if entries[n].get("head")]
        loras = loras + with_head[:1]  # a mix can carry one head
    if len(loras) >= 2:
        weights = [0.7, 0.3] if len(loras) == 2 else [1.0 / len(loras)] * len(loras)
        choices.append(dict(zip(loras, weights)))
    prefixes = [n for n in names if entries[n].get("prefix") and not entries[n]["prefix"]["from_prompt"]]
    if causal and prefixes and loras:
        choices.append({loras[0]: 1.0, prefixes[0]: 1.0})
    return choices


def per_row_choices(manifest: dict, choices: list) -> list | None:
    """The per-row case: one batch whose rows cycle through the base, each adapter and the mix
    of ``choices`` that the graph can vary per row (every input of the adapter weighted or offset
    per row: the manifest's ``rows`` and ``row_values``); None when fewer than two such choices
    (or a merged artifact, or one exported before per-row weights)."""
    if manifest["mode"] == "merged" or not (manifest.get("rows") or manifest.get("row_values")):
        return None
    entries = manifest["adapters"]
    weighted = {k for spec in manifest.get("rows", {}).values() for k in spec["inputs"]}
    weighted |= {v["input"] for v in manifest.get("row_values", {}).values()}
    free = {n for n, e in entries.items() if not e.get("prefix") and set(e["inputs"]) <= weighted}
    rows = [c for c in choices if c is None or (isinstance(c, str) and c in free)
            or (isinstance(c, dict) and set(c) <= free)]
    return rows if sum(c is not None for c in rows) >= 2 else None


def _jsonl(path: Path, want: str) -> list[tuple[int, dict]]:
    """``(line number, row)`` of a jsonl file; ``want`` describes a row for the messages."""
    if not path.is_file():
        raise EdgepeftError(f"{path}: labelled file not found (jsonl rows {want}).")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((i, json.loads(line)))
        except json.JSONDecodeError as e:
            raise EdgepeftError(f"{path}:{i}: not JSON ({e}).") from None
    if not rows:
        raise EdgepeftError(f"{path}: no rows.")
    return rows


def read_labelled(path: Path) -> tuple[list[str], list]:
    """Texts and labels of a jsonl file with ``{"text": ..., "label": ...}`` rows (classifiers).

    Raises:
        EdgepeftError: unreadable file, a row without text or label, or no rows.
    """
    texts, labels = [], []
    for i, row in _jsonl(path, '{"text": ..., "label": ...}'):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or "label" not in row:
            raise EdgepeftError(f"{path}:{i}: expected {{\"text\": str, \"label\": ...}} (a classifier's "
                                "labelled texts).")
        texts.append(row["text"])
        labels.append(row["label"])
    return texts, labels


def read_tasks(path: Path, adapter: str | None = None, limit: int | None = None) -> TaskSet:
    """Labelled prompts of a causal LM: a jsonl file with ``{"prompt": str, "target": str}`` rows.

    Raises:
        EdgepeftError: unreadable file, a row without a prompt or target string, or no rows.
    """
    prompts, targets = [], []
    for i, row in _jsonl(path, '{"prompt": ..., "target": ...}'):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(row.get("target"), str):
            raise EdgepeftError(f"{path}:{i}: expected {{\"prompt\": str, \"target\": str}} (a causal LM's "
                                "labelled prompts; {\"text\", \"label\"} rows are for classifiers).")
        prompts.append(row["prompt"])
        targets.append(row["target"])
    limit = limit or len(prompts)
    return TaskSet(str(path), adapter, tuple(prompts[:limit]), tuple(targets[:limit]))


def _label_ids(labels: list, manifest: dict, path: Path) -> np.ndarray:
    """Labels as class indices: ints as given; strings by the sorted order `edgepeft train` uses."""
    n = manifest["base"]["num_labels"]
    if all(isinstance(x, (int, bool)) for x in labels):
        ids = np.array([int(x) for x in labels])
    else:
        names = sorted({str(x) for x in labels})
        ids = np.array([names.index(str(x)) for x in labels])
    if ids.min() < 0 or ids.max() >= n:
        raise EdgepeftError(f"{path}: labels span {ids.min()}..{ids.max()}, the classifier has {n} classes.")
    return ids


def _labelled_sets(labelled) -> dict[str | None, Path]:
    """``labelled`` as ``{adapter or None (every case): file}``."""
    if labelled is None:
        return {}
    if isinstance(labelled, Mapping):
        return {k: Path(v) for k, v in labelled.items()}
    return {None: Path(labelled)}


def _plan(artifact_dir: Path, folder: Path, reference: Path, prompts, texts, max_new_tokens: int,
          budget: Budget | None, overrides: Mapping | None, adapter_dirs, labelled, limit, choices,
          threads: int | None) -> tuple[Settings, list, dict]:
    """``(settings, cases, manifest)`` of one artifact: what every process needs to run its cases."""
    manifest = read_manifest(artifact_dir)
    if budget is None:
        budget = Budget(**manifest["budget"]) if manifest.get("budget") else BUDGETS[manifest["precision"]]
    if overrides:
        budget = replace(budget, **overrides)
    dirs = {n: Path(e["source"]) for n, e in manifest["adapters"].items() if not e.get("mix_of")}
    dirs.update(adapter_dirs or {})
    for n, d in dirs.items():
        if not (d / "adapter_config.json").is_file():
            raise EdgepeftError(f"{d}: adapter {n!r}'s folder is not there (needed as the "
                                f"reference). Pass --adapter {n}=DIR.")
    sets = _labelled_sets(labelled)
    for name in sets:
        if name is not None and name not in manifest["adapters"]:
            raise EdgepeftError(f"--labels {name}=...: {artifact_dir} has no adapter {name!r} (it has "
                                f"{', '.join(manifest['adapters']) or 'none'}).")
    tokenizer = bool(manifest.get("tokenizer"))
    if (sets or prompts or texts) and not tokenizer:
        raise EdgepeftError(f"{artifact_dir}: the artifact has no tokenizer, so texts cannot be encoded. Leave "
                            "out --prompts / --texts / --labels to compare seeded random token ids.")
    default_texts = tuple(load_texts(DEFAULT_TEXTS)) if tokenizer else ()
    tasks, labels = (), None
    if manifest["task"] == "classification":
        if any(name is not None for name in sets):
            raise EdgepeftError("--labels NAME=FILE is for causal LMs; a classifier takes one labelled file, "
                                "scored on every case.")
        if sets:
            path = sets[None]
            raw_texts, raw = read_labelled(path)
            raw_texts, raw = (raw_texts[:limit], raw[:limit]) if limit else (raw_texts, raw)
            texts_of, labels = tuple(raw_texts), tuple(int(x) for x in _label_ids(raw, manifest, path))
        else:
            texts_of = tuple(prompts or texts or default_texts)
        causal_prompts = None
    else:
        tasks = tuple(read_tasks(p, name, limit) for name, p in sets.items())
        texts_of = tuple(texts) if texts is not None else default_texts
        causal_prompts = tuple(prompts) if prompts else None
    settings = Settings(artifact=str(artifact_dir), reference=str(folder), given=str(reference),
                        dirs=tuple((n, str(d)) for n, d in dirs.items()), budget=budget, prompts=causal_prompts,
                        texts=texts_of, max_new_tokens=max_new_tokens, tasks=tasks, labels=labels, threads=threads)
    cases = default_choices(manifest) if choices is None else list(choices)
    per_row = per_row_choices(manifest, cases) if manifest["task"] == "causal-lm" else None
    if per_row:
        cases.append(PerRow(tuple(per_row)))
    return settings, cases, manifest


def validate(artifact_dir: Path, reference: Path, prompts: list[str] | None = None,
             texts: list[str] | None = None, max_new_tokens: int = 32, budget: Budget | None = None,
             adapter_dirs: dict[str, Path] | None = None, report: Path | None = None,
             labelled: Path | Mapping[str | None, Path] | None = None, limit: int | None = None,
             quiet: bool = False, choices: list | None = None, overrides: Mapping[str, float] | None = None,
             ray: str | None = None, threads: int | None = 1) -> dict:
    """Compare an artifact with its PyTorch reference; see the module docstring.

    Args:
        artifact_dir: output of ``edgepeft export``.
        reference: the base model folder the artifact was exported from, or the GGUF file (the
            folder is its dequantized copy, :func:`edgepeft.gguf.resolve_base`).
        prompts: causal LMs: texts whose greedy continuations are compared (needs the artifact's
            tokenizer); default: built-in prompts, or seeded random token ids without a tokenizer.
        texts: texts whose every token position is compared (top-1, KL, |Δlogits|), with the
            prompts; classifiers: the texts classified. Default: ``edgepeft/calibration/heldout.txt`` when
            the artifact has a tokenizer, else seeded random token ids.
        max_new_tokens: greedy tokens compared per prompt (causal LMs).
        budget: bounds; default the artifact precision's.
        adapter_dirs: PEFT dirs per adapter; default the sources recorded at export.
        report: where to write ``report.json``; default ``artifact_dir/report.json``.
        labelled: classifiers: a jsonl of ``{"text", "label"}`` rows; accuracy is reported for
            both sides, and its texts are the inputs compared. Causal LMs: a jsonl of
            ``{"prompt", "target"}`` rows scored on every case, or ``{adapter: file}`` scored on
            that adapter's cases (the adapter alone and the mixes holding it).
        limit: use at most this many rows of each labelled file.
        quiet: no progress bar (over the cases, on stderr).
        choices: the cases to compare (adapter names, mixes, None for the base); default
            :func:`default_choices` (``edgepeft adapter add --validate``: the added adapter).
        overrides: budget fields to replace (``{"max_kl": 0.02}``).
        ray: run the cases as Ray tasks: a cluster address, or "" to start a local Ray.
        threads: torch and onnxruntime threads per case (a Ray task reserves as many CPUs). The
            last digits of the metrics depend on it, so a serial run and a Ray run give the same
            numbers when it is the same; default 1 (one case per CPU on Ray). None: the
            libraries' defaults (every core; a faster serial run, not comparable to the last digit).

    Returns:
        The report dict; ``report["passed"]`` is False when any case breaks the budget. Written
        to ``report`` (JSON), and beside it as ``.md`` and ``.html``.
    """
    return validate_many([artifact_dir], reference, prompts=prompts, texts=texts, max_new_tokens=max_new_tokens,
                         budget=budget, adapter_dirs=adapter_dirs, report=report, labelled=labelled, limit=limit,
                         quiet=quiet, choices=choices, overrides=overrides, ray=ray, threads=threads)


def validate_many(artifact_dirs: Sequence[Path], reference: Path, *, prompts: list[str] | None = None,
                  texts: list[str] | None = None, max_new_tokens: int = 32, budget: Budget | None = None,
                  adapter_dirs: dict[str, Path] | None = None, report: Path | None = None,
                  labelled: Path | Mapping[str | None, Path] | None = None, limit: int | None = None,
                  quiet: bool = False, choices: list | None = None, overrides: Mapping[str, float] | None = None,
                  ray: str | None = None, threads: int | None = 1) -> dict:
    """:func:`validate` of several artifacts of one base against one reference, in one report.

    One artifact: the report :func:`validate` describes. Several: ``{"reference", "artifacts":
    [one report per artifact], "passed", "seconds", "date", "ray"}``, written to ``report``
    (default ``validate-report.json`` in the current directory). Each artifact's ``budget`` is its
    own precision's unless ``budget`` is given; ``overrides`` apply to each. ``ray``: see
    :func:`validate`; each report's ``runs`` says which process ran each case and for how long.
    ``threads``: see :func:`validate`.
    """
    t0 = time.perf_counter()
    artifact_dirs = [Path(a) for a in artifact_dirs]
    if not artifact_dirs:
        raise EdgepeftError("validate: no artifact given.")
    seen = set()
    for a in artifact_dirs:
        if a.resolve() in seen:
            raise EdgepeftError(f"{a}: given twice; pass each artifact once.")
        seen.add(a.resolve())
    if threads is not None and threads < 1:
        raise EdgepeftError(f"threads={threads}: at least 1, or None for the libraries' defaults.")
    if ray is not None:
        from edgepeft.validate.scale import require_ray

        require_ray()  # before any work: exit 2 with the install line
        threads = threads or 1  # a task reserves its CPUs
    source = resolve_base(reference, quiet)  # a GGUF file: its dequantized folder in the cache
    plans = [_plan(a, source.folder, Path(reference), prompts, texts, max_new_tokens, budget, overrides,
                   adapter_dirs, labelled, limit, choices, threads) for a in artifact_dirs]
    tasks = [(s, case) for s, cases, _ in plans for case in cases]
    ray_info = None
    if ray is None:
        outs = _serial(tasks, quiet)
    else:
        from edgepeft.validate.scale import run_on_ray

        outs, ray_info = run_on_ray(tasks, ray, quiet)
    reports, k = [], 0
    for (s, cases, manifest), a in zip(plans, artifact_dirs):
        mine, k = outs[k:k + len(cases)], k + len(cases)
        reports.append(_artifact_report(a, reference, s, manifest, mine, labelled))
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    seconds = round(time.perf_counter() - t0, 2)
    if len(reports) == 1:
        out = {**reports[0], "seconds": seconds, "date": date, "ray": ray_info}
        report = report or artifact_dirs[0] / "report.json"
    else:
        out = {"reference": str(reference), "artifacts": reports, "passed": all(r["passed"] for r in reports),
               "seconds": seconds, "date": date, "ray": ray_info}
        report = report or Path(MULTI_REPORT)
    report.write_text(json.dumps(out, indent=2) + "\n")
    from edgepeft.validate.report import write_html, write_markdown

    write_markdown(out, report.with_suffix(".md"))
    write_html(out, report.with_suffix(".html"))
    return out


def _serial(tasks: list, quiet: bool) -> list:
    """Every case in this process, in order: ``[(CaseResult, run)]``."""
    import torch

    from edgepeft.validate import cases

    progress = bar(tasks, desc="validate", unit="case", quiet=quiet)
    outs = []
    threads = torch.get_num_threads()  # a case sets its own; the caller gets back its setting
    try:
        for s, case in progress:
            progress.set_postfix_str(case.name if isinstance(case, PerRow) else case_name(case))
            outs.append(cases.run_case(s, case))
    finally:
        progress.close()
        cases.forget()  # the models are this call's; a long-lived caller gets its memory back
        torch.set_num_threads(threads)
    return outs


def _artifact_report(artifact_dir: Path, reference: Path, s: Settings, manifest: dict, outs: list,
                     labelled) -> dict:
    results = [r for r, _ in outs]
    runs = [{"case": r.case, **run} for r, run in outs]
    first = runs[0] if runs else {}
    sets = _labelled_sets(labelled)
    return {"artifact": str(artifact_dir), "reference": str(reference), "task": manifest["task"],
            "precision": manifest["precision"], "mode": manifest["mode"], "budget": asdict(s.budget),
            "graph_format": first.get("graph_format"), "providers": first.get("providers"),
            "max_new_tokens": s.max_new_tokens if manifest["task"] == "causal-lm" else 0, "threads": s.threads,
            "labelled": ", ".join(str(p) if n is None else f"{n}={p}" for n, p in sets.items()) or None,
            "cases": [asdict(r) for r in results],
            "passed": all(not r.failures for r in results),
            "seconds": round(sum(run["seconds"] for run in runs), 2),
            "runs": [{k: v for k, v in run.items() if k not in ("graph_format", "providers")} for run in runs]}


def _label(paths: list[str]) -> list[str]:
    """Short names of artifact paths: what tells them apart."""
    if len(paths) < 2:
        return [Path(p).name for p in paths]
    common = os.path.commonpath([os.path.abspath(p) for p in paths])
    return [os.path.relpath(os.path.abspath(p), common) for p in paths]


def format_report(result: dict) -> str:
    """A plain-text table of a :func:`validate` result, one row per case (per artifact and case
    for several artifacts), failures spelled out."""
    reports = result.get("artifacts") or [result]
    names = _label([r["artifact"] for r in reports]) if "artifacts" in result else [""] * len(reports)
    width = max([len(n) for n in names] + [0])
    cases = [c for r in reports for c in r["cases"]]
    acc = any(c.get("accuracy_torch") is not None for c in cases)
    f1 = any(c.get("f1_torch") is not None for c in cases)
    gen = any(r.get("task", "causal-lm") == "causal-lm" for r in reports)
    lead = f"{'artifact':<{width}} " if width else ""
    head = f"{lead}{'case':<36} {'max|Δlogits|':>12} {'mean KL':>10} {'top-1':>7}"
    head += f" {'greedy':>9}" if gen else ""
    head += f" {'acc torch':>9} {'acc onnx':>9}" if acc else ""
    head += f" {'F1 torch':>9} {'F1 onnx':>9}" if f1 else ""
    lines = [head + "  verdict"]
    for name, r in zip(names, reports):
        for c in r["cases"]:
            row = (f"{name:<{width}} " if width else "") + (
                f"{c['case'][:36]:<36} {c['max_abs_logits']:>12.2e} {c['mean_kl']:>10.2e} {c['top1_agreement']:>7.2%}")
            if gen:
                row += f" {str(c['greedy_tokens'] - c['greedy_mismatches']) + '/' + str(c['greedy_tokens']):>9}"
            if acc:
                row += (f" {c['accuracy_torch']:>9.2%} {c['accuracy_artifact']:>9.2%}"
                        if c.get("accuracy_torch") is not None else f" {'-':>9} {'-':>9}")
            if f1:
                row += (f" {c['f1_torch']:>9.2%} {c['f1_artifact']:>9.2%}"
                        if c.get("f1_torch") is not None else f" {'-':>9} {'-':>9}")
            verdict = "ok" if not c["failures"] else "FAIL: " + "; ".join(c["failures"])
            lines.append(f"{row}  {verdict}")
    for name, r in zip(names, reports):
        b = r["budget"]
        bound = "any" if b["max_abs_logits"] is None else f"{b['max_abs_logits']:g}"
        causal = r.get("task", "causal-lm") == "causal-lm"
        lines.append((f"{name}: " if width else "") + f"budget ({r['precision']}): max|Δlogits| <= {bound}, "
                     f"top-1 >= {b['min_top1']:.0%}, KL <= {b['max_kl']:g}"
                     + (f", greedy identical: {b['greedy_must_match']}" if causal else "")
                     + (f", task score drop <= {b['max_accuracy_drop']:g} points"
                        if any(c.get("accuracy_torch") is not None for c in r["cases"]) else "")
                     + f"  ->  {'PASSED' if r['passed'] else 'FAILED'}"
                     + (f" (.{r['graph_format']} graph)" if r.get("graph_format") else ""))
    if "artifacts" in result:
        lines.append(f"{len(reports)} artifacts: {'PASSED' if result['passed'] else 'FAILED'}")
    if result.get("ray"):
        lines.append(f"ran on Ray ({result['ray']['address']}): {result['ray']['summary']}")
    return "\n".join(lines)
