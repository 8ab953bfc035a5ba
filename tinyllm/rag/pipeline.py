"""Answering with retrieved sources (notes ch.08.1.h "response synthesis", ch.08.1.m document QA with
citations, ch.08.2 the classic RAG call pattern: retrieve → construct prompt → LLM → user).

`answer(question, store, llm)`:
1. retrieve k chunks (`store.search`, or a `retrieve.Retriever` for rewriting / reranking / MMR);
2. refuse without calling the LLM when nothing relevant came back: no hit, or the best score below
   `min_score` (a threshold in the retrieval mode's own units: cosine for dense, BM25 score for bm25; RRF
   scores carry no absolute relevance, so hybrid search thresholds the dense cosine of the best hit);
3. build the prompt ("stuff" synthesis): numbered sources `[1] …`, `[2] …` in rank order, packed greedily until
   the context-token budget is spent (a source that does not fit whole is cut to the remaining budget, then
   packing stops), then the question and the instruction to cite sources as [n];
4. generate with any `llm(prompt) -> text`: a tinyllm model (`LocalLLM`, through the engine `tinyllm.LLM`
   with the checkpoint's chat template) or an OpenAI-compatible endpoint (`OpenAIChatLLM`: POST
   {base_url}/chat/completions with httpx — `tinyllm serve`, vLLM, OpenAI);
5. citations: the [n] markers in the answer that name a source in the prompt (others are dropped, so the
   cited hits are always a subset of the retrieved ones).

Not covered: refine / tree-summarize synthesis (one LLM call per chunk), streaming answers, semantic cache.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

LLMFn = Callable[[str], str]

REFUSAL = "抱歉，知识库中没有找到与问题相关的内容，无法回答。(No relevant source was found; I cannot answer.)"
SYSTEM = "你是一个严谨的问答助手，只根据给出的资料回答。You answer only from the given sources."
PROMPT = (
    "请只根据下面编号的资料回答问题，并在用到的句子后用 [编号] 标注来源，例如 [1]。"
    "如果资料中没有答案，请直接说不知道。\n"
    "Answer the question using only the numbered sources below, citing them as [n]. "
    "If the sources do not contain the answer, say you don't know.\n"
    "---------------------\n{context}\n---------------------\n问题 / Question: {question}\n回答 / Answer:")


@dataclass
class Citation:
    number: int  # the [n] in the answer
    hit: Any


@dataclass
class Answer:
    text: str
    hits: list[Any] = field(default_factory=list)  # the sources given to the LLM, numbered from 1
    citations: list[Citation] = field(default_factory=list)
    refused: bool = False
    prompt: str = ""


def _default_count(text: str) -> int:
    """Token estimate without a tokenizer: one per CJK character, one per other word (≈ BPE on Chinese)."""
    return len(re.findall(r"[\u3400-\u9fff\uf900-\ufaff]|[^\s\u3400-\u9fff\uf900-\ufaff]+", text))


def format_source(number: int, hit: Any, text: str | None = None) -> str:
    label = getattr(hit, "source", "") or getattr(hit, "doc_id", "")
    title = (getattr(hit, "metadata", None) or {}).get("title", "")
    head = f"[{number}] " + " · ".join(x for x in (title, label) if x)
    return f"{head}\n{hit.text if text is None else text}"


def build_prompt(question: str, hits: Sequence[Any], max_context_tokens: int = 1500,
                 count_tokens: Callable[[str], int] | None = None,
                 template: str = PROMPT) -> tuple[str, list[Any]]:
    """(prompt, the hits that made it in). Sources are numbered in rank order and packed until the budget
    of `max_context_tokens` (counted by `count_tokens`) is spent; see the module docstring."""
    if max_context_tokens <= 0:
        raise ValueError(f"max_context_tokens={max_context_tokens!r} must be positive")
    count = count_tokens or _default_count
    blocks: list[str] = []
    used: list[Any] = []
    budget = max_context_tokens
    for hit in hits:
        block = format_source(len(used) + 1, hit)
        cost = count(block) + 1  # + the newline between blocks
        if cost <= budget:
            blocks.append(block)
            used.append(hit)
            budget -= cost
            continue
        # cut the text to what still fits (binary search on characters), then stop packing
        head_cost = count(format_source(len(used) + 1, hit, "")) + 1
        lo, hi = 0, len(hit.text)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if head_cost + count(hit.text[:mid]) <= budget:
                lo = mid
            else:
                hi = mid - 1
        if lo > 0:
            blocks.append(format_source(len(used) + 1, hit, hit.text[:lo]))
            used.append(hit)
        break
    return template.format(context="\n".join(blocks), question=question), used


_CITE = re.compile(r"\[(\d+(?:\s*[,，、]\s*\d+)*)\]")


def parse_citations(text: str, hits: Sequence[Any]) -> list[Citation]:
    """[n] and [n, m] markers in order of first appearance; numbers outside 1..len(hits) are ignored."""
    seen: list[int] = []
    for m in _CITE.finditer(text):
        for part in re.split(r"\s*[,，、]\s*", m.group(1)):
            n = int(part)
            if 1 <= n <= len(hits) and n not in seen:
                seen.append(n)
    return [Citation(n, hits[n - 1]) for n in seen]


def _best_relevance(hits: Sequence[Any], mode: str, question: str, store: Any) -> float:
    if mode != "hybrid":
        return max(h.score for h in hits)
    dense = store.search(question, k=1, mode="dense")
    return dense[0].score if dense else float("-inf")


def answer(question: str, store: Any, llm: LLMFn, k: int = 5, mode: str = "hybrid",
           min_score: float | None = None, max_context_tokens: int = 1500,
           count_tokens: Callable[[str], int] | None = None, retriever: Any = None) -> Answer:
    """Retrieve, refuse or prompt, generate, cite. Returns Answer(text, hits, citations)."""
    if not question or not question.strip():
        raise ValueError("question is empty")
    hits = retriever.search(question, k=k) if retriever is not None else store.search(question, k=k, mode=mode)
    if not hits or (min_score is not None and _best_relevance(hits, mode, question, store) < min_score):
        return Answer(REFUSAL, [], [], refused=True)
    prompt, used = build_prompt(question, hits, max_context_tokens, count_tokens)
    text = llm(prompt).strip()
    return Answer(text, used, parse_citations(text, used), refused=False, prompt=prompt)


# ------------------------------------------------------------------ LLM back ends
class EndpointError(ConnectionError, RuntimeError):
    """An OpenAI-compatible endpoint that cannot be reached, fails, or answers something that is not the API's
    JSON; the message names the URL. A ConnectionError (an OSError) for callers that treat I/O failures alike."""


class LocalLLM:
    """A tinyllm checkpoint behind `llm(prompt) -> text`: chat template (when the tokenizer has one), then
    the engine's generate (greedy by default)."""

    def __init__(self, model: Any, max_tokens: int = 256, temperature: float = 0.0, system: str = SYSTEM,
                 **llm_kwargs: Any) -> None:
        from tinyllm.infer.engine import LLM

        self.llm = model if hasattr(model, "generate") and hasattr(model, "get_tokenizer") else LLM(model, **llm_kwargs)
        if self.llm.get_tokenizer() is None:
            raise ValueError(f"{model}: no tokenizer.json; answering from text needs the checkpoint's tokenizer")
        self.max_tokens, self.temperature, self.system = max_tokens, temperature, system

    def render(self, prompt: str) -> str:
        from tinyllm.tokenizer import apply_chat_template

        tok = self.llm.get_tokenizer()
        if not getattr(tok, "chat_template", None):
            return prompt
        msgs = [{"role": "system", "content": self.system}, {"role": "user", "content": prompt}]
        return apply_chat_template(msgs, tok.chat_template, add_generation_prompt=True,
                                   bos_token=getattr(tok, "bos_token", "") or "",
                                   eos_token=getattr(tok, "eos_token", "") or "")

    def __call__(self, prompt: str) -> str:
        from tinyllm.infer.sampling_params import SamplingParams

        params = SamplingParams(temperature=self.temperature, max_tokens=self.max_tokens)
        text = self.render(prompt)
        tok = self.llm.get_tokenizer()
        try:  # the template's special tokens (<|im_start|>) must stay single tokens, as the server encodes them
            ids: Any = tok.encode(text, allowed_special="all")
        except TypeError:
            ids = text
        window, n = self.context_window(), self.count_tokens(text)
        if n >= window:
            raise ValueError(f"the prompt is {n} tokens; the model's context holds {window} positions "
                             "(lower the source budget, max_context_tokens)")
        out = self.llm.generate([ids], params, use_tqdm=False)
        return out[0].outputs[0].text

    def context_window(self) -> int:
        """Positions the model attends over: the engine's max_model_len (the model's context by default)."""
        window = getattr(getattr(self.llm, "engine", None), "max_model_len", None)
        return int(window) if window else sys.maxsize  # an object without an engine: no known limit

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` as the prompt encodes them (special-token spellings kept whole)."""
        tok = self.llm.get_tokenizer()
        try:
            return len(tok.encode(text, allowed_special="all"))
        except TypeError:
            return len(tok.encode(text))

    def source_budget(self, question: str, wanted: int, template: str = PROMPT) -> int:
        """The most source tokens a prompt may carry so that the rendered prompt plus `max_tokens` of answer
        fit the context window: `min(wanted, window - max_tokens - tokens of the prompt without sources)`.
        The answer keeps at most half the window. Raises ValueError when not even one source token fits."""
        window = self.context_window()
        bare = self.count_tokens(self.render(template.format(context="", question=question)))
        room = window - min(self.max_tokens, window // 2) - bare - 1
        if room < 1:
            raise ValueError(f"the question and instructions take {bare} tokens of the model's {window}-position "
                             f"context with max_tokens={self.max_tokens} reserved for the answer: no room for "
                             "sources (shorten the question, lower --max-tokens or use a longer-context model)")
        return min(wanted, room)


class OpenAIChatLLM:
    """An OpenAI-compatible chat endpoint (`tinyllm serve`, vLLM, OpenAI) behind `llm(prompt) -> text`.

    `transport` is an httpx transport for tests (`httpx.MockTransport`); `client` an httpx.Client-like object
    to use instead (e.g. starlette's TestClient over `tinyllm.serve.create_app`), whose base URL is kept."""

    def __init__(self, base_url: str, api_key: str = "", model: str = "", max_tokens: int = 256,
                 temperature: float = 0.0, system: str = SYSTEM, timeout: float = 120.0,
                 transport: Any = None, client: Any = None) -> None:
        import httpx

        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url={base_url!r} must start with http:// or https://")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        if client is not None:
            client.base_url = base_url.rstrip("/")
            client.headers.update(headers)
            self.client = client
        else:
            self.client = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout,
                                       transport=transport)
        self.model, self.max_tokens, self.temperature, self.system = model, max_tokens, temperature, system

    def _url(self, path: str) -> str:
        return str(self.client.base_url).rstrip("/") + path

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        """The JSON body of a 200 answer to `method path`; EndpointError naming the URL otherwise."""
        import httpx

        url = self._url(path)
        try:
            r = self.client.request(method, path, **kwargs)
        except (httpx.HTTPError, httpx.InvalidURL) as e:  # refused, timed out, reset, not HTTP at all
            raise EndpointError(f"{url}: {type(e).__name__}: {e or 'no answer'}") from None
        if r.status_code != 200:
            raise EndpointError(f"{url} returned {r.status_code}: {' '.join(r.text[:300].split())}")
        try:
            return r.json()
        except ValueError:
            raise EndpointError(f"{url}: the answer is not JSON ({' '.join(r.text[:100].split())!r})") from None

    def _model(self) -> str:
        if not self.model:
            body = self._request("GET", "/models")
            try:
                self.model = body["data"][0]["id"]
            except (KeyError, IndexError, TypeError):
                raise EndpointError(f"{self._url('/models')}: no model listed in {str(body)[:100]!r}; "
                                    "pass the model name") from None
        return self.model

    def __call__(self, prompt: str) -> str:
        body = {"model": self._model(), "max_tokens": self.max_tokens, "temperature": self.temperature,
                "messages": [{"role": "system", "content": self.system}, {"role": "user", "content": prompt}]}
        out = self._request("POST", "/chat/completions", json=body)
        try:
            return out["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise EndpointError(f"{self._url('/chat/completions')}: not a chat completion: "
                                f"{str(out)[:100]!r}") from None
