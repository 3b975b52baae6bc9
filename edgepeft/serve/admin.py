"""The admin routes of ``edgepeft serve --admin-key KEY``: adapter packs in and out of a running
server, without a restart.

- ``GET /admin/adapters``: the loaded adapters, each with its version (0: from the artifact)
  and where it came from.
- ``POST /admin/adapters``: the body is a pack file (``edgepeft adapter pack``; Content-Type
  ``application/octet-stream``, at most ``max_pack_bytes``). It is written to a temporary file
  and loaded by ``Model.add_adapter``, which checks it (base fingerprint, slot schema, checksums,
  the signature against the server's ``--trusted-key`` and ``--revoked`` keys, a version newer
  than the loaded one). A new version of a loaded adapter replaces it.
- ``DELETE /admin/adapters/{name}``: unload an adapter.

Requests in flight keep their adapters: a change to an adapter waits until the requests
received before it that use the adapter have finished (:meth:`Engine.change`), and answers
then. Requests that name a removed adapter after its ``DELETE`` arrived get a 404; requests
that name a replaced adapter while it is being replaced wait for the new version. One change
runs at a time. Every refusal is a 4xx with OpenAI's error body; the adapters are then as before.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import threading
from pathlib import Path

from fastapi import APIRouter, Request

from edgepeft.contract.packs import PACK_FORMAT, PACK_SUFFIX, read_pack
from edgepeft.errors import EdgepeftError
from edgepeft.serve.app import ApiError
from edgepeft.serve.engine import Engine

UPLOAD = "the uploaded pack"  # how messages name the temporary file


def admin_routes(model, engine: Engine | None, base: str, withdrawn: set[str], max_bytes: int) -> APIRouter:
    """The /admin routes over ``model`` (``engine``: its decode loop; None for classifiers, whose
    calls each take the adapters once). ``base``: the base model's id, which no adapter may take;
    ``withdrawn``: the names being removed, shared with the /v1 routes, which refuse them."""
    router = APIRouter()
    one_at_a_time = threading.Lock()  # changes of a classifier (the engine orders its own)

    def describe(name: str, entry: dict) -> dict:
        pack = entry.get("pack")
        return {"id": name, "object": "adapter", "version": pack["version"] if pack else 0,
                "source": "pack" if pack else "artifact", "removing": name in withdrawn}

    def change(names: set[str], fn):
        if engine is not None:
            return engine.change(names, fn)
        with one_at_a_time:
            return fn()

    @router.get("/admin/adapters")
    async def listing():
        loaded = model.manifest["adapters"]  # one snapshot: a change replaces the manifest
        return {"object": "list", "base": base, "data": [describe(n, e) for n, e in loaded.items()]}

    @router.post("/admin/adapters")
    async def add(request: Request):
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/octet-stream":
            raise ApiError(415, f"send the pack file's bytes as the body with 'Content-Type: application/octet-stream' "
                           f"(got {kind or 'none'!r}); e.g. curl --data-binary @NAME{PACK_SUFFIX} -H 'Content-Type: "
                           "application/octet-stream'.", code="unsupported_media_type")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise _too_large(max_bytes)
        fd, tmp = tempfile.mkstemp(prefix="edgepeft-upload-", suffix=PACK_SUFFIX)
        path = Path(tmp)
        try:
            size = 0
            with os.fdopen(fd, "wb") as fh:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > max_bytes:
                        raise _too_large(max_bytes)
                    fh.write(chunk)
            if not size:
                raise ApiError(400, "the request body is empty: send the pack file's bytes.", code="invalid_pack")
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        # in a thread that owns the file from here: a client that goes does not stop a change half-way
        return await asyncio.to_thread(load, path)

    def load(path: Path) -> dict:
        try:
            header = _peek(path)
            if header is None:  # not a pack: read_pack says why
                _refuse(path, lambda: read_pack(path, manifest=model.manifest, trusted=None, revoked=set()))
                raise ApiError(400, f"{UPLOAD}: not an edgepeft adapter pack.", code="invalid_pack")
            name = header["name"]
            if name == base:
                raise ApiError(409, f"{UPLOAD}: adapter {name!r} has the base model's id here ({base}); rename the "
                               "adapter, or serve with another --name.", code="name_in_use")

            def swap() -> dict:  # inside the change: no other change in between
                old = model.manifest["adapters"].get(name)
                added = model.add_adapter(path)
                return {**describe(added, model.manifest["adapters"][added]),
                        "replaced_version": None if old is None else describe(name, old)["version"]}

            # held also when not loaded: a pack of that name may be loading for another request
            return _refuse(path, lambda: change({name}, swap))
        finally:
            path.unlink(missing_ok=True)

    @router.delete("/admin/adapters/{name}")
    async def remove(name: str):
        loaded = model.manifest["adapters"]
        if name not in loaded or name in withdrawn:
            raise ApiError(404, f"adapter {name!r} does not exist; the adapters are: "
                           f"{', '.join(a for a in loaded if a not in withdrawn) or '(none)'}.", "name",
                           "model_not_found")
        version = describe(name, loaded[name])["version"]
        withdrawn.add(name)  # before any await: from here new requests for it are refused
        return await asyncio.to_thread(unload, name, version)

    def unload(name: str, version: int) -> dict:
        try:
            if engine is not None:
                engine.remove_adapter(name)
            else:
                change({name}, lambda: model.remove_adapter(name))
        except EdgepeftError as e:
            raise ApiError(404, str(e), "name", "model_not_found") from None
        finally:
            withdrawn.discard(name)
        return {"id": name, "object": "adapter", "version": version, "deleted": True}

    return router


def _peek(path: Path) -> dict | None:
    """The pack header's ``name`` and ``version`` (the file's metadata only, unchecked: the load
    checks everything); None when the file is not a pack."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
        header = json.loads(meta["pack"]) if meta.get("format") == PACK_FORMAT else None
    except Exception:  # any malformed file: read_pack says why
        return None
    if not isinstance(header, dict) or type(header.get("name")) is not str or type(header.get("version")) is not int:
        return None
    return header


def _refuse(path: Path, fn):
    """``fn()``; its EdgepeftError as a 400 naming the upload (not the server's temporary file).
    Any other error is edgepeft's fault: a 500 with the same body, the adapters as before."""
    try:
        return fn()
    except ApiError:
        raise
    except EdgepeftError as e:
        raise ApiError(400, str(e).replace(str(path), UPLOAD), code="invalid_pack") from None
    except Exception as e:
        raise ApiError(500, f"loading {UPLOAD} failed: {type(e).__name__}: {str(e).replace(str(path), UPLOAD)}",
                       code="internal_error") from None


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(413, f"the pack is larger than this server takes ({max_bytes / 2 ** 20:g} MiB).",
                    code="pack_too_large")
