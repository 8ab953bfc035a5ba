"""The API fuzzed from its own OpenAPI schema (schemathesis over hypothesis) against the in-process app on a tiny
random model: whatever the generated body, no 5xx and no crash; every error is an OpenAI error object; responses
match the documented statuses, content types and schemas. Afterwards the engine still serves: every KV block is
back in the pool and a greedy reply equals the one computed offline before fuzzing.

Gaps it found, now answered 400 naming the field: completion prompts of token ids outside the vocabulary (the
tokenizer raised), seeds outside 64 bits (torch raised), temperatures below 1e-5 (NaN probabilities; now
greedy, as in vLLM), n above 128, non-finite temperature and repetition penalty.

Bounded: a few dozen examples per operation, derandomized (the same cases on every run), deadline off."""

from __future__ import annotations

import time
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.python.asgi import shutdown_lifespans  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from tinyllm.infer.engine import LLM  # noqa: E402
from tinyllm.infer.sampling_params import SamplingParams  # noqa: E402
from tinyllm.serve import create_app  # noqa: E402
from tinyllm.serve.chat_format import render_chat  # noqa: E402

EXAMPLES = 30
MESSAGES = [{"role": "user", "content": "hello world"}]


@pytest.fixture
def fuzzed(checkpoint) -> Any:
    """(app, the greedy reply to MESSAGES computed offline before the app serves)."""
    llm = LLM(str(checkpoint), max_model_len=64)
    _, ids = render_chat(llm.get_tokenizer(), MESSAGES)
    (ref,) = llm.generate([ids], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    app = create_app(llm.engine, model_name="tiny")
    yield app, ref.outputs[0].text
    shutdown_lifespans()  # the lifespan schemathesis started: stops the engine loop


def _check_openai_error(response: Any) -> None:
    assert response.status_code < 500, f"{response.status_code}: {response.text[:500]}"
    if response.status_code >= 400:
        err = response.json()["error"]
        assert set(err) >= {"message", "type", "param", "code"}, err
        assert isinstance(err["message"], str) and err["message"], err


def test_schema_fuzzing_finds_no_server_error(fuzzed) -> None:
    app, reference = fuzzed
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [op.ok() for op in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/embeddings"}
    t0 = time.monotonic()
    for op in operations:
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def run(case: Any) -> None:
            if isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = "tiny"  # reach past the model check into the engine
            response = case.call_and_validate(excluded_checks=[positive_data_acceptance])
            _check_openai_error(response)

        run()
    assert time.monotonic() - t0 < 60, "the fuzzing budget is a minute"

    st = app.state.server
    client = TestClient(app)  # the engine loop is the one schemathesis started
    assert client.get("/health").json() == {"status": "ok"}
    bm = st.engine.block_manager
    deadline = time.monotonic() + 10
    while bm.num_free_blocks != bm.num_blocks and time.monotonic() < deadline:
        time.sleep(0.01)  # streams cut short by the fuzzer are aborted asynchronously
    assert bm.num_free_blocks == bm.num_blocks and st.loop.num_in_flight == 0
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, "temperature": 0,
                                                  "max_tokens": 8, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == reference
