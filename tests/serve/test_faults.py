"""The server survives engine faults (notes ch.06.4 serving). Faults are injected into a live server's engine:
the forward raising once and twice in a row, the scheduler raising after leaking a KV block, the failure handler
itself raising, one request's own sampling or detokenization raising while another shares its batch, a step
that hangs, and an engine thread that dies. Each time the hit requests get an OpenAI-shaped 500 (a stream: an
error event, then [DONE]), their KV blocks return to the pool, the others are untouched, and the next request
gets the same greedy tokens as before the fault. A dead or stalled engine makes waiting requests fail with 503
instead of hanging, and /health says why.

Regression: a second exception inside the old failure handler ended the engine thread and every stream hung."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tinyllm.serve.metrics import parse_metrics

BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hello world"}], "temperature": 0,
        "max_tokens": 8, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(make_server, checkpoint):
    return make_server(checkpoint)


@pytest.fixture(scope="module")
def reference(server) -> str:
    """The greedy reply before any fault."""
    return _text(_chat(server))


def _chat(server, **kw: Any) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", json={**BODY, **kw}, timeout=30)


def _text(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def _stream(server, **kw: Any) -> list[Any]:
    """The data of every SSE event of a streamed chat ('[DONE]' as the string)."""
    events = []
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**BODY, "stream": True, **kw},
                      timeout=30) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def _assert_error(body: dict, code: str = "engine_error", *needles: str) -> None:
    err = body["error"]
    assert set(err) >= {"message", "type", "param", "code"}, err
    assert err["type"] == "server_error" and err["code"] == code, err
    for needle in needles:
        assert needle in err["message"], err


def _blocks_back(server, timeout: float = 5.0) -> None:
    bm = server.state.engine.block_manager
    deadline = time.monotonic() + timeout
    while bm.num_free_blocks != bm.num_blocks and time.monotonic() < deadline:
        time.sleep(0.01)
    assert bm.num_free_blocks == bm.num_blocks, f"{bm.num_blocks - bm.num_free_blocks} KV blocks still held"


class Faulty:
    """Wraps `fn`: the calls numbered in `fail_on` (from 1) run `fault` (default: raise) instead of `fn`."""

    def __init__(self, fn: Callable, fail_on: set[int], fault: Callable[[int], Any] | None = None) -> None:
        self.fn, self.fail_on, self.fault, self.calls = fn, fail_on, fault, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls in self.fail_on:
            if self.fault is None:
                raise RuntimeError(f"injected fault #{self.calls}")
            self.fault(self.calls)
        return self.fn(*args, **kwargs)


def _faults(server) -> float:
    return parse_metrics(httpx.get(server.url + "/metrics").text)["tinyllm_engine_faults_total"]


@pytest.mark.parametrize("stream", [False, True])
def test_forward_fault_is_a_500_and_the_next_request_is_served(server, reference, monkeypatch, stream) -> None:
    runner = server.state.engine.runner
    monkeypatch.setattr(runner, "forward", Faulty(runner.forward, {1}))
    before = _faults(server)
    if stream:
        events = _stream(server)
        assert events[-1] == "[DONE]", events
        _assert_error(events[-2], "engine_error", "injected fault #1")
    else:
        r = _chat(server)
        assert r.status_code == 500
        _assert_error(r.json(), "engine_error", "engine step failed", "injected fault #1")
    _blocks_back(server)
    assert _faults(server) == before + 1
    assert _text(_chat(server)) == reference
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_two_faults_in_a_row(server, reference, monkeypatch) -> None:
    runner = server.state.engine.runner
    monkeypatch.setattr(runner, "forward", Faulty(runner.forward, {1, 2}))
    for n in (1, 2):
        r = _chat(server)
        assert r.status_code == 500
        _assert_error(r.json(), "engine_error", f"injected fault #{n}")
        _blocks_back(server)
    assert _text(_chat(server)) == reference


def test_fault_inside_the_failure_handler(server, reference, monkeypatch) -> None:
    engine = server.state.engine
    monkeypatch.setattr(engine.runner, "forward", Faulty(engine.runner.forward, {1}))

    def broken_recover(*args: Any) -> None:
        raise RuntimeError("injected fault in the failure handler")

    monkeypatch.setattr(engine, "recover", broken_recover)
    events = _stream(server)
    assert events[-1] == "[DONE]"
    _assert_error(events[-2], "engine_error", "injected fault #1", "recovery failed", "failure handler")
    _blocks_back(server)
    assert _text(_chat(server)) == reference


def test_leaked_block_after_a_scheduler_fault_is_reset(server, reference, monkeypatch) -> None:
    engine = server.state.engine
    real = engine.scheduler.schedule

    def leak(n: int) -> None:
        real()
        engine.block_manager.allocate()  # taken and never handed back
        raise RuntimeError("injected scheduler fault")

    monkeypatch.setattr(engine.scheduler, "schedule", Faulty(real, {1}, leak))
    r = _chat(server)
    assert r.status_code == 500
    _assert_error(r.json(), "engine_error", "injected scheduler fault")
    _blocks_back(server)  # the audit saw the leak and rebuilt the pool
    assert _text(_chat(server)) == reference


@pytest.mark.parametrize("where", ["sampling", "detokenization"])
def test_a_fault_of_one_request_spares_its_batch(server, reference, monkeypatch, where) -> None:
    engine, loop = server.state.engine, server.state.loop
    if where == "sampling":  # a sampled (not greedy) request whose draw raises
        real = engine.runner._sample_one

        def sample_one(seq, scores):
            if seq.request.params.seed == 666:
                raise RuntimeError("injected sampling fault")
            return real(seq, scores)

        monkeypatch.setattr(engine.runner, "_sample_one", sample_one)
        bad = {"temperature": 0.8, "seed": 666}
    else:  # a greedy request whose text does not decode
        real_append = engine._append

        def append(seq, smp):
            if seq.request.params.seed == 666:
                raise ValueError("injected detokenization fault")
            return real_append(seq, smp)

        monkeypatch.setattr(engine, "_append", append)
        bad = {"seed": 666}
    batch_sizes: list[int] = []
    real_sample = engine.runner.sample
    monkeypatch.setattr(engine.runner, "sample", lambda s, r, lg: batch_sizes.append(len(s)) or real_sample(s, r, lg))

    gate = threading.Event()
    loop._submit(lambda: gate.wait(10))  # hold the engine thread so both requests join the same first step
    results: dict[str, Any] = {}
    threads = [threading.Thread(target=lambda: results.__setitem__("good", _stream(server))),
               threading.Thread(target=lambda: results.__setitem__("bad", _chat(server, **bad)))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while len(loop._commands) < 2 and time.monotonic() < deadline:  # both add_request commands queued
        time.sleep(0.005)
    gate.set()
    for t in threads:
        t.join(30)
    assert max(batch_sizes) == 2, batch_sizes
    assert results["bad"].status_code == 500
    _assert_error(results["bad"].json(), "engine_error", f"injected {where} fault", "failed")
    good = results["good"]
    assert good[-1] == "[DONE]" and "".join(e["choices"][0]["delta"].get("content") or "" for e in good[:-1]
                                            if e["choices"]) == reference
    _blocks_back(server)
    assert _text(_chat(server)) == reference


def test_stalled_step_fails_waiting_requests_and_health_says_so(server, reference, monkeypatch) -> None:
    loop, runner = server.state.loop, server.state.engine.runner
    monkeypatch.setattr(loop, "stall_timeout", 0.3)
    monkeypatch.setattr(loop, "poll_interval", 0.05)
    monkeypatch.setattr(runner, "forward", Faulty(runner.forward, {1}, lambda n: time.sleep(2.0)))
    t0 = time.monotonic()
    r = _chat(server)
    assert r.status_code == 503 and time.monotonic() - t0 < 1.8  # failed while the step still hangs
    _assert_error(r.json(), "engine_unavailable", "stalled")
    health = httpx.get(server.url + "/health")
    assert health.status_code == 503 and "stalled" in health.json()["error"]
    deadline = time.monotonic() + 10
    while httpx.get(server.url + "/health").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.05)  # the step ends: the loop is healthy again
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    _blocks_back(server)
    assert _text(_chat(server)) == reference


@pytest.mark.parametrize("told", [True, False], ids=["thread-reports", "watchdog-only"])
def test_dead_engine_ends_streams_and_refuses_requests(make_server, checkpoint, monkeypatch, told) -> None:
    server = make_server(checkpoint)
    engine, loop = server.state.engine, server.state.loop
    monkeypatch.setattr(loop, "poll_interval", 0.05)

    def broken(*args: Any) -> None:
        raise RuntimeError("injected fault in every handler")

    monkeypatch.setattr(engine.runner, "forward", broken)
    monkeypatch.setattr(engine, "recover", broken)
    monkeypatch.setattr(engine, "reset", broken)
    if not told:  # the dying thread cannot tell anyone: only the watchdog can end the waits
        monkeypatch.setattr(loop, "_fail_everything", lambda error: None)
    t0 = time.monotonic()
    events = _stream(server)
    assert events[-1] == "[DONE]" and time.monotonic() - t0 < 10
    _assert_error(events[-2], "engine_unavailable", "engine loop died", "injected fault in every handler")
    health = httpx.get(server.url + "/health")
    assert health.status_code == 503 and "died" in health.json()["error"]
    r = _chat(server)
    assert r.status_code == 503
    _assert_error(r.json(), "engine_unavailable", "died")
    assert server.state.loop.num_in_flight == 0
