"""Helpers the benchmarks share: timing, medians, machine description."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

from edgepeft.bench.workers import median, timeit_us

REPO = Path(__file__).resolve().parent.parent
__all__ = ["REPO", "machine_info", "median", "random_lora", "spread", "spread_rows", "timeit_us", "write_result"]


def random_lora(base: Path, path: Path, r: int, seed: int) -> Path:
    """A random all-linear LoRA of rank ``r`` over ``base`` at ``path`` (kept if there), B scaled up
    so it visibly changes the output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if (path / "adapter_config.json").exists():
        return path
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear",
                                                  init_lora_weights=False, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.mul_(4.0)
    peft_model.save_pretrained(path)
    return path


def machine_info() -> dict:
    import importlib.metadata as md

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for d in ("torch", "transformers", "peft", "onnxruntime", "onnx", "numpy", "tokenizers", "edgepeft"):
        try:
            versions[d] = md.version(d)
        except md.PackageNotFoundError:
            versions[d] = None
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "edgepeft"],
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    mem = None
    try:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    return {"cpu_model": cpu, "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "mem_total_gb": mem, "platform": platform.platform(), "python": sys.version.split()[0],
            "versions": versions, "git_commit": commit, "edgepeft_tree_dirty": dirty,
            "loadavg_start": os.getloadavg()}


def spread(runs: dict[str, list[float]]) -> dict[str, dict]:
    """``{case: {median, min, max, all}}`` of each case's measurements (the rounds)."""
    import statistics

    return {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "all": v} for k, v in runs.items()}


def spread_rows(runs: dict[str, list[float]], digits: int = 1, extra=lambda case: "") -> list[str]:
    """Markdown table rows ``| case | median | min | max |`` (plus ``extra(case)`` cells)."""
    return [f"| {k} | {d['median']:.{digits}f} | {d['min']:.{digits}f} | {d['max']:.{digits}f} |{extra(k)}"
            for k, d in spread(runs).items()]


def write_result(stem: str, result: dict, lines: list[str]) -> None:
    """``docs/bench/{stem}.json`` (the numbers) and ``.md`` (the table ``lines``), and print the table."""
    import json

    out = REPO / "docs" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
