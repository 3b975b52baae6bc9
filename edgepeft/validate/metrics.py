"""The numbers validate compares: logit agreement per position, its summaries for the report, the
budget verdict, and task scores of generated text (exact match, token F1).

Pure numpy on arrays both sides computed; nothing here runs a model.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from edgepeft.quantize.budgets import Budget

HIST_BINS_PER_DECADE = 8  # log-spaced histogram bins of |Δlogits| and KL in the report
MAX_POSITION_BINS = 128  # more distinct token positions than this are grouped into equal ranges


def kl_rows(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(p || q) per row of logits ``(N, V)`` -> ``(N,)``, in float64."""
    p = p_logits.astype(np.float64)
    q = q_logits.astype(np.float64)
    lp = p - p.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    lq = q - q.max(-1, keepdims=True)
    lq -= np.log(np.exp(lq).sum(-1, keepdims=True))
    return (np.exp(lp) * (lp - lq)).sum(-1)


def per_position(ort_logits: np.ndarray, pt_logits: np.ndarray, real: np.ndarray) -> dict[str, np.ndarray]:
    """At each real position: max |Δlogits| over the vocabulary (or classes), KL(torch || artifact)
    and whether the argmaxes agree, each ``(N,)``."""
    o, p = ort_logits[real], pt_logits[real]
    return {"diff": np.abs(o - p).max(-1), "kl": kl_rows(p, o), "match": o.argmax(-1) == p.argmax(-1)}


def stats(ort_logits: np.ndarray, pt_logits: np.ndarray, real: np.ndarray,
          rows: list | None = None) -> np.ndarray:
    """Per batch: ``[max |Δlogits|, sum of KL, top-1 agreements, positions]`` over real positions.

    ``rows``: when given, the batch's :func:`per_position` arrays are appended to it.
    """
    d = per_position(ort_logits, pt_logits, real)
    if rows is not None:
        rows.append(d)
    return np.array([d["diff"].max(), d["kl"].sum(), d["match"].sum(), len(d["kl"])])


def sig(x: float) -> float:
    """4 significant digits: enough for a plot, small in report.json."""
    return float(f"{x:.4g}")


def log_hist(x: np.ndarray) -> dict:
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
        out.update(p50=sig(np.quantile(finite, 0.5)), p99=sig(np.quantile(finite, 0.99)),
                   max=sig(finite.max()))
    if len(pos):
        k = HIST_BINS_PER_DECADE
        lo = int(np.floor(np.log10(pos.min()) * k))
        hi = max(int(np.ceil(np.log10(pos.max()) * k)), lo + 1)
        idx = np.clip(np.floor(np.log10(pos) * k).astype(int) - lo, 0, hi - lo - 1)
        out.update(log10_lo=lo / k, counts=np.bincount(idx, minlength=hi - lo).tolist())
    return out


def by_position(pos: np.ndarray, diff: np.ndarray, kl: np.ndarray, match: np.ndarray) -> dict:
    """Means per token position (grouped into ranges of ``width`` when there are more than
    ``MAX_POSITION_BINS``): ``{"width", "position", "count", "top1", "mean_kl", "mean_abs_logits"}``."""
    width = max(1, int(np.ceil((pos.max() + 1) / MAX_POSITION_BINS))) if len(pos) else 1
    key = pos // width
    out = {"width": width, "position": [], "count": [], "top1": [], "mean_kl": [], "mean_abs_logits": []}
    for k in np.unique(key):
        sel = key == k
        out["position"].append(int(k * width))
        out["count"].append(int(sel.sum()))
        out["top1"].append(sig(match[sel].mean()))
        out["mean_kl"].append(sig(kl[sel].mean()))
        out["mean_abs_logits"].append(sig(diff[sel].mean()))
    return out


def distributions(rows: list[dict], pos: np.ndarray | None = None) -> dict:
    """Summaries of the :func:`per_position` rows of one case for the report: histograms of
    |Δlogits| and KL, and for causal LMs (``pos``: each row's token position) per-position means."""
    diff = np.concatenate([r["diff"] for r in rows])
    kl = np.concatenate([r["kl"] for r in rows])
    out = {"abs_logits": log_hist(diff), "kl": log_hist(kl)}
    if pos is not None:
        match = np.concatenate([r["match"] for r in rows])
        out["by_position"] = by_position(pos, diff, kl, match)
    return out


def verdict(batches: list[np.ndarray], budget: Budget):
    """Merge per-batch :func:`stats` and judge them: ``(max diff, mean KL, top-1, failures)``."""
    s = np.stack(batches)
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


def token_f1(predicted: list[int], target: list[int]) -> float:
    """SQuAD-style F1 of two token multisets: 1.0 when both are empty, 0.0 when one is."""
    if not predicted or not target:
        return float(predicted == target)
    common = sum((Counter(predicted) & Counter(target)).values())
    if not common:
        return 0.0
    p, r = common / len(predicted), common / len(target)
    return 2 * p * r / (p + r)


def task_scores(completions: list[str], targets: list[str], encode) -> tuple[float, float]:
    """``(exact match, mean token F1)`` of generated texts against their targets, both in [0, 1].

    Texts are compared after stripping surrounding whitespace; ``encode(text) -> list[int]`` gives
    the tokens F1 counts (the artifact's tokenizer, no special tokens).
    """
    exact = [c.strip() == t.strip() for c, t in zip(completions, targets)]
    f1 = [token_f1(encode(c.strip()), encode(t.strip())) for c, t in zip(completions, targets)]
    return float(np.mean(exact)), float(np.mean(f1))


def drop_failures(what: str, torch_score: float, artifact_score: float, budget: Budget) -> list[str]:
    """The budget's allowed drop of a task score (accuracy, exact match, F1), in points."""
    drop = 100 * (torch_score - artifact_score)
    return [f"{what} drop {drop:.2f} points > {budget.max_accuracy_drop:g}"] if drop > budget.max_accuracy_drop else []
