"""`/v1/chat/completions` and `/v1/completions` over the engine loop (notes ch.06.1 decoding parameters, ch.06.4
OpenAI-compatible serving; the OpenAI API reference).

A request becomes `SamplingParams` (OpenAI names → vLLM semantics: temperature 0 is greedy, penalties additive)
plus prompt token ids (chat: the model's chat template; completions: each prompt string or token list), is
admitted into the running batch, and is answered either whole (a JSON body) or as Server-Sent Events: one
`data: {chunk}` per engine step that produced text, a last chunk with `finish_reason`, an optional usage chunk
(`stream_options.include_usage`) and `data: [DONE]`. Log-probabilities are those of the raw model distribution
(`logprobs` / `top_logprobs`); `echo` with `logprobs` scores the prompt with one extra forward. A fault after a
stream has begun arrives as one `data: {"error": {...}}` event followed by `data: [DONE]`.

max_tokens defaults: chat → whatever the context window leaves; completions → 16 (OpenAI's legacy default).
Tool calls (`tool_calls.py`): a tools request parses the reply into OpenAI `tool_calls`; streamed, content
arrives as it is decided and each call as one delta when its block closes.
Not covered: `best_of`, `suffix`, `logit_bias`, streaming of partial tool-call arguments.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import torch
from fastapi.responses import StreamingResponse

from tinyllm.infer.sampling_params import SamplingParams
from tinyllm.infer.sequence import CompletionOutput, RequestOutput
from tinyllm.serve import protocol as P
from tinyllm.serve.async_engine import EngineError, RequestStream
from tinyllm.serve.chat_format import ChatFormatError, RenderedChat, parse_tool_calls, render_chat_tools
from tinyllm.serve.errors import APIError
from tinyllm.serve.state import ServerState
from tinyllm.serve.tool_calls import ToolCallStreamer

COMPLETIONS_DEFAULT_MAX_TOKENS = 16
MAX_N = 128  # samples per request, OpenAI's documented limit


def sampling_params(st: ServerState, req: P._Sampling, max_tokens: int | None, prompt_lens: list[int],
                    param: str, logprobs: int | None, default_max: int | None = None) -> SamplingParams:
    if isinstance(req.n, int) and req.n > MAX_N:
        raise APIError(400, f"n={req.n} must be at most {MAX_N}", "n", "invalid_value")
    for n in prompt_lens:
        st.check_context(n, max_tokens, param)
    if max_tokens is None:
        room = st.max_model_len - max(prompt_lens)
        max_tokens = room if default_max is None else min(default_max, room)
    try:
        return SamplingParams(
            n=req.n, temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0, min_p=req.min_p or 0.0,
            repetition_penalty=req.repetition_penalty or 1.0, no_repeat_ngram_size=req.no_repeat_ngram_size or 0,
            no_repeat_ngram_scope="output", presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty, seed=req.seed, max_tokens=max_tokens, stop=req.stop,
            logprobs=logprobs, ignore_eos=req.ignore_eos)
    except ValueError as e:
        raise APIError.from_value_error(e) from None


def sse(payload: P.BaseModel | str) -> str:
    data = payload if isinstance(payload, str) else payload.model_dump_json(exclude_none=True)
    return f"data: {data}\n\n"


def _error_event(error: Exception) -> str:
    """The in-band error of a stream whose 200 has gone out: the OpenAI error object as one SSE event."""
    if isinstance(error, EngineError):
        code = "engine_unavailable" if error.unavailable else "engine_error"
    else:
        code = "internal_error"
    return sse(json.dumps({"error": {"message": str(error) or type(error).__name__, "type": "server_error",
                                     "param": None, "code": code}}))


def _stream_response(body: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---------------------------------------------------------------- log-probabilities
class _Tokens:
    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer

    def text(self, token: int) -> str:
        return self.tok.decode([token])

    def bytes(self, token: int) -> list[int]:
        raw = getattr(self.tok, "decode_bytes", None)
        return list(raw([token]) if raw else self.text(token).encode())

    def top(self, lp: dict[int, float], k: int) -> list[tuple[int, float]]:
        return sorted(lp.items(), key=lambda kv: -kv[1])[:k]


def chat_logprobs(tokens: _Tokens, ids: list[int], lps: list[dict[int, float]], k: int) -> P.ChoiceLogprobs:
    content = [P.TokenLogprob(token=tokens.text(t), logprob=lp[t], bytes=tokens.bytes(t), top_logprobs=[
        P.TopLogprob(token=tokens.text(i), logprob=v, bytes=tokens.bytes(i)) for i, v in tokens.top(lp, k)])
        for t, lp in zip(ids, lps, strict=True)]
    return P.ChoiceLogprobs(content=content)


def completion_logprobs(tokens: _Tokens, ids: list[int], lps: list[dict[int, float] | None], k: int,
                        offset: int) -> P.CompletionLogprobs:
    out = P.CompletionLogprobs()
    for t, lp in zip(ids, lps, strict=True):
        s = tokens.text(t)
        out.tokens.append(s)
        out.token_logprobs.append(None if lp is None else lp[t])
        out.top_logprobs.append(None if lp is None else {tokens.text(i): v for i, v in tokens.top(lp, k)})
        out.text_offset.append(offset)
        offset += len(s)
    return out


def prompt_logprobs(model: torch.nn.Module, ids: list[int], k: int) -> list[dict[int, float] | None]:
    """log p(x_t | x_<t) of every prompt token (None for the first) plus the k most likely alternatives."""
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(torch.tensor([ids], device=device))[0].float()  # [T, V]
    lp = torch.log_softmax(logits[:-1], dim=-1)
    out: list[dict[int, float] | None] = [None]
    for t in range(1, len(ids)):
        row = lp[t - 1]
        vals, idx = row.topk(k) if k else (row[:0], row[:0].long())
        d = dict(zip(idx.tolist(), vals.tolist(), strict=True))
        d[ids[t]] = row[ids[t]].item()
        out.append(d)
    return out


def _new_logprobs(o: CompletionOutput) -> list[dict[int, float]]:
    n = len(o.delta_token_ids)
    return (o.logprobs or [])[len(o.token_ids) - n:] if n else []


async def _final(stream: RequestStream) -> RequestOutput:
    last = None
    async for out in stream:
        last = out
    assert last is not None
    return last


def _usage(prompt_tokens: int, outputs: list[CompletionOutput]) -> P.Usage:
    completion = sum(len(o.token_ids) for o in outputs)
    return P.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion)


# ---------------------------------------------------------------- chat
async def chat_completion(st: ServerState, req: P.ChatCompletionRequest) -> Any:
    st.check_model(req.model)
    try:
        rendered = render_chat_tools(st.tokenizer, [m.model_dump() for m in req.messages], req.tools,
                                     req.tool_choice, st.tool_prompt)
    except ChatFormatError as e:
        raise APIError(400, str(e), e.param) from None
    ids = rendered.ids
    if req.top_logprobs is not None and not 0 <= req.top_logprobs <= 20:
        raise APIError(400, f"top_logprobs={req.top_logprobs} must be in [0, 20]", "top_logprobs")
    k = (req.top_logprobs or 0) if req.logprobs else None
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params = sampling_params(st, req, max_tokens, [len(ids)], "messages", k)
    cid = f"chatcmpl-{uuid.uuid4().hex}"
    (stream,) = await st.admit([(cid, ids, params, None)])
    tokens = _Tokens(st.tokenizer)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _stream_response(_chat_events(st, req, cid, stream, len(ids), rendered, tokens, include_usage))
    try:
        final = await _final(stream)
    finally:
        stream.abort()
        st.release(1)
    choices = []
    for o in final.outputs:
        content, calls = _reply(o.text, rendered, req.parallel_tool_calls)
        choices.append(P.ChatChoice(
            index=o.index, finish_reason="tool_calls" if calls else o.finish_reason,
            message=P.AssistantMessage(content=content, tool_calls=[P.ToolCall(**c) for c in calls] or None),
            logprobs=chat_logprobs(tokens, o.token_ids, o.logprobs or [], k) if k is not None else None))
    return P.ChatCompletion(id=cid, model=st.model_name, choices=choices, usage=_usage(len(ids), final.outputs))


def _reply(text: str, rendered: RenderedChat, parallel: bool | None) -> tuple[str | None, list[dict[str, Any]]]:
    if not rendered.tools_active:
        return text, []
    content, calls = parse_tool_calls(rendered.prefill + text, rendered.fmt)
    if rendered.only:
        calls = [c for c in calls if c["function"]["name"] == rendered.only]
    if not calls and rendered.prefill:
        content = text  # the forced call did not parse: give back what the model wrote
    return content, calls[:1] if parallel is False else calls


async def _chat_events(st: ServerState, req: P.ChatCompletionRequest, cid: str, stream: RequestStream,
                       prompt_tokens: int, rendered: RenderedChat, tokens: _Tokens,
                       include_usage: bool) -> AsyncIterator[str]:
    k = (req.top_logprobs or 0) if req.logprobs else None

    def chunk(index: int, delta: P.Delta, finish: str | None = None, lp: P.ChoiceLogprobs | None = None) -> str:
        return sse(P.ChatCompletionChunk(id=cid, model=st.model_name, choices=[
            P.ChunkChoice(index=index, delta=delta, finish_reason=finish, logprobs=lp)]))

    done: set[int] = set()
    final: list[CompletionOutput] = []
    streamers = [ToolCallStreamer(rendered.fmt) for _ in range(req.n)] if rendered.tools_active else []
    for s in streamers:
        s.feed(rendered.prefill)  # opens the forced call; yields nothing yet

    def tool_deltas(i: int, events: list[tuple[str, Any]]) -> list[P.Delta]:
        # content as it is decided; each call whole, as soon as its block closes (one index per call)
        out = []
        for kind, value in events:
            if kind == "content" and value:
                out.append(P.Delta(content=value))
            elif kind == "call" and rendered.only and value["function"]["name"] != rendered.only:
                streamers[i].calls -= 1  # a call of a tool the request did not allow
            elif kind == "call" and not (req.parallel_tool_calls is False and streamers[i].calls > 1):
                out.append(P.Delta(tool_calls=[{"index": streamers[i].calls - 1, **value}]))
        return out

    try:
        for i in range(req.n):
            yield chunk(i, P.Delta(role="assistant", content=""))
        async for out in stream:
            final = out.outputs
            for o in out.outputs:
                if o.index in done:
                    continue
                if streamers:
                    for delta in tool_deltas(o.index, streamers[o.index].feed(o.delta_text)):
                        yield chunk(o.index, delta)
                elif o.delta_text or (k is not None and o.delta_token_ids):
                    lp = chat_logprobs(tokens, o.delta_token_ids, _new_logprobs(o), k) if k is not None else None
                    yield chunk(o.index, P.Delta(content=o.delta_text), None, lp)
                if o.finish_reason is not None:
                    done.add(o.index)
                    finish = o.finish_reason
                    if streamers:
                        for delta in tool_deltas(o.index, streamers[o.index].finish()):
                            yield chunk(o.index, delta)
                        finish = "tool_calls" if streamers[o.index].calls else finish
                    yield chunk(o.index, P.Delta(), finish)
        if include_usage:
            yield sse(P.ChatCompletionChunk(id=cid, model=st.model_name, choices=[],
                                            usage=_usage(prompt_tokens, final)))
        yield sse("[DONE]")
    except Exception as e:  # engine fault or shutdown after the 200 went out: tell the client in-band
        yield _error_event(e)
        yield sse("[DONE]")
    finally:
        stream.abort()
        st.release(1)


# ---------------------------------------------------------------- text completions
def _prompts(st: ServerState, prompt: str | list[str] | list[int] | list[list[int]]) -> list[tuple[str, list[int]]]:
    tok = st.tokenizer
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and all(isinstance(t, int) for t in prompt):
        prompt = [prompt]  # type: ignore[list-item]
    if not prompt:
        raise APIError(400, "prompt is empty", "prompt")
    out = []
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            # special-token spellings are the special tokens, as in vLLM's /v1/completions (a raw ChatML prompt)
            ids = tok.encode(p, allowed_special="all", add_special_tokens=True)
            out.append((p, ids))
        else:
            vocab = st.engine.model.config.vocab_size
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"prompt[{i}] holds token ids outside [0, {vocab}): {bad[:5]}", "prompt")
            try:
                out.append((tok.decode(p), list(p)))
            except ValueError as e:  # an id the tokenizer does not know
                raise APIError(400, f"prompt[{i}]: {e}", "prompt") from None
        if not out[-1][1]:
            raise APIError(400, f"prompt[{i}] encodes to no tokens", "prompt")
    return out


async def completion(st: ServerState, req: P.CompletionRequest) -> Any:
    st.check_model(req.model)
    prompts = _prompts(st, req.prompt)
    if req.logprobs is not None and not 0 <= req.logprobs <= 20:
        raise APIError(400, f"logprobs={req.logprobs} must be in [0, 20]", "logprobs")
    params = sampling_params(st, req, req.max_tokens, [len(ids) for _, ids in prompts], "prompt", req.logprobs,
                             COMPLETIONS_DEFAULT_MAX_TOKENS)
    cid = f"cmpl-{uuid.uuid4().hex}"
    echo_lps: list[list[dict[int, float] | None] | None] = [None] * len(prompts)
    if req.echo and req.logprobs is not None:
        model = st.engine.model
        for i, (_, ids) in enumerate(prompts):
            echo_lps[i] = await st.loop.call(lambda ids=ids: prompt_logprobs(model, ids, req.logprobs or 0))
    streams = await st.admit([(f"{cid}-{i}", ids, params, text) for i, (text, ids) in enumerate(prompts)])
    args = (st, req, cid, streams, prompts, echo_lps, _Tokens(st.tokenizer))
    if req.stream:
        return _stream_response(_completion_events(*args))
    try:
        finals = await asyncio.gather(*(_final(s) for s in streams))
    finally:
        for s in streams:
            s.abort()
        st.release(len(streams))
    choices = []
    for i, final in enumerate(finals):
        for o in final.outputs:
            choices.append(_completion_choice(req, i * req.n + o.index, prompts[i], echo_lps[i], o, o.text,
                                              o.token_ids, o.logprobs or [], 0, args[-1], o.finish_reason))
    outputs = [o for f in finals for o in f.outputs]
    return P.Completion(id=cid, model=st.model_name, choices=choices,
                        usage=_usage(sum(len(ids) for _, ids in prompts), outputs))


def _completion_choice(req: P.CompletionRequest, index: int, prompt: tuple[str, list[int]],
                       echo_lp: list | None, o: CompletionOutput, text: str, ids: list[int], lps: list,
                       offset: int, tokens: _Tokens, finish: str | None) -> P.CompletionChoice:
    if req.echo:
        text = prompt[0] + text
        if req.logprobs is not None:
            ids, lps = prompt[1] + ids, (echo_lp or [None] * len(prompt[1])) + lps
    lp = completion_logprobs(tokens, ids, lps, req.logprobs, offset) if req.logprobs is not None else None
    return P.CompletionChoice(index=index, text=text, logprobs=lp, finish_reason=finish)


async def _completion_events(st: ServerState, req: P.CompletionRequest, cid: str, streams: list[RequestStream],
                             prompts: list[tuple[str, list[int]]], echo_lps: list, tokens: _Tokens
                             ) -> AsyncIterator[str]:
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, s: RequestStream) -> None:
        try:
            async for out in s:
                await queue.put((i, out))
        except Exception as e:  # forwarded to the response
            await queue.put((i, e))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    offsets: dict[int, int] = {}
    done: set[int] = set()
    finals: dict[int, list[CompletionOutput]] = {}
    live = len(tasks)
    try:
        while live:
            i, out = await queue.get()
            if out is None:
                live -= 1
                continue
            if isinstance(out, BaseException):
                raise out
            finals[i] = out.outputs
            for o in out.outputs:
                index = i * req.n + o.index
                if index in done:
                    continue
                if o.finish_reason is not None:
                    done.add(index)
                first = index not in offsets
                if not (o.delta_text or o.delta_token_ids or o.finish_reason or (first and req.echo)):
                    continue
                lps = _new_logprobs(o) if req.logprobs is not None else []
                choice = _completion_choice(
                    req if first else req.model_copy(update={"echo": False}), index, prompts[i], echo_lps[i], o,
                    o.delta_text, o.delta_token_ids, lps, offsets.get(index, 0), tokens, o.finish_reason)
                offsets[index] = offsets.get(index, 0) + len(choice.text)
                yield sse(P.Completion(id=cid, model=st.model_name, choices=[choice]))
        if req.stream_options and req.stream_options.include_usage:
            usage = _usage(sum(len(ids) for _, ids in prompts), [o for f in finals.values() for o in f])
            yield sse(P.Completion(id=cid, model=st.model_name, choices=[], usage=usage))
        yield sse("[DONE]")
    except Exception as e:
        yield _error_event(e)
        yield sse("[DONE]")
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            s.abort()
        st.release(len(streams))
