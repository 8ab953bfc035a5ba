"""One engine loop behind many HTTP requests: continuous batching behind a server (notes ch.06.3.c continuous
batching, ch.06.4 vLLM `AsyncLLMEngine`; Yu et al. 2022 "Orca").

The `LLMEngine` is not thread-safe and must never run one request at a time, so exactly one thread owns it.
HTTP handlers (on the asyncio event loop) never touch the engine: they hand it *commands* (add a request,
abort one, run a function such as an embedding forward between two steps) through a thread-safe deque and
wait on futures. The engine thread loops: run queued commands → if work exists, `step()` once over the mixed
batch of every running request → route each `RequestOutput` to its request's `asyncio.Queue` with
`loop.call_soon_threadsafe`. A request that arrives while others decode joins the very next step, which is
what makes a server with 32 clients ~32× cheaper per token than one serving them one at a time.

The thread also records time to first token and inter-token latency (the moment a step produced the tokens)
and counts generated tokens. `stop()` aborts what is left, delivers the abort outputs and joins the thread.

Faults never take the loop down with them. A request that the engine ended with an error, or the requests of a
batch whose step raised (`LLMEngine.recover` fails them and resets the engine if its bookkeeping is broken),
get an `EngineError` in their stream (the HTTP layer answers 500); the others go on. If the recovery itself
raises, the engine is reset whole; if even that raises, the thread records why and ends, failing every stream
and pending command. A watchdog on the waiting side covers what the thread cannot report: a stream or command
whose engine thread is dead, or stuck in one step for longer than `stall_timeout`, fails within
`poll_interval` instead of hanging, and `health()` says why.

Not covered: multiple engine replicas, priority scheduling, request-level timeouts, restarting a dead loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from tinyllm.infer.engine import EngineStepError, LLMEngine
from tinyllm.infer.sampling_params import SamplingParams
from tinyllm.infer.sequence import RequestOutput
from tinyllm.serve.metrics import Metrics


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrival: float = field(default_factory=time.perf_counter)
    last: float | None = None  # when the previous tokens came out

    def put(self, item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is listening any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class EngineError(RuntimeError):
    """A request ended by an engine fault (`unavailable=False`: HTTP 500), or an engine loop that is dead or
    stalled (`unavailable=True`: HTTP 503)."""

    def __init__(self, message: str, unavailable: bool = False) -> None:
        super().__init__(message)
        self.unavailable = unavailable


class RequestStream:
    """The outputs of one admitted request, in step order; `abort()` (idempotent) ends it early."""

    def __init__(self, owner: AsyncEngine, request_id: str, stream: _Stream) -> None:
        self.owner, self.request_id, self._stream = owner, request_id, stream
        self.finished = False

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self.owner.abort(self.request_id)

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            queue = self._stream.queue
            while not self.finished:
                item = queue.get_nowait() if not queue.empty() else await self.owner.watch(queue.get())
                if isinstance(item, BaseException):
                    self.finished = True
                    raise item
                self.finished = item.finished
                yield item
        finally:
            self.abort()


class AsyncEngine:
    """Runs `engine.step()` in one background thread while work exists; `generate` streams a request's outputs."""

    def __init__(self, engine: LLMEngine, metrics: Metrics | None = None, *, stall_timeout: float = 300.0,
                 poll_interval: float = 0.5) -> None:
        if not stall_timeout > 0 or not poll_interval > 0:
            raise ValueError(f"stall_timeout={stall_timeout!r} and poll_interval={poll_interval!r} must be > 0")
        self.engine = engine
        self.metrics = metrics or Metrics()
        self.stall_timeout, self.poll_interval = stall_timeout, poll_interval
        self._commands: deque[tuple[Callable[[], Any], concurrent.futures.Future | None]] = deque()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._busy_since: float | None = None  # when the step in progress began (engine thread writes)
        self.error: str | None = None  # why the engine thread died
        self.num_in_flight = 0  # requests admitted and not yet returned (event-loop side)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="tinyllm-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Abort every request still running, deliver their final outputs, end the thread."""
        if self._thread is None:
            return
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def health(self) -> str | None:
        """None while the loop serves; otherwise why it does not (stopped, died, or stuck in one step)."""
        if self._thread is None:
            return "the engine loop is not running"
        if not self._thread.is_alive():
            return f"the engine loop died: {self.error or 'unknown error'}"
        since = self._busy_since
        if since is not None and time.monotonic() - since > self.stall_timeout:
            return (f"the engine loop is stalled: one step has run for {time.monotonic() - since:.0f} s "
                    f"(stall_timeout={self.stall_timeout:g} s)")
        return None

    async def watch(self, awaitable: Any) -> Any:
        """Await `awaitable` (a queue get, a command's future), checking the loop's health every
        `poll_interval` seconds: raise `EngineError(unavailable=True)` rather than wait on a dead engine."""
        task = asyncio.ensure_future(awaitable)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.poll_interval)
                if done:
                    return task.result()
                problem = self.health()
                if problem is not None:
                    raise EngineError(problem, unavailable=True)
        finally:
            if not task.done():
                task.cancel()

    # ------------------------------------------------------------------ commands
    def _submit(self, fn: Callable[[], Any], future: concurrent.futures.Future | None = None) -> None:
        self._commands.append((fn, future))
        self._wake.set()

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn()` in the engine thread between two steps; return its result (or raise its exception)."""
        problem = self.health()
        if problem is not None:
            raise EngineError(problem, unavailable=True)
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._submit(fn, future)
        return await self.watch(asyncio.wrap_future(future))

    def abort(self, request_id: str) -> None:
        def run() -> None:
            if request_id in self.engine.requests:
                self.engine.abort(request_id)
                with self.metrics.lock:
                    self.metrics.aborted += 1
        self._submit(run)

    async def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                          prompt: str | None = None) -> RequestStream:
        """Admit a request into the running batch (the engine's ValueError propagates); iterate the returned
        stream for its outputs. Leaving the iteration early (client gone, task cancelled) aborts the request."""
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())

        def add() -> None:
            self.engine.add_request(request_id, prompt, params, prompt_token_ids=prompt_token_ids)
            self._streams[request_id] = stream
            self.metrics.add_tokens(prompt=len(prompt_token_ids))

        await self.call(add)
        return RequestStream(self, request_id, stream)

    # ------------------------------------------------------------------ the engine thread
    def _run_commands(self) -> None:
        while self._commands:
            fn, future = self._commands.popleft()
            if future is not None and not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn()
            except BaseException as e:
                if future is not None:
                    future.set_exception(e)
            else:
                if future is not None:
                    future.set_result(result)

    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # nothing escapes the thread: record why, fail everyone waiting
            self.error = f"{type(e).__name__}: {e}"
            self._busy_since = None
            self._fail_everything(EngineError(f"the engine loop died: {self.error}", unavailable=True))

    def _serve(self) -> None:
        engine = self.engine
        while True:
            self._run_commands()
            if self._stopping:
                break
            if not engine.has_unfinished_requests():
                self._wake.wait()
                self._wake.clear()
                continue
            self._busy_since = time.monotonic()
            try:
                outputs = engine.step()
            except Exception as e:
                self._recover(e)
                continue
            finally:
                self._busy_since = None
            self._dispatch(outputs)
        for rid in list(engine.requests):
            engine.abort(rid)
        self._dispatch(engine.step())
        self._run_commands()
        self._fail_everything(EngineError("the server is shutting down", unavailable=True))

    def _recover(self, error: Exception) -> None:
        """A step raised: fail the requests it hit and leave the engine ready for the next step. Raises only
        when even a whole reset of the engine fails (the loop then dies, see `_loop`)."""
        cause = error.cause if isinstance(error, EngineStepError) else error
        message = f"engine step failed: {type(cause).__name__}: {cause}"
        ids = error.request_ids if isinstance(error, EngineStepError) else list(self.engine.requests)
        try:
            failed = [*ids, *self.engine.recover(ids, message)]
        except Exception as e:  # the failure handling failed too: drop every request and rebuild
            message += f"; then recovery failed: {type(e).__name__}: {e}"
            failed = [*ids, *self.engine.reset(message), *self._streams]
        self.metrics.count_fault()
        err = EngineError(message)
        for rid in dict.fromkeys(failed):
            stream = self._streams.pop(rid, None)
            if stream is not None:
                stream.put(err)

    def _fail_everything(self, error: BaseException) -> None:
        """Hand `error` to every stream and every pending command; cannot raise."""
        streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            stream.put(error)
        while self._commands:
            try:
                _, future = self._commands.popleft()
                if future is not None and future.set_running_or_notify_cancel():
                    future.set_exception(error)
            except Exception:  # a racing pop or a cancelled future: nothing left to tell
                continue

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        now = time.perf_counter()
        m = self.metrics
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if out.finished:
                self._streams.pop(out.request_id, None)
            if stream is None:
                continue
            if out.error is not None:  # the engine ended this request alone
                m.count_fault()
                stream.put(EngineError(out.error))
                continue
            new = sum(len(o.delta_token_ids) for o in out.outputs)
            if new:
                m.add_tokens(generated=new)
                if stream.last is None:
                    m.observe("ttft", now - stream.arrival)
                else:
                    m.observe("itl", now - stream.last)
                stream.last = now
            if out.finished:
                m.observe("e2e", now - stream.arrival)
            stream.put(out)

    # ------------------------------------------------------------------ gauges
    def gauges(self) -> dict[str, float]:
        """Scrape-time gauges; read without the engine thread's cooperation (ints, so a torn read is harmless)."""
        sched, bm = self.engine.scheduler, self.engine.block_manager
        free = bm.num_free_blocks
        return {"num_requests_in_flight": self.num_in_flight, "num_requests_waiting": len(sched.waiting),
                "num_sequences_running": len(sched.running), "kv_blocks_total": bm.num_blocks,
                "kv_blocks_free": free, "kv_blocks_used": bm.num_blocks - free,
                "engine_steps_total": self.engine.num_steps, **self._spec_gauges()}

    def _spec_gauges(self) -> dict[str, float]:
        """Speculative decoding (when the engine speculates): draft tokens proposed and accepted, the
        acceptance rate and the tokens emitted per verification (the speedup's upper bound)."""
        if self.engine.drafter is None:
            return {}
        st = self.engine.spec_stats
        return {"spec_decode_draft_tokens": st.proposed, "spec_decode_accepted_tokens": st.accepted,
                "spec_decode_acceptance_rate": st.acceptance_rate,
                "spec_decode_tokens_per_verification": st.tokens_per_target_forward}
