"""The OpenAI-compatible API through the official `openai` client against a live uvicorn server (notes ch.06.4):
chat (plain, streamed with usage, n=2, stop, logprobs, seeds), completions (string, list, token ids, echo with
prompt log-probabilities), embeddings (float and base64, equal to the mean hidden state computed directly),
models, health and metrics — every answer checked against the engine's offline output or a direct forward."""

from __future__ import annotations

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")

from tinyllm.infer.engine import LLM  # noqa: E402
from tinyllm.infer.sampling_params import SamplingParams  # noqa: E402
from tinyllm.serve.chat_format import render_chat  # noqa: E402
from tinyllm.serve.metrics import parse_metrics  # noqa: E402

HELLO = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello, how are you today?"}]
LONG = {"ignore_eos": True}  # vLLM's extension: fixed-length outputs for comparisons


@pytest.fixture(scope="module")
def server(make_server, checkpoint):
    return make_server(checkpoint)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def offline(checkpoint):
    return LLM(str(checkpoint))


def offline_chat(offline, messages, **kw) -> tuple[list[int], str, object]:
    _, ids = render_chat(offline.get_tokenizer(), messages)
    (out,) = offline.generate([ids], SamplingParams(**kw), use_tqdm=False)
    return ids, out.outputs[0].text, out.outputs[0]


def test_models_and_health(client, server) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_chat_greedy_equals_offline_engine(client, offline) -> None:
    r = client.chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=12, extra_body=LONG)
    ids, text, _ = offline_chat(offline, HELLO, temperature=0, max_tokens=12, ignore_eos=True)
    assert r.choices[0].message.content == text
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 12, len(ids) + 12)
    # max_completion_tokens is the newer spelling of max_tokens
    r2 = client.chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_completion_tokens=5,
                                        extra_body=LONG)
    assert r2.usage.completion_tokens == 5 and text.startswith(r2.choices[0].message.content)
    # the no-repeat n-gram extension reaches the engine, over the reply only
    r3 = client.chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=12,
                                        extra_body={**LONG, "no_repeat_ngram_size": 1})
    _, text3, _ = offline_chat(offline, HELLO, temperature=0, max_tokens=12, ignore_eos=True, no_repeat_ngram_size=1,
                               no_repeat_ngram_scope="output")
    assert r3.choices[0].message.content == text3


def test_chat_stream_adds_up_and_reports_usage(client, offline) -> None:
    stream = client.chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}, extra_body=LONG)
    chunks = list(stream)
    _, text, _ = offline_chat(offline, HELLO, temperature=0, max_tokens=12, ignore_eos=True)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert len({c.id for c in chunks}) == 1


def test_raw_sse_framing(server) -> None:
    body = {"model": "tiny", "messages": HELLO, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


def test_n_choices_and_seed(client) -> None:
    kw = dict(model="tiny", messages=HELLO, max_tokens=10, temperature=1.0, extra_body=LONG)
    r = client.chat.completions.create(n=2, seed=7, **kw)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].message.content != r.choices[1].message.content
    assert r.usage.completion_tokens == 20
    again = client.chat.completions.create(n=2, seed=7, **kw)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]
    other = client.chat.completions.create(n=2, seed=8, **kw)
    assert [c.message.content for c in other.choices] != [c.message.content for c in r.choices]
    # streamed n=2: each index gets its own deltas and finish
    chunks = list(client.chat.completions.create(n=2, seed=7, stream=True, **kw))
    texts = ["", ""]
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
    assert texts == [c.message.content for c in r.choices]


def test_stop_string_cuts_the_text(client) -> None:
    full = client.chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=24,
                                          extra_body=LONG).choices[0].message.content
    stop = next(full[i:i + 2] for i in range(3, len(full) - 2) if "\ufffd" not in full[i:i + 2])
    r = client.chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=24, stop=[stop],
                                       extra_body=LONG)
    assert r.choices[0].message.content == full[:full.find(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=HELLO, temperature=0, max_tokens=24, stop=stop, stream=True, extra_body=LONG)
        if c.choices)
    assert streamed == full[:full.find(stop)]


def test_chat_logprobs_equal_offline(client, offline) -> None:
    r = client.chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=6, logprobs=True,
                                       top_logprobs=3, extra_body=LONG)
    _, _, out = offline_chat(offline, HELLO, temperature=0, max_tokens=6, ignore_eos=True, logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    for item, tok, lp in zip(content, out.token_ids, out.logprobs, strict=True):
        assert item.logprob == pytest.approx(lp[tok], abs=1e-5)
        assert len(item.top_logprobs) == 3
        best = sorted(lp.values(), reverse=True)[:3]
        assert [t.logprob for t in item.top_logprobs] == pytest.approx(best, abs=1e-5)
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob, abs=1e-5)  # greedy takes the best


def test_completions(client, offline) -> None:
    tok = offline.get_tokenizer()
    r = client.completions.create(model="tiny", prompt="the quick brown fox", max_tokens=8, temperature=0,
                                  extra_body=LONG)
    (ref,) = offline.generate(["the quick brown fox"], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                              use_tqdm=False)
    assert r.choices[0].text == ref.outputs[0].text and r.object == "text_completion"
    assert r.usage.prompt_tokens == len(tok.encode("the quick brown fox"))
    default = client.completions.create(model="tiny", prompt="hello", temperature=0, extra_body=LONG)
    assert default.usage.completion_tokens == 16  # OpenAI's legacy default
    ids = tok.encode("hello world")
    many = client.completions.create(model="tiny", prompt=["the quick brown fox", "hello world"], n=2, max_tokens=8,
                                     temperature=0, extra_body=LONG)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text == ref.outputs[0].text
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0, extra_body=LONG)
    assert by_ids.choices[0].text == many.choices[2].text
    chunks = list(client.completions.create(model="tiny", prompt=["the quick brown fox", "hello world"], max_tokens=8,
                                            temperature=0, stream=True, extra_body=LONG))
    texts = {0: "", 1: ""}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.text
    assert texts == {0: ref.outputs[0].text, 1: many.choices[2].text}


def test_completion_echo_with_prompt_logprobs(client, offline) -> None:
    prompt = "hello world"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0, echo=True, logprobs=2,
                                  extra_body=LONG)
    tok = offline.get_tokenizer()
    ids = tok.encode(prompt)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith(prompt)
    assert len(lp.tokens) == len(ids) + 4 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    with torch.no_grad():
        ref = torch.log_softmax(offline.engine.model(torch.tensor([ids]))[0].float(), -1)
    for t in range(1, len(ids)):
        assert lp.token_logprobs[t] == pytest.approx(ref[t - 1, ids[t]].item(), abs=1e-4)
    assert lp.text_offset == sorted(lp.text_offset) and "".join(lp.tokens) == r.choices[0].text


def test_embeddings_equal_mean_hidden_state(client, offline) -> None:
    tok = offline.get_tokenizer()
    texts = ["hello world", "你好，世界！"]
    for fmt in ("float", openai.NOT_GIVEN):  # not given: the client asks for base64 and decodes it
        r = client.embeddings.create(model="tiny", input=texts, encoding_format=fmt)
        got = torch.tensor([d.embedding for d in r.data])
        with torch.no_grad():
            ref = torch.stack([offline.engine.model.model(torch.tensor([tok.encode(t)]))[0].mean(0) for t in texts])
        torch.testing.assert_close(got, torch.nn.functional.normalize(ref, dim=-1), atol=1e-5, rtol=0)
    assert r.usage.prompt_tokens == sum(len(tok.encode(t)) for t in texts)
    one = client.embeddings.create(model="tiny", input=tok.encode("hello world"))
    assert len(one.data) == 1 and one.data[0].embedding == pytest.approx(got[0].tolist(), abs=1e-6)


def test_metrics_count_requests_tokens_and_latencies(client, server) -> None:
    client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4, extra_body=LONG)
    text = httpx.get(server.url + "/metrics").text
    m = parse_metrics(text)
    assert m['tinyllm_requests_total{endpoint="/v1/chat/completions",status="200"}'] >= 1
    assert m["tinyllm_generation_tokens_total"] >= 4 and m["tinyllm_prompt_tokens_total"] > 0
    assert m["tinyllm_time_to_first_token_seconds_count"] >= 1
    assert m["tinyllm_inter_token_latency_seconds_count"] >= 3
    assert m["tinyllm_kv_blocks_used"] + m["tinyllm_kv_blocks_free"] == m["tinyllm_kv_blocks_total"]
    for gauge in ("num_requests_waiting", "num_sequences_running", "num_requests_in_flight"):
        assert f"tinyllm_{gauge}" in m
    assert "# TYPE tinyllm_time_to_first_token_seconds histogram" in text
