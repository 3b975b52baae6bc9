"""Text sets shared by the stages: calibration texts for static int8 (export) and the texts
``edgepeft validate`` compares on. A set is a file, or the name of one packaged in
``edgepeft/calibration/`` (package data, so a wheel carries them)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from edgepeft.errors import EdgepeftError

CALIBRATION_DIR = Path(str(resources.files("edgepeft") / "calibration"))


def load_texts(source: str | None, default: str = "default", option: str = "--calibration") -> list[str]:
    """Texts of a text set: a .txt (one per line, ``#`` lines skipped) or .jsonl (``{"text"}``)
    file, or the name of a set packaged in ``edgepeft/calibration/``.

    Args:
        source: a file path or a set name; None: the ``default`` set.
        default: the set used when ``source`` is None.
        option: the CLI option named in errors.

    Raises:
        EdgepeftError: the file or set does not exist, or holds no text.
    """
    path = Path(source) if source else CALIBRATION_DIR / f"{default}.txt"
    if source and not path.is_file():
        named = CALIBRATION_DIR / f"{source}.txt"
        if not named.is_file():
            sets = sorted(p.stem for p in CALIBRATION_DIR.glob("*.txt")) if CALIBRATION_DIR.is_dir() else []
            raise EdgepeftError(f"{option} {source}: no such file, nor a packaged set "
                                f"(sets: {', '.join(sets) or 'none'}). Pass a .txt (one text per line) "
                                "or .jsonl ({\"text\": ...}) file.")
        path = named
    if not path.is_file():
        raise EdgepeftError(f"{path}: the built-in text set {default!r} is missing; pass {option} FILE.")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(lines, 1):
            if line.strip():
                try:
                    texts.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise EdgepeftError(f"{path}:{i}: expected {{\"text\": ...}}.") from None
    else:
        texts = [t for t in lines if t.strip() and not t.startswith("#")]
    if not texts:
        raise EdgepeftError(f"{path}: no texts in it.")
    return texts
