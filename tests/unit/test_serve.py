"""`tuneforge serve`: an OpenAI-compatible server over one tiny base with two LoRA adapters.

Every answer is checked against the reference path users already trust: `load_for_inference` on the run plus
transformers' greedy `generate`, token for token. The server is exercised with FastAPI's TestClient and, over real
HTTP, with the official `openai` client against uvicorn on a free local port.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli, serve_in_thread, wait_until_serving
from tests.unit.test_merge import make_lora_run

KEY = "test-secret"
AUTH = {"Authorization": f"Bearer {KEY}"}
QUESTIONS = ["Where is Tampere?", "Name a colour.", "Say hi", "Write one word about the sea."]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("adapters")
    return {"alpha": make_lora_run(tiny_model_dir, folder / "alpha", seed=1, r=4),
            "beta": make_lora_run(tiny_model_dir, folder / "beta", seed=2, r=8)}


@pytest.fixture(scope="module")
def server(tiny_model_dir, runs):
    from tuneforge.deploy.server import ServeSettings, load_server

    settings = ServeSettings(api_key=KEY, max_tokens_limit=64, max_model_len=256, max_concurrent=8, max_batch=8)
    served = load_server(str(tiny_model_dir), [(name, str(path)) for name, path in runs.items()], settings)
    yield served
    served.engine.close()


@pytest.fixture(scope="module")
def client(server):
    from fastapi.testclient import TestClient

    from tuneforge.deploy.server import build_app

    with TestClient(build_app(server)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def live_url(server):
    """The same server over real HTTP: uvicorn on a free localhost port, in a thread of this process."""
    from tuneforge.deploy.server import build_app

    url, stop = serve_in_thread(build_app(server))
    yield f"{url}/v1"
    stop()


def openai_client(url: str, key: str = KEY):
    from openai import OpenAI

    return OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)


class Reference:
    """Greedy answers from `load_for_inference(run)` + `model.generate`: what the server must reproduce."""

    def __init__(self):
        self.loaded: dict[str, tuple] = {}

    def ids(self, source: str, prompt_ids: list[int], max_tokens: int) -> list[int]:
        from tuneforge.model.trained import load_for_inference

        if source not in self.loaded:
            self.loaded[source] = load_for_inference(source)
        model, _ = self.loaded[source]
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids),
                                 dtype=torch.long), max_new_tokens=max_tokens, do_sample=False, temperature=None,
                                 top_p=None, top_k=None)
        return out[0, len(prompt_ids):].tolist()

    def chat(self, source: str, question: str, max_tokens: int) -> tuple[str, int]:
        from tuneforge.data.tokenize import render_prompt
        from tuneforge.model.load import load_tokenizer

        tokenizer = load_tokenizer(source)
        prompt_ids = tokenizer(render_prompt(tokenizer, [{"role": "user", "content": question}]),
                               add_special_tokens=False)["input_ids"]
        generated = self.ids(source, prompt_ids, max_tokens)
        return decode(tokenizer, generated), len(generated)


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module")
def reference() -> Reference:
    return Reference()


def source_of(name: str, runs, tiny_model_dir) -> str:
    return str(runs[name]) if name in runs else str(tiny_model_dir)


def chat_body(model: str, question: str, max_tokens: int = 6, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0, **extra}


def sse_payloads(text: str) -> list:
    lines = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


# ---------------------------------------------------------------------------------------------------------------------
# Through FastAPI's TestClient


def test_chat_answers_equal_load_for_inference_greedy_per_adapter(client, runs, tiny_model_dir, reference):
    base = str(tiny_model_dir)
    answers = {}
    for name in (base, "alpha", "beta"):
        reply = client.post("/v1/chat/completions", headers=AUTH, json=chat_body(name, QUESTIONS[0], 8))
        assert reply.status_code == 200, reply.text
        body = reply.json()
        text, count = reference.chat(source_of(name, runs, tiny_model_dir), QUESTIONS[0], 8)
        assert body["choices"][0]["message"] == {"role": "assistant", "content": text}, name
        assert body["usage"]["completion_tokens"] == count and body["model"] == name
        assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + count
        answers[name] = text
    assert len(set(answers.values())) == 3  # the two adapters and the base really answer differently


def test_streaming_chat_sends_the_same_reply_in_pieces(client):
    plain = client.post("/v1/chat/completions", headers=AUTH, json=chat_body("beta", QUESTIONS[1], 8)).json()
    streamed = client.post("/v1/chat/completions", headers=AUTH,
                           json=chat_body("beta", QUESTIONS[1], 8, stream=True,
                                          stream_options={"include_usage": True}))
    assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
    chunks = sse_payloads(streamed.text)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]]
    assert len([p for p in pieces if p]) > 1  # really streamed, not one final chunk
    assert "".join(pieces) == plain["choices"][0]["message"]["content"]
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finish == [plain["choices"][0]["finish_reason"]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]


def test_completions_route_continues_raw_text(client, server, runs, reference):
    prompt = "The sea near Tampere is"
    reply = client.post("/v1/completions", headers=AUTH,
                        json={"model": "alpha", "prompt": prompt, "max_tokens": 7, "temperature": 0})
    assert reply.status_code == 200, reply.text
    prompt_ids = server.tokenizer(prompt)["input_ids"]
    expected = reference.ids(str(runs["alpha"]), prompt_ids, 7)
    body = reply.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == decode(server.tokenizer, expected)
    assert body["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": len(expected),
                             "total_tokens": len(prompt_ids) + len(expected)}
    streamed = client.post("/v1/completions", headers=AUTH,
                           json={"model": "alpha", "prompt": prompt, "max_tokens": 7, "temperature": 0, "stream": True})
    assert "".join(c["choices"][0]["text"] for c in sse_payloads(streamed.text)) == body["choices"][0]["text"]


def test_stop_strings_and_max_tokens_end_the_reply(client):
    full = client.post("/v1/chat/completions", headers=AUTH, json=chat_body("alpha", QUESTIONS[0], 8)).json()
    text = full["choices"][0]["message"]["content"]
    assert full["choices"][0]["finish_reason"] == "length" and full["usage"]["completion_tokens"] == 8
    stop = text[len(text) // 2:len(text) // 2 + 3]
    cut = client.post("/v1/chat/completions", headers=AUTH, json=chat_body("alpha", QUESTIONS[0], 8, stop=[stop]))
    assert cut.json()["choices"][0]["message"]["content"] == text[:text.find(stop)]
    assert cut.json()["choices"][0]["finish_reason"] == "stop"
    streamed = client.post("/v1/chat/completions", headers=AUTH,
                           json=chat_body("alpha", QUESTIONS[0], 8, stop=stop, stream=True))
    pieces = [c["choices"][0]["delta"].get("content", "") for c in sse_payloads(streamed.text) if c["choices"]]
    assert "".join(pieces) == text[:text.find(stop)]  # a stop string split across tokens is never sent


def test_sampling_with_a_seed_is_repeatable(client):
    body = chat_body("beta", QUESTIONS[2], 8, temperature=1.0, top_p=0.9, seed=123)
    first = client.post("/v1/chat/completions", headers=AUTH, json=body).json()["choices"][0]["message"]["content"]
    again = client.post("/v1/chat/completions", headers=AUTH, json=body).json()["choices"][0]["message"]["content"]
    assert first == again


def test_models_route_lists_base_and_adapters(client, tiny_model_dir):
    models = client.get("/v1/models", headers=AUTH).json()
    assert [m["id"] for m in models["data"]] == [str(tiny_model_dir), "alpha", "beta"]
    assert {m.get("parent") for m in models["data"][1:]} == {str(tiny_model_dir)}


@pytest.mark.parametrize("path,method", [("/v1/models", "get"), ("/v1/chat/completions", "post"),
                                         ("/v1/completions", "post"), ("/nowhere", "get")])
def test_api_key_is_required_except_for_health(client, path, method):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        reply = getattr(client, method)(path, headers=headers)
        assert reply.status_code == 401
        assert reply.json()["error"]["type"] == "authentication_error"
    assert client.get("/health").json() == {"status": "ok"}


@pytest.mark.parametrize("body,status,param,words", [
    ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model", "does not exist"),
    ({"model": "alpha"}, 400, "messages", "Field required"),
    ({"model": "alpha", "messages": []}, 400, "messages", "at least 1"),
    ({"model": "alpha", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages", "role"),
    (chat_body("alpha", "x", max_tokens=65), 400, "max_tokens", "at most 64"),
    (chat_body("alpha", "x", max_tokens=0), 400, "max_tokens", "greater than or equal to 1"),
    (chat_body("alpha", "x " * 300, max_tokens=10), 400, "max_tokens", "context length of 256"),
    (chat_body("alpha", "x", temperature=3), 400, "temperature", "less than or equal to 2"),
    (chat_body("alpha", "x", n=2), 400, "n", "only n=1"),
    (chat_body("alpha", "x", stop=["a", "b", "c", "d", "e"]), 400, "stop", "at most 4"),
    (chat_body("alpha", "x", tools=[{"type": "function"}]), 400, "tools", "not supported"),
])
def test_bad_requests_get_one_line_openai_errors(client, body, status, param, words):
    reply = client.post("/v1/chat/completions", headers=AUTH, json=body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and words in error["message"] and "\n" not in error["message"]
    assert error["type"] == "invalid_request_error"


def test_malformed_and_oversized_bodies_are_refused(client, server):
    reply = client.post("/v1/chat/completions", headers={**AUTH, "Content-Type": "application/json"}, content=b"{no")
    assert reply.status_code == 400 and "not valid JSON" in reply.json()["error"]["message"]
    reply = client.post("/v1/completions", headers=AUTH, json={"model": "alpha", "prompt": [10**9]})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "prompt"
    big = json.dumps(chat_body("alpha", "x" * (server.settings.max_body_bytes + 10))).encode()
    reply = client.post("/v1/chat/completions", headers={**AUTH, "Content-Type": "application/json"}, content=big)
    assert reply.status_code == 413 and "larger than" in reply.json()["error"]["message"]


def test_admin_routes_are_off_unless_enabled(client):
    assert client.get("/admin/adapters", headers=AUTH).status_code == 404
    assert client.post("/admin/adapters", headers=AUTH, json={"name": "x", "path": "/tmp"}).status_code == 404


def test_admin_loads_and_unloads_adapters_from_the_allowed_directory_only(server, runs, tmp_path, reference,
                                                                          tiny_model_dir):
    import shutil

    from fastapi.testclient import TestClient

    from tuneforge.deploy.server import build_app

    allowed = tmp_path / "allowed"
    shutil.copytree(runs["beta"], allowed / "gamma-run")
    (allowed / "escape").symlink_to(runs["alpha"], target_is_directory=True)  # a link out of the allowed directory
    sneaky = allowed / "sneaky"
    shutil.copytree(runs["beta"], sneaky)
    (sneaky / "adapter_model.safetensors").unlink()
    (sneaky / "adapter_model.safetensors").symlink_to(runs["alpha"] / "adapter_model.safetensors")
    server.settings.admin_dir = allowed
    try:
        with TestClient(build_app(server)) as admin:
            load = lambda name, path: admin.post("/admin/adapters", headers=AUTH, json={"name": name, "path": path})  # noqa: E731
            for name, path, words in [("g", "../allowed/gamma-run", "'..'"), ("g", str(runs["alpha"]), "outside"),
                                      ("g", "escape", "outside"), ("g", "sneaky", "links outside"),
                                      ("g", "missing", "no such"), ("../g", "gamma-run", "adapter name"),
                                      ("alpha", "gamma-run", "already in use")]:
                reply = load(name, path)
                assert reply.status_code == 400 and words in reply.json()["error"]["message"], (name, path, reply.text)
            assert load("gamma", "gamma-run").json() == {"name": "gamma", "loaded": True}
            assert "gamma" in [m["id"] for m in admin.get("/v1/models", headers=AUTH).json()["data"]]
            reply = admin.post("/v1/chat/completions", headers=AUTH, json=chat_body("gamma", QUESTIONS[3], 6))
            expected, _ = reference.chat(str(runs["beta"]), QUESTIONS[3], 6)  # gamma is a copy of beta
            assert reply.json()["choices"][0]["message"]["content"] == expected
            assert admin.delete("/admin/adapters/gamma", headers=AUTH).json() == {"name": "gamma", "unloaded": True}
            assert admin.post("/v1/chat/completions", headers=AUTH,
                              json=chat_body("gamma", "x")).status_code == 404
            assert admin.delete("/admin/adapters/gamma", headers=AUTH).status_code == 404
            # The adapters given at start are untouched by the load and unload around them.
            reply = admin.post("/v1/chat/completions", headers=AUTH, json=chat_body("alpha", QUESTIONS[3], 6))
            assert reply.json()["choices"][0]["message"]["content"] == reference.chat(
                str(runs["alpha"]), QUESTIONS[3], 6)[0]
    finally:
        server.settings.admin_dir = None


# ---------------------------------------------------------------------------------------------------------------------
# Over HTTP with the official openai client


def test_openai_client_chat_streaming_and_adapter_switching(live_url, runs, tiny_model_dir, reference):
    api = openai_client(live_url)
    assert [m.id for m in api.models.list().data] == [str(tiny_model_dir), "alpha", "beta"]
    answers = {}
    for name in ("alpha", "beta", str(tiny_model_dir)):
        reply = api.chat.completions.create(model=name, messages=[{"role": "user", "content": QUESTIONS[1]}],
                                            max_tokens=6, temperature=0)
        text, count = reference.chat(source_of(name, runs, tiny_model_dir), QUESTIONS[1], 6)
        assert reply.choices[0].message.content == text and reply.usage.completion_tokens == count
        answers[name] = text
    assert len(set(answers.values())) == 3
    stream = api.chat.completions.create(model="alpha", messages=[{"role": "user", "content": QUESTIONS[1]}],
                                         max_tokens=6, temperature=0, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answers["alpha"]
    assert chunks[-1].usage.completion_tokens == 6
    completion = api.completions.create(model="beta", prompt="Hello", max_tokens=4, temperature=0)
    assert completion.usage.completion_tokens == 4 and completion.choices[0].finish_reason == "length"


def test_openai_client_errors(live_url):
    import openai

    with pytest.raises(openai.AuthenticationError):
        openai_client(live_url, key="wrong").models.list()
    api = openai_client(live_url)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        api.chat.completions.create(model="gamma", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="at most 64"):
        api.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "x"}], max_tokens=500)
    with pytest.raises(openai.BadRequestError) as error:
        api.completions.create(model="alpha", prompt="word " * 300, max_tokens=8)
    assert error.value.code == "context_length_exceeded"


def hold_engine(server) -> threading.Event:
    """Park the engine thread (as a long batch would) until the returned event is set."""
    release = threading.Event()
    started = threading.Event()

    def park(_engine):
        started.set()
        release.wait(timeout=60)

    server.engine.run(park)
    assert started.wait(timeout=30)
    return release


def wait_until(condition, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_concurrent_requests_to_different_adapters_share_one_batch_and_get_their_own_answers(
        live_url, server, runs, tiny_model_dir, reference, monkeypatch):
    batches: list[list] = []
    decode_batch = server.engine._decode
    monkeypatch.setattr(server.engine, "_decode", lambda jobs: (batches.append(list(jobs)), decode_batch(jobs)))
    names = ["alpha", "beta", str(tiny_model_dir), "beta", "alpha", "alpha"]
    # Different prompt lengths too, so rows are left-padded differently inside the one batch.
    asks = [(name, QUESTIONS[i % len(QUESTIONS)], 4 + i) for i, name in enumerate(names)]
    api = openai_client(live_url)
    release = hold_engine(server)
    try:
        with ThreadPoolExecutor(len(asks)) as pool:
            futures = [pool.submit(api.chat.completions.create, model=name, max_tokens=budget, temperature=0,
                                   messages=[{"role": "user", "content": question}]) for name, question, budget in asks]
            wait_until(lambda: len(server.engine._jobs) == len(asks), "all requests to queue")
            release.set()
            replies = [f.result(timeout=120) for f in futures]
    finally:
        release.set()
    assert len(batches) == 1 and len(batches[0]) == len(asks)  # one forward pass served every adapter at once
    for (name, question, budget), reply in zip(asks, replies):
        text, count = reference.chat(source_of(name, runs, tiny_model_dir), question, budget)
        assert reply.choices[0].message.content == text, (name, question)
        assert reply.usage.completion_tokens == count


def test_dora_adapters_are_served_beside_lora_ones(tiny_model_dir, runs, tmp_path, reference, monkeypatch):
    """PEFT cannot put DoRA rows in a mixed-adapter batch: they are decoded as their own group, still correctly."""
    from fastapi.testclient import TestClient

    from tuneforge.deploy.server import ServeSettings, build_app, load_server

    dora = make_lora_run(tiny_model_dir, tmp_path / "run-dora", method="dora", seed=3)
    served = load_server(str(tiny_model_dir), [("plain", str(runs["alpha"])), ("dora", str(dora))], ServeSettings())
    groups: list[list] = []
    decode_group = served.engine._decode_group
    monkeypatch.setattr(served.engine, "_decode_group",
                        lambda jobs, route: (groups.append(sorted(j.adapter or "base" for j in jobs)),
                                                    decode_group(jobs, route)))
    asks = [("dora", QUESTIONS[0]), ("plain", QUESTIONS[1]), ("dora", QUESTIONS[2]), (str(tiny_model_dir), QUESTIONS[3])]
    try:
        with TestClient(build_app(served)) as local:
            release = hold_engine(served)
            with ThreadPoolExecutor(len(asks)) as pool:
                futures = [pool.submit(local.post, "/v1/chat/completions", json=chat_body(name, question, 6))
                           for name, question in asks]
                wait_until(lambda: len(served.engine._jobs) == len(asks), "all requests to queue")
                release.set()
                replies = [f.result(timeout=120).json() for f in futures]
    finally:
        served.engine.close()
    assert sorted(groups) == [["base", "plain"], ["dora", "dora"]]  # LoRA + base mixed; DoRA rows together
    sources = {"dora": str(dora), "plain": str(runs["alpha"]), str(tiny_model_dir): str(tiny_model_dir)}
    for (name, question), reply in zip(asks, replies):
        assert reply["choices"][0]["message"]["content"] == reference.chat(sources[name], question, 6)[0], name


def test_requests_beyond_the_concurrency_limit_get_429(live_url, server):
    import openai

    api = openai_client(live_url)
    limit = server.settings.max_concurrent
    server.settings.max_concurrent = 1
    release = hold_engine(server)
    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(api.chat.completions.create, model="alpha", max_tokens=2,
                                messages=[{"role": "user", "content": "x"}])
            wait_until(lambda: server.in_flight == 1, "the first request to be in flight")
            with pytest.raises(openai.RateLimitError, match="too many concurrent requests"):
                api.chat.completions.create(model="beta", max_tokens=2, messages=[{"role": "user", "content": "x"}])
            release.set()
            assert first.result(timeout=60).usage.completion_tokens == 2
    finally:
        release.set()
        server.settings.max_concurrent = limit
    wait_until(lambda: server.in_flight == 0, "the count to drop back")


# ---------------------------------------------------------------------------------------------------------------------
# The command line


def test_serve_command_runs_a_server_the_openai_client_can_use(tiny_model_dir, runs, reference):
    import subprocess
    import sys

    from tests.conftest import ROOT, free_port

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tuneforge", "serve", "--model", str(tiny_model_dir), "--adapter",
         f"alpha={runs['alpha']}", "--port", str(port), "--api-key", KEY, "--max-tokens-limit", "16"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_serving(process, port, process.stdout.read)
        api = openai_client(f"http://127.0.0.1:{port}/v1")
        reply = api.chat.completions.create(model="alpha", messages=[{"role": "user", "content": QUESTIONS[2]}],
                                            max_tokens=5, temperature=0)
        assert reply.choices[0].message.content == reference.chat(str(runs["alpha"]), QUESTIONS[2], 5)[0]
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_serve_command_line_errors_and_vllm_print(tiny_model_dir, runs):
    result = run_cli("serve", "--model", str(tiny_model_dir), "--adapter", "no-equals-sign")
    assert result.returncode == 2 and "expected NAME=PATH" in result.stderr
    assert result.stderr.strip().count("\n") == 0
    result = run_cli("serve", "--model", str(runs["alpha"]))
    assert result.returncode == 2 and "is an adapter" in result.stderr
    result = run_cli("serve", "--engine", "vllm", "--print", "--model", str(tiny_model_dir), "--adapter",
                     f"alpha={runs['alpha']}", "--adapter", f"beta={runs['beta']}", "--api-key", KEY)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["vllm", "serve", str(tiny_model_dir), "--served-model-name", str(tiny_model_dir),
                                     "--host", "127.0.0.1", "--port", "8000", "--enable-lora", "--lora-modules",
                                     f"alpha={runs['alpha'].resolve()}", f"beta={runs['beta'].resolve()}",
                                     "--max-lora-rank", "8", "--max-loras", "2", "--api-key", KEY]
