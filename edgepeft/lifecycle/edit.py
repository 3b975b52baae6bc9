"""Changing the adapters of an existing artifact in place: one edit at a time (a lock file), the
files first and the manifest last, replaced atomically. numpy only (the runtime install).

A reader (an app's ``Model``, ``verify``) sees the old manifest or the new one, never half of one:
an added adapter's files are complete and synced before the manifest that names them replaces the
old one; a removed adapter's files go only after the manifest that no longer names them.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from edgepeft.contract import MANIFEST_NAME, check_adapter_name, inside, read_manifest
from edgepeft.contract.names import sync_dir
from edgepeft.errors import EdgepeftError

try:
    import fcntl
except ImportError:  # not POSIX: edits are not serialized against each other
    fcntl = None

LOCK_NAME = ".edgepeft-edit.lock"


@contextlib.contextmanager
def editing(root: Path) -> Iterator[dict]:
    """Hold the artifact's edit lock and yield its manifest, read under the lock.

    Raises:
        EdgepeftError: not an artifact, or another edit holds the lock.
    """
    read_manifest(root)  # a readable error for a wrong path before the lock file is made
    fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise EdgepeftError(f"{root}: another `edgepeft adapter` command is changing this artifact; "
                                    "run this one when it has finished.") from None
        yield read_manifest(root)  # as it is now that no other edit runs
    finally:
        os.close(fd)


def write_manifest_atomic(root: Path, manifest: dict) -> None:
    """Replace ``root/manifest.json`` by ``manifest``: written to a temporary file beside it,
    synced, renamed over it, the directory synced."""
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", suffix=".tmp", dir=root)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(manifest, indent=2) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, root / MANIFEST_NAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    sync_dir(root)


@contextlib.contextmanager
def new_adapter_files(root: Path, name: str, arrays: dict, manifest: dict, where: str) -> Iterator[dict]:
    """Write adapter ``name``'s files (``adapters/NAME.onnx_adapter`` and its safetensors twin, at the
    artifact's adapter precision, tagged with its base) and fsync them; yield their manifest fields.
    No manifest names them yet: if the block fails, they are removed again."""
    from edgepeft.contract.adapter_files import write_adapter_files

    path = root / "adapters" / f"{name}.onnx_adapter"
    try:
        files = write_adapter_files(arrays, path, manifest["adapter_precision"], manifest["base"]["fingerprint"])
        for f in adapter_files(root, files, where):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        sync_dir(root / "adapters")
        yield files
    except BaseException:
        for f in (path, path.with_suffix(".safetensors")):
            f.unlink(missing_ok=True)
        raise


def side_artifact(root: Path, manifest: dict, what: str) -> None:
    """Refuse a merged artifact: its adapters are graphs, made by an export.

    Raises:
        EdgepeftError: ``manifest`` is of a merged artifact.
    """
    if manifest["mode"] != "side":
        raise EdgepeftError(f"{root}: a merged artifact (one graph per adapter); {what} works on side-branch "
                            "artifacts, whose adapters are files. Export the adapter with `edgepeft export "
                            "--mode merged` instead.")


def new_name(root: Path, manifest: dict, name: str, where: str) -> str:
    """``name``, checked as a file name and not taken.

    Raises:
        EdgepeftError: a name that is not allowed (path separators, ``..``) or already in use.
    """
    check_adapter_name(name, where)
    if name in manifest["adapters"]:
        raise EdgepeftError(f"{where}: {root} already has an adapter named {name!r}. Remove it first "
                            f"(edgepeft adapter remove {root} {name}) or choose another name.")
    return name


def adapter_files(root: Path, entry: dict, where: str) -> list[Path]:
    """The files of one adapter entry (its ``.onnx_adapter`` and safetensors twin), inside ``root``."""
    rels = [entry.get("file"), (entry.get("safetensors") or {}).get("file")]
    return [inside(root, rel, where) for rel in rels if rel]


def remove_adapter(root: Path, name: str) -> dict:
    """``edgepeft adapter remove``: drop ``name`` from the manifest, then delete its files.

    Returns:
        The new manifest.

    Raises:
        EdgepeftError: a merged artifact, or no adapter of that name.
    """
    with editing(root) as manifest:
        side_artifact(root, manifest, "edgepeft adapter remove")
        if name not in manifest["adapters"]:
            raise EdgepeftError(f"{root}: no adapter named {name!r}; it has: "
                                f"{', '.join(manifest['adapters']) or '(none)'}.")
        files = adapter_files(root, manifest["adapters"][name], f"adapter {name!r} of {root / MANIFEST_NAME}")
        manifest = {**manifest, "adapters": {k: v for k, v in manifest["adapters"].items() if k != name}}
        write_manifest_atomic(root, manifest)
        for f in files:
            f.unlink(missing_ok=True)
        sync_dir(root / "adapters")
    return manifest


def list_lines(root: Path) -> list[str]:
    """``edgepeft adapter list``: one line per adapter (name, kind, ranks, layers, size), then the
    graph's reserved slots."""
    manifest = read_manifest(root)
    lines = []
    for name, e in manifest["adapters"].items():
        size = sum(f.stat().st_size for f in adapter_files(root, e, name) if f.is_file()) if "file" in e else 0
        ranks = e.get("ranks")
        lines.append(f"{name}\t{e.get('kind', '?')}"
                     + (f"\tranks {'/'.join(map(str, ranks))}" if ranks else "")
                     + (f"\t{len(e['targets'])} layers" if e.get("targets") else "")
                     + (f"\tmix of {', '.join(f'{k}:{w:g}' for k, w in e['mix_of'].items())}" if e.get("mix_of") else "")
                     + (f"\t{size / 1e6:.2f} MB" if size else "")
                     + ("\tadded" if e.get("added") else ""))
    if not lines:
        lines.append("(no adapters)")
    reserved = manifest.get("reserved")
    lines.append(f"slots: {len(manifest.get('slots', []))} adapted layers"
                 + (f" (reserved at export: --slots {reserved})" if reserved else ""))
    return lines


def pack_adapter(root: Path, name: str, out: Path, version: int = 1, sign: Path | None = None) -> dict:
    """``edgepeft adapter pack``: one adapter of ``root`` as a pack file (``edgepeft.contract.packs``).

    Returns:
        The pack's header.

    Raises:
        EdgepeftError: a merged artifact, no such adapter, a damaged adapter file, a bad key.
    """
    from edgepeft.contract.adapter_files import read_checked_adapter
    from edgepeft.contract.packs import PACK_SUFFIX, write_pack

    manifest = read_manifest(root)
    side_artifact(root, manifest, "edgepeft adapter pack")
    if name not in manifest["adapters"]:
        raise EdgepeftError(f"{root}: no adapter named {name!r}; it has: {', '.join(manifest['adapters']) or '(none)'}.")
    if not out.name.endswith(PACK_SUFFIX):
        raise EdgepeftError(f"--out {out}: a pack's file name ends with {PACK_SUFFIX} (runtimes tell packs by it).")
    entry = manifest["adapters"][name]
    _, _, arrays = read_checked_adapter(root, name, entry, manifest["base"]["fingerprint"])
    return write_pack(arrays, out, name=name, version=version, entry=entry, manifest=manifest, sign=sign)


def parse_mix(spec: str) -> tuple[str, dict[str, float]]:
    """``NAME=a:0.7,b:0.3`` as ``(NAME, {a: 0.7, b: 0.3})``.

    Raises:
        EdgepeftError: another form, a weight that is not a number, a name twice.
    """
    name, sep, rest = spec.partition("=")
    weights: dict[str, float] = {}
    for part in rest.split(",") if sep else ():
        member, colon, w = part.partition(":")
        try:
            weight = float(w)
        except ValueError:
            colon = ""
        if not colon or not member.strip() or member.strip() in weights:
            weights = {}
            break
        weights[member.strip()] = weight
    if not name.strip() or len(weights) < 1:
        raise EdgepeftError(f"adapter mix {spec!r}: expected NAME=ADAPTER:WEIGHT[,ADAPTER:WEIGHT...], each adapter "
                            "once, e.g. support=chat:0.7,sql:0.3.")
    return name.strip(), weights


def mix_adapter(root: Path, spec: str) -> dict:
    """``edgepeft adapter mix``: a weighted mix of the artifact's adapters written as one more
    adapter file (the manifest's mix rules, as a call with ``adapter={a: 0.7, b: 0.3}`` combines
    them, so the new adapter computes exactly that mix). Its entry records ``mix_of``.

    Returns:
        The new entry.

    Raises:
        EdgepeftError: a merged artifact, a taken name, an unknown adapter, adapters of different
            kinds, a mix the rules refuse (two IA3 scales, ...), ranks that add up above max_rank.
    """
    import numpy as np

    from edgepeft.contract import prefix_names
    from edgepeft.contract.adapter_files import read_checked_adapter
    from edgepeft.runtime.adapters import Adapter
    from edgepeft.runtime.mix import combine

    name, weights = parse_mix(spec)
    where = f"adapter mix {spec}"
    with editing(root) as manifest:
        side_artifact(root, manifest, "edgepeft adapter mix")
        new_name(root, manifest, name, where)
        entries, fp = manifest["adapters"], manifest["base"]["fingerprint"]
        unknown = [n for n in weights if n not in entries]
        if unknown:
            raise EdgepeftError(f"{where}: {root} has no adapter {unknown[0]!r}; it has: {', '.join(entries) or '(none)'}.")
        kinds = sorted({entries[n]["kind"] for n in weights})
        if len(kinds) > 1:
            raise EdgepeftError(f"{where}: adapters of different kinds ({', '.join(kinds)}) make no one adapter of a "
                                "kind; combine them per call (adapter={...}) instead.")
        loaded = {}
        for n in weights:
            _, _, arrays = read_checked_adapter(root, n, entries[n], fp)
            arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
            layers = len((manifest.get("kv_cache") or {}).get("kv_heads", []))
            prefix = [(arrays[prefix_names(i)[0]], arrays[prefix_names(i)[1]]) for i in range(layers)
                      if prefix_names(i)[0] in arrays]
            loaded[n] = Adapter(entries[n], {k: v for k, v in arrays.items() if k in manifest["inputs"]}, prefix or None)
        feeds, prefix = combine(tuple(sorted(weights.items())), loaded, manifest["inputs"], root / MANIFEST_NAME)
        max_rank = (manifest.get("target") or {}).get("max_rank")
        for k, v in feeds.items():
            axis = {"cat0": 0, "cat0w": 0, "cat1": 1, "cat1w": 1}.get(manifest["inputs"][k]["mix"])
            if max_rank is not None and axis is not None and v.shape[axis] > max_rank:
                raise EdgepeftError(f"{where}: the mix's ranks add up to {v.shape[axis]} on {k}, above max_rank "
                                    f"{max_rank} of target {manifest['target']['name']!r}. Mix fewer adapters.")
        arrays = dict(feeds)
        for i, (k, v) in enumerate(prefix or []):
            arrays[prefix_names(i)[0]], arrays[prefix_names(i)[1]] = k, v
        defaults = sorted({d for n in weights for d in entries[n].get("defaults", []) if d not in feeds})
        with new_adapter_files(root, name, arrays, manifest, where) as files:
            with_prefix = next((entries[n]["prefix"] for n in weights if entries[n].get("prefix")), None)
            entry = {"kind": kinds[0], "summary": "mix of " + " + ".join(f"{n} x{w:g}" for n, w in weights.items()),
                     "mix_of": weights, "targets": sorted({t for n in weights for t in entries[n].get("targets", [])}),
                     "head": sorted({h for n in weights for h in entries[n].get("head", [])}), **files,
                     "base_fingerprint": fp, "inputs": sorted(feeds), **({"defaults": defaults} if defaults else {}),
                     "prefix": with_prefix, "source": None,
                     "sources": {n: entries[n].get("source") for n in weights},
                     "added": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            write_manifest_atomic(root, {**manifest, "adapters": {**entries, name: entry}})
    return entry
