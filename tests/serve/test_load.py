"""Continuous batching behind the server (notes ch.06.3.c): 16 concurrent streaming clients all finish, each
greedy reply equals the engine's offline `LLM.generate` output, and they were batched (far fewer engine steps than
tokens). A client that disconnects mid-stream aborts its request and its KV blocks return to the pool (seen through
/metrics). SIGTERM lets an in-flight stream finish and the process exit cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

openai = pytest.importorskip("openai")

from tinyllm.infer.engine import LLM  # noqa: E402
from tinyllm.infer.sampling_params import SamplingParams  # noqa: E402
from tinyllm.serve.chat_format import render_chat  # noqa: E402
from tinyllm.serve.metrics import parse_metrics  # noqa: E402

QUESTIONS = [f"question {i}: " + " ".join(["the quick brown fox", "hello world", "你好", "servers"][: 1 + i % 4]) * (1 + i % 3)
             for i in range(16)]


@pytest.fixture(scope="module")
def server(make_server, checkpoint):
    return make_server(checkpoint)


def _metrics(server) -> dict[str, float]:
    return parse_metrics(httpx.get(server.url + "/metrics").text)


def test_16_concurrent_streams_equal_offline(server, checkpoint) -> None:
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    steps_before = _metrics(server)["tinyllm_engine_steps_total"]

    async def one(q: str) -> str:
        stream = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": q}], temperature=0, max_tokens=24, stream=True,
            extra_body={"ignore_eos": True})
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def everyone() -> list[str]:
        return await asyncio.gather(*(one(q) for q in QUESTIONS))

    got = asyncio.run(everyone())
    steps = _metrics(server)["tinyllm_engine_steps_total"] - steps_before
    llm = LLM(str(checkpoint))
    ids = [render_chat(llm.get_tokenizer(), [{"role": "user", "content": q}])[1] for q in QUESTIONS]
    ref = llm.generate(ids, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    assert got == [r.outputs[0].text for r in ref]
    assert steps < 16 * 24 / 3, f"{steps} engine steps for 16 × 24 tokens: the requests were not batched"


def test_disconnect_aborts_and_frees_kv_blocks(server, monkeypatch) -> None:
    # each engine step as slow as a real model's: the tiny model would otherwise finish all 300 tokens before the
    # client has read four lines, and there would be nothing left to abort
    engine = server.state.engine
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: time.sleep(0.01) or step())
    before = _metrics(server)
    assert before["tinyllm_kv_blocks_used"] == 0
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 300, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        for _ in range(4):
            next(lines)
        assert _metrics(server)["tinyllm_kv_blocks_used"] > 0  # the request holds blocks while it streams
    deadline = time.time() + 10
    while time.time() < deadline:
        m = _metrics(server)
        if m["tinyllm_kv_blocks_used"] == 0 and m["tinyllm_num_requests_in_flight"] == 0:
            break
        time.sleep(0.02)
    assert m["tinyllm_kv_blocks_used"] == 0 and m["tinyllm_num_requests_in_flight"] == 0
    assert m["tinyllm_requests_aborted_total"] == before["tinyllm_requests_aborted_total"] + 1
    assert m["tinyllm_generation_tokens_total"] - before["tinyllm_generation_tokens_total"] < 300


def test_cli_serve_and_graceful_sigterm(checkpoint, free_tcp_port) -> None:
    port = free_tcp_port
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tinyllm", "serve", "--model", str(checkpoint), "--port", str(port),
                             "--served-model-name", "tiny-cli", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() else "timeout"
            time.sleep(0.1)
        body = {"model": "tiny-cli", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200,
                "stream": True, "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGTERM)  # while the stream is in flight
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"  # the in-flight request finished before the server went away
        # uvicorn shuts down gracefully, then re-raises the signal so the exit status says "terminated by SIGTERM"
        assert proc.wait(30) in (0, -signal.SIGTERM)
        log = proc.stdout.read()
        assert "Traceback" not in log and "serving tiny-cli at" in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
