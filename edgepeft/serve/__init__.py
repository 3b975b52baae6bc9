"""``edgepeft serve``: an OpenAI-compatible HTTP server over one artifact, every adapter chosen
per request, concurrent requests decoded together (continuous batching,
:mod:`edgepeft.serve.engine`). Needs the ``serve`` extra (FastAPI, uvicorn, jinja2 for chat
templates); the runtime itself does not.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

from edgepeft.errors import EdgepeftError

LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def serve(artifact: str | Path, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8,
          api_key: str | None = None, drain_timeout: float = 30.0, context: int | None = None,
          threads: int | None = None, name: str | None = None) -> None:
    """Serve ``artifact`` until SIGINT / SIGTERM; then take no new requests and finish the
    running ones (up to ``drain_timeout`` s).

    Raises:
        EdgepeftError: a host other than loopback without ``api_key``, the serve extra missing,
            an artifact the runtime refuses.
    """
    if host not in LOOPBACK and not api_key:
        raise EdgepeftError(f"--host {host} serves beyond this machine: pass --api-key KEY (clients send "
                            "'Authorization: Bearer KEY'), or bind 127.0.0.1.")
    if drain_timeout < 0 or max_batch < 1:
        raise EdgepeftError("--drain-timeout must be >= 0 and --max-batch >= 1.")
    try:
        import uvicorn

        from edgepeft.serve.app import create_app  # FastAPI
    except ImportError:
        raise EdgepeftError("edgepeft serve needs its extra: pip install 'edgepeft[serve]'.") from None
    from edgepeft.runtime import Model
    from edgepeft.serve.engine import Engine

    model = Model(artifact, threads=threads)
    name = name or Path(artifact).resolve().name
    engine = Engine(model, max_batch, context) if model.task == "causal-lm" else None
    app = create_app(model, engine, name, api_key)
    how = ("classifier" if engine is None else
           "one request at a time (merged or fixed-shape artifact)" if engine.batcher.serial else
           f"up to {engine.batcher.capacity} requests decoded together, {engine.context} tokens each")
    print(f"edgepeft serve: http://{host}:{port} - {name}: base + {len(model.adapters)} adapters, {how}",
          file=sys.stderr, flush=True)
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
