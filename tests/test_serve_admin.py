"""`edgepeft serve --admin-key`: adapter packs loaded into and removed from a running server.

A server started on 127.0.0.1 over an artifact exported with empty slots takes a pack signed by a
trusted key and then answers with it exactly as the Python runtime does; every refused pack is a
4xx naming the check that failed, the adapters unchanged; requests in flight finish with the
adapter they started with, whatever is loaded or removed meanwhile.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
from test_serve import PROMPTS, Server, _alone, _error, httpx  # noqa: E402

from edgepeft.cli import main  # noqa: E402
from edgepeft.export import ExportConfig, export  # noqa: E402
from edgepeft.runtime import Model  # noqa: E402

ADMIN, API = "adm1n-s3cret", "api-s3cret"


@pytest.fixture(scope="module")
def packs(llama_base, llama_adapters, tmp_path_factory) -> dict:
    """``shipped``: a fused artifact with LoRA slots on every linear layer and two adapters (chat,
    code); ``builder``: a copy with sql added, and the packs made from it; keys good, other and
    gone (trusted, then revoked); a pack of another graph (``schema``)."""
    from edgepeft.contract.packs import generate_key

    root = tmp_path_factory.mktemp("serve-admin")
    shipped = root / "shipped"
    export(ExportConfig(graph="fused", base=llama_base, out=shipped, slots="all-linear",
                        adapters=(("chat", llama_adapters["chat"]), ("code", llama_adapters["code"]))), quiet=True)
    builder = root / "builder"
    shutil.copytree(shipped, builder)
    assert main(["adapter", "add", str(builder), "--adapter", f"sql={llama_adapters['sql']}", "--quiet"]) == 0
    keys = {k: generate_key(root / k) for k in ("good", "other", "gone")}  # (KEY.pub, key id)
    out = {"shipped": shipped, "builder": builder, "keys": keys}
    for version, key in ((1, "good"), (2, "good"), (1, None), (1, "other"), (1, "gone")):
        f = root / f"sql-v{version}-{key}.edgepeft-pack"
        args = ["adapter", "pack", str(builder), "sql", "--out", str(f), "--version", str(version)]
        assert main(args + (["--sign", str(root / key)] if key else [])) == 0
        out[(version, key)] = f
    other = root / "qv"  # slots for chat's q_proj / v_proj only: another slot schema
    export(ExportConfig(graph="fused", base=llama_base, out=other, adapters=(("chat", llama_adapters["chat"]),)),
           quiet=True)
    assert main(["adapter", "pack", str(other), "chat", "--out", str(root / "schema.edgepeft-pack"),
                 "--sign", str(root / "good")]) == 0
    out["schema"] = root / "schema.edgepeft-pack"
    return out


@pytest.fixture(scope="module")
def reference(packs) -> Model:
    """The Python runtime with all three adapters: the answers the server must give."""
    return Model(packs["builder"])


def _trust(packs) -> list[str]:
    keys = packs["keys"]
    return ["--trusted-key", str(keys["good"][0]), "--trusted-key", str(keys["gone"][0]), "--revoked", keys["gone"][1]]


@pytest.fixture(scope="module")
def server(packs):
    s = Server(packs["shipped"], "--admin-key", ADMIN, "--api-key", API, "--max-batch", "4", *_trust(packs))
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def http():
    """One HTTP client for the module's requests (a client per request costs ~60 ms)."""
    with httpx.Client(timeout=60, limits=httpx.Limits(max_connections=64, max_keepalive_connections=64)) as c:
        yield c


def _admin(key: str = ADMIN) -> dict:
    """The Authorization header with ``key`` (default the admin key)."""
    return {"Authorization": f"Bearer {key}"}


def _post_pack(http, s: Server, pack: Path | bytes, key: str = ADMIN, **headers) -> httpx.Response:
    data = pack if isinstance(pack, bytes) else pack.read_bytes()
    return http.post(f"{s.url}/admin/adapters", content=data,
                     headers={**_admin(key), "Content-Type": "application/octet-stream", **headers})


def _listing(http, s: Server) -> dict[str, int]:
    r = http.get(f"{s.url}/admin/adapters", headers=_admin())
    assert r.status_code == 200, r.text
    return {a["id"]: a["version"] for a in r.json()["data"]}


def _complete(http, s: Server, model: str, prompt: str, n: int, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return http.post(f"{s.url}/v1/completions", headers=headers, json={
        "model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True})


# ---------------------------------------------------------------- switched on, keys
def test_admin_routes_exist_only_with_an_admin_key(packs, capsys, http):
    s = Server(packs["shipped"])
    try:
        for method in ("GET", "POST"):
            err = _error(http.request(method, f"{s.url}/admin/adapters", headers=_admin()), 404)
            assert err["code"] == "not_found"
        _error(http.delete(f"{s.url}/admin/adapters/chat", headers=_admin()), 404)
        assert [m["id"] for m in http.get(f"{s.url}/v1/models").json()["data"]] == ["shipped", "chat", "code"]
    finally:
        assert s.stop() == 0
    for args, words in ((["--trusted-key", str(packs["keys"]["good"][0])], "--admin-key"),
                        (["--admin-key", "k", "--revoked", packs["keys"]["gone"][1]], "--trusted-key"),
                        (["--admin-key", "same", "--api-key", "same"], "equals --api-key"),
                        (["--admin-key", " "], "empty"),
                        (["--admin-key", "k", "--trusted-key", "ed25519:nope"], "not an Ed25519 public key")):
        assert main(["serve", str(packs["shipped"]), *args]) == 2
        assert words in capsys.readouterr().err


def test_admin_key_and_api_key_each_open_their_own_routes(server, http):
    for headers in ({}, _admin("wrong"), _admin(API)):
        err = _error(http.get(f"{server.url}/admin/adapters", headers=headers), 401)
        assert err["code"] == "invalid_api_key" and "admin key" in err["message"]
    assert _error(_post_pack(http, server, b"x", key="wrong"), 401)["type"] == "authentication_error"
    _error(http.delete(f"{server.url}/admin/adapters/chat"), 401)
    _error(http.get(f"{server.url}/v1/models", headers=_admin()), 401)  # not an API key
    assert _listing(http, server) == {"chat": 0, "code": 0}


# ---------------------------------------------------------------- loading, refusing, removing
def test_a_trusted_pack_loads_and_answers_as_the_runtime(server, packs, reference, http):
    r = _post_pack(http, server, packs[(1, "good")])
    try:
        assert r.status_code == 200, r.text
        assert r.json() == {"id": "sql", "object": "adapter", "version": 1, "source": "pack", "removing": False,
                            "replaced_version": None}
        client = server.client(api_key=API)
        assert [m.id for m in client.models.list().data] == ["shipped", "chat", "code", "sql"]
        for prompt in PROMPTS[:3]:
            got = client.completions.create(model="sql", prompt=prompt, max_tokens=8, temperature=0)
            assert got.choices[0].text == _alone(reference, prompt, "sql"), prompt
        mix = {"sql": 0.5, "chat": 1.0}
        got = client.completions.create(model="shipped", prompt=PROMPTS[0], max_tokens=8, temperature=0,
                                        extra_body={"adapter": mix})
        assert got.choices[0].text == _alone(reference, PROMPTS[0], mix)
        # the same version again is refused; a newer one replaces it
        err = _error(_post_pack(http, server, packs[(1, "good")]), 400)
        assert "version 1 is loaded" in err["message"] and err["code"] == "invalid_pack"
        r = _post_pack(http, server, packs[(2, "good")])
        assert r.status_code == 200 and r.json()["version"] == 2 and r.json()["replaced_version"] == 1
        assert _listing(http, server) == {"chat": 0, "code": 0, "sql": 2}
    finally:
        http.delete(f"{server.url}/admin/adapters/sql", headers=_admin())


def _flipped(src: Path, dst: Path) -> Path:
    data = bytearray(src.read_bytes())
    data[-3] ^= 0x40  # a byte of the last array
    dst.write_bytes(bytes(data))
    return dst


def test_refused_packs_are_4xx_and_change_nothing(server, packs, tmp_path, http):
    before = _listing(http, server)
    cases = {
        "unsigned": (packs[(1, None)], 400, "not signed"),
        "untrusted key": (packs[(1, "other")], 400, "not among the trusted keys"),
        "revoked key": (packs[(1, "gone")], 400, "revoked"),
        "tampered": (_flipped(packs[(1, "good")], tmp_path / "t.edgepeft-pack"), 400, "does not match its sha256"),
        "another graph": (packs["schema"], 400, "slot schema"),
        "not a pack": (b"\x00" * 64, 400, "not a readable adapter pack"),
        "empty": (b"", 400, "empty"),
    }
    for case, (pack, status, words) in cases.items():
        err = _error(_post_pack(http, server, pack), status)
        assert words in err["message"], (case, err)
        assert "edgepeft-upload" not in err["message"] and "the uploaded pack" in err["message"] or case == "empty"
        assert _listing(http, server) == before, case
    err = _error(_post_pack(http, server, packs[(1, "good")], **{"Content-Type": "application/json"}), 415)
    assert "application/octet-stream" in err["message"]
    # a body declared above the cap is refused before it is read
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(f"POST /admin/adapters HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\n"
                     "Content-Type: application/octet-stream\r\nContent-Length: 4294967296\r\n\r\n".encode())
        assert b" 413 " in sock.recv(4096).split(b"\r\n", 1)[0]
    err = _error(http.delete(f"{server.url}/admin/adapters/nope", headers=_admin()), 404)
    assert err["code"] == "model_not_found" and "chat, code" in err["message"]
    assert _listing(http, server) == before
    got = _complete(http, server, "chat", PROMPTS[0], 4, API)  # and the server goes on serving
    assert got.status_code == 200


def test_delete_waits_for_the_requests_running_with_the_adapter(server, packs, reference, http):
    """A stream with the adapter is running when it is removed: it finishes with it, while new
    requests for it are refused at once; then it is gone."""
    assert _post_pack(http, server, packs[(1, "good")]).status_code == 200
    n = 100
    with http.stream("POST", f"{server.url}/v1/completions", headers=_admin(API),
                     json={"model": "sql", "prompt": PROMPTS[3], "max_tokens": n, "temperature": 0, "stream": True,
                           "ignore_eos": True}) as stream:
        lines = stream.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        deleted: list[httpx.Response] = []
        remover = threading.Thread(target=lambda: deleted.append(
            http.delete(f"{server.url}/admin/adapters/sql", headers=_admin())))
        remover.start()
        deadline = time.monotonic() + 30
        while "sql" in [m["id"] for m in http.get(f"{server.url}/v1/models", headers=_admin(API)).json()["data"]]:
            assert time.monotonic() < deadline  # withdrawn as soon as the DELETE arrives
            time.sleep(0.005)
        err = _error(_complete(http, server, "sql", PROMPTS[0], 4, API), 404)  # withdrawn: refused at once
        assert err["code"] == "model_not_found"
        text = "".join(_sse_texts([first, *lines]))
        remover.join(60)
    assert text == _alone(reference, PROMPTS[3], "sql", n, ignore_eos=True)
    assert deleted[0].status_code == 200 and deleted[0].json() == {"id": "sql", "object": "adapter", "version": 1,
                                                                   "deleted": True}
    assert _listing(http, server) == {"chat": 0, "code": 0}
    _error(http.delete(f"{server.url}/admin/adapters/sql", headers=_admin()), 404)


def _sse_texts(lines):
    import json

    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])["choices"][0]["text"]


# ---------------------------------------------------------------- under load
def test_requests_in_flight_while_packs_come_and_go(packs, reference, http):
    """40 requests on the base, code and chat at once (--max-batch 4: most wait, then join
    running batches) while the sql pack is loaded and chat removed: every answer is its
    adapter's greedy answer, or, for chat requests that came after the removal, a 404."""
    s = Server(packs["shipped"], "--admin-key", ADMIN, "--max-batch", "4", *_trust(packs))
    try:
        n = 16
        jobs = [(PROMPTS[i % len(PROMPTS)], ("shipped", "code", "chat", "chat")[i % 4]) for i in range(40)]
        want = {(p, m): _alone(reference, p, None if m == "shipped" else m, n, ignore_eos=True)
                for p in PROMPTS for m in ("shipped", "code", "chat", "sql")}
        started = time.monotonic()
        with ThreadPoolExecutor(24) as pool:
            running = [pool.submit(_complete, http, s, m, p, n) for p, m in jobs]
            deadline = time.monotonic() + 30
            while http.get(f"{s.url}/health").json()["busy"] < 4:  # a full batch running, more waiting
                assert time.monotonic() < deadline
                time.sleep(0.002)
            with ThreadPoolExecutor(2) as admin:
                added = admin.submit(_post_pack, http, s, packs[(1, "good")])
                removed = admin.submit(http.delete, f"{s.url}/admin/adapters/chat", headers=_admin())
                assert added.result(60).status_code == 200 and removed.result(60).status_code == 200
            after = [pool.submit(_complete, http, s, m, p, n) for p in PROMPTS for m in ("sql", "chat")]
            results = [f.result(60) for f in running + after]
        assert time.monotonic() - started < 60
        served = {"chat": 0, "refused": 0}
        for (prompt, model), r in zip(jobs + [(p, m) for p in PROMPTS for m in ("sql", "chat")], results):
            if model == "chat" and r.status_code == 404:
                assert r.json()["error"]["code"] == "model_not_found"
                served["refused"] += 1
                continue
            assert r.status_code == 200, (prompt, model, r.text)
            assert r.json()["choices"][0]["text"] == want[prompt, model], (prompt, model)
            served["chat"] += model == "chat"
        assert served["refused"] >= len(PROMPTS)  # at least the ones sent after the removal
        assert served["chat"] >= 1  # and some started before it, and finished with chat
        assert _listing(http, s) == {"code": 0, "sql": 1}
        assert http.get(f"{s.url}/health").json()["busy"] == 0
    finally:
        assert s.stop() == 0


# ---------------------------------------------------------------- the engine, step by step
def test_an_adapter_change_waits_for_running_rows_and_holds_new_ones(packs, reference, monkeypatch):
    """Deterministic: with the engine stopped between two steps, a chat job is queued, chat's
    removal begins, then a chat job and two others are queued. The removal waits for the first
    chat job (which ends with chat), the second waits for the removal (and then finds chat gone),
    and the rows that shared the batch with chat go on after it (the Batcher forgets chat)."""
    from edgepeft.runtime.decode import Sampling
    from edgepeft.serve.engine import Engine, Job

    model = Model(packs["shipped"])
    engine = Engine(model, 4, 100)
    seen: dict[str, bool] = {}
    jobs: dict[str, Job] = {}
    original = model.remove_adapter

    def remove(name):  # what the removal finds when it runs
        seen["a ended"] = jobs["a"].ended.is_set()
        seen["b waits"] = any(j is jobs["b"] for j in engine._waiting)
        original(name)

    monkeypatch.setattr(model, "remove_adapter", remove)
    ids = model.tokenizer.encode(PROMPTS[3]).ids

    async def text(job) -> tuple[str, str | None]:
        parts = []
        while True:
            e = await job.events.get()
            parts.append(e.text)
            if e.finish:
                return "".join(parts), e.error

    async def go():
        loop = asyncio.get_running_loop()
        gate, frozen = threading.Event(), threading.Event()
        stop = loop.run_in_executor(None, engine._between_steps, lambda: (frozen.set(), gate.wait(30)))
        assert await loop.run_in_executor(None, frozen.wait, 30)  # the engine waits between two steps
        for key, adapter, n in (("a", "chat", 30), ("b", "chat", 4), ("c", "code", 90), ("d", None, 90)):
            jobs[key] = Job(ids, adapter, n, Sampling(), (), (), False, loop)
            engine.submit(jobs[key])
            if key == "a":
                removal = loop.run_in_executor(None, engine.remove_adapter, "chat")
                while "chat" not in engine._held:
                    await asyncio.sleep(0.001)
        gate.set()
        await stop
        await removal
        return await asyncio.gather(*(text(jobs[k]) for k in "abcd"))

    got_a, got_b, got_c, got_d = asyncio.run(go())
    assert seen == {"a ended": True, "b waits": True}
    assert got_a == (_alone(reference, PROMPTS[3], "chat", 30, ignore_eos=True), None)
    assert got_b[1] and "'chat' is not in" in got_b[1]
    assert got_c == (_alone(reference, PROMPTS[3], "code", 90, ignore_eos=True), None)
    assert got_d == (_alone(reference, PROMPTS[3], None, 90, ignore_eos=True), None)
    assert model.adapters == ["code"] and engine.close(10)
