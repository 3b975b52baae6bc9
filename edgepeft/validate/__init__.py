"""``edgepeft validate``: does the artifact still agree with the PyTorch (peft) model?

Per case (no adapter, each adapter, a weighted LoRA mix, a LoRA + prefix composition, and one
batch whose rows each run another of those, :func:`per_row_choices`) both sides run the same inputs. The PyTorch side of each adapter is built as its kind describes
(``kind_module(entry["kind"]).REFERENCE``, :class:`edgepeft.kinds.common.Reference`); which
adapters mix and which prefix composes is read from the manifest and those descriptions.
Causal LMs: a left-padded batch, real-token positions compared: max |Δlogits|, mean
KL(torch || artifact), top-1 agreement, and greedy generations (the torch side recomputes the
whole sequence each step, no cache, so the artifact's KV cache is checked too).
PEFT's prompt-learning models ignore position ids, which makes their padded rows depend on the
padding, so those references run each row unpadded. Classifiers: the same metrics on the class
logits, plus accuracy on both sides when given a labelled file. Every case is checked and all
failures are reported together.

Besides ``report.json``, validate writes ``report.md`` and a self-contained ``report.html`` (plots
of the per-position distributions, see :mod:`edgepeft.validate.report`). ``report.json`` keeps
those distributions summarized (histograms, per-position means), never the raw arrays.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from edgepeft.contract import PROMPT_INPUT
from edgepeft.data import load_texts
from edgepeft.errors import EdgepeftError
from edgepeft.gguf import resolve_base
from edgepeft.progress import bar
from edgepeft.quantize.budgets import BUDGETS, Budget
from edgepeft.runtime import Model
from edgepeft.runtime.adapters import case_name
from edgepeft.runtime.batch import batch_inputs, positions

# Default prompts when the caller gives none and the artifact has a tokenizer.
DEFAULT_PROMPTS = (
    "The capital of France is",
    "Review: a warm, funny and surprisingly moving film.\nSentiment:",
    "Number: 4821\nIn words:",
    "def fibonacci(n):",
)
# Held-out texts whose every position is compared (teacher-forced) when the caller gives none:
# edgepeft/calibration/heldout.txt, never used for calibration. Enough positions (~1,700 on SmolLM2) that
# a 99 % top-1 bound is not decided by one near-tie.
DEFAULT_TEXTS = "heldout"
TEXT_TOKENS = 64  # longest text row compared, in tokens
BATCH = 8  # rows per forward pass (bounds the (B, T, vocab) logits held at once)
HIST_BINS_PER_DECADE = 8  # log-spaced histogram bins of |Δlogits| and KL in the report
MAX_POSITION_BINS = 128  # more distinct token positions than this are grouped into equal ranges


@dataclass(frozen=True)
class CaseResult:
    """Agreement of one adapter choice over all prompts."""

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
    distributions: dict | None = None  # summaries for the report plots, see _distributions


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(p || q) per row of logits ``(N, V)`` -> ``(N,)``, in float64."""
    p = p_logits.astype(np.float64)
    q = q_logits.astype(np.float64)
    lp = p - p.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    lq = q - q.max(-1, keepdims=True)
    lq -= np.log(np.exp(lq).sum(-1, keepdims=True))
    return (np.exp(lp) * (lp - lq)).sum(-1)


def _positions_t(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(positions(mask))


class _Ref:
    """One PyTorch reference for one adapter choice.

    Attributes:
        model: the torch model to call (peft's model for peft kinds, edgepeft's bottleneck
            wrapper for bottleneck adapters, the base for ``None``).
        prompt_learning: a PEFT prompt-learning model (prefix / prompt / P-tuning): PEFT drops
            given position ids for prompts, so it is run on each unpadded row alone.
        prefix: per layer ``(key, value)`` ``(1, H, p, D)`` to seed the cache with (a LoRA +
            prefix composition, which PEFT cannot run as one model), else None. Also run on each
            unpadded row alone: a row's left padding would sit between the prefix and its tokens,
            and a sliding window over cache slots (transformers' masks) would count it.
        enter: a context manager factory to run inside (e.g. a mix's merged deltas).
    """

    def __init__(self, model, prompt_learning=False, prefix=None, enter=None):
        self.model, self.prompt_learning, self.prefix = model, prompt_learning, prefix
        self.enter = enter or contextlib.nullcontext

    @torch.no_grad()
    def logits(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Causal LM logits ``(B, S, V)`` at every position of the (left-padded) batch."""
        with self.enter():
            if self.prompt_learning or self.prefix is not None:
                out = None
                for i in range(ids.shape[0]):
                    real = ids[i][mask[i].astype(bool)]
                    row = self._row(real)  # (len(real), V)
                    if out is None:
                        out = np.zeros((*ids.shape, row.shape[-1]), np.float32)
                    out[i, mask[i].astype(bool)] = row
                return out
            out = self.model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                             position_ids=_positions_t(mask))
            return out.logits.float().numpy()  # (B, S, V)

    def _row(self, real: np.ndarray) -> np.ndarray:
        """Logits ``(S, V)`` of one unpadded row ``(S,)``, after the prefix when there is one."""
        if self.prefix is None:
            return self.model(input_ids=torch.from_numpy(real[None])).logits[0, -len(real):].float().numpy()
        from transformers import DynamicCache

        p = self.prefix[0][0].shape[2]
        cache = DynamicCache(ddp_cache_data=[(k.clone(), v.clone()) for k, v in self.prefix],
                             config=self.model.config)
        pos = torch.arange(p, p + len(real))[None]  # (1, S): the tokens follow the prefix
        out = self.model(input_ids=torch.from_numpy(real[None]), attention_mask=torch.ones(1, p + len(real),
                         dtype=torch.long), position_ids=pos, cache=cache, use_cache=True)
        return out.logits[0].float().numpy()

    @torch.no_grad()
    def classify_logits(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Classifier logits ``(B, num_labels)`` of a right-padded batch."""
        with self.enter():
            out = self.model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
            return out.logits.float().numpy()

    def greedy(self, ids: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
        """Greedy decoding by full recomputation (no cache): the plain definition. -> (B, n)."""
        new = []
        for _ in range(n):
            nxt = self.logits(ids, mask)[:, -1].argmax(-1)[:, None].astype(np.int64)  # (B, 1)
            new.append(nxt)
            ids = np.concatenate([ids, nxt], 1)
            mask = np.concatenate([mask, np.ones_like(nxt)], 1)
        return np.concatenate(new, 1)


class _Reference:
    """The server side: the base model plus every adapter loaded the way its trainer would.

    Each adapter's kind says how (``Reference``): kinds whose adapters share one model (LoRA /
    DoRA: one ``PeftModel``, as in the demo, and cheap on memory) get one model per kind; every
    other adapter gets its own model on a copy of the base (PEFT cannot hold IA3 and LoRA, or a
    prompt and LoRA, in one model; bottleneck adapters use edgepeft's own torch module).
    """

    def __init__(self, reference: Path, manifest: dict, adapter_dirs: dict[str, Path], given: Path | None = None):
        """``reference``: the base model folder; ``given``: what the user passed, for messages (a
        GGUF file whose dequantized folder ``reference`` is), default ``reference``."""
        from edgepeft.export.base import fingerprint, load_causal_lm, load_classifier
        from edgepeft.kinds import kind_module

        self.task = manifest["task"]
        self.manifest = manifest
        self.reference = reference
        if self.task == "causal-lm":
            base, fresh = load_causal_lm(reference), []
        else:
            base, fresh = load_classifier(reference, manifest["base"].get("num_labels"))
        fp = fingerprint(base, fresh)
        if fp != manifest["base"]["fingerprint"]:
            raise EdgepeftError(f"{given or reference}: its weights (fingerprint {fp[:19]}...) are not the base "
                                f"this artifact was exported from ({manifest['base']['fingerprint'][:19]}"
                                "...). Pass the same --reference folder (or GGUF file) that export used.")
        self.base = base
        self.dirs = adapter_dirs
        # an adapter written by `edgepeft adapter mix` is its mix in PyTorch (get), not a model of its own
        self.kinds = {n: kind_module(e["kind"]) for n, e in manifest["adapters"].items() if not e.get("mix_of")}
        self._models: dict[str, object] = {}  # own models, by adapter name
        self._shared: dict[object, object] = {}  # shared models, by kind module

    def _fresh_base(self):
        import copy

        return copy.deepcopy(self.base)

    def _shared_model(self, kind):
        """The one model holding every adapter of ``kind`` (a kind module with a shared Reference)."""
        if kind not in self._shared:
            ref, model = kind.REFERENCE, None
            for name in [n for n, k in self.kinds.items() if k is kind]:  # manifest order
                if model is None:
                    model = ref.load(self._fresh_base(), self.dirs[name], name)
                else:
                    ref.add(model, self.dirs[name], name)
            self._shared[kind] = model.eval()
        return self._shared[kind]

    def _single(self, name: str):
        """(model, prompt_learning) for one adapter."""
        ref = self.kinds[name].REFERENCE
        if ref.shared:
            model = self._shared_model(self.kinds[name])
            ref.select(model, name)
            return model, ref.prompt_learning
        if name not in self._models:
            self._models[name] = ref.load(self._fresh_base(), self.dirs[name], None).eval()
        return self._models[name], ref.prompt_learning

    def _seed(self, name: str):
        """Per layer ``(key, value)`` ``(1, H, p, D)``: the KV-cache seed of adapter ``name``."""
        from edgepeft.kinds import read_adapter

        adapter = read_adapter(name, self.dirs[name], self.base, self.task)
        seed = self.kinds[name].side(adapter, self.base).prefix
        return [(torch.from_numpy(k), torch.from_numpy(v)) for k, v in seed]

    def get(self, choice) -> _Ref:
        """The reference for None, a name, or a mix / composition ``{name: weight}``."""
        if choice is None:
            return _Ref(self.base)
        if isinstance(choice, str) and self.manifest["adapters"][choice].get("mix_of"):
            mix = self.manifest["adapters"][choice]["mix_of"]
            gone = [n for n in mix if n not in self.kinds]
            if gone:
                raise EdgepeftError(f"adapter {choice!r} is a mix of {', '.join(mix)}, and {gone[0]!r} is no longer in "
                                    "the artifact: its PyTorch reference is that mix. Validate before removing them.")
            return self.get(dict(mix))
        if isinstance(choice, str):
            model, prompt = self._single(choice)
            return _Ref(model, prompt_learning=prompt)
        seeds = [n for n in choice if self.manifest["adapters"][n].get("prefix")]
        mixed = {n: w for n, w in choice.items() if n not in seeds}
        kinds = {self.kinds[n] for n in mixed}
        if (len(seeds) > 1 or any(not self.kinds[n].REFERENCE.seed_composes for n in seeds) or len(kinds) > 1
                or any(k.REFERENCE.mix is None for k in kinds)):
            raise EdgepeftError(f"no PyTorch reference for the combination {choice}: validate checks "
                                "weighted mixes of adapters of one kind with a mix reference (LoRA), "
                                "optionally with one prefix that composes (prefix tuning).")
        prefix = self._seed(seeds[0]) if seeds else None
        if not mixed:
            return _Ref(self.base, prefix=prefix)
        kind = kinds.pop()
        model = self._shared_model(kind)
        return _Ref(model, prefix=prefix, enter=lambda: kind.REFERENCE.mix(model, mixed))


def default_choices(artifact: Model) -> list:
    """What validate compares: the base, each adapter, a LoRA mix, a LoRA + prefix composition.

    The mix: the adapters of :func:`edgepeft.kinds.mix_group` (mixable by the manifest's rules,
    with a PyTorch mix reference; today LoRA) without a head, plus one with a head on a
    classifier. The composition: the mix's first adapter with the first prefix that is not a
    decoder prompt (prompt tuning's seed went through the base weights). Merged artifacts: each
    adapter. Classifiers: the base only when it has a trained head.
    """
    from edgepeft.kinds import mix_group

    names = artifact.adapters
    if artifact.merged:
        return list(names)
    entries = artifact.manifest["adapters"]
    base_ok = artifact.task == "causal-lm" or artifact.manifest["base"].get("head_trained", True)
    choices: list = ([None] if base_ok else []) + list(names)
    group = mix_group(artifact.manifest)
    loras = [n for n in group if not entries[n].get("head")]
    if artifact.task == "classification":
        with_head = [n for n in group if entries[n].get("head")]
        loras = loras + with_head[:1]  # a mix can carry one head
    if len(loras) >= 2:
        weights = [0.7, 0.3] if len(loras) == 2 else [1.0 / len(loras)] * len(loras)
        choices.append(dict(zip(loras, weights)))
    prefixes = [n for n in names if entries[n].get("prefix") and not entries[n]["prefix"]["from_prompt"]]
    if artifact.task == "causal-lm" and prefixes and loras:
        choices.append({loras[0]: 1.0, prefixes[0]: 1.0})
    return choices


def per_row_choices(artifact: Model, choices: list) -> list | None:
    """The per-row case: one batch whose rows cycle through the base, each adapter and the mix
    of ``choices`` that the graph can vary per row (every input of the adapter weighted or offset
    per row: the manifest's ``rows`` and ``row_values``); None when fewer than two such choices
    (or a merged artifact, or one exported before per-row weights)."""
    if artifact.merged or not (artifact.manifest.get("rows") or artifact.manifest.get("row_values")):
        return None
    entries = artifact.manifest["adapters"]
    weighted = {k for spec in artifact.manifest.get("rows", {}).values() for k in spec["inputs"]}
    weighted |= {v["input"] for v in artifact.manifest.get("row_values", {}).values()}
    free = {n for n, e in entries.items() if not e.get("prefix") and set(e["inputs"]) <= weighted}
    rows = [c for c in choices if c is None or (isinstance(c, str) and c in free)
            or (isinstance(c, dict) and set(c) <= free)]
    return rows if sum(c is not None for c in rows) >= 2 else None


def read_labelled(path: Path) -> tuple[list[str], list]:
    """Texts and labels of a jsonl file with ``{"text": ..., "label": ...}`` rows.

    Raises:
        EdgepeftError: unreadable file, a row without text or label, or no rows.
    """
    if not path.is_file():
        raise EdgepeftError(f"{path}: labelled file not found (jsonl rows {{\"text\": ..., \"label\": ...}}).")
    texts, labels = [], []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise EdgepeftError(f"{path}:{i}: not JSON ({e}).") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or "label" not in row:
            raise EdgepeftError(f"{path}:{i}: expected {{\"text\": str, \"label\": ...}}.")
        texts.append(row["text"])
        labels.append(row["label"])
    if not texts:
        raise EdgepeftError(f"{path}: no rows.")
    return texts, labels


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


def _per_position(ort_logits: np.ndarray, pt_logits: np.ndarray, real: np.ndarray) -> dict[str, np.ndarray]:
    """At each real position: max |Δlogits| over the vocabulary (or classes), KL(torch || artifact)
    and whether the argmaxes agree, each ``(N,)``."""
    o, p = ort_logits[real], pt_logits[real]
    return {"diff": np.abs(o - p).max(-1), "kl": _kl(p, o), "match": o.argmax(-1) == p.argmax(-1)}


def _stats(ort_logits: np.ndarray, pt_logits: np.ndarray, real: np.ndarray,
           rows: list | None = None) -> np.ndarray:
    """Per batch: ``[max |Δlogits|, sum of KL, top-1 agreements, positions]`` over real positions.

    ``rows``: when given, the batch's :func:`_per_position` arrays are appended to it.
    """
    d = _per_position(ort_logits, pt_logits, real)
    if rows is not None:
        rows.append(d)
    return np.array([d["diff"].max(), d["kl"].sum(), d["match"].sum(), len(d["kl"])])


def _sig(x: float) -> float:
    """4 significant digits: enough for a plot, small in report.json."""
    return float(f"{x:.4g}")


def _log_hist(x: np.ndarray) -> dict:
    """A histogram over log-spaced bins (``HIST_BINS_PER_DECADE`` per decade) of ``x``'s positive
    values; zeros (exact agreement, or KL rounding below 0) and non-finite values counted apart.

    Returns:
        ``{"log10_lo", "bins_per_decade", "counts", "zeros", "nonfinite", "p50", "p99", "max"}``;
        bin ``i`` spans ``10 ** (log10_lo + [i, i + 1] / bins_per_decade)``.
    """
    finite = x[np.isfinite(x)]
    pos = finite[finite > 0]
    out = {"log10_lo": None, "bins_per_decade": HIST_BINS_PER_DECADE, "counts": [],
           "zeros": int((finite <= 0).sum()), "nonfinite": int(len(x) - len(finite)),
           "p50": None, "p99": None, "max": None}
    if len(finite):
        out.update(p50=_sig(np.quantile(finite, 0.5)), p99=_sig(np.quantile(finite, 0.99)),
                   max=_sig(finite.max()))
    if len(pos):
        k = HIST_BINS_PER_DECADE
        lo = int(np.floor(np.log10(pos.min()) * k))
        hi = max(int(np.ceil(np.log10(pos.max()) * k)), lo + 1)
        idx = np.clip(np.floor(np.log10(pos) * k).astype(int) - lo, 0, hi - lo - 1)
        out.update(log10_lo=lo / k, counts=np.bincount(idx, minlength=hi - lo).tolist())
    return out


def _by_position(pos: np.ndarray, diff: np.ndarray, kl: np.ndarray, match: np.ndarray) -> dict:
    """Means per token position (grouped into ranges of ``width`` when there are more than
    ``MAX_POSITION_BINS``): ``{"width", "position", "count", "top1", "mean_kl", "mean_abs_logits"}``."""
    width = max(1, int(np.ceil((pos.max() + 1) / MAX_POSITION_BINS))) if len(pos) else 1
    key = pos // width
    out = {"width": width, "position": [], "count": [], "top1": [], "mean_kl": [], "mean_abs_logits": []}
    for k in np.unique(key):
        sel = key == k
        out["position"].append(int(k * width))
        out["count"].append(int(sel.sum()))
        out["top1"].append(_sig(match[sel].mean()))
        out["mean_kl"].append(_sig(kl[sel].mean()))
        out["mean_abs_logits"].append(_sig(diff[sel].mean()))
    return out


def _distributions(rows: list[dict], pos: np.ndarray | None = None) -> dict:
    """Summaries of the :func:`_per_position` rows of one case for the report: histograms of
    |Δlogits| and KL, and for causal LMs (``pos``: each row's token position) per-position means."""
    diff = np.concatenate([r["diff"] for r in rows])
    kl = np.concatenate([r["kl"] for r in rows])
    out = {"abs_logits": _log_hist(diff), "kl": _log_hist(kl)}
    if pos is not None:
        match = np.concatenate([r["match"] for r in rows])
        out["by_position"] = _by_position(pos, diff, kl, match)
    return out


def _verdict(stats: list[np.ndarray], budget: Budget):
    """Merge per-batch ``_stats`` and judge them: ``(max diff, mean KL, top-1, failures)``."""
    s = np.stack(stats)
    diff, kl, top1 = float(s[:, 0].max()), float(s[:, 1].sum() / s[:, 3].sum()), float(s[:, 2].sum() / s[:, 3].sum())
    failures = []
    if not np.isfinite(diff):
        failures.append(f"max |Δlogits| is {diff}")
    elif budget.max_abs_logits is not None and not diff <= budget.max_abs_logits:
        failures.append(f"max |Δlogits| {diff:.3g} > {budget.max_abs_logits:g}")
    if not top1 >= budget.min_top1:
        failures.append(f"top-1 agreement {top1:.2%} < {budget.min_top1:.2%}")
    if not kl <= budget.max_kl:
        failures.append(f"mean KL {kl:.3g} > {budget.max_kl:g}")
    return diff, kl, top1, failures


def validate(artifact_dir: Path, reference: Path, prompts: list[str] | None = None,
             texts: list[str] | None = None, max_new_tokens: int = 32, budget: Budget | None = None,
             adapter_dirs: dict[str, Path] | None = None, report: Path | None = None,
             labelled: Path | None = None, limit: int | None = None, quiet: bool = False,
             choices: list | None = None) -> dict:
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
            both sides, and its texts are the inputs compared.
        limit: use at most this many rows of ``labelled``.
        quiet: no progress bar (over the cases, on stderr).
        choices: the cases to compare (adapter names, mixes, None for the base); default
            :func:`default_choices` (``edgepeft adapter add --validate``: the added adapter).

    Returns:
        The report dict; ``report["passed"]`` is False when any case breaks the budget. Written
        to ``report`` (JSON), and beside it as ``.md`` and ``.html``.
    """
    t0 = time.perf_counter()
    art = Model(artifact_dir)
    manifest = art.manifest
    if budget is None:
        budget = Budget(**manifest["budget"]) if manifest.get("budget") else BUDGETS[manifest["precision"]]
    dirs = {n: Path(e["source"]) for n, e in manifest["adapters"].items() if not e.get("mix_of")}
    dirs.update(adapter_dirs or {})
    for n, d in dirs.items():
        if not (d / "adapter_config.json").is_file():
            raise EdgepeftError(f"{d}: adapter {n!r}'s folder is not there (needed as the "
                                f"reference). Pass --adapter {n}=DIR.")
    if labelled is not None and art.task != "classification":
        raise EdgepeftError(f"--labels: {artifact_dir} is a {art.task} artifact; labelled accuracy is "
                            "for classifiers.")
    if texts is None and manifest.get("tokenizer"):
        texts = load_texts(DEFAULT_TEXTS)
    source = resolve_base(reference, quiet)  # a GGUF file: its dequantized folder in the cache
    ref = _Reference(source.folder, manifest, dirs, given=reference)
    if art.task == "classification":
        results = _validate_classifier(art, ref, prompts or texts, budget, labelled, limit, quiet, choices)
    else:
        results = _validate_causal(art, ref, prompts, texts or [], budget, max_new_tokens, quiet, choices)
    out = {"artifact": str(artifact_dir), "reference": str(reference), "task": art.task,
           "precision": manifest["precision"], "mode": manifest["mode"], "budget": asdict(budget),
           "graph_format": art.format, "providers": art.providers,
           "max_new_tokens": max_new_tokens if art.task == "causal-lm" else 0,
           "labelled": str(labelled) if labelled else None,
           "cases": [asdict(r) for r in results],
           "passed": all(not r.failures for r in results),
           "seconds": round(time.perf_counter() - t0, 2),
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    report = report or artifact_dir / "report.json"
    report.write_text(json.dumps(out, indent=2) + "\n")
    from edgepeft.validate.report import write_html, write_markdown

    write_markdown(out, report.with_suffix(".md"))
    write_html(out, report.with_suffix(".html"))
    return out


def _validate_causal(art: Model, ref: _Reference, prompts, texts, budget: Budget, max_new_tokens: int,
                     quiet: bool = True, choices: list | None = None):
    manifest = art.manifest
    if manifest.get("tokenizer"):
        prompt_rows = [art.tokenizer.encode(p).ids for p in (prompts or DEFAULT_PROMPTS)]
        text_rows = [art.tokenizer.encode(t).ids[:TEXT_TOKENS] for t in texts]
    elif prompts or texts:
        raise EdgepeftError(f"{art.path}: the artifact has no tokenizer, so text prompts cannot "
                            "be encoded. Leave out --prompts / --texts to use random token ids.")
    else:
        rng = np.random.default_rng(0)
        prompt_rows = [rng.integers(0, manifest["base"]["vocab_size"], n).tolist() for n in (5, 9, 12, 7)]
        text_rows = [rng.integers(0, manifest["base"]["vocab_size"], n).tolist() for n in (24, 17, 31, 20)]
    vocab = manifest["base"]["vocab_size"]
    ids, mask = batch_inputs(prompt_rows, vocab=vocab)
    rows = prompt_rows + text_rows  # teacher-forced agreement over every position of all of them
    batches = [batch_inputs(rows[i:i + BATCH], vocab=vocab) for i in range(0, len(rows), BATCH)]
    pos = np.concatenate([positions(m)[m.astype(bool)] for _, m in batches])  # of every compared row
    results = []
    choices = default_choices(art) if choices is None else choices
    per_row = per_row_choices(art, choices)
    mine = [per_row[b % len(per_row)] for b in range(BATCH)] if per_row else []  # row b's choice
    first = None  # the references of the first batch's rows, each its own choice's
    first_gen = np.zeros((ids.shape[0], max_new_tokens), np.int64) if per_row else None
    cases = bar(choices, desc="validate", unit="case", quiet=quiet)
    for choice in cases:
        cases.set_postfix_str(case_name(choice))
        torch_ref = ref.get(choice)
        rows_of_case: list[dict] = []
        stats = []
        for k, (i, m) in enumerate(batches):
            pt = torch_ref.logits(i, m)
            if k == 0 and per_row:
                keep = [b for b in range(i.shape[0]) if mine[b] == choice]
                first = np.zeros_like(pt) if first is None else first
                first[keep] = pt[keep]
            stats.append(_stats(art.logits(i, adapter=choice, attention_mask=m), pt, m.astype(bool), rows_of_case))
        gen = art.generate(ids, max_new_tokens, adapter=choice, attention_mask=mask,
                           stop_at_eos=False)[:, ids.shape[1]:]
        pt_gen = torch_ref.greedy(ids, mask, max_new_tokens)
        results.append(_causal_case(case_name(choice), stats, gen, pt_gen, budget, rows_of_case, pos))
        if per_row:
            keep = [b for b in range(ids.shape[0]) if mine[b % BATCH] == choice]
            first_gen[keep] = pt_gen[keep]
    cases.close()
    if per_row:  # the first batch and the prompts, row b on mine[b]: each against its choice's reference
        i, m = batches[0]
        rows_of_case = []
        stats = [_stats(art.logits(i, adapter=mine[:i.shape[0]], attention_mask=m), first, m.astype(bool),
                        rows_of_case)]
        gen = art.generate(ids, max_new_tokens, adapter=[mine[b % BATCH] for b in range(ids.shape[0])],
                           attention_mask=mask, stop_at_eos=False)[:, ids.shape[1]:]
        results.append(_causal_case("per-row(" + "|".join(case_name(c) for c in per_row) + ")", stats, gen,
                                    first_gen, budget, rows_of_case, pos[:int(m.sum())]))
    return results


def _causal_case(name: str, stats: list, gen: np.ndarray, pt_gen: np.ndarray, budget: Budget,
                 rows_of_case: list[dict], pos: np.ndarray) -> CaseResult:
    """One causal case's result: the per-position verdict of ``stats`` and the greedy comparison."""
    diff, kl, top1, failures = _verdict(stats, budget)
    mism = int((gen != pt_gen).sum())
    if budget.greedy_must_match and mism:
        failures.append(f"greedy generation differs at {mism}/{gen.size} tokens")
    return CaseResult(name, int(sum(s[3] for s in stats)), diff, kl, top1, int(gen.size), mism, tuple(failures),
                      distributions=_distributions(rows_of_case, pos))


def _validate_classifier(art: Model, ref: _Reference, prompts, budget: Budget, labelled, limit,
                         quiet: bool = True, choices: list | None = None):
    manifest = art.manifest
    labels = None
    if labelled is not None:
        texts, raw = read_labelled(labelled)
        texts, raw = (texts[:limit], raw[:limit]) if limit else (texts, raw)
        labels = _label_ids(raw, manifest, labelled)
    elif manifest.get("tokenizer") and prompts:
        texts = list(prompts)
    else:
        texts = None
    if texts is not None and not manifest.get("tokenizer"):
        raise EdgepeftError(f"{art.path}: the artifact has no tokenizer, so texts cannot be encoded.")
    reserved = max([e.get("virtual_tokens") or 0 for e in manifest["adapters"].values()
                    if PROMPT_INPUT in (e.get("inputs") or [])] + [0])  # room for a prompt's virtual tokens
    if texts is None:
        rng = np.random.default_rng(0)
        batches = [art._encode([rng.integers(5, manifest["base"]["vocab_size"], n).tolist()
                                for n in (5, 9, 12, 7)], None, reserved)]
    else:
        batches = [art._encode(texts[i:i + 32], None, reserved) for i in range(0, len(texts), 32)]
    results = []
    cases = bar(default_choices(art) if choices is None else choices, desc="validate", unit="case", quiet=quiet)
    for choice in cases:
        cases.set_postfix_str(case_name(choice))
        torch_ref = ref.get(choice)
        ort_logits = np.concatenate([art.classify_logits(i, adapter=choice, attention_mask=m)
                                     for i, m in batches])
        pt_logits = np.concatenate([torch_ref.classify_logits(i, m) for i, m in batches])
        real = np.ones(len(ort_logits), bool)
        rows_of_case: list[dict] = []
        diff, kl, top1, failures = _verdict([_stats(ort_logits, pt_logits, real, rows_of_case)], budget)
        acc = (None, None)
        if labels is not None:
            acc = (float((pt_logits.argmax(-1) == labels).mean()), float((ort_logits.argmax(-1) == labels).mean()))
            drop = 100 * (acc[0] - acc[1])
            if drop > budget.max_accuracy_drop:
                failures.append(f"accuracy drop {drop:.2f} points > {budget.max_accuracy_drop:g}")
        results.append(CaseResult(case_name(choice), len(ort_logits), diff, kl, top1, 0, 0,
                                  tuple(failures), *acc, distributions=_distributions(rows_of_case)))
    cases.close()
    return results


def format_report(result: dict) -> str:
    """A plain-text table of a :func:`validate` result, one row per case, failures spelled out."""
    acc = any(c.get("accuracy_torch") is not None for c in result["cases"])
    gen = result.get("task", "causal-lm") == "causal-lm"
    head = f"{'case':<36} {'max|Δlogits|':>12} {'mean KL':>10} {'top-1':>7}"
    head += f" {'greedy':>9}" if gen else ""
    head += f" {'acc torch':>9} {'acc onnx':>9}" if acc else ""
    lines = [head + "  verdict"]
    for c in result["cases"]:
        row = (f"{c['case'][:36]:<36} {c['max_abs_logits']:>12.2e} {c['mean_kl']:>10.2e} "
               f"{c['top1_agreement']:>7.2%}")
        if gen:
            row += f" {str(c['greedy_tokens'] - c['greedy_mismatches']) + '/' + str(c['greedy_tokens']):>9}"
        if acc:
            row += f" {c['accuracy_torch']:>9.2%} {c['accuracy_artifact']:>9.2%}"
        verdict = "ok" if not c["failures"] else "FAIL: " + "; ".join(c["failures"])
        lines.append(f"{row}  {verdict}")
    b = result["budget"]
    bound = "any" if b["max_abs_logits"] is None else f"{b['max_abs_logits']:g}"
    lines.append(f"budget ({result['precision']}): max|Δlogits| <= {bound}, "
                 f"top-1 >= {b['min_top1']:.0%}, KL <= {b['max_kl']:g}"
                 + (f", greedy identical: {b['greedy_must_match']}" if gen else "")
                 + f"  ->  {'PASSED' if result['passed'] else 'FAILED'}"
                 + (f" (.{result['graph_format']} graph)" if result.get("graph_format") else ""))
    return "\n".join(lines)
