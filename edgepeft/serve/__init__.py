"""``edgepeft serve``: an OpenAI-compatible HTTP server over one artifact, every adapter chosen
per request, concurrent requests decoded together (continuous batching,
:mod:`edgepeft.serve.engine`). Needs the ``serve`` extra (FastAPI, uvicorn, jinja2 for chat
templates); the runtime itself does not.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from edgepeft.errors import EdgepeftError

LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def serve(artifact: str | Path, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8,
          api_key: str | None = None, drain_timeout: float = 30.0, context: int | None = None,
          threads: int | None = None, name: str | None = None, admin_key: str | None = None,
          trusted_keys: Sequence[str] = (), revoked: Sequence[str] = ()) -> None:
    """Serve ``artifact`` until SIGINT / SIGTERM; then take no new requests and finish the
    running ones (up to ``drain_timeout`` s).

    With ``admin_key``, the /admin/adapters routes load and unload adapter packs while the server
    runs (:mod:`edgepeft.serve.admin`); ``trusted_keys`` (``ed25519:BASE64`` or KEY.pub files)
    pins the keys a pack must be signed by, none of them ``revoked`` (key ids or keys); without
    ``trusted_keys``, unsigned packs load (their checksums are still checked).

    Raises:
        EdgepeftError: a host other than loopback without ``api_key``, an empty admin key or one
            equal to the API key, trusted or revoked keys without an admin key (or revoked keys
            without trusted ones), the serve extra missing, an artifact or key the runtime refuses.
    """
    if host not in LOOPBACK and not api_key:
        raise EdgepeftError(f"--host {host} serves beyond this machine: pass --api-key KEY (clients send "
                            "'Authorization: Bearer KEY'), or bind 127.0.0.1.")
    if drain_timeout < 0 or max_batch < 1:
        raise EdgepeftError("--drain-timeout must be >= 0 and --max-batch >= 1.")
    if admin_key is not None and not admin_key.strip():
        raise EdgepeftError("--admin-key is empty; pass a secret (e.g. from `python -c 'import secrets; "
                            "print(secrets.token_urlsafe())'`).")
    if admin_key is not None and admin_key == api_key:
        raise EdgepeftError("--admin-key equals --api-key: every client could then change the adapters. Pass "
                            "another admin key.")
    if admin_key is None and (trusted_keys or revoked):
        raise EdgepeftError("--trusted-key and --revoked apply to packs loaded through the admin routes: pass "
                            "--admin-key KEY too.")
    if revoked and not trusted_keys:
        raise EdgepeftError("--revoked without --trusted-key does nothing: without pinned keys packs need no "
                            "signature. Pass the keys to trust with --trusted-key.")
    try:
        import uvicorn

        from edgepeft.serve.app import create_app  # FastAPI
    except ImportError:
        raise EdgepeftError("edgepeft serve needs its extra: pip install 'edgepeft[serve]'.") from None
    from edgepeft.runtime import Model
    from edgepeft.serve.engine import Engine

    model = Model(artifact, threads=threads, trusted_keys=list(trusted_keys) or None, revoked=list(revoked))
    name = name or Path(artifact).resolve().name
    engine = Engine(model, max_batch, context) if model.task == "causal-lm" else None
    app = create_app(model, engine, name, api_key, admin_key)
    how = ("classifier" if engine is None else
           "one request at a time (merged or fixed-shape artifact)" if engine.batcher.serial else
           f"up to {engine.batcher.capacity} requests decoded together, {engine.context} tokens each")
    print(f"edgepeft serve: http://{host}:{port} - {name}: base + {len(model.adapters)} adapters, {how}",
          file=sys.stderr, flush=True)
    if admin_key is not None:
        packs = (f"packs signed by {len(trusted_keys)} trusted key(s), {len(revoked)} revoked" if trusted_keys else
                 "packs need no signature (no --trusted-key)")
        print(f"edgepeft serve: admin routes on /admin/adapters; {packs}", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=drain_timeout,
                            access_log=False)
    # uvicorn drains on SIGTERM / SIGINT, restores the handlers it found, then raises the signal
    # again; these handlers let that end here, so the engine is closed and the exit code is 0.
    stopped_by: list[int] = []
    previous = {sig: signal.signal(sig, lambda sig, frame: stopped_by.append(sig))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    started = time.monotonic()
    try:
        uvicorn.Server(config).run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if engine is not None:  # uvicorn waited for open requests; anything left ends here
        left = max(0.0, drain_timeout - (time.monotonic() - started)) if drain_timeout else 0.0
        engine.close(min(left, drain_timeout))
    print("edgepeft serve: stopped", file=sys.stderr, flush=True)
