"""Tool calling through the OpenAI-compatible server, with the official `openai` client and LangChain's
`ChatOpenAI.bind_tools`: calls parsed from the model's `<tool_call>` text, streamed as deltas, `tool_choice`
honoured, `role: tool` results rendered back through the template, and the Hermes system prompt for a
template that cannot show tools. The model is a tiny one trained (conftest) to script the conversation."""

from __future__ import annotations

import json
import random

import pytest

openai = pytest.importorskip("openai")

from conftest import ANSWER, QUESTION, RESULT, WEATHER_TOOL  # noqa: E402

from tinyllm.serve.tool_calls import ToolCallStreamer, detect_format, parse_tool_calls, prefill  # noqa: E402

ASK = [{"role": "user", "content": QUESTION}]


@pytest.fixture(scope="module")
def server(serve, scripted_checkpoint):
    return serve(scripted_checkpoint)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="none", max_retries=0)


def _streamed(events: list[tuple[str, object]]) -> tuple[str, list[dict]]:
    content = "".join(v for k, v in events if k == "content")
    return content, [v for k, v in events if k == "call"]


SAMPLES = [
    'Sure.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n<tool_call>{"name": "g", '
    '"arguments": {}}</tool_call> done',
    '<tool_call>{"name": "f", "arguments": {"s": "<tool_call> inside"}}</tool_call>',
    "plain text with < and <tool and <tool_cal",
    '<tool_call>not json</tool_call> then <tool_call>{"name": "h", "arguments": {"a": [1, 2]}}',
    '{"name": "bare", "arguments": {"q": "x"}}',
    '[{"name": "a", "arguments": {}}, {"name": "b", "parameters": {"k": 2}}]',
    '{"not": "a call"}',
    "", "   \n", "<tool_call>", '<tool_call>{"name": "f", "arguments": {"x": 1}',
]


@pytest.mark.parametrize("text", SAMPLES)
@pytest.mark.parametrize("fmt", ["hermes", "llama3"])
def test_streamer_equals_whole_parse(text, fmt):
    rng = random.Random(0)
    content, calls = parse_tool_calls(text, fmt)
    for _ in range(30):
        s = ToolCallStreamer(fmt)
        events = []
        i = 0
        while i < len(text):
            j = i + rng.randint(1, 6)
            events += s.feed(text[i:j])
            i = j
        events += s.finish()
        got_content, got_calls = _streamed(events)
        assert (got_content.strip() or None) == ((content or "").strip() or None), text
        assert [c["function"] for c in got_calls] == [c["function"] for c in calls]


def test_mistral_format_and_detection():
    text = 'ok [TOOL_CALLS][{"name": "f", "arguments": {"x": 1}}]'
    content, calls = parse_tool_calls(text, "mistral")
    assert content == "ok" and calls[0]["function"] == {"name": "f", "arguments": '{"x": 1}'}
    s = ToolCallStreamer("mistral")
    assert _streamed(s.feed(text[:8]) + s.feed(text[8:]) + s.finish())[1][0]["function"]["name"] == "f"
    assert detect_format("{{ '[TOOL_CALLS]' }}") == "mistral"
    assert detect_format("{% if tools %}<|python_tag|>{% endif %}") == "llama3"
    assert detect_format("<tool_call>") == detect_format(None) == "hermes"
    assert prefill("hermes", {"type": "function", "function": {"name": "f"}}) == prefill("hermes", "required") \
        == "<tool_call>\n"
    assert prefill("hermes", "auto") == prefill("hermes", "none") == ""


def test_call_result_answer_roundtrip(client):
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER_TOOL], temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_")
    history = [*ASK, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": RESULT}]
    r2 = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER_TOOL], temperature=0)
    assert r2.choices[0].message.content == ANSWER and r2.choices[0].message.tool_calls is None
    assert r2.choices[0].finish_reason == "stop"


def test_streamed_tool_call_deltas(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER_TOOL], temperature=0,
                                                 stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    assert not "".join(d.content or "" for d in deltas).strip()
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # a plain answer streams as content, token by token
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Say hi."}],
                                                 tools=[WEATHER_TOOL], temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hi!" and chunks[-1].choices[0].finish_reason == "stop"


def test_tool_choice(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in ("required", named):
        r = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER_TOOL], temperature=0,
                                           tool_choice=choice)
        assert r.choices[0].message.tool_calls[0].function.name == "get_weather", choice
        chunks = list(client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER_TOOL],
                                                     temperature=0, tool_choice=choice, stream=True))
        calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
        assert json.loads(calls[0].function.arguments) == {"city": "Paris"}, choice
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER_TOOL], temperature=0,
                                       tool_choice="none", max_tokens=30)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason != "tool_calls"
    for bad, msg in [("sometimes", "must be 'none', 'auto', 'required'"),
                     ({"type": "function", "function": {"name": "nope"}}, "not in 'tools'"),
                     ({"type": "function"}, "must name a function")]:
        with pytest.raises(openai.BadRequestError, match=msg) as e:
            client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER_TOOL], tool_choice=bad)
        assert e.value.body["param"] == "tool_choice"
    with pytest.raises(openai.BadRequestError, match="needs a non-empty 'tools'"):
        client.chat.completions.create(model="tiny", messages=ASK, tool_choice="required")


def test_parallel_tool_calls_false_keeps_one(client, server):
    from tinyllm.serve.chat_format import RenderedChat
    from tinyllm.serve.completions import _reply

    r = RenderedChat("", [], True, "hermes", "")
    two = '<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b", "arguments": {}}</tool_call>'
    assert [c["function"]["name"] for c in _reply(two, r, None)[1]] == ["a", "b"]
    assert [c["function"]["name"] for c in _reply(two, r, False)[1]] == ["a"]
    only_b = RenderedChat("", [], True, "hermes", "", only="b")
    assert [c["function"]["name"] for c in _reply(two, only_b, None)[1]] == ["b"]
    resp = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER_TOOL], temperature=0,
                                          parallel_tool_calls=False)
    assert len(resp.choices[0].message.tool_calls) == 1


def test_hermes_prompt_for_a_template_without_tools(serve, scripted_plain_checkpoint):
    refuse = openai.OpenAI(base_url=serve(scripted_plain_checkpoint, tool_prompt="template").url, api_key="none",
                           max_retries=0)
    with pytest.raises(openai.BadRequestError, match="--tool-prompt hermes"):
        refuse.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER_TOOL])
    hermes = openai.OpenAI(base_url=serve(scripted_plain_checkpoint, tool_prompt="hermes").url, api_key="none",
                           max_retries=0)
    r = hermes.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER_TOOL], temperature=0)
    (call,) = r.choices[0].message.tool_calls
    history = [*ASK, r.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": RESULT}]
    r2 = hermes.chat.completions.create(model="tiny", messages=history, tools=[WEATHER_TOOL], temperature=0)
    assert r2.choices[0].message.content == ANSWER


def test_langchain_bind_tools(server):
    lc = pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool as lc_tool

    @lc_tool
    def get_weather(city: str) -> str:
        """Current weather of a city."""
        return RESULT

    llm = lc.ChatOpenAI(base_url=server.url, api_key="none", model="tiny", temperature=0, max_retries=0)
    # the OpenAI dict passes through bind_tools unchanged, so the prompt is the one the model was trained on
    # (LangChain's own schema of get_weather orders its keys differently)
    bound = llm.bind_tools([WEATHER_TOOL])
    ai = bound.invoke([HumanMessage(QUESTION)])
    assert ai.tool_calls and ai.tool_calls[0]["name"] == "get_weather"
    assert ai.tool_calls[0]["args"] == {"city": "Paris"}
    result = get_weather.invoke(ai.tool_calls[0])
    assert isinstance(result, ToolMessage)
    final = bound.invoke([HumanMessage(QUESTION), ai, result])
    assert final.content == ANSWER and not final.tool_calls
    # streaming through LangChain assembles the same call from the deltas
    merged = None
    for part in bound.stream([HumanMessage(QUESTION)]):
        merged = part if merged is None else merged + part
    assert merged.tool_calls[0]["args"] == {"city": "Paris"}
