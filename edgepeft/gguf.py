"""GGUF bases: a ``.gguf`` file wherever a Hugging Face model folder is accepted.

``edgepeft export``, ``validate --reference`` and ``train`` pass their base through
:func:`resolve_base`. A folder is used as it is. A GGUF file is dequantized to float32 once, by
transformers' GGUF loader (:func:`dequantize_gguf`), into ``<cache>/gguf/<sha256 of the file>/``: a
plain Hugging Face folder (``model.safetensors``, ``config.json``, ``generation_config.json``, the
tokenizer files), which every later step loads like any other base. The same file gives the same
folder, so adapters trained on it (their binding is the weight fingerprint of that folder) match an
export or a validation from the GGUF, and a second use of the file converts nothing.

The cache root is :func:`default_cache_dir` (``$EDGEPEFT_CACHE``, else ``~/.cache/edgepeft``); the demo
keeps its SmolLM2 folder there too, converted by the same :func:`dequantize_gguf`.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edgepeft.contract.names import sha256_file
from edgepeft.errors import EdgepeftError
from edgepeft.progress import log

GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file
GGUF_SUFFIX = ".gguf"
CACHE_SUBDIR = "gguf"  # <cache root>/gguf/<sha256>/: one dequantized folder per GGUF file
GGUF_PIP = 'pip install "edgepeft[gguf]"  (gguf==0.19.0 and accelerate==1.15.0)'
# What transformers' GGUF path raises for a file it cannot take (an unknown architecture, tensors
# that do not fit the config it rebuilt, a vocabulary it cannot turn into a tokenizer).
_LOAD_ERRORS = (ValueError, KeyError, IndexError, TypeError, OSError, RuntimeError, NotImplementedError,
                struct.error)


def default_cache_dir() -> Path:
    """Cache root: ``$EDGEPEFT_CACHE`` if set, else ``~/.cache/edgepeft``.

    Returns:
        The cache root (not created).
    """
    env = os.environ.get("EDGEPEFT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "edgepeft"


@dataclass(frozen=True)
class BaseSource:
    """Where a base model's weights come from.

    Attributes:
        folder: the Hugging Face model folder to load (for a GGUF: its dequantized copy in the cache).
        gguf: the GGUF file given (absolute), None for a folder.
        sha256: hex sha256 of the GGUF file, None for a folder.
    """

    folder: Path
    gguf: Path | None = None
    sha256: str | None = None

    def __post_init__(self):
        if (self.gguf is None) != (self.sha256 is None):
            raise ValueError("BaseSource: gguf and sha256 go together")

    def manifest(self) -> dict | None:
        """The manifest's ``base.gguf`` entry ``{"file", "sha256"}``, None for a folder."""
        return None if self.gguf is None else {"file": str(self.gguf), "sha256": self.sha256}


def is_gguf(path: Path) -> bool:
    """Whether ``path`` names a GGUF file rather than a model folder: any regular file, or a name
    ending in ``.gguf`` that is not a folder."""
    path = Path(path)
    return path.is_file() or (path.suffix.lower() == GGUF_SUFFIX and not path.is_dir())


def check_magic(path: Path) -> None:
    """Refuse what is not a GGUF file at all, by its first four bytes (cheap: before any hashing).

    Raises:
        EdgepeftError: missing, not a file, or not starting with ``GGUF``.
    """
    if not path.is_file():
        raise EdgepeftError(f"{path}: GGUF file not found. Pass a .gguf model file or a Hugging Face "
                            "model folder (config.json + weights).")
    with open(path, "rb") as f:
        head = f.read(len(GGUF_MAGIC))
    if head != GGUF_MAGIC:
        what = "it is empty" if not head else f"it begins with {head!r}, not {GGUF_MAGIC!r}"
        raise EdgepeftError(f"{path}: not a GGUF file ({what}). Pass a GGUF model file (as llama.cpp's "
                            "convert_hf_to_gguf.py writes it) or a Hugging Face model folder.")


def read_architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF file, after checking its header, tensor table and that
    every tensor's data lies inside the file (``gguf.GGUFReader``; the data itself is not read).

    Raises:
        EdgepeftError: the ``gguf`` package is missing, or the file is damaged or truncated.
    """
    check_magic(path)
    try:
        from gguf import GGUFReader
    except ImportError:
        raise EdgepeftError(f"{path}: reading a GGUF file needs the gguf package: {GGUF_PIP}.") from None
    damaged = (f"{path}: a damaged or truncated GGUF file ({{}}). Copy or download it again, or "
               "convert the model to GGUF again.")
    try:
        reader = GGUFReader(path)
        field = reader.get_field("general.architecture")
        arch = bytes(field.parts[field.data[0]]).decode("utf-8") if field is not None else None
        end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=reader.data_offset)
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, UnicodeDecodeError) as e:
        raise EdgepeftError(damaged.format(f"gguf cannot read it: {e}")) from None
    size = path.stat().st_size
    if end > size:
        raise EdgepeftError(damaged.format(f"its tensors end at byte {end:,}, the file has {size:,}"))
    if not arch:
        raise EdgepeftError(damaged.format("no general.architecture in its metadata"))
    return arch


def dequantize_gguf(gguf: Path, target: Path, quiet: bool = True) -> None:
    """Write ``target``: the Hugging Face folder of the GGUF file ``gguf``, dequantized to float32 by
    transformers' GGUF loader (weights, config, generation config, tokenizer files).

    The folder is written under a temporary name beside ``target`` and renamed into place, so it
    exists complete or not at all; when another process converted the same file meanwhile, its
    folder is kept. Unless ``quiet``, one progress line once the file is checked.

    Raises:
        EdgepeftError: not a GGUF file, a damaged or truncated one, missing packages, or one whose
            architecture (or vocabulary) transformers' GGUF loader does not know.
    """
    arch = read_architecture(gguf)
    try:
        import accelerate  # noqa: F401  transformers' gguf_file= loading needs it
    except ImportError:
        raise EdgepeftError(f"{gguf}: loading a GGUF file needs the accelerate package: {GGUF_PIP}.") from None
    log(f"dequantizing {gguf} ({arch}) to float32 into {target} (once)", quiet)
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # dequantize=True: plain float32 Linear layers even where the `kernels` package could keep
        # the weights in GGUF blocks (which save_pretrained could not write as a float folder)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                     quantization_config=GgufConfig(dequantize=True))
    except _LOAD_ERRORS as e:
        raise EdgepeftError(
            f"{gguf}: transformers {transformers.__version__} cannot load this GGUF file (architecture "
            f"{arch!r}: {type(e).__name__}: {e}). Use a GGUF of an architecture transformers' GGUF loader "
            "knows (e.g. llama, mistral, qwen2, qwen3, gemma3, phi3), or pass the model's Hugging Face "
            "folder instead.") from None
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)  # the saved folder is plain float32
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for f in tmp.iterdir():  # safetensors is written 0600
            os.chmod(f, 0o644)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a lost race: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def gguf_folder(gguf: Path, sha256: str, cache_dir: Path | None = None) -> Path:
    """The cache folder of the GGUF file with this hex ``sha256`` (it may not exist yet)."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / CACHE_SUBDIR / sha256


def resolve_base(path: Path, quiet: bool = True, cache_dir: Path | None = None) -> BaseSource:
    """The model folder to load for a base given as a folder or as a GGUF file.

    A GGUF file is hashed (sha256) and, unless its cache folder exists, dequantized into it
    (:func:`dequantize_gguf`; one progress line unless ``quiet``).

    Args:
        path: a Hugging Face model folder, or a GGUF file (see :func:`is_gguf`).
        quiet: no progress line.
        cache_dir: cache root; default :func:`default_cache_dir`.

    Returns:
        The :class:`BaseSource`: for a folder, the folder itself (not checked here: the loaders say
        what is missing).

    Raises:
        EdgepeftError: a GGUF file that is missing, not a GGUF, damaged or of an architecture
            transformers cannot load.
    """
    path = Path(path)
    if not is_gguf(path):
        return BaseSource(path)
    check_magic(path)
    digest = sha256_file(path)
    folder = gguf_folder(path, digest, cache_dir)
    if not (folder / "config.json").is_file():
        dequantize_gguf(path, folder, quiet)
    return BaseSource(folder, path.resolve(), digest)
