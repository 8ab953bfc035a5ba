"""Answering: prompt packing under a token budget, citations ⊆ sources, refusal below the threshold, a local
tinyllm model and our own OpenAI-compatible server giving the same answer, an httpx mock of the wire format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tinyllm.rag.embed import HashingEmbedder
from tinyllm.rag.pipeline import (
    REFUSAL,
    LocalLLM,
    OpenAIChatLLM,
    _default_count,
    answer,
    build_prompt,
    parse_citations,
)
from tinyllm.rag.store import Hit, RagStore

pytestmark = pytest.mark.usefixtures("one_thread")

DOCS = [
    {"id": "rag", "text": "检索增强生成（RAG）先检索相关文档，再把文档放进提示词里让大模型回答。", "source": "rag.md"},
    {"id": "bm25", "text": "BM25 是一种基于词频和逆文档频率的关键词检索打分函数。", "source": "bm25.md"},
    {"id": "cake", "text": "蛋糕需要面粉、鸡蛋和糖，烤箱预热到一百八十度。", "source": "cake.md"},
]


def _hit(i: int, text: str, score: float = 1.0) -> Hit:
    return Hit(f"d{i}", f"d{i}#0", text, 0, len(text), score, f"s{i}.txt")


@pytest.fixture
def store(tmp_path: Path) -> RagStore:
    s = RagStore.open(tmp_path / "kb", embedder=HashingEmbedder(512))
    s.add(DOCS)
    yield s
    s.close()


def test_prompt_numbers_sources_and_respects_budget():
    hits = [_hit(1, "第一段资料" * 4), _hit(2, "第二段资料" * 4), _hit(3, "第三段资料" * 4)]
    prompt, used = build_prompt("问题？", hits, max_context_tokens=10_000)
    assert used == hits
    assert prompt.index("[1] s1.txt") < prompt.index("[2] s2.txt") < prompt.index("[3] s3.txt")
    assert "问题 / Question: 问题？" in prompt
    # a budget for one whole source and part of the second: the second is cut, the third never appears
    one = _default_count("[1] s1.txt\n" + hits[0].text) + 1
    prompt, used = build_prompt("问题？", hits, max_context_tokens=one + 8)
    assert [h.doc_id for h in used] == ["d1", "d2"] and "[3]" not in prompt
    context = prompt.split("---------------------\n")[1]
    assert _default_count(context) <= one + 8
    with pytest.raises(ValueError, match="max_context_tokens=0"):
        build_prompt("q", hits, max_context_tokens=0)


def test_citations_are_a_subset_of_sources():
    hits = [_hit(1, "a"), _hit(2, "b")]
    cites = parse_citations("RAG 先检索 [2]，再生成 [1, 2]；[7] 不存在。[2]", hits)
    assert [c.number for c in cites] == [2, 1]
    assert [c.hit.doc_id for c in cites] == ["d2", "d1"]


def test_answer_with_a_fake_llm_cites_the_retrieved_chunk(store):
    prompts = []

    def llm(prompt: str) -> str:
        prompts.append(prompt)
        return "RAG 会先检索文档再生成答案 [1]。"

    out = answer("什么是检索增强生成？", store, llm, k=2, mode="bm25")
    assert not out.refused and len(prompts) == 1
    assert out.hits[0].doc_id == "rag" and out.citations[0].hit.doc_id == "rag"
    assert "[1] rag.md" in prompts[0] and out.text.endswith("[1]。")


def test_refusal_without_calling_the_llm(store):
    def llm(prompt: str) -> str:
        raise AssertionError("the LLM must not be called")

    out = answer("量子纠缠的实验验证", store, llm, mode="dense", min_score=0.3)
    assert out.refused and out.text == REFUSAL and out.hits == [] and out.citations == []
    out = answer("量子纠缠的实验验证", store, llm, mode="hybrid", min_score=0.3)  # hybrid: dense cosine decides
    assert out.refused
    with pytest.raises(ValueError, match="question is empty"):
        answer("  ", store, llm)


def test_openai_wire_format_with_mock_transport():
    httpx = pytest.importorskip("httpx")
    seen = []

    def handler(request):
        seen.append(request)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "m1", "object": "model"}]})
        body = json.loads(request.content)
        text = f"echo {body['messages'][-1]['content'][-6:]} [1]"
        return httpx.Response(200, json={"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                                      "finish_reason": "stop"}]})

    llm = OpenAIChatLLM("http://127.0.0.1:9/v1", api_key="sk-test", transport=httpx.MockTransport(handler),
                        max_tokens=7)
    assert llm("question?") == "echo stion? [1]"
    post = seen[-1]
    assert post.url.path == "/v1/chat/completions" and post.headers["authorization"] == "Bearer sk-test"
    body = json.loads(post.content)
    assert body["model"] == "m1" and body["max_tokens"] == 7 and body["temperature"] == 0.0
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    with pytest.raises(ValueError, match="base_url='localhost:8000'"):
        OpenAIChatLLM("localhost:8000")

    err = OpenAIChatLLM("http://x/v1", model="m", transport=httpx.MockTransport(
        lambda r: httpx.Response(400, json={"error": {"message": "bad"}})))
    with pytest.raises(RuntimeError, match="returned 400"):
        err("q")


def _tiny_chat_checkpoint(directory: Path) -> Path:
    from tinyllm.model.config import ModelConfig
    from tinyllm.model.hf import build_model, save_pretrained
    from tinyllm.tokenizer import train_bpe
    from tinyllm.tokenizer.chat import CHATML_TEMPLATE

    corpus = [d["text"] for d in DOCS] * 10 + ["hello world, answer the question [1]"] * 10
    tok = train_bpe(corpus, 400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                    show_progress=False, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                    chat_template=CHATML_TEMPLATE)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      initializer_range=0.2)
    save_pretrained(build_model(cfg).eval(), directory)
    tok.save(directory)
    return directory


def test_local_model_and_our_server_give_the_same_answer(store, tmp_path):
    pytest.importorskip("fastapi")
    from starlette.testclient import TestClient

    from tinyllm.infer.engine import LLM
    from tinyllm.serve import create_app

    ckpt = _tiny_chat_checkpoint(tmp_path / "tiny")
    local = LocalLLM(str(ckpt), max_tokens=12)
    a_local = answer("什么是检索增强生成？", store, local, k=2, mode="bm25", max_context_tokens=80)
    assert a_local.prompt and not a_local.refused
    app = create_app(LLM(str(ckpt)).engine, model_name="tiny")
    with TestClient(app) as client:
        remote = OpenAIChatLLM("http://testserver/v1", client=client, max_tokens=12)
        a_remote = answer("什么是检索增强生成？", store, remote, k=2, mode="bm25", max_context_tokens=80)
    assert remote.model == "tiny"
    assert a_remote.prompt == a_local.prompt
    assert a_remote.text == a_local.text  # greedy: the same tokens through the engine and through HTTP
