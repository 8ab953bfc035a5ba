"""Serving benchmark (DESIGN §7): N concurrent streaming clients against tinyllm's OpenAI server (one continuously
batched engine) and against a baseline of transformers `generate` behind a minimal FastAPI app that serves one
request at a time; requests/s, output tokens/s, time to first token and inter-token latency p50/p99, and ratios.

Both servers run in this process under uvicorn (threads), on the same model file, prompts and output lengths
(fixed: `ignore_eos` on ours, `min_new_tokens` on the baseline), fp32 on both sides; the clients are raw SSE
readers on one asyncio loop, so both servers are measured by the same code.

    python bench/serve.py                       # SmolLM2, 1 / 8 / 32 clients, 32 output tokens each
    python bench/serve.py --clients 1 8 --max-tokens 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_ceilings, report

QUESTIONS = ["What is continuous batching?", "Explain the KV cache in one paragraph.", "Why is the sky blue?",
             "Write a haiku about servers.", "What does a tokenizer do?", "Name three sorting algorithms.",
             "How does attention work?", "Give me a tip for learning Python."]


# ---------------------------------------------------------------- the baseline server
def baseline_app(model: Any, tokenizer: Any, name: str) -> Any:
    """transformers `generate` behind FastAPI, one request at a time (an asyncio lock), tokens streamed as SSE."""
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse
    from transformers.generation.streamers import BaseStreamer

    from tinyllm.serve.chat_format import render_chat

    app = FastAPI()
    lock = asyncio.Lock()

    class QueueStreamer(BaseStreamer):
        def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
            self.loop, self.queue, self.prompt_seen = loop, queue, False

        def put(self, value: torch.Tensor) -> None:
            if not self.prompt_seen:  # generate() first hands over the prompt
                self.prompt_seen = True
                return
            for t in value.reshape(-1).tolist():
                self.loop.call_soon_threadsafe(self.queue.put_nowait, t)

        def end(self) -> None:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, None)

    @app.post("/v1/chat/completions")
    async def chat(body: dict) -> StreamingResponse:
        _, ids = render_chat(tokenizer, body["messages"])
        n = int(body.get("max_tokens", 32))

        async def events():
            async with lock:
                loop, queue = asyncio.get_running_loop(), asyncio.Queue()
                x = torch.tensor([ids])

                def work() -> None:
                    with torch.inference_mode():
                        model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                                       min_new_tokens=n, pad_token_id=0, streamer=QueueStreamer(loop, queue))

                thread = threading.Thread(target=work)
                thread.start()
                cid = f"chatcmpl-{uuid.uuid4().hex}"
                while (tok := await queue.get()) is not None:
                    chunk = {"id": cid, "object": "chat.completion.chunk", "model": name,
                             "choices": [{"index": 0, "delta": {"content": tokenizer.decode([tok])}}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                thread.join()
                yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


class Served:
    def __init__(self, app: Any, port: int) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{port}"

    def __enter__(self) -> Served:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(30)


# ---------------------------------------------------------------- the load
async def one_client(http: Any, url: str, name: str, question: str, max_tokens: int) -> dict[str, Any]:
    body = {"model": name, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "ignore_eos": True}
    t0 = time.perf_counter()
    stamps: list[float] = []
    async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                stamps.append(time.perf_counter())
    return {"start": t0, "end": time.perf_counter(), "stamps": stamps}


async def load(url: str, name: str, clients: int, max_tokens: int) -> dict[str, float]:
    import httpx

    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=clients + 4)) as http:
        t0 = time.perf_counter()
        runs = await asyncio.gather(*(one_client(http, url, name, QUESTIONS[i % len(QUESTIONS)], max_tokens)
                                      for i in range(clients)))
        wall = time.perf_counter() - t0
    ttft = sorted(r["stamps"][0] - r["start"] for r in runs)
    itl = sorted(b - a for r in runs for a, b in zip(r["stamps"], r["stamps"][1:], strict=False))

    def q(xs: list[float], p: float) -> float:
        return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")

    tokens = clients * max_tokens
    return {"requests_per_s": clients / wall, "output_tokens_per_s": tokens / wall, "wall_s": wall,
            "ttft_p50_ms": 1e3 * statistics.median(ttft), "ttft_p99_ms": 1e3 * q(ttft, 0.99),
            "itl_p50_ms": 1e3 * q(itl, 0.5), "itl_p99_ms": 1e3 * q(itl, 0.99)}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="GGUF file, HF directory or short name")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrency levels")
    ap.add_argument("--max-tokens", type=int, default=32, help="output tokens per request")
    ap.add_argument("--skip-baseline", action="store_true", help="measure tinyllm only")
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM

    from tinyllm import LLM
    from tinyllm.model.hf import resolve_model_path
    from tinyllm.serve import create_app

    ceil = machine_ceilings()
    print(json.dumps(ceil), flush=True)
    lines: list[dict] = [ceil]
    path = resolve_model_path(args.model)
    llm = LLM(str(path), max_model_len=1024, max_num_seqs=max(args.clients))
    tokenizer = llm.get_tokenizer()
    if path.suffix == ".gguf":
        peer = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    else:
        peer = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    name = "smollm2"
    with Served(create_app(llm.engine, model_name=name), 18431) as ours, \
            Served(baseline_app(peer, tokenizer, name), 18432) as base:
        asyncio.run(load(ours.url, name, 2, 4))  # warm-up both
        if not args.skip_baseline:
            asyncio.run(load(base.url, name, 1, 4))
        for n in args.clients:
            a = asyncio.run(load(ours.url, name, n, args.max_tokens))
            b = None if args.skip_baseline else asyncio.run(load(base.url, name, n, args.max_tokens))
            extra = {"clients": n, "max_tokens": args.max_tokens,
                     "ours_detail": {k: round(v, 2) for k, v in a.items()},
                     "peer_detail": {k: round(v, 2) for k, v in b.items()} if b else None}
            lines.append(report(f"serve_{n}_clients", a["output_tokens_per_s"],
                                b["output_tokens_per_s"] if b else 0.0, "output tok/s", **extra))
    return lines


if __name__ == "__main__":
    main()
