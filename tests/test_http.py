import asyncio
import json
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from specexec.launch.api import open_llm, tree_choice
from specexec.launch.metrics import Metrics
from specexec.launch.openai_server import create_app
from specexec.launch.options import LinkOptions, ModelOptions, PlacementOptions
from tiny_models import save_tiny_pair

CHAT = {"messages": [{"role": "user", "content": "w10 w11 w12"}], "max_tokens": 12}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """An app over an in-process tiny pair, with its model and metrics."""
    paths, _ = save_tiny_pair(tmp_path_factory.mktemp("pair"))
    metrics = Metrics()
    tree = tree_choice("specexec", 8, 64, 16, 32)
    llm = open_llm(ModelOptions(paths["draft"], paths["target"], "float32"), LinkOptions(in_process=True),
                   PlacementOptions(), tree, max_queued=8, on_round=metrics.on_round, on_result=metrics.on_result)
    app = create_app(llm, "tiny", metrics)
    with TestClient(app) as client:
        yield client, llm, app
    llm.close()


def sse(text: str) -> list:
    lines = [ln[len("data: "):] for ln in text.splitlines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(ln) for ln in lines[:-1]]


def test_model_list(served):
    client, _, _ = served
    body = client.get("/v1/models").json()
    assert body["object"] == "list" and body["data"][0]["id"] == "tiny"


def test_chat_answer_equals_the_python_api(served):
    client, llm, _ = served
    res = client.post("/v1/chat/completions", json=CHAT)
    assert res.status_code == 200, res.text
    body = res.json()
    alone = llm.generate(CHAT["messages"], max_new_tokens=12)
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": alone.text}
    assert choice["finish_reason"] in ("stop", "length") and body["object"] == "chat.completion"
    assert body["usage"]["completion_tokens"] == len(alone.token_ids)


def test_streamed_chat_equals_plain(served):
    client, _, _ = served
    plain = client.post("/v1/chat/completions", json=CHAT).json()
    res = client.post("/v1/chat/completions", json={**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/event-stream")
    chunks = sse(res.text)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == plain["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"] == plain["usage"]


def test_completion_with_usage_and_stop(served):
    client, llm, _ = served
    res = client.post("/v1/completions", json={"prompt": "w10 w11 w12", "max_tokens": 10})
    body = res.json()
    alone = llm.generate("w10 w11 w12", max_new_tokens=10, chat=False)
    assert body["choices"][0]["text"] == alone.text and body["object"] == "text_completion"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": len(alone.token_ids),
                             "total_tokens": 3 + len(alone.token_ids)}
    stop = alone.text.split()[1]
    cut = client.post("/v1/completions", json={"prompt": "w10 w11 w12", "max_tokens": 10, "stop": [stop]}).json()
    assert cut["choices"][0]["text"] == alone.text[:alone.text.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"


def test_three_concurrent_chats_each_equal_its_solo_answer(served):
    _, llm, app = served
    prompts = ["w10 w11 w12", "w20 w21", "w30 w5 w6 w7"]
    solo = [llm.generate([{"role": "user", "content": p}], max_new_tokens=10).text for p in prompts]

    async def together():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            calls = [client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": p}], "max_tokens": 10, "budget": 4}) for p in prompts]
            return await asyncio.gather(*calls)

    answers = asyncio.run(together())
    assert [r.json()["choices"][0]["message"]["content"] for r in answers] == solo


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, None),
    ({"messages": [{"role": "user", "content": "w1"}], "max_tokens": -1}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "w1"}], "max_tokens": "5"}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "w1"}], "temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "user", "content": "w1"}], "stop": 5}, "stop"),
    ({"messages": [{"role": "user"}]}, "messages"),
    ({"messages": "w1"}, "messages"),
    ({"messages": [{"role": "user", "content": "w1"}], "method": "beam"}, None),
    ({"messages": [{"role": "user", "content": "w1"}], "n": 2}, "n"),
    ({"messages": [{"role": "user", "content": "w1"}], "repetition_penalty": 0}, "repetition_penalty"),
    ({"messages": [{"role": "user", "content": "w1"}], "frequency_penalty": 0.5}, "frequency_penalty"),
    ({"messages": [{"role": "user", "content": "w1"}], "presence_penalty": -1}, "presence_penalty"),
])
def test_bad_input_is_an_openai_400(served, body, param):
    client, _, _ = served
    res = client.post("/v1/chat/completions", json=body)
    assert res.status_code == 400, res.text
    error = res.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param:
        assert error["param"] == param


def test_not_json_and_too_long_prompt_are_400(served):
    client, _, _ = served
    res = client.post("/v1/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert res.status_code == 400 and "error" in res.json()
    long_prompt = " ".join(["w5"] * 600)  # the tiny target has 512 positions
    res = client.post("/v1/completions", json={"prompt": long_prompt, "max_tokens": 4})
    assert res.status_code == 400 and "context" in res.json()["error"]["message"]


def test_repetition_penalty_reaches_the_model(served):
    client, llm, _ = served
    body = {"prompt": "w10 w11 w12", "max_tokens": 16, "repetition_penalty": 1.3}
    res = client.post("/v1/completions", json=body)
    assert res.status_code == 200, res.text
    want = llm.generate("w10 w11 w12", max_new_tokens=16, chat=False, repetition_penalty=1.3)
    assert res.json()["choices"][0]["text"] == want.text
    assert want.text != llm.generate("w10 w11 w12", max_new_tokens=16, chat=False).text


def test_extra_fields_are_accepted(served):
    client, _, _ = served
    res = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 3, "budget": 2, "method": "chain",
                                                    "presence_penalty": 0, "user": "me"})
    assert res.status_code == 200 and res.json()["specexec"]["method"] == "chain"


def test_metrics_in_prometheus_format(served):
    client, _, _ = served
    client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 3})
    res = client.get("/metrics")
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/plain")
    text = res.text
    for name in ("specexec_requests_total", "specexec_generated_tokens_total", "specexec_target_passes_total",
                 "specexec_gen_rate", "specexec_round_latency_seconds_bucket", "specexec_draft_seconds_total",
                 "specexec_verify_seconds_total", "specexec_active_sessions"):
        assert name in text, name
    passes = [ln for ln in text.splitlines() if ln.startswith("specexec_target_passes_total ")]
    assert float(passes[0].split()[1]) >= 1


def test_health(served):
    client, _, _ = served
    res = client.get("/health")
    assert res.status_code == 200 and res.json() == {"status": "ok"}


def test_full_queue_is_429(served):
    client, llm, _ = served
    gate = threading.Event()
    blocked = []
    llm.submit(llm.request("w1", max_new_tokens=1), lambda item: (blocked.append(item), gate.wait(10)))
    while not blocked:  # the worker holds the first job (else it would count as waiting: a race under load)
        time.sleep(0.01)
    fillers = [llm.submit(llm.request("w1", max_new_tokens=1), lambda item: None) for _ in range(8)]
    try:
        res = client.post("/v1/chat/completions", json=CHAT)
        assert res.status_code == 429 and res.json()["error"]["type"] == "rate_limit_error"
    finally:
        for job in fillers:
            job.cancel.set()
        gate.set()


def test_openai_client_against_uvicorn(served):
    import socket
    import uvicorn
    from openai import BadRequestError, OpenAI
    _, llm, app = served
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            thread.join(0.05)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        assert [m.id for m in client.models.list()] == ["tiny"]
        answer = client.chat.completions.create(model="tiny", **CHAT)
        solo = llm.generate(CHAT["messages"], max_new_tokens=12).text
        assert answer.choices[0].message.content == solo
        pieces = client.chat.completions.create(model="tiny", stream=True, **CHAT)
        assert "".join(c.choices[0].delta.content or "" for c in pieces if c.choices) == solo
        text = client.completions.create(model="tiny", prompt="w10 w11", max_tokens=5)
        assert text.usage.prompt_tokens == 2 and text.usage.completion_tokens >= 1
        with pytest.raises(BadRequestError):
            client.chat.completions.create(model="tiny", messages=[])
    finally:
        server.should_exit = True
        thread.join(10)


def test_a_disconnected_client_frees_its_slot(served):
    """A waiting request whose client went away is cancelled between rounds; the queue moves on."""
    from specexec.launch.openai_server import ApiError, _collect
    _, llm, _ = served

    class Gone:
        async def is_disconnected(self):
            return True

    gate = threading.Event()
    llm.submit(llm.request("w1", max_new_tokens=1), lambda item: gate.wait(10))  # holds the model
    seen = []

    async def leave():
        with pytest.raises(ApiError, match="disconnected"):
            await _collect(llm, llm.request("w1", max_new_tokens=400, chat=False), Gone())
        seen.append(llm.scheduler.queued)

    try:
        asyncio.run(leave())
    finally:
        gate.set()
    done = llm.generate("w1", max_new_tokens=2, chat=False)
    assert seen == [1] and len(done.token_ids) <= 2 and llm.scheduler.queued == 0


def test_specexec_api_command(tmp_path):
    """`specexec api` on a free port: health, then one chat, over a verifier process it starts."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    paths, _ = save_tiny_pair(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "specexec.launch.cli", "api", "--target", paths["target"],
                             "--draft", paths["draft"], "--dtype", "float32", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.5)
        res = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=60)
        assert res.status_code == 200 and res.json()["choices"][0]["message"]["content"]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)


class _LostVerifier:
    """A pipeline whose verifier never answers."""

    tokenizer, stop_ids, chat_template, draft, target_model = None, frozenset(), "t", None, None

    def encode(self, text, chat):
        return [1, 2]

    def encode_chat(self, messages):
        return [1, 2]

    def generate(self, prompt_ids, options, on_tokens=None, context=None):
        from specexec.protocol.link import LinkError
        raise LinkError("no verifier at tcp://nowhere:1")


def test_a_lost_verifier_is_503_and_unhealthy():
    import contextlib
    from specexec.launch.api import LLM
    llm = LLM(_LostVerifier(), contextlib.ExitStack(), tree_choice("specexec", 8, 64, 16, 32), overlap=False)
    try:
        client = TestClient(create_app(llm, "lost"))
        res = client.post("/v1/chat/completions", json=CHAT)
        assert res.status_code == 503 and "nowhere" in res.json()["error"]["message"]
        assert client.post("/v1/chat/completions", json={**CHAT, "stream": True}).status_code == 503
        health = client.get("/health")
        assert health.status_code == 503 and "nowhere" in health.json()["reason"]
    finally:
        llm.close()
