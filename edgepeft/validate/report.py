"""``report.md`` and a self-contained ``report.html`` of a :func:`edgepeft.validate.validate` result.

Both have a header (artifact, reference, precision, budget, date), a summary table, and per case
(adapter, mix, composition, base) a verdict line per budget bound: the measured number, the bound,
PASS or FAIL. The HTML adds one figure per case, a PNG embedded as a base64 data URI (no other
files): the distribution of max |Δlogits| per position, and for causal LMs top-1 agreement and
mean KL by token position; for classifiers the KL per text and, with labelled data, the accuracy of
torch and artifact. matplotlib draws them with the Agg canvas (no display, no global backend).
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

TORCH, ARTIFACT, BOUND, DATA = "#4C72B0", "#DD8452", "#C44E52", "#4C72B0"
STYLE = {"font.size": 9.5, "axes.titlesize": 10, "axes.labelsize": 9.5, "xtick.labelsize": 8.5,
         "ytick.labelsize": 8.5, "legend.fontsize": 8.5, "axes.spines.top": False,
         "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3, "grid.linewidth": 0.6,
         "font.family": "DejaVu Sans"}


def bounds(result: dict, case: dict) -> list[tuple[str, str, str, bool | None]]:
    """The budget checks of one case: ``(what, measured, bound, ok)``; ``ok`` is None for a
    measurement the budget does not bound. Same comparisons as ``edgepeft.validate._verdict``."""
    b = result["budget"]
    rows = []
    diff = case["max_abs_logits"]
    finite = math.isfinite(diff)
    if b["max_abs_logits"] is None:
        rows.append(("max |Δlogits|", f"{diff:.3g}", "no bound", None if finite else False))
    else:
        rows.append(("max |Δlogits|", f"{diff:.3g}", f"≤ {b['max_abs_logits']:g}",
                     finite and diff <= b["max_abs_logits"]))
    top1 = case["top1_agreement"]
    rows.append(("top-1 agreement", f"{top1:.2%}", f"≥ {b['min_top1']:.2%}", top1 >= b["min_top1"]))
    kl = case["mean_kl"]
    rows.append(("mean KL(torch ‖ artifact)", f"{kl:.3g}", f"≤ {b['max_kl']:g}", kl <= b["max_kl"]))
    if result.get("task", "causal-lm") == "causal-lm" and case["greedy_tokens"]:
        same = case["greedy_tokens"] - case["greedy_mismatches"]
        must = b["greedy_must_match"]
        rows.append(("greedy tokens identical", f"{same}/{case['greedy_tokens']}",
                     "all" if must else "not required", case["greedy_mismatches"] == 0 if must else None))
    scores = [("accuracy_torch", "accuracy_artifact", _acc_name(result))]
    scores.append(("f1_torch", "f1_artifact", "token F1"))
    for t, a, what in scores:
        if case.get(t) is not None:
            drop = 100 * (case[t] - case[a])
            rows.append((f"{what} drop", f"{drop:.2f} points (torch {case[t]:.2%}, artifact {case[a]:.2%}"
                         + (f", {case['task_rows']} rows)" if case.get("task_rows") else ")"),
                         f"≤ {b['max_accuracy_drop']:g} points", drop <= b["max_accuracy_drop"]))
    return rows


def _acc_name(result: dict) -> str:
    """What ``accuracy_*`` measures: classifiers' accuracy, causal LMs' exact match."""
    return "exact match" if result.get("task", "causal-lm") == "causal-lm" else "accuracy"


def _mark(ok: bool | None) -> str:
    return {True: "PASS", False: "FAIL", None: "info"}[ok]


def _budget_text(result: dict) -> str:
    b = result["budget"]
    parts = [f"max |Δlogits| ≤ {b['max_abs_logits']:g}" if b["max_abs_logits"] is not None else "max |Δlogits| unbounded",
             f"top-1 ≥ {b['min_top1']:.2%}", f"mean KL ≤ {b['max_kl']:g}"]
    if result.get("task", "causal-lm") == "causal-lm":
        parts.append("greedy identical" if b["greedy_must_match"] else "greedy may differ")
    if result.get("labelled"):
        what = "exact match and token F1" if result.get("task", "causal-lm") == "causal-lm" else "accuracy"
        parts.append(f"{what} drop ≤ {b['max_accuracy_drop']:g} points")
    return ", ".join(parts)


def _header(result: dict) -> list[tuple[str, str]]:
    rows = [("artifact", result["artifact"]), ("reference", result["reference"]),
            ("task", result.get("task", "causal-lm")),
            ("precision", f"{result['precision']} ({result.get('mode', 'side')} mode)"),
            ("budget", _budget_text(result))]
    if result.get("labelled"):
        rows.append(("labelled data", result["labelled"]))
    if result.get("ray"):
        rows.append(("ran on", f"Ray ({result['ray']['address']}): {result['ray']['summary']}"))
    if result.get("date"):
        rows.append(("date", f"{result['date']} ({result.get('seconds', 0):.1f} s)"))
    else:  # one artifact of several: its cases' time
        rows.append(("time", f"{result.get('seconds', 0):.1f} s of cases"))
    return rows


def _summary_cells(result: dict, case: dict) -> list[str]:
    cells = [case["case"], str(case["positions"]), f"{case['max_abs_logits']:.2e}", f"{case['mean_kl']:.2e}",
             f"{case['top1_agreement']:.2%}"]
    if result.get("task", "causal-lm") == "causal-lm":
        cells.append(f"{case['greedy_tokens'] - case['greedy_mismatches']}/{case['greedy_tokens']}")
    if any(c.get("accuracy_torch") is not None for c in result["cases"]):
        cells.append(f"{case['accuracy_torch']:.2%} / {case['accuracy_artifact']:.2%}"
                     if case.get("accuracy_torch") is not None else "—")
    if any(c.get("f1_torch") is not None for c in result["cases"]):
        cells.append(f"{case['f1_torch']:.2%} / {case['f1_artifact']:.2%}" if case.get("f1_torch") is not None else "—")
    cells.append("PASS" if not case["failures"] else "FAIL")
    return cells


def _summary_head(result: dict) -> list[str]:
    causal = result.get("task", "causal-lm") == "causal-lm"
    head = ["case", "positions" if causal else "texts", "max |Δlogits|", "mean KL", "top-1"]
    if causal:
        head.append("greedy")
    if any(c.get("accuracy_torch") is not None for c in result["cases"]):
        head.append(f"{_acc_name(result)} torch / artifact")
    if any(c.get("f1_torch") is not None for c in result["cases"]):
        head.append("token F1 torch / artifact")
    return head + ["verdict"]


def write_markdown(result: dict, path: Path) -> Path:
    """Write ``path`` (Markdown): header, summary table, per case a verdict line per bound. Several
    artifacts: one summary of every artifact and case, then each artifact's part."""
    verdict = "PASSED" if result["passed"] else "FAILED"
    out = [f"# edgepeft validate: {verdict}", ""]
    if "artifacts" in result:
        out += [f"- **{k}**: {_md(v)}" for k, v in _many_header(result)]
        out += ["", "## Summary", "", "| artifact | case | verdict |", "|---|---|---|"]
        for name, r in zip(_names(result), result["artifacts"]):
            out += [f"| {_md(name)} | {_md(c['case'])} | {'PASS' if not c['failures'] else 'FAIL'} |"
                    for c in r["cases"]]
        out.append("")
        for name, r in zip(_names(result), result["artifacts"]):
            out += [f"## {_md(name)}: {'PASSED' if r['passed'] else 'FAILED'}", ""] + _markdown_part(r, "###")
    else:
        out += _markdown_part(result, "##")
    path.write_text("\n".join(out), encoding="utf-8")
    return path


def _many_header(result: dict) -> list[tuple[str, str]]:
    rows = [("reference", result["reference"]), ("artifacts", ", ".join(r["artifact"] for r in result["artifacts"]))]
    if result.get("ray"):
        rows.append(("ran on", f"Ray ({result['ray']['address']}): {result['ray']['summary']}"))
    rows.append(("date", f"{result.get('date', '?')} ({result.get('seconds', 0):.1f} s)"))
    return rows


def _names(result: dict) -> list[str]:
    from edgepeft.validate import _label

    return _label([r["artifact"] for r in result["artifacts"]])


def _markdown_part(result: dict, h: str) -> list[str]:
    """One artifact's header, summary table and cases, under headings of level ``h``."""
    out = [f"- **{k}**: {_md(v)}" for k, v in _header(result)]
    head = _summary_head(result)
    out += ["", f"{h} Summary", "", "| " + " | ".join(_md(x) for x in head) + " |", "|" + "---|" * len(head)]
    for c in result["cases"]:
        cells = _summary_cells(result, c)
        cells = cells[:len(head) - 1] + ["—"] * (len(head) - len(cells)) + cells[-1:]
        out.append("| " + " | ".join(_md(x) for x in cells) + " |")
    out += ["", "Plots: report.html beside this file.", ""]
    for c in result["cases"]:
        out += [f"{h} {_md(c['case'])}: {'PASS' if not c['failures'] else 'FAIL'}", ""]
        for what, value, bound, ok in bounds(result, c):
            out.append(f"- {_mark(ok)}: {what} {_md(value)} (bound: {bound})")
        for f in c["failures"]:
            out.append(f"- failure: {_md(f)}")
        d = (c.get("distributions") or {}).get("abs_logits")
        if d and d.get("p50") is not None:
            out.append(f"- |Δlogits| per {'position' if result.get('task', 'causal-lm') == 'causal-lm' else 'text'}"
                       f" (max over {'vocabulary' if result.get('task', 'causal-lm') == 'causal-lm' else 'classes'}):"
                       f" median {d['p50']:.3g}, 99th percentile {d['p99']:.3g}, max {d['max']:.3g}")
        out.append("")
    return out


def _md(text: str) -> str:
    return str(text).replace("|", "\\|")


def _hist(ax, h: dict, bound: float | None, what: str, unit_of: str) -> None:
    """A histogram stored by ``edgepeft.validate._log_hist`` on a log x axis."""
    import numpy as np

    counts = h.get("counts") or []
    if counts:
        edges = 10 ** (h["log10_lo"] + np.arange(len(counts) + 1) / h["bins_per_decade"])
        ax.stairs(counts, edges, fill=True, color=DATA, alpha=0.85)
        ax.set_xscale("log")
        lo, hi = math.log10(edges[0]), math.log10(edges[-1])
        if bound is not None:
            ax.axvline(bound, color=BOUND, ls="--", lw=1.2, label=f"bound {bound:g}")
            lo, hi = min(lo, math.log10(bound)), max(hi, math.log10(bound))
        if hi - lo < 1:  # at least a decade in view, so there is a 10^k label
            lo, hi = math.floor(lo), max(math.ceil(hi), math.floor(lo) + 1)
        pad = 0.05 * (hi - lo)  # the bound and the outer bins off the frame
        ax.set_xlim(10.0 ** (lo - pad), 10.0 ** (hi + pad))
        from matplotlib.ticker import LogLocator, NullFormatter

        ax.xaxis.set_major_locator(LogLocator(base=10, numticks=8))
        ax.xaxis.set_minor_formatter(NullFormatter())
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    notes = []
    if h.get("zeros"):
        notes.append(f"{h['zeros']} exactly 0 (not shown)")
    if h.get("nonfinite"):
        notes.append(f"{h['nonfinite']} not finite (not shown)")
    if not counts and not notes:
        notes.append("no data")
    for note in notes:  # as legend entries: "best" keeps them off the bars and the bound
        ax.plot([], [], " ", label=note)
    if notes or (counts and bound is not None):
        if counts:
            ax.set_ylim(0, max(counts) * (1.1 + 0.12 * (len(notes) + (bound is not None))))  # legend room
        ax.legend(loc="best", frameon=False)
    ax.set_xlabel(what)
    ax.set_ylabel(unit_of)


def _figure(result: dict, case: dict):
    """The case's figure: 2-3 small panels side by side (see the module docstring)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    causal = result.get("task", "causal-lm") == "causal-lm"
    d = case.get("distributions") or {}
    b = result["budget"]
    acc = case.get("accuracy_torch") is not None
    panels = (4 if causal and acc else 3) if causal or acc else 2
    fig = Figure(figsize=(3.7 * panels, 3.1), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    verdict = "PASS" if not case["failures"] else "FAIL"
    fig.suptitle(f"{case['case']}: {verdict}", fontsize=11, fontweight="bold",
                 color="#1a7f37" if verdict == "PASS" else "#c62828")
    unit = "positions" if causal else "texts"
    _hist(axes[0], d.get("abs_logits") or {}, b["max_abs_logits"], "|Δlogits| (logit units, log scale)",
          unit)
    axes[0].set_title(f"max |Δlogits| per {'position' if causal else 'text'} "
                      f"(over {'vocabulary' if causal else 'classes'})")
    if causal:
        pos = d.get("by_position") or {}
        x = pos.get("position") or []
        width = pos.get("width", 1)
        marker = dict(marker="o", ms=2.5) if len(x) <= 64 else {}
        axes[1].axhline(100 * b["min_top1"], color=BOUND, ls="--", lw=1.2, label=f"bound ≥ {b['min_top1']:.0%}")
        axes[1].plot(x, [100 * v for v in pos.get("top1", [])], color=DATA, lw=1.4, **marker, label="measured")
        lo = min([100 * v for v in pos.get("top1", [])] + [100 * b["min_top1"]])
        axes[1].set_ylim(max(0, lo - max(2, (100 - lo) * 0.15)), 100 + max(0.5, (100 - lo) * 0.08))
        axes[1].set_title("top-1 agreement by token position")
        axes[1].set_ylabel("agreement (%)")
        axes[1].legend(loc="best", frameon=False)
        kl = pos.get("mean_kl", [])
        shown = [(p, v) for p, v in zip(x, kl) if v > 0]
        if b["max_kl"] > 0:  # a zero bound has no place on a log axis
            axes[2].axhline(b["max_kl"], color=BOUND, ls="--", lw=1.2, label=f"bound on the mean {b['max_kl']:g}")
        if shown:
            axes[2].plot(*zip(*shown), color=DATA, lw=1.4, **marker, label="measured")
            axes[2].set_yscale("log")
            vals = [v for _, v in shown] + ([b["max_kl"]] if b["max_kl"] > 0 else [])
            lo, hi = (math.log10(f(vals)) for f in (min, max))
            span = max(hi - lo, 1)
            axes[2].set_ylim(10 ** (lo - 0.08 * span), 10 ** (hi + 0.4 * span))  # bound in view, legend above
        else:
            axes[2].plot(x, kl, color=DATA, lw=1.4, label="measured")
        axes[2].set_title("mean KL(torch ‖ artifact) by token position")
        axes[2].set_ylabel("KL (nats, log scale)" if shown else "KL (nats)")
        axes[2].legend(loc="upper right", frameon=False)
        for ax in axes[1:3]:
            ax.set_xlabel("token position" + (f" (groups of {width})" if width > 1 else ""))
        if acc:  # task scores of the labelled prompts
            import numpy as np

            x = np.arange(2)
            t = [100 * case["accuracy_torch"], 100 * case["f1_torch"]]
            a = [100 * case["accuracy_artifact"], 100 * case["f1_artifact"]]
            for off, vals, color, label in ((-0.18, t, TORCH, "torch"), (0.18, a, ARTIFACT, "artifact")):
                bars = axes[3].bar(x + off, vals, width=0.34, color=color, label=label)
                axes[3].bar_label(bars, labels=[f"{v:.1f}" for v in vals], padding=2, fontsize=8)
            axes[3].set_xticks(x, ["exact match", "token F1"])
            axes[3].set_ylim(0, 118)
            axes[3].set_ylabel("%")
            axes[3].set_title(f"task scores ({case.get('task_rows')} labelled prompts)")
            axes[3].legend(loc="upper right", frameon=False, ncols=2)
            axes[3].grid(axis="x", visible=False)
    else:
        _hist(axes[1], d.get("kl") or {}, None, "KL (nats, log scale)", "texts")
        axes[1].set_title("KL(torch ‖ artifact) per text")
        if acc:
            vals = [100 * case["accuracy_torch"], 100 * case["accuracy_artifact"]]
            bars = axes[2].bar(["torch", "artifact"], vals, color=[TORCH, ARTIFACT], width=0.55)
            axes[2].bar_label(bars, labels=[f"{v:.1f}%" for v in vals], padding=2, fontsize=9)
            axes[2].set_ylim(0, 112)
            axes[2].set_ylabel("accuracy (%)")
            axes[2].set_title("accuracy on the labelled texts")
            axes[2].grid(axis="x", visible=False)
    return fig


def figure_png(result: dict, case: dict) -> bytes:
    """The case's figure as PNG bytes."""
    import matplotlib

    with matplotlib.rc_context(STYLE):
        fig = _figure(result, case)
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    return buf.getvalue()


PASS_C, FAIL_C = "#1a7f37", "#c62828"


def _overview(result: dict):
    """All cases in one figure, one row per case: the |Δlogits| distribution as a ridgeline (log x,
    with the bound), top-1 agreement and mean KL as bars against their bounds, and with labelled
    data the accuracy of both sides. The per-case figures below give the detail."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cases = result["cases"]
    causal = result.get("task", "causal-lm") == "causal-lm"
    b = result["budget"]
    acc = any(c.get("accuracy_torch") is not None for c in cases)
    n = len(cases)
    panels = 4 if acc else 3
    fig = Figure(figsize=(3.9 * panels if acc else 12.5, 1.1 + 0.42 * max(n, 2)), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False, gridspec_kw={"width_ratios": [1.5] + [1] * (panels - 1)})[0]
    ys = np.arange(n)
    colors = [PASS_C if not c["failures"] else FAIL_C for c in cases]
    labels = [c["case"] if len(c["case"]) <= 36 else c["case"][:35] + "…" for c in cases]

    ax = axes[0]  # ridgeline of each case's |Δlogits| histogram
    lo = hi = None
    for i, c in enumerate(cases):
        h = (c.get("distributions") or {}).get("abs_logits") or {}
        counts = h.get("counts") or []
        if not counts:
            continue
        edges = 10 ** (h["log10_lo"] + np.arange(len(counts) + 1) / h["bins_per_decade"])
        top = max(counts) or 1
        ax.stairs(i - 0.42 * np.asarray(counts) / top, edges, baseline=i, fill=True, color=colors[i], alpha=0.55)
        if h.get("p50") is not None and h["p50"] > 0:
            ax.plot([h["p50"]], [i], "|", color="#222", ms=9, mew=1.5)
        lo = edges[0] if lo is None else min(lo, edges[0])
        hi = edges[-1] if hi is None else max(hi, edges[-1])
    if b["max_abs_logits"] is not None:
        ax.axvline(b["max_abs_logits"], color=BOUND, ls="--", lw=1.2, label=f"bound {b['max_abs_logits']:g}")
        lo = b["max_abs_logits"] if lo is None else min(lo, b["max_abs_logits"])
        hi = b["max_abs_logits"] if hi is None else max(hi, b["max_abs_logits"])
    if lo is not None:
        ax.set_xscale("log")
        ax.set_xlim(lo / 1.6, hi * 1.6)
    ax.plot([], [], "|", color="#222", ms=9, mew=1.5, label="median")
    ax.legend(loc="lower right", frameon=True, framealpha=0.85, fontsize=7.5)
    ax.set_title(f"|Δlogits| per {'position' if causal else 'text'}: distribution", fontsize=9.5)
    ax.set_xlabel("logit units, log scale")

    top1 = [100 * c["top1_agreement"] for c in cases]
    ax = axes[1]
    floor = min(top1 + [100 * b["min_top1"]])
    left = max(0.0, floor - max(1.0, (100 - floor) * 0.6))
    ax.barh(ys, [t - left for t in top1], left=left, color=colors, height=0.55)
    for i, t in enumerate(top1):
        ax.text(left + (100 - left) * 0.02, i, f"{t:.2f}%", va="center", fontsize=8, color="white", fontweight="bold")
    ax.axvline(100 * b["min_top1"], color=BOUND, ls="--", lw=1.2, label=f"bound ≥ {b['min_top1']:.0%}")
    ax.set_xlim(left, 100 + (100 - left) * 0.02)
    ax.set_title("top-1 agreement", fontsize=9.5)
    ax.set_xlabel("%")
    ax.legend(loc="lower right", frameon=True, framealpha=0.85, fontsize=7.5)

    ax = axes[2]
    kls = [c["mean_kl"] for c in cases]
    shown = [k for k in kls if k > 0] + ([b["max_kl"]] if b["max_kl"] > 0 else [])
    floor = min(shown) / 10 if shown else 1e-12
    ax.barh(ys, [max(k, floor) - floor for k in kls], left=floor, color=colors, height=0.55)
    for i, k in enumerate(kls):
        ax.text(max(k, floor) * 1.3, i, f"{k:.2g}", va="center", fontsize=8)
    if b["max_kl"] > 0:
        ax.axvline(b["max_kl"], color=BOUND, ls="--", lw=1.2, label=f"bound {b['max_kl']:g}")
        ax.legend(loc="lower right", frameon=True, framealpha=0.85, fontsize=7.5)
    ax.set_xscale("log")
    ax.set_xlim(floor, max(shown + [floor * 10]) * 30)
    ax.set_title("mean KL(torch ‖ artifact)", fontsize=9.5)
    ax.set_xlabel("nats, log scale")

    if acc:
        ax = axes[3]
        scored = [c.get("accuracy_torch") is not None for c in cases]
        t = [100 * (c.get("accuracy_torch") or 0) for c in cases]
        a = [100 * (c.get("accuracy_artifact") or 0) for c in cases]
        ax.barh(ys - 0.15, t, height=0.3, color=TORCH, label="torch")
        ax.barh(ys + 0.15, a, height=0.3, color=ARTIFACT, label="artifact")
        for i, (x, y) in enumerate(zip(t, a)):
            ax.text(max(x, y) + 1, i, f"{x:.1f} / {y:.1f}" if scored[i] else "not scored", va="center", fontsize=8,
                    color="#222" if scored[i] else "#888")
        ax.set_xlim(0, 125)
        ax.set_title(f"{_acc_name(result)}: torch / artifact", fontsize=9.5)
        ax.set_xlabel("%")
        ax.legend(loc="lower right", frameon=True, framealpha=0.85, fontsize=7.5)
    for k, ax in enumerate(axes):
        ax.set_ylim(n - 0.5, -0.6)
        ax.set_yticks(ys, labels if k == 0 else [""] * n)
        ax.grid(axis="y", visible=False)
    for tick, col in zip(axes[0].get_yticklabels(), colors):
        tick.set_color(col)
        tick.set_fontweight("bold")
    return fig


def overview_png(result: dict) -> bytes:
    """The all-cases figure as PNG bytes."""
    import matplotlib

    with matplotlib.rc_context(STYLE):
        fig = _overview(result)
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    return buf.getvalue()


CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;color:#222;max-width:1180px;
margin:24px auto;padding:0 16px;line-height:1.4}
h1{font-size:22px;margin-bottom:8px}h2{font-size:17px;margin:28px 0 8px}
table{border-collapse:collapse;font-size:13.5px;margin:6px 0}
td,th{border-bottom:1px solid #ddd;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
table.meta td:first-child{color:#666;width:120px}
.PASS,.PASSED{color:#1a7f37;font-weight:600}.FAIL,.FAILED{color:#c62828;font-weight:600}.info{color:#666}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:13px;margin-left:8px;color:#fff}
.badge.PASS{background:#1a7f37}.badge.FAIL{background:#c62828}
ul.fail{color:#c62828;font-size:13.5px;margin:4px 0}
img{max-width:100%;height:auto;display:block;margin-top:8px}
section{border-top:1px solid #e5e5e5}p.note{color:#555;font-size:13px;margin:2px 0}
"""


def write_html(result: dict, path: Path) -> Path:
    """Write ``path``: the Markdown content plus one embedded PNG figure per case, one file.
    Several artifacts: a summary of every artifact and case, then each artifact's part."""
    e = html.escape
    verdict = "PASSED" if result["passed"] else "FAILED"
    what = ", ".join(r["artifact"] for r in result["artifacts"]) if "artifacts" in result else result["artifact"]
    out = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>edgepeft validate: {verdict}: {e(what)}</title>",
           f"<style>{CSS}</style></head><body>",
           f'<h1>edgepeft validate: <span class="{verdict}">{verdict}</span></h1>']
    if "artifacts" in result:
        out.append('<table class="meta">')
        out += [f"<tr><td>{e(k)}</td><td>{e(str(v))}</td></tr>" for k, v in _many_header(result)]
        out.append("</table><h2>Summary</h2><table><tr><th>artifact</th><th>case</th><th>verdict</th></tr>")
        for name, r in zip(_names(result), result["artifacts"]):
            for c in r["cases"]:
                v = "PASS" if not c["failures"] else "FAIL"
                out.append(f'<tr><td>{e(name)}</td><td>{e(c["case"])}</td><td class="{v}">{v}</td></tr>')
        out.append("</table>")
        for name, r in zip(_names(result), result["artifacts"]):
            v = "PASSED" if r["passed"] else "FAILED"
            out.append(f'<h2 style="font-size:20px;margin-top:40px">{e(name)}: <span class="{v}">{v}</span></h2>')
            out += _html_part(r)
    else:
        out += _html_part(result)
    out.append("</body></html>")
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return path


def _html_part(result: dict) -> list[str]:
    """One artifact's header, summary table, overview figure and per-case sections."""
    e = html.escape
    out = ['<table class="meta">']
    out += [f"<tr><td>{e(k)}</td><td>{e(str(v))}</td></tr>" for k, v in _header(result)]
    out.append("</table><h2>Summary</h2><table><tr>"
               + "".join(f"<th>{e(h)}</th>" for h in _summary_head(result)) + "</tr>")
    ncols = len(_summary_head(result))
    for c in result["cases"]:
        cells = _summary_cells(result, c)
        cells = cells[:ncols - 1] + ["—"] * (ncols - len(cells)) + cells[-1:]
        out.append("<tr>" + "".join(f'<td class="num">{e(x)}</td>' for x in cells[:-1])
                   .replace('<td class="num">', "<td>", 1)
                   + f'<td class="{cells[-1]}">{cells[-1]}</td></tr>')
    out.append("</table>")
    if result["cases"]:
        png = base64.b64encode(overview_png(result)).decode("ascii")
        out.append('<h2>At a glance</h2><p class="note">One row per case (green: passes its budget, red: '
                   "breaks it); dashed red lines are the budget's bounds. Per-case detail below.</p>"
                   f'<img alt="all cases: distributions and agreement" src="data:image/png;base64,{png}">')
    for c in result["cases"]:
        v = "PASS" if not c["failures"] else "FAIL"
        out.append(f'<section><h2>{e(c["case"])}<span class="badge {v}">{v}</span></h2>')
        out.append("<table><tr><th>bound</th><th>measured</th><th>budget</th><th>verdict</th></tr>")
        for what, value, bound, ok in bounds(result, c):
            m = _mark(ok)
            out.append(f"<tr><td>{e(what)}</td><td>{e(value)}</td><td>{e(bound)}</td>"
                       f'<td class="{m}">{m}</td></tr>')
        out.append("</table>")
        if c["failures"]:
            out.append('<ul class="fail">' + "".join(f"<li>{e(f)}</li>" for f in c["failures"]) + "</ul>")
        png = base64.b64encode(figure_png(result, c)).decode("ascii")
        out.append(f'<img alt="{e(c["case"])}: distributions" src="data:image/png;base64,{png}"></section>')
    return out
