"""The OpenAI-endpoint backend against our own server (`tinyllm.serve`, in process through starlette's
TestClient): log-likelihoods, is_greedy, rolling log-likelihood and greedy generation equal scoring the same
checkpoint offline (within 1e-4), with token-id prompts when the tokenizer is given and with text prompts
split at `text_offset` when it is not; an endpoint without echoed logprobs is a clear error."""

from __future__ import annotations

import pytest
import torch
from eval_helpers import save_tiny_lm

from tinyllm.eval.endpoint import OpenAILM
from tinyllm.eval.lm import TinyLM
from tinyllm.model.hf import load_model
from tinyllm.rag.pipeline import EndpointError
from tinyllm.tokenizer import load_tokenizer

pytest.importorskip("fastapi")
testclient = pytest.importorskip("starlette.testclient")

REQUESTS = [("Question: the model\nAnswer:", " A"), ("Question: the model\nAnswer:", " reads the"),
            ("What is", " plus minus"), ("", "the model reads"), ("注意力", "机制是什么")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tinyllm.infer.engine import LLM
    from tinyllm.serve import create_app

    torch.set_num_threads(1)
    path = save_tiny_lm(tmp_path_factory.mktemp("ep") / "tiny", max_position_embeddings=256)
    app = create_app(LLM(str(path)).engine, model_name="tiny")
    with testclient.TestClient(app) as client:
        yield path, client


def test_token_mode_equals_offline(setup) -> None:
    path, client = setup
    tok = load_tokenizer(path)
    offline = TinyLM(load_model(path), tok, max_length=200)
    remote = OpenAILM("http://testserver/v1", tokenizer=tok, max_length=200, client=client)
    for (a, ga), (b, gb) in zip(remote.loglikelihood(REQUESTS, batch_size=2), offline.loglikelihood(REQUESTS)):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    texts = ["the model reads the question " * 60, "注意力机制"]
    assert len(tok.encode(texts[0])) > 200  # two windows
    # a sum over ~360 tokens: float32 rounding of the summed terms, 1e-4 relative to a token each
    assert remote.loglikelihood_rolling(texts) == pytest.approx(offline.loglikelihood_rolling(texts), rel=1e-6, abs=1e-4)
    reqs = [("the model", {"until": ["\n"], "max_gen_toks": 8}), ("What is", {"until": ["A"], "max_gen_toks": 6})]
    assert remote.generate_until(reqs) == offline.generate_until(reqs)


def test_text_mode_equals_offline_where_the_split_agrees(setup) -> None:
    path, client = setup
    offline = TinyLM(load_model(path), load_tokenizer(path))
    remote = OpenAILM("http://testserver/v1", client=client)
    # text offsets count decoded characters: a token holding part of a UTF-8 character shifts them, so
    # text mode is exact only for text whose tokens are whole characters (here ASCII)
    reqs = [r for r in REQUESTS if r[0] and r[0].isascii()]
    for (a, ga), (b, gb) in zip(remote.loglikelihood(reqs), offline.loglikelihood(reqs)):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    with pytest.raises(ValueError, match="tokenizer"):
        remote.loglikelihood([("", "the model")])


def test_endpoint_without_logprobs_is_a_clear_error() -> None:
    httpx = pytest.importorskip("httpx")

    def handler(request):
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"data": [{"id": "m"}]})
        return httpx.Response(200, json={"choices": [{"index": 0, "text": "x", "logprobs": None}]})

    lm = OpenAILM("http://127.0.0.1:1/v1", transport=httpx.MockTransport(handler))
    with pytest.raises(EndpointError, match="echo"):
        lm.loglikelihood([("a", " b")])
