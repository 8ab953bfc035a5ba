"""Bad input gets OpenAI-shaped errors with the right status (400 invalid values, unknown model, too-long prompt
with the lengths, malformed JSON; 401 without the key; 404 unknown route; 429 when the queue is full; 400 for
tools on a template without tools), and the server keeps answering afterwards. Tool calls are rendered through a
tools-aware template and parsed back from `<tool_call>` blocks."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

openai = pytest.importorskip("openai")

from tinyllm.serve.chat_format import parse_tool_calls  # noqa: E402

MSG = [{"role": "user", "content": "hello"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "weather of a city",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


@pytest.fixture(scope="module")
def server(make_server, checkpoint):
    return make_server(checkpoint)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _bad(client, status: int = 400, **kw):
    args = {"model": "tiny", "messages": MSG, "max_tokens": 4, **kw}
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(**args)
    assert e.value.status_code == status, e.value
    body = e.value.body
    assert set(body) >= {"message", "type", "param", "code"}, body  # the client unwraps {"error": {...}}
    return body


@pytest.mark.parametrize("kw, param", [
    (dict(model="gpt-4o"), "model"),
    (dict(temperature=-0.5), "temperature"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-3), "max_tokens"),
    (dict(top_p=1.5), "top_p"),
    (dict(presence_penalty=3.0), "presence_penalty"),
    (dict(extra_body={"no_repeat_ngram_size": -1}), "no_repeat_ngram_size"),
    (dict(n=0), "n"),
    (dict(logprobs=True, top_logprobs=50), "top_logprobs"),
])
def test_invalid_parameters_are_400(client, kw, param) -> None:
    body = _bad(client, **kw)
    assert body["param"] == param
    assert body["type"] == "invalid_request_error"


def test_prompt_longer_than_context(client, server) -> None:
    ctx = server.state.max_model_len
    body = _bad(client, messages=[{"role": "user", "content": "fox " * 400}])
    assert body["code"] == "context_length_exceeded" and str(ctx) in body["message"] and "prompt has" in body["message"]
    body = _bad(client, max_tokens=ctx)  # prompt + completion over the window: both lengths named
    assert f"{ctx} tokens" in body["message"] and f"{ctx} for the completion" in body["message"]
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model="tiny", prompt=list(range(1, 300)) * 2, max_tokens=2)


def test_malformed_bodies(server, client) -> None:
    url = server.url + "/v1/chat/completions"
    r = httpx.post(url, content=b'{"model": "tiny", "messages": [', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    r = httpx.post(url, json={"model": "tiny"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(url, json={"model": "tiny", "messages": "hi"})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages")
    r = httpx.post(url, json={"model": "tiny", "messages": MSG, "temperature": "hot"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = httpx.post(server.url + "/v1/embeddings", json={"model": "tiny", "input": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    r = httpx.get(server.url + "/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    # and the server still answers
    assert client.chat.completions.create(model="tiny", messages=MSG, max_tokens=2).choices


def test_api_key(make_server, checkpoint) -> None:
    server = make_server(checkpoint, api_key="sekret")
    for key in ("wrong", None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        r = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": MSG}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    ok = openai.OpenAI(base_url=server.url + "/v1", api_key="sekret", max_retries=0)
    assert ok.chat.completions.create(model="tiny", messages=MSG, max_tokens=2).choices
    assert httpx.get(server.url + "/health").status_code == 200  # health and the page need no key


def test_queue_full_is_429(make_server, checkpoint) -> None:
    server = make_server(checkpoint, max_queue=0, max_num_seqs=1)
    body = {"model": "tiny", "messages": MSG, "max_tokens": 300, "stream": True, "ignore_eos": True}
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    gate = threading.Event()
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as first:
        lines = first.iter_lines()  # kept referenced: a dropped iterator closes the connection
        next(lines)  # admitted and streaming
        server.state.loop._submit(lambda: gate.wait(10))  # hold the engine so the first request stays in flight
        try:
            with pytest.raises(openai.RateLimitError) as e:
                client.chat.completions.create(model="tiny", messages=MSG, max_tokens=2)
        finally:
            gate.set()
        assert e.value.body["code"] == "queue_full"
    # the slot frees once the first client is gone (its disconnect is noticed asynchronously)
    deadline = time.time() + 10
    while server.state.loop.num_in_flight and time.time() < deadline:
        time.sleep(0.02)
    assert client.chat.completions.create(model="tiny", messages=MSG, max_tokens=2).choices


def test_tools_rendered_and_refused_without_template_support(make_server, client, checkpoint, plain_checkpoint) -> None:
    plain = make_server(plain_checkpoint)
    plain_client = openai.OpenAI(base_url=plain.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="does not support tools") as e:
        plain_client.chat.completions.create(model="tiny", messages=MSG, tools=[TOOL], max_tokens=2)
    assert e.value.body["param"] == "tools"
    # tool_choice "none": the tools are not rendered, so the request is fine anywhere
    assert plain_client.chat.completions.create(model="tiny", messages=MSG, tools=[TOOL], tool_choice="none",
                                                max_tokens=2).choices
    without = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=2)
    with_tools = client.chat.completions.create(model="tiny", messages=MSG, tools=[TOOL], max_tokens=2)
    assert with_tools.usage.prompt_tokens > without.usage.prompt_tokens + 20  # the schema is in the prompt
    chunks = list(client.chat.completions.create(model="tiny", messages=MSG, tools=[TOOL], max_tokens=3,
                                                 stream=True))
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] in (["length"], ["stop"])
    history = [*MSG, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    assert client.chat.completions.create(model="tiny", messages=history, tools=[TOOL], max_tokens=2).choices
    with pytest.raises(openai.BadRequestError, match="not in 'tools'"):
        client.chat.completions.create(model="tiny", messages=MSG, tools=[TOOL], max_tokens=2,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})


def test_parse_tool_calls() -> None:
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>'
    content, calls = parse_tool_calls(text)
    assert content == "Let me check."
    assert calls[0]["function"]["name"] == "get_weather" and calls[0]["type"] == "function"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "北京"}
    assert calls[0]["id"].startswith("call_")
    assert parse_tool_calls('{"name": "f", "arguments": "{}"}')[1][0]["function"]["arguments"] == "{}"
    assert parse_tool_calls("no calls here") == ("no calls here", [])
    assert parse_tool_calls("<tool_call>not json</tool_call>") == ("<tool_call>not json</tool_call>", [])
