"""An OpenAI-compatible endpoint as an evaluation backend (notes ch.09 评估; `tinyllm serve`, vLLM, OpenAI).

Log-likelihoods come from `/v1/completions` with `echo: true, logprobs: 1, max_tokens: 1, temperature: 0`:
the answer carries the log-probability of every prompt token (the first is null) and the most likely token
at each position, so Σ over the continuation's tokens is the request's log-likelihood and `is_greedy` holds
when each continuation token's log-probability is its position's top one (lm-eval's `local-completions`
reads the same fields). The one generated token is ignored.

With a tokenizer (the served model's), prompts go as token ids split exactly as offline (`encode_pair`,
rolling windows): the same numbers as scoring the model in process. Without one, prompts go as text and
the continuation is the tokens whose `text_offset` falls at or after the context's end; rolling
log-likelihood is then one echo of the whole text (no windows: texts must fit the endpoint's context).
Offsets count decoded characters, and a byte-level token holding part of a UTF-8 character decodes to
U+FFFD, so text mode is exact only where tokens are whole characters: give the tokenizer for Chinese.
In token mode the endpoint receives (context + continuation) cut to `max_length + 1` tokens and generates
one more: set `max_length` at most the served context window minus 2.
Generation: `/v1/completions` with `stop` and `max_tokens`, temperature 0 unless asked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tinyllm.eval.lm import LM, Pair, cut_at_stops
from tinyllm.rag.pipeline import EndpointError, OpenAIChatLLM


class OpenAILM(LM):
    """`tokenizer` (optional): anything with `encode(text)` and BOS/EOS ids, the served model's."""

    def __init__(self, base_url: str, model: str = "", api_key: str = "", tokenizer: Any = None,
                 max_length: int = 2048, timeout: float = 300.0, transport: Any = None, client: Any = None) -> None:
        self.http = OpenAIChatLLM(base_url, api_key=api_key, model=model, timeout=timeout, transport=transport,
                                  client=client)
        self.tokenizer, self.max_length = tokenizer, max_length
        if tokenizer is not None:
            bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
            self.prefix_token_id = bos if bos is not None else eos

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("token-level requests need the served model's tokenizer (pass --tokenizer)")
        return self.tokenizer.encode(text, add_special_tokens=bool(getattr(self.tokenizer, "add_bos_token", False)))

    def _echo(self, prompts: list[Any]) -> list[dict[str, Any]]:
        body = {"model": self.http._model(), "prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 1,
                "temperature": 0.0}
        out = self.http._request("POST", "/completions", json=body)
        try:
            choices = sorted(out["choices"], key=lambda c: c["index"])
            lps = [c["logprobs"] for c in choices]
            for lp in lps:
                lp["token_logprobs"], lp["top_logprobs"]
        except (KeyError, TypeError):
            raise EndpointError(f"{self.http._url('/completions')}: no echoed logprobs in {str(out)[:120]!r}; "
                                "the endpoint must support echo with logprobs") from None
        if len(lps) != len(prompts):
            raise EndpointError(f"{len(lps)} choices for {len(prompts)} prompts")
        return lps

    @staticmethod
    def _sum(lp: dict[str, Any], start: int, stop: int) -> tuple[float, bool]:
        total, greedy = 0.0, True
        for t in range(start, stop):
            v = lp["token_logprobs"][t]
            total += v
            top = lp["top_logprobs"][t] or {}
            greedy = greedy and (not top or v >= max(top.values()) - 1e-6)
        return total, greedy

    def score(self, pairs: Sequence[Pair], batch_size: int = 1) -> list[tuple[float, bool]]:
        out = []
        for s in range(0, len(pairs), max(batch_size, 1)):
            chunk = [(ctx + cont)[-(self.max_length + 1):] for ctx, cont in pairs[s: s + batch_size]]
            for (_, cont), ids, lp in zip(pairs[s: s + batch_size], chunk, self._echo(chunk)):
                n = len(ids)  # the echoed prompt plus one generated token
                out.append(self._sum(lp, n - len(cont), n))
        return out

    def loglikelihood(self, requests: Sequence[tuple[str, str]], batch_size: int = 1) -> list[tuple[float, bool]]:
        if self.tokenizer is not None:
            return super().loglikelihood(requests, batch_size)
        out = []
        for s in range(0, len(requests), max(batch_size, 1)):
            chunk = requests[s: s + batch_size]
            for (ctx, _cont), lp in zip(chunk, self._echo([c + x for c, x in chunk])):
                if not ctx:
                    raise ValueError("an empty context needs the served model's tokenizer (pass --tokenizer)")
                cut = len(ctx.rstrip())  # trailing spaces belong to the continuation, as offline
                offs = lp["text_offset"][: len(lp["token_logprobs"]) - 1]
                first = next((i for i, o in enumerate(offs) if o >= cut), len(offs))
                out.append(self._sum(lp, max(first, 1), len(offs)))
        return out

    def loglikelihood_rolling(self, texts: Sequence[str], batch_size: int = 1) -> list[float]:
        if self.tokenizer is not None:
            return super().loglikelihood_rolling(texts, batch_size)
        lps = self._echo(list(texts))
        return [self._sum(lp, 1, len(lp["token_logprobs"]) - 1)[0] for lp in lps]

    def generate_until(self, requests: Sequence[tuple[str, dict[str, Any]]], batch_size: int = 1) -> list[str]:
        out = []
        for context, kw in requests:
            until = [s for s in kw.get("until", []) if s]
            body = {"model": self.http._model(), "prompt": context, "max_tokens": int(kw.get("max_gen_toks", 256)),
                    "temperature": float(kw.get("temperature", 0.0)), **({"stop": until[:4]} if until else {})}
            if kw.get("seed") is not None:
                body["seed"] = kw["seed"]
            res = self.http._request("POST", "/completions", json=body)
            try:
                text = res["choices"][0]["text"]
            except (KeyError, IndexError, TypeError):
                raise EndpointError(f"{self.http._url('/completions')}: not a completion: {str(res)[:100]!r}") from None
            out.append(cut_at_stops(text, until))
        return out
