"""`tinyllm serve --speculative ngram`: completions equal the plain engine's greedy text, and /metrics reports
the draft tokens proposed and accepted and the acceptance rate."""

from __future__ import annotations

import pytest

pytest.importorskip("httpx")
from starlette.testclient import TestClient

from tinyllm.infer.engine import LLM
from tinyllm.infer.sampling_params import SamplingParams
from tinyllm.serve.cli import ServeConfig, build_app
from tinyllm.serve.metrics import parse_metrics

PROMPT = "hello world, hello world, hello world, hello"


def test_speculative_server_matches_plain_engine_and_reports_acceptance(checkpoint) -> None:
    (ref,) = LLM(str(checkpoint)).generate(PROMPT, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                                           use_tqdm=False)
    app = build_app(ServeConfig(model=str(checkpoint), speculative="ngram", num_speculative_tokens=3))
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"model": app.state.server.model_name, "prompt": PROMPT,
                                                  "max_tokens": 12, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == ref.outputs[0].text
        m = parse_metrics(client.get("/metrics").text)
    assert m["tinyllm_spec_decode_draft_tokens"] > 0
    assert 0 <= m["tinyllm_spec_decode_accepted_tokens"] <= m["tinyllm_spec_decode_draft_tokens"]
    assert m["tinyllm_spec_decode_acceptance_rate"] == pytest.approx(
        m["tinyllm_spec_decode_accepted_tokens"] / m["tinyllm_spec_decode_draft_tokens"])


def test_serve_config_refuses_a_bad_speculative_setting() -> None:
    with pytest.raises(ValueError, match="num_speculative_tokens=0"):
        ServeConfig(model="x", speculative="ngram", num_speculative_tokens=0)
