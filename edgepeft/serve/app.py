"""The OpenAI-compatible HTTP API over one artifact (FastAPI).

Routes: ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions`` (causal LMs; ``stream``
as server-sent events), ``/v1/classify`` (classifiers), ``/health``; with an admin key, the
``/admin/adapters`` routes (:mod:`edgepeft.serve.admin`). The adapter of a request is its
``model`` (an adapter name, or the artifact's name for the base) or the ``adapter`` field (a name
or a ``{name: weight}`` mix), which wins; the names are read per request, so adapters added or
removed while the server runs show at once. Errors are OpenAI's body,
``{"error": {"message", "type", "param", "code"}}``, with a 4xx status; parameters edgepeft does
not implement are refused by name, never ignored.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from edgepeft.errors import EdgepeftError
from edgepeft.runtime.decode import Sampling
from edgepeft.serve.engine import Engine, Event, Job

# Parameters of OpenAI's API that edgepeft does not implement, and the value that means "not used".
UNSUPPORTED = {"n": 1, "best_of": 1, "logprobs": None, "top_logprobs": None, "echo": False, "suffix": None,
               "tools": None, "tool_choice": None, "functions": None, "function_call": None,
               "response_format": None, "logit_bias": None, "presence_penalty": 0, "frequency_penalty": 0,
               "parallel_tool_calls": None, "audio": None, "modalities": None, "prediction": None}
COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop",
          "stream", "stream_options", "adapter", "user", "stop_token_ids", "ignore_eos"}
FIELDS = {"/v1/completions": COMMON | {"prompt"},
          "/v1/chat/completions": COMMON | {"messages", "max_completion_tokens"}}
MAX_STOP = 4
MAX_PACK_UPLOAD = 1 << 30  # bytes: the largest adapter pack POST /admin/adapters takes


class ApiError(Exception):
    """A request error: its status and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.status, self.body = status, {"error": {"message": message, "type": type, "param": param, "code": code}}


def create_app(model, engine: Engine | None, name: str, api_key: str | None = None,
               admin_key: str | None = None, max_pack_bytes: int = MAX_PACK_UPLOAD):
    """The FastAPI app over ``model`` (and its decode ``engine``; None for classifiers).

    Args:
        api_key: the key the /v1 routes require (``Authorization: Bearer KEY``); None: none.
        admin_key: the key the /admin routes require; None: no /admin routes (404 as any
            unknown route). Each key opens its own routes only.
        max_pack_bytes: the largest adapter pack ``POST /admin/adapters`` takes (413 above).
    """
    app = FastAPI(title="edgepeft", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    withdrawn: set[str] = set()  # adapters being removed: refused to new requests, running ones finish

    def adapters() -> list[str]:
        """The adapters requests may name now (read per request: packs come and go)."""
        return [a for a in model.adapters if a not in withdrawn]

    def names() -> list[str]:
        return [*([] if model.merged else [name]), *adapters()]  # a merged artifact has no base graph

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return JSONResponse(e.body, status_code=e.status)

    @app.exception_handler(404)
    async def _not_found(request: Request, e):
        return JSONResponse(ApiError(404, f"no route {request.url.path}", code="not_found").body, status_code=404)

    @app.exception_handler(405)
    async def _method(request: Request, e):
        return JSONResponse(ApiError(405, f"{request.method} is not allowed on {request.url.path}").body,
                            status_code=405)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        path = request.url.path
        if admin_key is not None and (path == "/admin" or path.startswith("/admin/")):
            key, what = admin_key, "admin key (--admin-key)"  # the API key does not open these
        elif api_key is not None and path != "/health":
            key, what = api_key, "API key"
        else:
            return await call_next(request)
        if not _bearer(request, key):
            return JSONResponse(ApiError(401, f"missing or wrong {what}: send 'Authorization: Bearer <key>'.",
                                         code="invalid_api_key", type="authentication_error").body,
                                status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "busy": engine.busy if engine else 0, **(engine.stats if engine else {})}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "edgepeft"}
                                           for n in names()]}

    if admin_key is not None:
        from edgepeft.serve.admin import admin_routes

        app.include_router(admin_routes(model, engine, name, withdrawn, max_pack_bytes))

    if model.task == "classification":
        @app.post("/v1/classify")
        async def classify(request: Request):
            body = await _body(request, {"model", "input", "adapter"})
            texts = body.get("input")
            if isinstance(texts, str):
                texts = [texts]
            if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
                raise ApiError(400, "input: a non-empty string or list of non-empty strings.", "input")
            adapter = _adapter(body, name, names(), adapters())
            try:
                probs = await asyncio.to_thread(model.classify, texts, adapter)
            except EdgepeftError as e:
                raise ApiError(400, str(e)) from None
            labels = _labels(model, probs.shape[1])
            return {"object": "list", "model": body.get("model") or name,
                    "data": [{"index": i, "label": labels[int(p.argmax())],
                              "probabilities": {labels[j]: float(x) for j, x in enumerate(p)}}
                             for i, p in enumerate(probs)]}
        return app

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _body(request, FIELDS["/v1/completions"])
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = prompt
        elif isinstance(prompt, str) and prompt:
            ids = model.tokenizer.encode(prompt).ids
        else:
            raise ApiError(400, "prompt: a non-empty string (or one list of token ids); batches of prompts "
                           "are separate requests here.", "prompt")
        return await _generate(body, ids, "text_completion")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await _body(request, FIELDS["/v1/chat/completions"])
        if "max_completion_tokens" in body:
            body.setdefault("max_tokens", body.pop("max_completion_tokens"))
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise ApiError(400, "messages: a non-empty list of {role, content} with string content.", "messages")
        try:
            text = model.chat_prompt([{"role": m["role"], "content": m["content"]} for m in messages])
        except EdgepeftError as e:
            raise ApiError(400, str(e), "messages") from None
        return await _generate(body, model.tokenizer.encode(text, add_special_tokens=False).ids, "chat.completion")

    async def _generate(body: dict, ids: list[int], kind: str):
        # No await from here to engine.submit: an adapter an admin request removes is either refused
        # here (withdrawn) or named by a job queued before the removal began, which it waits for.
        adapter = _adapter(body, name, names(), adapters())
        max_tokens = _int(body, "max_tokens", 16, 1, engine.context)
        if len(ids) + max_tokens > engine.context:
            raise ApiError(400, f"this model's context holds {engine.context} tokens; the prompt has {len(ids)} "
                           f"and max_tokens asks {max_tokens} more. Shorten the prompt or lower max_tokens.",
                           "messages" if kind == "chat.completion" else "prompt", "context_length_exceeded")
        sampling = _sampling(body)
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
            raise ApiError(400, f"stop: a non-empty string or a list of at most {MAX_STOP} of them.", "stop")
        stop_ids = body.get("stop_token_ids") or []
        if not isinstance(stop_ids, list) or not all(isinstance(t, int) and t >= 0 for t in stop_ids):
            raise ApiError(400, "stop_token_ids: a list of token ids.", "stop_token_ids")
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise ApiError(400, "ignore_eos: true or false.", "ignore_eos")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "stream: true or false.", "stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, Mapping) or set(options) - {"include_usage"}:
            raise ApiError(400, "stream_options: only include_usage is supported.", "stream_options")
        job = Job(ids, adapter, max_tokens, sampling, stop, stop_ids, not ignore_eos, asyncio.get_running_loop())
        try:
            engine.submit(job)
        except EdgepeftError as e:
            raise ApiError(503, str(e), code="unavailable", type="server_error") from None
        head = {"id": f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}",
                "created": int(time.time()), "model": body.get("model") or name}
        usage = lambda n: {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}  # noqa: E731
        if stream:
            return StreamingResponse(_sse(job, head, kind, usage, bool(options.get("include_usage"))),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            parts, last = [], None
            while last is None or last.finish is None:
                last = await job.events.get()
                parts.append(last.text)
        except asyncio.CancelledError:
            job.cancel()
            raise
        if last.error:
            raise ApiError(last.status, last.error)
        text = "".join(parts)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": last.finish}
                  if kind == "chat.completion" else
                  {"index": 0, "text": text, "logprobs": None, "finish_reason": last.finish})
        return {**head, "object": kind, "choices": [choice], "usage": usage(last.completion_tokens)}

    return app


async def _sse(job: Job, head: dict, kind: str, usage, include_usage: bool):
    """Server-sent events of ``job``: one chunk per piece of text, a last one with the finish
    reason, [optionally the usage,] then ``[DONE]``. A client that goes cancels the job."""
    chat = kind == "chat.completion"
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish: str | None, role: bool = False) -> str:
        if chat:
            delta = ({"role": "assistant", "content": ""} if role else {} if text is None else {"content": text})
            c = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            c = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        extra = {"usage": None} if include_usage else {}
        return f"data: {json.dumps({**head, 'object': obj, 'choices': [c], **extra})}\n\n"

    try:
        if chat:
            yield chunk(None, None, role=True)
        while True:
            e: Event = await job.events.get()
            if e.error:
                body = ApiError(e.status, e.error).body
                yield f"data: {json.dumps(body)}\n\n"
                break
            if e.text:
                yield chunk(e.text, None)
            if e.finish:
                yield chunk(None if chat else "", e.finish)
                if include_usage:
                    yield f"data: {json.dumps({**head, 'object': obj, 'choices': [], 'usage': usage(e.completion_tokens)})}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()  # gone or done: the engine drops the row if it still runs


async def _body(request, allowed: set[str]) -> dict:
    """The request's JSON object, its parameters checked against ``allowed`` and UNSUPPORTED."""
    raw = await request.body()
    try:
        body = json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e}).") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object.")
    for k, v in body.items():
        if k in UNSUPPORTED:
            if v is not None and v != UNSUPPORTED[k]:
                raise ApiError(400, f"{k}={json.dumps(v)[:80]} is not supported by edgepeft; leave it out.", k,
                               "unsupported_parameter")
        elif k not in allowed:
            raise ApiError(400, f"unknown parameter {k!r} for {request.url.path}.", k, "unknown_parameter")
    return body


def _bearer(request, key: str) -> bool:
    """Whether ``request`` carries ``Authorization: Bearer <key>`` (compared in constant time)."""
    given = request.headers.get("authorization", "")
    return secrets.compare_digest(given.encode(), f"Bearer {key}".encode())


def _adapter(body: dict, name: str, names: list[str], adapters: list[str]):
    """The request's adapter choice: ``adapter`` (name or mix) if given, else ``model`` (one of
    ``names``; ``name``: the base; ``adapters``: the names of a mix)."""
    listing = ", ".join(names)
    choice = body.get("adapter")
    requested = body.get("model")
    if requested is not None and not isinstance(requested, str):
        raise ApiError(400, "model: a string.", "model")
    if requested is not None and requested not in names:
        raise ApiError(404, f"model {requested!r} does not exist; the models are: {listing}.", "model",
                       "model_not_found")
    if choice is None:
        return None if requested in (None, name) else requested
    if isinstance(choice, str):
        if choice not in names:
            raise ApiError(404, f"adapter {choice!r} does not exist; the adapters are: "
                           f"{', '.join(adapters)} (or {name} for the base).", "adapter", "model_not_found")
        return None if choice == name else choice
    if isinstance(choice, Mapping) and choice and all(
            isinstance(k, str) and isinstance(w, (int, float)) and not isinstance(w, bool) for k, w in choice.items()):
        unknown = [k for k in choice if k not in adapters]
        if unknown:
            raise ApiError(404, f"adapter {unknown[0]!r} does not exist; the adapters are: "
                           f"{', '.join(adapters) or '(none)'}.", "adapter", "model_not_found")
        return {k: float(w) for k, w in choice.items()}
    raise ApiError(400, "adapter: an adapter name or a {name: weight} mix.", "adapter")


def _int(body: dict, key: str, default: int, low: int, high: int) -> int:
    v = body.get(key, default)
    v = default if v is None else v
    if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
        raise ApiError(400, f"{key}={json.dumps(v)[:40]}: an integer from {low} to {high}.", key)
    return v


def _number(body: dict, key: str, default: float, ok, what: str) -> float:
    v = body.get(key, default)
    v = default if v is None else v
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not ok(v):
        raise ApiError(400, f"{key}={json.dumps(v)[:40]}: {what}.", key)
    return float(v)


def _sampling(body: dict) -> Sampling:
    """OpenAI's defaults: temperature 1 and top_p 1 (temperature 0 is greedy)."""
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise ApiError(400, "seed: an integer >= 0.", "seed")
    return Sampling(temperature=_number(body, "temperature", 1.0, lambda v: 0 <= v <= 2, "a number from 0 to 2"),
                    top_k=_int(body, "top_k", 0, 0, 1 << 30),
                    top_p=_number(body, "top_p", 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]"),
                    repetition_penalty=_number(body, "repetition_penalty", 1.0, lambda v: 0 < v <= 10,
                                               "a number in (0, 10]"),
                    seed=seed)


def _labels(model, n: int) -> list[str]:
    id2label: Any = model.manifest["base"].get("id2label") or {}
    return [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(n)]
