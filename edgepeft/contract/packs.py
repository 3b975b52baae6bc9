"""Adapter packs: one adapter of an artifact as one file for over-the-air delivery, optionally signed.

A pack is a safetensors file (the format the JS runtime already reads): its tensors are the
adapter's arrays as the artifact stores them, and its metadata holds two strings:

- ``pack``: JSON text with ``format``, ``format_version``, ``name``, ``version`` (an integer; a
  device refuses a pack older than the one it runs), ``entry`` (the adapter's manifest entry, file
  fields left out), ``base_fingerprint``, ``slot_schema`` (:func:`slot_schema` of the graph it was
  packed from), ``arrays`` (``{name: [dtype, shape, sha256 of the bytes]}``) and ``created``.
- ``signature`` (optional): ``{"key": key id, "sig": base64 Ed25519 signature of the UTF-8 bytes of
  the ``pack`` text}``. The ``pack`` text is signed exactly as stored, so no JSON canonical form
  is needed on any platform; it names every array's checksum, so the signature covers the arrays.

Keys (``edgepeft keygen``): the private key as PKCS#8 PEM, the public key as one line
``ed25519:BASE64`` of its 32 raw bytes (what WebCrypto's ``importKey("raw")`` takes). A key id is
``sha256:`` + the first 16 hex digits of the sha256 of those 32 bytes.

Signing and verifying use ``cryptography`` (imported when used).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from pathlib import Path

from edgepeft.errors import EdgepeftError

PACK_FORMAT = "edgepeft-adapter-pack"
PACK_VERSION = 1
PACK_SUFFIX = ".edgepeft-pack"
MAX_PACK_BYTES = 2 << 30
KEY_PREFIX = "ed25519:"


# ---------------------------------------------------------------- the graph a pack fits
def slot_schema(manifest: dict) -> str:
    """``sha256:...`` of what an adapter file must fit: the graph's layout, task, adapter inputs
    (name, shape with None for ranks, mix rule, shared default), per-row inputs, KV-cache geometry
    and fixed shapes. Two artifacts with the same schema take the same adapter files."""
    graph = manifest.get("graph") or {}
    schema = {"task": manifest["task"], "layout": graph.get("layout"),
              "inputs": {k: [v.get("shape"), v.get("mix"), v.get("default")]
                         for k, v in sorted((manifest.get("inputs") or {}).items())},
              "row_values": manifest.get("row_values") or {}, "kv_cache": manifest.get("kv_cache"),
              "static": manifest.get("static"), "max_rank": (manifest.get("target") or {}).get("max_rank")}
    text = json.dumps(schema, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def array_digest(array) -> list:
    """``[dtype, shape, sha256]`` of one array as stored (little-endian, C order)."""
    a = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return [str(a.dtype), list(a.shape), hashlib.sha256(a.tobytes(order="C")).hexdigest()]


# ---------------------------------------------------------------- keys
def key_id(raw: bytes) -> str:
    return "sha256:" + hashlib.sha256(raw).hexdigest()[:16]


def generate_key(out: Path) -> tuple[Path, str]:
    """Write a new Ed25519 private key to ``out`` (PEM, mode 0600) and its public key to
    ``out.pub``; returns ``(public key file, key id)``.

    Raises:
        EdgepeftError: ``out`` exists (a key is never overwritten).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    pub_file = Path(f"{out}.pub")
    for p in (out, pub_file):
        if p.exists():
            raise EdgepeftError(f"{p}: already exists; a key is never overwritten. Choose another --out.")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    pub_file.write_text(KEY_PREFIX + base64.b64encode(raw).decode() + "\n")
    return pub_file, key_id(raw)


def public_key(value: str | Path) -> bytes:
    """The 32 raw bytes of a public key given as ``ed25519:BASE64`` or a file holding that line.

    Raises:
        EdgepeftError: neither.
    """
    text = str(value).strip()
    if not text.startswith(KEY_PREFIX):
        path = Path(text)
        if not path.is_file():
            raise EdgepeftError(f"trusted key {text[:60]!r}: neither 'ed25519:BASE64' nor a public key file "
                                "(edgepeft keygen writes KEY.pub).")
        text = path.read_text(encoding="utf-8").strip()
    try:
        raw = base64.b64decode(text[len(KEY_PREFIX):], validate=True) if text.startswith(KEY_PREFIX) else b""
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise EdgepeftError(f"trusted key {str(value)[:60]!r}: not an Ed25519 public key (expected "
                            "'ed25519:' and 32 bytes in base64, as edgepeft keygen writes to KEY.pub).")
    return raw


def _private_key(path: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if not path.is_file():
        raise EdgepeftError(f"--sign {path}: no such key file (edgepeft keygen --out {path} makes one).")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise EdgepeftError(f"--sign {path}: not an unencrypted PEM private key ({e}).") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise EdgepeftError(f"--sign {path}: not an Ed25519 key (edgepeft keygen makes one).")
    return key


# ---------------------------------------------------------------- writing
def write_pack(arrays: dict, out: Path, *, name: str, version: int, entry: dict, manifest: dict,
               sign: Path | None = None) -> dict:
    """Write one adapter's pack to ``out`` (atomically: a temporary file renamed); returns its
    ``pack`` header (a dict).

    Args:
        arrays: the adapter's arrays as the artifact stores them.
        name: the adapter's name.
        version: the pack's version (an integer >= 1).
        entry: its manifest entry (file fields are dropped).
        manifest: the artifact's manifest (base fingerprint, slot schema).
        sign: an Ed25519 private key file (PEM) to sign with.
    """
    import numpy as np
    from safetensors.numpy import save_file

    if type(version) is not int or version < 1:
        raise EdgepeftError(f"--version {version!r}: a pack's version is an integer from 1 up.")
    header = {"format": PACK_FORMAT, "format_version": PACK_VERSION, "name": name, "version": version,
              "entry": {k: v for k, v in entry.items() if k not in ("file", "sha256", "safetensors")},
              "base_fingerprint": manifest["base"]["fingerprint"], "slot_schema": slot_schema(manifest),
              "arrays": {k: array_digest(v) for k, v in sorted(arrays.items())},
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    text = json.dumps(header, indent=None, separators=(",", ":"))
    metadata = {"format": PACK_FORMAT, "pack": text}
    if sign is not None:
        key = _private_key(Path(sign))
        from cryptography.hazmat.primitives import serialization

        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        metadata["signature"] = json.dumps({"key": key_id(raw),
                                            "sig": base64.b64encode(key.sign(text.encode())).decode()})
    tmp = out.with_name(f".{out.name}.tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp), metadata=metadata)
    tmp.chmod(0o644)  # safetensors writes 0600; a pack is meant to be published
    tmp.replace(out)
    return header


# ---------------------------------------------------------------- reading
def read_pack(path: Path, *, manifest: dict, trusted: list[bytes] | None, revoked: set[str]) -> tuple[dict, dict]:
    """Read and check a pack against an artifact's ``manifest``; ``(header, arrays)``.

    Checks, in order: the file is a pack; its signature, when ``trusted`` keys are pinned (a
    missing signature, a key not pinned or ``revoked`` (key ids), a signature that does not
    verify); the base fingerprint; the slot schema; every array's dtype, shape and sha256 against
    the header (so nothing can be swapped under a valid signature).

    Raises:
        EdgepeftError: naming the file and the check that failed.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise EdgepeftError(f"{path}: no such adapter pack.")
    if path.stat().st_size > MAX_PACK_BYTES:
        raise EdgepeftError(f"{path}: larger than {MAX_PACK_BYTES >> 30} GB; not an adapter pack.")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError for any malformed file
        raise EdgepeftError(f"{path}: not a readable adapter pack ({str(e)[:200]}).") from None
    if meta.get("format") != PACK_FORMAT or "pack" not in meta:
        raise EdgepeftError(f"{path}: not an edgepeft adapter pack (make one with `edgepeft adapter pack`).")
    text = meta["pack"]
    try:
        header = json.loads(text)
    except json.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or header.get("format") != PACK_FORMAT:
        raise EdgepeftError(f"{path}: its pack header is damaged. Download the pack again.")
    if header.get("format_version") != PACK_VERSION:
        raise EdgepeftError(f"{path}: pack format_version {header.get('format_version')!r}; this edgepeft "
                            f"reads {PACK_VERSION}. Use the matching edgepeft version.")
    for field, kind in (("name", str), ("version", int), ("entry", dict), ("arrays", dict),
                        ("base_fingerprint", str), ("slot_schema", str)):
        if type(header.get(field)) is not kind:
            raise EdgepeftError(f"{path}: pack header field {field!r} missing or not a {kind.__name__}.")
    if trusted is not None:
        _check_signature(path, meta.get("signature"), text, trusted, revoked)
    if header["base_fingerprint"] != manifest["base"]["fingerprint"]:
        raise EdgepeftError(f"{path}: packed for base {header['base_fingerprint'][:23]}..., this artifact's base "
                            f"is {manifest['base']['fingerprint'][:23]}.... Pack the adapter from an artifact of "
                            "this base.")
    if header["slot_schema"] != slot_schema(manifest):
        raise EdgepeftError(f"{path}: packed for another graph (slot schema {header['slot_schema'][:23]}..., this "
                            f"artifact's is {slot_schema(manifest)[:23]}...): its slots, layout or shapes differ. "
                            "Pack the adapter from an artifact exported like this one.")
    if sorted(arrays) != sorted(header["arrays"]):
        raise EdgepeftError(f"{path}: its arrays are not the ones its header lists; the file was altered.")
    for k, v in arrays.items():
        if array_digest(v) != header["arrays"][k]:
            raise EdgepeftError(f"{path}: array {k!r} does not match its sha256 in the header; the file was "
                                "altered or damaged. Download the pack again.")
    return header, arrays


def _check_signature(path: Path, signature: str | None, text: str, trusted: list[bytes], revoked: set[str]) -> None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if signature is None:
        raise EdgepeftError(f"{path}: not signed, and this model accepts only packs signed by a trusted key. "
                            "Sign it with `edgepeft adapter pack ... --sign KEY`.")
    try:
        sig = json.loads(signature)
        kid, raw_sig = sig["key"], base64.b64decode(sig["sig"], validate=True)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise EdgepeftError(f"{path}: its signature field is damaged. Download the pack again.") from None
    if kid in revoked:
        raise EdgepeftError(f"{path}: signed by key {kid}, which is revoked.")
    keys = {key_id(k): k for k in trusted}
    if kid not in keys:
        raise EdgepeftError(f"{path}: signed by key {kid}, which is not among the trusted keys "
                            f"({', '.join(keys) or 'none'}).")
    try:
        Ed25519PublicKey.from_public_bytes(keys[kid]).verify(raw_sig, text.encode())
    except InvalidSignature:
        raise EdgepeftError(f"{path}: the signature does not verify with key {kid}: the pack was altered "
                            "after signing, or signed by another key.") from None
