"""`edgepeft serve`: the OpenAI-compatible server, checked with the official `openai` client
against a server each test module starts on 127.0.0.1 (and stops).

Every greedy answer must equal the runtime's single-request result for the same prompt and
adapter, alone and with other requests in flight; bad requests get an OpenAI-style 4xx body and
the server keeps serving; SIGTERM finishes the running requests before it exits.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import httpx2 as httpx  # noqa: E402  (the HTTP client openai uses)

from helpers import make_adapter, make_base, make_encoder, make_lora  # noqa: E402
from edgepeft.cli import main  # noqa: E402
from edgepeft.export import ExportConfig, export  # noqa: E402
from edgepeft.runtime import Model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# roles as in-vocabulary words of the tiny tokenizer: user w4, assistant w5; the answer after w6
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}w4{% else %}w5{% endif %} {{ m['content'] }} "
            "{% endfor %}{% if add_generation_prompt %}w6{% endif %}")
PROMPTS = ["w5 w6 w7 w8", "w9 w10", "w11 w12 w13", "w20 w21 w22 w23 w24 w25", "w30", "w40 w41"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``edgepeft serve`` in a child process on 127.0.0.1, ready once /health answers."""

    def __init__(self, artifact: Path, *args: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "edgepeft", "serve", str(artifact), "--port",
                                      str(self.port), *args], stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start: {self.proc.stderr.read()}")
            time.sleep(0.2)

    def client(self, **kw):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=kw.pop("api_key", "none"), max_retries=0,
                             timeout=60, **kw)

    def post(self, path: str, body, **kw) -> httpx.Response:
        data = body if isinstance(body, (str, bytes)) else json.dumps(body)
        return httpx.post(f"{self.url}{path}", content=data, timeout=60, **kw)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    """A fused side-branch artifact of the tiny Llama (with a chat template) and three LoRAs."""
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("serve")
    base = make_base("llama", root / "base", tokenizer=True)
    tok = PreTrainedTokenizerFast.from_pretrained(base)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(base)
    ads = (("chat", make_lora(base, root / "chat", r=4, target_modules=["q_proj", "v_proj"])),
           ("sql", make_lora(base, root / "sql", seed=2, r=8, target_modules="all-linear")),
           ("code", make_lora(base, root / "code", seed=3, r=2, target_modules=["k_proj", "up_proj"])))
    export(ExportConfig(graph="fused", base=base, out=root / "art", adapters=ads), quiet=True)
    return root / "art"


@pytest.fixture(scope="module")
def server(artifact):
    s = Server(artifact, "--max-batch", "4")
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def model(artifact) -> Model:
    return Model(artifact)


CHOICES = [("art", None), ("chat", "chat"), ("sql", "sql"), ("code", "code")]


def _alone(model: Model, prompt: str, adapter, n: int = 8, ignore_eos: bool = False) -> str:
    """The runtime's answer to one request alone: its tokens up to EOS, decoded."""
    ids = model.tokenizer.encode(prompt).ids
    new = model.generate([ids], n, adapter, stop_at_eos=not ignore_eos)[0, len(ids):].tolist()
    eos = model.manifest["base"]["eos_token_id"]
    if not ignore_eos and eos in new:
        new = new[:new.index(eos)]
    return model.tokenizer.decode(new, skip_special_tokens=True)


def test_models_list_the_base_and_every_adapter(server):
    ids = [m.id for m in server.client().models.list().data]
    assert ids == ["art", "chat", "sql", "code"]
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


@pytest.mark.parametrize("name,adapter", CHOICES)
def test_greedy_completions_equal_the_runtime(server, model, name, adapter):
    client = server.client()
    for prompt in PROMPTS[:3]:
        got = client.completions.create(model=name, prompt=prompt, max_tokens=8, temperature=0)
        want = _alone(model, prompt, adapter)
        assert got.choices[0].text == want, (name, prompt)
        assert got.usage.prompt_tokens == len(model.tokenizer.encode(prompt).ids)
        assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
        assert got.choices[0].finish_reason in ("stop", "length")


def test_a_mix_by_the_adapter_field(server, model):
    mix = {"chat": 0.7, "sql": 0.3}
    got = server.client().completions.create(model="art", prompt=PROMPTS[0], max_tokens=8, temperature=0,
                                             extra_body={"adapter": mix})
    assert got.choices[0].text == _alone(model, PROMPTS[0], mix)
    assert got.choices[0].text != _alone(model, PROMPTS[0], "chat")  # the mix is not one of its parts


def test_chat_uses_the_chat_template(server, model):
    messages = [{"role": "user", "content": "w9 w10 w11"}]
    got = server.client().chat.completions.create(model="sql", messages=messages, max_tokens=8, temperature=0)
    prompt = model.chat_prompt(messages)
    assert prompt == "w4 w9 w10 w11 w6"
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == _alone(model, prompt, "sql")


def test_streaming_joins_to_the_whole_answer(server, model):
    client = server.client()
    stream = client.completions.create(model="chat", prompt=PROMPTS[3], max_tokens=10, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert len(chunks) > 2 and chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].text for c in chunks) == _alone(model, PROMPTS[3], "chat", 10, ignore_eos=True)
    chat = client.chat.completions.create(model="code", messages=[{"role": "user", "content": "w7"}], max_tokens=6,
                                          temperature=0, stream=True, stream_options={"include_usage": True})
    parts = list(chat)
    text = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
    assert text == _alone(model, "w4 w7 w6", "code", 6)
    assert parts[-1].usage.completion_tokens >= 1 and parts[0].choices[0].delta.role == "assistant"


def test_in_flight_requests_get_their_own_answers(server, model):
    """9 requests at once over four adapters, a mix and the base (more than --max-batch 4, so
    some wait and join mid-generation): each equals its single-request result."""
    jobs = [(PROMPTS[i % len(PROMPTS)], name, adapter) for i, (name, adapter) in
            enumerate(CHOICES * 2 + [("art", {"sql": 0.5, "code": 1.0})])]

    def one(job):
        prompt, name, adapter = job
        extra = {"adapter": adapter} if isinstance(adapter, dict) else {}
        return server.client().completions.create(model=name, prompt=prompt, max_tokens=12, temperature=0,
                                                  extra_body={**extra, "ignore_eos": True}).choices[0].text

    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(one, jobs))
    for (prompt, name, adapter), text in zip(jobs, got):
        assert text == _alone(model, prompt, adapter, 12, ignore_eos=True), (prompt, name, adapter)


def test_seeded_sampling_is_reproducible(server):
    client = server.client()

    def draw(seed):
        return client.completions.create(model="chat", prompt=PROMPTS[1], max_tokens=12, temperature=1.5, seed=seed,
                                         extra_body={"ignore_eos": True}).choices[0].text

    assert draw(7) == draw(7)
    assert len({draw(s) for s in range(5)}) > 1  # a sample, not the argmax


def test_stop_strings_end_the_answer(server, model):
    text = server.client().completions.create(model="sql", prompt=PROMPTS[3], max_tokens=12, temperature=0,
                                              extra_body={"ignore_eos": True}).choices[0].text
    words = text.split()
    assert len(words) >= 3
    stop = " " + words[2]
    got = server.client().completions.create(model="sql", prompt=PROMPTS[3], max_tokens=12, temperature=0,
                                             stop=[stop], extra_body={"ignore_eos": True})
    assert got.choices[0].text == text[:text.index(stop)] and got.choices[0].finish_reason == "stop"


# ---------------------------------------------------------------- bad input
def _error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    return body


def test_unknown_model_or_adapter_is_404_with_the_names(server):
    with pytest.raises(openai.NotFoundError) as e:
        server.client().completions.create(model="nope", prompt="w5", max_tokens=2)
    assert "art, chat, sql, code" in str(e.value)
    body = _error(server.post("/v1/completions", {"model": "art", "prompt": "w5", "adapter": {"chat": 1, "zz": 1}}), 404)
    assert body["param"] == "adapter" and "zz" in body["message"] and "chat, sql, code" in body["message"]


@pytest.mark.parametrize("body,param", [
    ('{"model": "chat", "prompt": ', None),  # malformed JSON
    ('[1, 2]', None),
    ({"model": "chat", "prompt": 5}, "prompt"),
    ({"model": "chat", "prompt": "w5", "max_tokens": -1}, "max_tokens"),
    ({"model": "chat", "prompt": "w5", "max_tokens": 10 ** 9}, "max_tokens"),
    ({"model": "chat", "prompt": "w5", "max_tokens": "4"}, "max_tokens"),
    ({"model": "chat", "prompt": "w5", "temperature": "hot"}, "temperature"),
    ({"model": "chat", "prompt": "w5", "stop": [1]}, "stop"),
    ({"model": "chat", "prompt": "w5", "n": 2}, "n"),
    ({"model": "chat", "prompt": "w5", "logprobs": 2}, "logprobs"),
    ({"model": "chat", "prompt": "w5", "frobnicate": True}, "frobnicate"),
    ({"model": "chat", "messages": [{"role": "user", "content": "w5"}], "tools": [{"type": "function"}]}, "tools"),
    ({"model": "chat", "messages": "w5"}, "messages"),
])
def test_bad_requests_are_400_naming_the_problem(server, body, param):
    path = "/v1/chat/completions" if isinstance(body, dict) and ("messages" in body) else "/v1/completions"
    err = _error(server.post(path, body), 400)
    assert err["param"] == param and err["message"]
    if param:
        assert param in err["message"]


def test_a_prompt_longer_than_the_context_is_context_length_exceeded(server):
    err = _error(server.post("/v1/completions", {"model": "chat", "prompt": " ".join(["w7"] * 200), "max_tokens": 4}), 400)
    assert err["code"] == "context_length_exceeded" and "200" in err["message"]


def test_a_client_that_leaves_mid_stream_frees_its_row(server, model):
    before = httpx.get(f"{server.url}/health").json()
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60, content=json.dumps(
            {"model": "chat", "prompt": PROMPTS[0], "max_tokens": 100, "temperature": 0, "stream": True,
             "ignore_eos": True})) as r:
        next(r.iter_lines())  # one event, then hang up
    deadline = time.monotonic() + 30
    while httpx.get(f"{server.url}/health").json()["busy"] and time.monotonic() < deadline:
        time.sleep(0.05)
    after = httpx.get(f"{server.url}/health").json()
    assert after["busy"] == 0 and after["served"] + after["cancelled"] > before["served"] + before["cancelled"]
    # and the server goes on serving
    got = server.client().completions.create(model="sql", prompt=PROMPTS[1], max_tokens=6, temperature=0)
    assert got.choices[0].text == _alone(model, PROMPTS[1], "sql", 6)


def test_the_engine_drops_a_cancelled_row_at_its_next_step(model):
    """Deterministic: the engine is held between steps while the job is cancelled."""
    from edgepeft.runtime.decode import Sampling
    from edgepeft.serve.engine import Engine, Job

    engine = Engine(model, 2, 100)

    async def go():
        job = Job(model.tokenizer.encode(PROMPTS[0]).ids, "chat", 90, Sampling(), (), (), False,
                  asyncio.get_running_loop())
        engine.submit(job)
        first = await job.events.get()
        with engine._wake:  # the engine waits here at its next step
            job.cancel()
        return first

    first = asyncio.run(go())
    deadline = time.monotonic() + 30
    while engine.busy and time.monotonic() < deadline:
        time.sleep(0.01)
    assert first.text and engine.busy == 0 and engine.stats == {"served": 0, "cancelled": 1}
    assert engine.close(10)


# ---------------------------------------------------------------- keys, hosts, shutdown
def test_an_api_key_is_required_when_set_and_beyond_loopback(artifact, capsys):
    assert main(["serve", str(artifact), "--host", "0.0.0.0"]) == 2
    assert "--api-key" in capsys.readouterr().err
    s = Server(artifact, "--api-key", "s3cret", "--max-batch", "2")
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").models.list()
        assert [m.id for m in s.client(api_key="s3cret").models.list().data][0] == "art"
        assert httpx.get(f"{s.url}/health").status_code == 200  # health needs no key
    finally:
        assert s.stop() == 0


def test_sigterm_finishes_running_requests_then_exits(artifact, model):
    s = Server(artifact, "--max-batch", "4", "--drain-timeout", "30")
    results, started = [], threading.Barrier(5)

    def one(i):
        with httpx.stream("POST", f"{s.url}/v1/completions", timeout=60, content=json.dumps(
                {"model": "sql", "prompt": PROMPTS[i], "max_tokens": 60, "temperature": 0, "stream": True,
                 "ignore_eos": True, "stream_options": {"include_usage": True}})) as r:
            lines = r.iter_lines()
            first = next(lines)
            started.wait(30)
            results.append([first, *lines])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    started.wait(30)  # every request has its first token
    s.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(60)
    assert s.proc.wait(60) == 0
    assert len(results) == 4
    for lines in results:
        events = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
        assert events[-2]["choices"][0]["finish_reason"] == "length" and [x for x in lines if x][-1] == "data: [DONE]"
        assert events[-1]["usage"]["completion_tokens"] == 60  # every token, none cut
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{s.url}/health", timeout=2)


# ---------------------------------------------------------------- classifiers
def test_a_classifier_serves_classify(tmp_path):
    base = make_encoder("bert", tmp_path / "base")
    ads = {k: make_adapter(base, tmp_path / k, "lora", seed=i, task="SEQ_CLS") for i, k in enumerate(("pos", "neg"))}
    export(ExportConfig(graph="generic", base=base, out=tmp_path / "cls", adapters=tuple(ads.items())), quiet=True)
    model = Model(tmp_path / "cls")
    s = Server(tmp_path / "cls")
    try:
        texts = ["w5 w6 w7", "w9 w10"]
        got = s.post("/v1/classify", {"model": "neg", "input": texts}).json()
        want = model.classify(texts, "neg")
        assert [row["index"] for row in got["data"]] == [0, 1]
        for i, row in enumerate(got["data"]):
            np.testing.assert_allclose(list(row["probabilities"].values()), want[i], atol=1e-6)
            assert row["label"] == list(row["probabilities"])[int(want[i].argmax())]
        err = _error(s.post("/v1/classify", {"model": "nope", "input": ["w5"]}), 404)
        assert "pos, neg" in err["message"]
        _error(s.post("/v1/completions", {"model": "pos", "prompt": "w5"}), 404)  # no such route here
    finally:
        assert s.stop() == 0


def test_a_merged_artifact_serves_one_request_at_a_time(tmp_path, artifact, model):
    """A merged artifact (one graph per adapter) has no base and decodes one request at a time;
    each answer still equals the runtime's, with requests in flight."""
    src = artifact.parent
    export(ExportConfig(graph="fused", base=src / "base", out=tmp_path / "merged", mode="merged",
                        adapters=(("chat", src / "chat"), ("sql", src / "sql"))), quiet=True)
    merged = Model(tmp_path / "merged")
    s = Server(tmp_path / "merged")
    try:
        assert "one request at a time" in s.proc.stderr.readline()
        jobs = [(p, name) for p in PROMPTS[:3] for name in ("chat", "sql")]

        def one(job):
            return s.client().completions.create(model=job[1], prompt=job[0], max_tokens=6, temperature=0,
                                                 extra_body={"ignore_eos": True}).choices[0].text

        with ThreadPoolExecutor(len(jobs)) as pool:
            got = list(pool.map(one, jobs))
        for (prompt, name), text in zip(jobs, got):
            assert text == _alone(merged, prompt, name, 6, ignore_eos=True), (prompt, name)
        assert [m.id for m in s.client().models.list().data] == ["chat", "sql"]  # no base graph
        err = _error(s.post("/v1/completions", {"model": "merged", "prompt": "w5"}), 404)
        assert "chat, sql" in err["message"]
        err = _error(s.post("/v1/completions", {"model": "chat", "prompt": "w5", "adapter": {"chat": 1}}), 400)
        assert "merged artifact" in err["message"]  # mixes need a side-branch artifact
    finally:
        assert s.stop() == 0
