"""One validate case, run the same way wherever it runs: in the calling process, or in a Ray worker.

A case is one adapter choice of one artifact (None for the base, a name, a mix or composition
``{name: weight}``) or the per-row batch (:class:`PerRow`). :class:`Settings` holds everything a
process needs to run the cases of one artifact, and nothing it has to share with another process:
paths, the budget, the texts and labelled rows. :func:`run_case` loads the artifact, its PyTorch
reference and the inputs once per process (:func:`loaded`) and keeps them for the next case, so a
worker that runs ten cases of one artifact loads it once. Each case computes its own references,
also the per-row case (it does not borrow the other cases' outputs), so a case's numbers do not
depend on where or after what it ran.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from edgepeft.errors import EdgepeftError
from edgepeft.quantize.budgets import Budget
from edgepeft.validate import metrics

DEFAULT_PROMPTS = (
    "The capital of France is",
    "Review: a warm, funny and surprisingly moving film.\nSentiment:",
    "Number: 4821\nIn words:",
    "def fibonacci(n):",
)
TEXT_TOKENS = 64  # longest text row compared, in tokens
BATCH = 8  # rows per forward pass (bounds the (B, T, vocab) logits held at once)
TASK_MARGIN = 3  # greedy tokens past a task set's longest target (a leading space, EOS, one spare)


@dataclass(frozen=True)
class CaseResult:
    """Agreement of one adapter choice over all prompts.

    ``accuracy_*``: classifiers: accuracy on the labelled texts; causal LMs: exact match of the
    greedy completions of the labelled prompts (``task_rows`` of them), with ``f1_*`` their mean
    token F1 (:func:`edgepeft.validate.metrics.task_scores`).
    """

    case: str
    positions: int
    max_abs_logits: float
    mean_kl: float
    top1_agreement: float
    greedy_tokens: int
    greedy_mismatches: int
    failures: tuple[str, ...]
    accuracy_torch: float | None = None
    accuracy_artifact: float | None = None
    distributions: dict | None = None  # summaries for the report plots, see metrics.distributions
    f1_torch: float | None = None
    f1_artifact: float | None = None
    task_rows: int | None = None


@dataclass(frozen=True)
class TaskSet:
    """Labelled prompts of a causal LM: ``{"prompt", "target"}`` rows of ``path``, scored on the
    cases of adapter ``adapter`` (and mixes holding it), or on every case when it is None."""

    path: str
    adapter: str | None
    prompts: tuple[str, ...]
    targets: tuple[str, ...]

    def __post_init__(self):
        if len(self.prompts) != len(self.targets) or not self.prompts:
            raise EdgepeftError(f"{self.path}: expected one target per prompt and at least one row.")

    def applies(self, choice) -> bool:
        return self.adapter is None or choice == self.adapter or (isinstance(choice, dict) and self.adapter in choice)


@dataclass(frozen=True)
class PerRow:
    """The per-row case: every batch of the compared rows, row ``r`` on ``choices[r % len(choices)]``."""

    choices: tuple

    @property
    def name(self) -> str:
        from edgepeft.runtime.adapters import case_name

        return "per-row(" + "|".join(case_name(c) for c in self.choices) + ")"


@dataclass(frozen=True)
class Settings:
    """What every case of one artifact runs with. Picklable: Ray sends it to the workers, which
    need the same paths (a shared or copied file system on a cluster).

    Attributes:
        artifact: the artifact directory.
        reference: the base model folder (a GGUF reference's dequantized copy).
        given: what the user passed as the reference, for messages.
        dirs: ``(adapter name, PEFT folder)`` pairs of the references.
        budget: the bounds every case is judged by.
        prompts: causal LMs: texts whose greedy continuations are compared (None: built-in
            prompts, or seeded random ids without a tokenizer).
        texts: texts compared at every position (causal) or classified (classifiers).
        max_new_tokens: greedy tokens compared per prompt.
        tasks: causal LMs: labelled prompt sets (:class:`TaskSet`).
        labels: classifiers: class index per text of ``texts`` (labelled accuracy), else None.
        threads: torch and onnxruntime intra-op threads (None: their defaults).
    """

    artifact: str
    reference: str
    given: str
    dirs: tuple[tuple[str, str], ...]
    budget: Budget
    prompts: tuple[str, ...] | None
    texts: tuple[str, ...]
    max_new_tokens: int
    tasks: tuple[TaskSet, ...] = ()
    labels: tuple[int, ...] | None = None
    threads: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise EdgepeftError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}.")
        if self.labels is not None and len(self.labels) != len(self.texts):
            raise EdgepeftError("labels: one label per text.")


@dataclass
class _Inputs:
    """The token batches of one artifact's cases, built once per process."""

    ids: np.ndarray | None = None  # (B, S) left-padded prompts (causal)
    mask: np.ndarray | None = None
    batches: list | None = None  # [(ids, mask)] compared at every position / classified
    pos: np.ndarray | None = None  # token position of every compared position (causal)
    tasks: list | None = None  # [(TaskSet, [(ids, mask)], n)] (causal)
    labels: np.ndarray | None = None  # (N,) class indices (classifiers)


_MODELS: dict = {}  # (artifact, threads) -> runtime Model
_REFERENCES: dict = {}  # (base folder, adapters) -> Reference
_INPUTS: dict = {}  # Settings -> _Inputs


def _reference_key(s: Settings, manifest: dict) -> tuple:
    """Artifacts exported from one base with the same adapter folders share one reference."""
    adapters = tuple((n, e["kind"], str(e.get("mix_of"))) for n, e in manifest["adapters"].items())
    return (s.reference, manifest["task"], manifest["base"].get("num_labels"), adapters, s.dirs)


def loaded(s: Settings):
    """``(Model, Reference, _Inputs)`` of ``s``, loaded on this process's first case of it."""
    from edgepeft.runtime import Model
    from edgepeft.validate.reference import Reference

    if s.threads:
        import torch

        torch.set_num_threads(s.threads)
    key = (s.artifact, s.threads)
    if key not in _MODELS:
        _MODELS[key] = Model(s.artifact, threads=s.threads)
    art = _MODELS[key]
    rkey = _reference_key(s, art.manifest)
    if rkey not in _REFERENCES:
        _REFERENCES[rkey] = Reference(Path(s.reference), art.manifest, {n: Path(d) for n, d in s.dirs},
                                      given=Path(s.given))
    if s not in _INPUTS:
        _INPUTS[s] = _causal_inputs(art, s) if art.task == "causal-lm" else _classifier_inputs(art, s)
    return art, _REFERENCES[rkey], _INPUTS[s]


def forget() -> None:
    """Drop every loaded artifact and reference of this process (tests; a long-lived worker)."""
    _MODELS.clear()
    _REFERENCES.clear()
    _INPUTS.clear()


def run_case(s: Settings, case) -> tuple[CaseResult, dict]:
    """Run one case of ``s``: ``(result, run)``, ``run`` saying where and how long
    (``{"pid", "host", "seconds", ...}``; not part of the result, which is the same wherever it ran)."""
    t0 = time.perf_counter()
    art, ref, inp = loaded(s)
    if isinstance(case, PerRow):
        result = _per_row_case(art, ref, inp, s, case)
    elif art.task == "causal-lm":
        result = _causal_case(art, ref, inp, s, case)
    else:
        result = _classifier_case(art, ref, inp, s, case)
    return result, {"pid": os.getpid(), "host": socket.gethostname(), "seconds": round(time.perf_counter() - t0, 3),
                    "graph_format": art.format, "providers": list(art.providers)}


# ------------------------------------------------------------------------------------- inputs
def _causal_inputs(art, s: Settings) -> _Inputs:
    from edgepeft.runtime.batch import batch_inputs, positions

    manifest = art.manifest
    vocab = manifest["base"]["vocab_size"]
    if manifest.get("tokenizer"):
        prompt_rows = [art.tokenizer.encode(p).ids for p in (s.prompts or DEFAULT_PROMPTS)]
        text_rows = [art.tokenizer.encode(t).ids[:TEXT_TOKENS] for t in s.texts]
    else:  # validate's plan refused texts for an artifact without a tokenizer
        rng = np.random.default_rng(0)
        prompt_rows = [rng.integers(0, vocab, n).tolist() for n in (5, 9, 12, 7)]
        text_rows = [rng.integers(0, vocab, n).tolist() for n in (24, 17, 31, 20)]
    ids, mask = batch_inputs(prompt_rows, vocab=vocab)
    rows = prompt_rows + text_rows  # teacher-forced agreement over every position of all of them
    batches = [batch_inputs(rows[i:i + BATCH], vocab=vocab) for i in range(0, len(rows), BATCH)]
    pos = np.concatenate([positions(m)[m.astype(bool)] for _, m in batches])  # of every compared row
    tasks = []
    for t in s.tasks:
        encoded = [art.tokenizer.encode(p).ids for p in t.prompts]
        n = max(len(art.tokenizer.encode(x, add_special_tokens=False).ids) for x in t.targets) + TASK_MARGIN
        tasks.append((t, [batch_inputs(encoded[i:i + BATCH], vocab=vocab) for i in range(0, len(encoded), BATCH)], n))
    return _Inputs(ids=ids, mask=mask, batches=batches, pos=pos, tasks=tasks)


def _classifier_inputs(art, s: Settings) -> _Inputs:
    from edgepeft.contract import PROMPT_INPUT

    manifest = art.manifest
    reserved = max([e.get("virtual_tokens") or 0 for e in manifest["adapters"].values()
                    if PROMPT_INPUT in (e.get("inputs") or [])] + [0])  # room for a prompt's virtual tokens
    if not s.texts:
        rng = np.random.default_rng(0)
        batches = [art._encode([rng.integers(5, manifest["base"]["vocab_size"], n).tolist()
                                for n in (5, 9, 12, 7)], None, reserved)]
    else:
        batches = [art._encode(list(s.texts[i:i + 32]), None, reserved) for i in range(0, len(s.texts), 32)]
    labels = None if s.labels is None else np.array(s.labels)
    return _Inputs(batches=batches, labels=labels)


# -------------------------------------------------------------------------------------- cases
def _causal_case(art, ref, inp: _Inputs, s: Settings, choice) -> CaseResult:
    from edgepeft.runtime.adapters import case_name

    torch_ref = ref.get(choice)
    rows_of_case: list[dict] = []
    with torch_ref.held():
        batch_stats = [metrics.stats(art.logits(i, adapter=choice, attention_mask=m), torch_ref.logits(i, m),
                                     m.astype(bool), rows_of_case) for i, m in inp.batches]
    gen = art.generate(inp.ids, s.max_new_tokens, adapter=choice, attention_mask=inp.mask,
                       stop_at_eos=False)[:, inp.ids.shape[1]:]
    pt_gen = ref.greedy(choice, inp.ids, inp.mask, s.max_new_tokens)
    result = _causal_result(case_name(choice), batch_stats, gen, pt_gen, s.budget, rows_of_case, inp.pos)
    sets = [t for t in inp.tasks if t[0].applies(choice)]
    return _with_tasks(art, ref, result, choice, sets, s.budget) if sets else result


def _with_tasks(art, ref, result: CaseResult, choice, sets: list, budget: Budget) -> CaseResult:
    """``result`` with the task scores of the labelled prompt sets ``sets``: greedy completions of
    both sides (cut at the base model's EOS), exact match and token F1 against the targets."""
    from edgepeft.runtime.decode import eos_ids

    eos = eos_ids(art.manifest, True)
    tok = art.tokenizer

    def text(row: np.ndarray) -> str:
        ends = [k for k, t in enumerate(row.tolist()) if t in eos]
        return tok.decode(row[:ends[0] if ends else len(row)].tolist(), skip_special_tokens=True)

    def encode(x: str) -> list[int]:
        return tok.encode(x, add_special_tokens=False).ids

    pt_text, art_text, targets = [], [], []
    for t, batches, n in sets:
        for ids, mask in batches:
            pt_text += [text(r) for r in ref.greedy(choice, ids, mask, n)]
            out = art.generate(ids, n, adapter=choice, attention_mask=mask, stop_at_eos=False)[:, ids.shape[1]:]
            art_text += [text(r) for r in out]
        targets += list(t.targets)
    em_t, f1_t = metrics.task_scores(pt_text, targets, encode)
    em_a, f1_a = metrics.task_scores(art_text, targets, encode)
    failures = (metrics.drop_failures("exact match", em_t, em_a, budget)
                + metrics.drop_failures("token F1", f1_t, f1_a, budget))
    return replace(result, failures=result.failures + tuple(failures), accuracy_torch=em_t, accuracy_artifact=em_a,
                   f1_torch=f1_t, f1_artifact=f1_a, task_rows=len(targets))


def _per_row_case(art, ref, inp: _Inputs, s: Settings, case: PerRow) -> CaseResult:
    """Every batch in one call each, row ``r`` (counted across the batches) on ``choices[r % n]``,
    against that choice's reference on the same rows: as many positions as a single-choice case, so
    the per-row verdict is not decided by a near-tie or two. Then the prompts generated in one call,
    row ``b`` on ``choices[b % n]``."""
    per_row, n = list(case.choices), len(case.choices)
    rows_of_case: list[dict] = []
    batch_stats, r0 = [], 0
    for i, m in inp.batches:
        on = np.arange(r0, r0 + i.shape[0]) % n  # (B,): each row's choice index
        r0 += i.shape[0]
        pt = None
        for k in np.unique(on):  # the choices some row of this batch is on
            keep = np.flatnonzero(on == k)
            part = ref.get(per_row[k]).logits(i[keep], m[keep])  # (rows, S, V); positions from the mask
            pt = np.zeros((*i.shape, part.shape[-1]), np.float32) if pt is None else pt
            pt[keep] = part
        mine = [per_row[k] for k in on]
        batch_stats.append(metrics.stats(art.logits(i, adapter=mine, attention_mask=m), pt, m.astype(bool),
                                         rows_of_case))
    on = np.arange(inp.ids.shape[0]) % n
    pt_gen = np.zeros((inp.ids.shape[0], s.max_new_tokens), np.int64)
    for k in np.unique(on):
        keep = np.flatnonzero(on == k)
        pt_gen[keep] = ref.greedy(per_row[k], inp.ids, inp.mask, s.max_new_tokens)[keep]
    gen = art.generate(inp.ids, s.max_new_tokens, adapter=[per_row[k] for k in on], attention_mask=inp.mask,
                       stop_at_eos=False)[:, inp.ids.shape[1]:]
    return _causal_result(case.name, batch_stats, gen, pt_gen, s.budget, rows_of_case, inp.pos)


def _causal_result(name: str, batch_stats: list, gen: np.ndarray, pt_gen: np.ndarray, budget: Budget,
                   rows_of_case: list[dict], pos: np.ndarray) -> CaseResult:
    """One causal case's result: the per-position verdict and the greedy comparison."""
    diff, kl, top1, failures = metrics.verdict(batch_stats, budget)
    mism = int((gen != pt_gen).sum())
    if budget.greedy_must_match and mism:
        failures.append(f"greedy generation differs at {mism}/{gen.size} tokens")
    return CaseResult(name, int(sum(b[3] for b in batch_stats)), diff, kl, top1, int(gen.size), mism,
                      tuple(failures), distributions=metrics.distributions(rows_of_case, pos))


def _classifier_case(art, ref, inp: _Inputs, s: Settings, choice) -> CaseResult:
    from edgepeft.runtime.adapters import case_name

    torch_ref = ref.get(choice)
    ort_logits = np.concatenate([art.classify_logits(i, adapter=choice, attention_mask=m) for i, m in inp.batches])
    pt_logits = np.concatenate([torch_ref.classify_logits(i, m) for i, m in inp.batches])
    rows_of_case: list[dict] = []
    diff, kl, top1, failures = metrics.verdict(
        [metrics.stats(ort_logits, pt_logits, np.ones(len(ort_logits), bool), rows_of_case)], s.budget)
    acc = (None, None)
    if inp.labels is not None:
        acc = (float((pt_logits.argmax(-1) == inp.labels).mean()), float((ort_logits.argmax(-1) == inp.labels).mean()))
        failures += metrics.drop_failures("accuracy", *acc, s.budget)
    return CaseResult(case_name(choice), len(ort_logits), diff, kl, top1, 0, 0, tuple(failures), *acc,
                      distributions=metrics.distributions(rows_of_case),
                      task_rows=None if inp.labels is None else len(inp.labels))
