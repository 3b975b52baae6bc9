"""``bench.png``: the bench result in four panels (matplotlib, Agg canvas, no display)."""

from __future__ import annotations

from pathlib import Path

COLORS = {"edgepeft-side": "#1f6feb", "edgepeft-merged": "#8250df", "torch": "#d1242f"}


def _bars(ax, labels, values, colors, title, unit, errors=None, fmt="{:.1f}"):
    ys = range(len(labels))
    vals = [v if v is not None else 0 for v in values]
    bars = ax.barh(list(ys), vals, color=colors, height=0.6,
                   xerr=errors if errors and any(e is not None for e in errors[1]) else None,
                   error_kw={"ecolor": "#333", "capsize": 2, "lw": 0.8})
    ax.bar_label(bars, labels=[fmt.format(v) if v is not None else "-" for v in values], padding=3, fontsize=7)
    ax.set_yticks(list(ys), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(unit, fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    hi = max([v for v in vals] + [e for e in (errors[1] if errors else []) if e] + [0])
    ax.set_xlim(0, hi * 1.25 + 1e-9)


def _figure(result: dict):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    s = list(result["summary"].values())
    labels = [f"{v['system'].replace('edgepeft-', '')}: {v['case'][:30]}" for v in s]
    colors = [COLORS.get(v["system"], "#888") for v in s]
    fig = Figure(figsize=(12, 3.2 + 0.55 * len(s)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    c = result["config"]
    fig.suptitle(f"edgepeft bench: {Path(result['artifact']).name} ({result['task']}, {result['mode']}, "
                 f"{result['precision']}, {c['threads']} thread{'s' if c['threads'] != 1 else ''}, medians of {c['repeats']})", fontsize=11)
    if result["task"] == "causal-lm":
        _bars(axes[0][0], labels, [v["decode_tok_s"] for v in s], colors,
              f"decode tokens/s (batch 1, {c['new_tokens']} tokens; higher is better)", "tokens/s")
        p50 = [v["prefill_ms_p50"] for v in s]
        p95 = [v["prefill_ms_p95"] for v in s]
        err = [[0] * len(s), [(b - a) if a is not None and b is not None else None for a, b in zip(p50, p95)]]
        _bars(axes[0][1], labels, p50, colors, f"prefill latency, {c['prompt_tokens']}-token prompt "
              "(bar p50, whisker p95)", "ms", errors=[err[0], [e or 0 for e in err[1]]])
    else:
        bs = c["batch_sizes"]
        for ax, b in zip(axes[0], (bs[0], bs[-1])):
            p50 = [v[f"batch{b}_ms_p50"] for v in s]
            p95 = [v[f"batch{b}_ms_p95"] for v in s]
            _bars(ax, labels, p50, colors, f"latency, batch {b} (bar p50, whisker p95; lower is better)", "ms",
                  errors=[[0] * len(s), [(y - x) if x is not None and y is not None else 0 for x, y in zip(p50, p95)]],
                  fmt="{:.2f}")
    _bars(axes[1][0], labels, [v["peak_rss_mb"] for v in s], colors, "peak RSS of the process", "MB", fmt="{:.0f}")
    ax = axes[1][1]
    rows = _swap_ms(result)
    if rows:
        ax.barh(range(len(rows)), [v for _, v in rows], color=[_color(k) for k, _ in rows], height=0.6)
        ax.set_xscale("log")
        ax.set_yticks(range(len(rows)), [k for k, _ in rows], fontsize=7)
        ax.invert_yaxis()
        for i, (_, v) in enumerate(rows):
            ax.text(v * 1.15, i, _human(v), va="center", fontsize=7)
        lo, hi = min(v for _, v in rows), max(v for _, v in rows)
        ax.set_xlim(lo / 3, hi * 12)
    else:
        ax.text(0.5, 0.5, "no swap measured", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("adapter swap latency (median, log scale)", fontsize=9)
    ax.set_xlabel("ms", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    return fig


def _color(label: str) -> str:
    return COLORS["torch"] if label.startswith("torch") else COLORS["edgepeft-merged"] if label.startswith(
        "merged") else COLORS["edgepeft-side"]


def _human(ms: float) -> str:
    return f"{ms * 1e3:.1f} µs" if ms < 1 else f"{ms:.1f} ms"


def _swap_ms(result: dict) -> list[tuple[str, float]]:
    sw = result["swap"]
    side, mg, th = sw.get("swap-side") or {}, sw.get("swap-merged") or {}, sw.get("swap-torch") or {}
    rows = []
    if "feeds_alternating_us" in side:
        rows.append(("side: switch adapter (feeds)", side["feeds_alternating_us"] / 1e3))
    if "mix_uncached_us" in side:
        rows.append(("side: build a new mix", side["mix_uncached_us"] / 1e3))
    if "session_create_ms" in mg:
        rows.append(("merged: new session per adapter", mg["session_create_ms"]))
    if "set_adapter_alternating_us" in th:
        rows.append(("torch: set_adapter", th["set_adapter_alternating_us"] / 1e3))
    loads = [v["load_adapter_ms"] for v in (th.get("memory_per_adapter") or {}).values()]
    if loads:
        rows.append(("torch: load_adapter from disk", sorted(loads)[len(loads) // 2]))
    return [(k, v) for k, v in rows if v and v > 0]


def write_png(result: dict, path: Path) -> None:
    import matplotlib

    with matplotlib.rc_context({"axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
                                "grid.alpha": 0.3, "axes.grid.axis": "x"}):
        _figure(result).savefig(path, format="png")
