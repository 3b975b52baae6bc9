"""Which install this is: the runtime (``pip install edgepeft``: onnxruntime, onnx, numpy,
tokenizers) or the toolchain too (``edgepeft[export]``). Commands that make artifacts, or check
them against PyTorch, refuse the runtime install with the one line that installs the toolchain.
"""

from __future__ import annotations

from edgepeft.errors import EdgepeftError

TOOLCHAIN_PIP = 'pip install torch==2.13.0 && pip install "edgepeft[export]"'
TOOLCHAIN_MODULES = ("torch", "transformers", "peft", "onnxscript", "safetensors", "matplotlib")
NEEDS_TOOLCHAIN = ("export", "validate", "train", "demo")


def missing_toolchain() -> list[str]:
    """The toolchain's packages this environment lacks (none: ``edgepeft[export]`` is installed)."""
    import importlib.util

    return [m for m in TOOLCHAIN_MODULES if importlib.util.find_spec(m) is None]


def require_toolchain(what: str) -> None:
    """Refuse ``what`` in a runtime-only install, with the one line to install the toolchain.

    Raises:
        EdgepeftError: some toolchain package is missing.
    """
    missing = missing_toolchain()
    if missing:
        raise EdgepeftError(f"{what} needs the edgepeft toolchain ({', '.join(missing)} not installed; this is "
                            f"the runtime-only install). Install it with: {TOOLCHAIN_PIP}")
