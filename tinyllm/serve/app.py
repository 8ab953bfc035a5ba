"""The OpenAI-compatible HTTP server: a FastAPI app over one shared `LLMEngine` (notes ch.06.4 "vLLM:
OpenAI-compatible server"; the OpenAI REST API).

`create_app(engine, model_name=...)` wires the routes:
- `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions` (`completions.py`),
  `POST /v1/embeddings` (`embeddings.py`), `GET /health`, `GET /metrics` (Prometheus text, `metrics.py`),
  `GET /` the chat page (`static/`, no CDN).
- One engine loop (`async_engine.AsyncEngine`) is started and stopped with the app's lifespan: all requests
  join the same continuously batched step loop.
- A small ASGI middleware checks `Authorization: Bearer <key>` on `/v1/*` when an API key is set (401
  otherwise, compared in constant time) and counts requests per endpoint and status for `/metrics`; it is
  plain ASGI (not `BaseHTTPMiddleware`) so a client's disconnect still reaches a streaming response, whose
  cancellation aborts the request and frees its KV blocks.
- Every error is OpenAI-shaped (`errors.py`): malformed JSON and schema violations are 400s naming the field;
  a request that an engine fault ended is a 500 (`engine_error`; a stream gets an error event and `[DONE]`),
  and a dead or stalled engine loop makes requests 503 (`engine_unavailable`) and `/health` 503 with the reason.

Not covered: TLS, CORS, multiple models per server, LoRA adapters per request, rate limits per key.
"""

from __future__ import annotations

import base64
import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from tinyllm.infer.engine import LLMEngine
from tinyllm.serve import protocol as P
from tinyllm.serve.async_engine import EngineError
from tinyllm.serve.completions import chat_completion, completion
from tinyllm.serve.embeddings import Embedder
from tinyllm.serve.errors import APIError, error_response
from tinyllm.serve.state import ServerState

STATIC = Path(__file__).parent / "static"
# documented in the OpenAPI schema: every failure is an OpenAI error object (never FastAPI's 422 body)
ERRORS: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": P.ErrorResponse, "description": "invalid request, missing key, unknown route, queue full"},
    "5XX": {"model": P.ErrorResponse, "description": "engine fault (500) or engine unavailable (503)"}}
STREAMING = {**ERRORS, 200: {"description": "a JSON body, or Server-Sent Events when stream=true",
                             "content": {"text/event-stream": {"schema": {  # one SSE event
                                 "type": "object", "properties": {"data": {"type": "string"}}}}}}}


class _GuardMiddleware:
    """API-key check on /v1/* and request counting by endpoint and status."""

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        path, st = scope["path"], self.state
        if st.api_key is not None:
            headers = dict(scope.get("headers") or [])
            auth = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, key = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), st.api_key.encode()):
                message = ("missing API key: send 'Authorization: Bearer <key>'" if not auth
                           else "incorrect API key provided")
                st.metrics.count_request(path, 401)
                await error_response(401, message, None, "invalid_api_key")(scope, receive, send)
                return

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                st.metrics.count_request(path, message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    e = errors[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    if e.get("type") == "json_invalid":
        return f"malformed JSON body: {e.get('ctx', {}).get('error', e.get('msg'))}", None
    param = ".".join(loc) or None
    return f"invalid value for {param or 'the body'}: {e.get('msg')} (got {e.get('input')!r})"[:1000], param


def create_app(engine: LLMEngine, *, model_name: str = "tinyllm", api_key: str | None = None, max_queue: int = 256,
               embedder: Embedder | None = None, stall_timeout: float = 300.0,
               tool_prompt: str = "template") -> FastAPI:
    """The server's FastAPI app; the engine loop runs while the app's lifespan is open. A step that runs longer
    than `stall_timeout` seconds marks the engine stalled (/health 503, waiting requests fail)."""
    st = ServerState(engine, model_name, api_key, max_queue, embedder, stall_timeout=stall_timeout,
                     tool_prompt=tool_prompt)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        st.loop.start()
        try:
            yield
        finally:
            st.loop.stop()

    own_embedder = Embedder.from_model(engine.model, engine.tokenizer, model_name)
    app = FastAPI(title="tinyllm", lifespan=lifespan)
    app.state.server = st
    app.add_middleware(_GuardMiddleware, state=st)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param, "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(EngineError)
    async def _engine(request: Request, exc: EngineError) -> JSONResponse:
        if exc.unavailable:
            return error_response(503, str(exc), None, "engine_unavailable")
        return error_response(500, str(exc), None, "engine_error")

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", None, "internal_error")

    @app.get("/health", responses={503: {"description": "the engine loop is dead or stalled (the reason in error)"}})
    async def health() -> JSONResponse:
        problem = st.loop.health()
        if problem is None:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable", "error": problem}, status_code=503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(st.metrics.render(st.loop.gauges), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", responses=ERRORS)
    async def models() -> P.ModelList:
        cards = [P.ModelCard(id=st.model_name, max_model_len=st.max_model_len)]
        if embedder is not None and embedder.name != st.model_name:
            cards.append(P.ModelCard(id=embedder.name, max_model_len=embedder.max_len))
        return P.ModelList(data=cards)

    @app.post("/v1/chat/completions", responses=STREAMING)
    async def chat(req: P.ChatCompletionRequest) -> Any:
        return await chat_completion(st, req)

    @app.post("/v1/completions", responses=STREAMING)
    async def completions(req: P.CompletionRequest) -> Any:
        return await completion(st, req)

    @app.post("/v1/embeddings", responses=ERRORS)
    async def embeddings(req: P.EmbeddingRequest) -> P.EmbeddingResponse:
        st.check_model(req.model, embedding=True)
        emb = embedder or own_embedder
        inputs: Any = req.input
        if isinstance(inputs, str) or (inputs and all(isinstance(t, int) for t in inputs)):
            inputs = [inputs]
        if not inputs:
            raise APIError(400, "input is empty", "input")
        batch = [emb.encode(x) if isinstance(x, str) else list(x) for x in inputs]
        for i, ids in enumerate(batch):
            try:
                emb.check(ids, i)
            except ValueError as e:
                raise APIError(400, str(e), "input") from None
        vectors = (await st.loop.call(lambda: emb.embed(batch))).cpu().numpy().astype(np.float32)
        if req.dimensions is not None and req.dimensions != vectors.shape[1]:
            raise APIError(400, f"dimensions={req.dimensions}: this model only gives {vectors.shape[1]}", "dimensions")
        data = [P.Embedding(index=i, embedding=base64.b64encode(v.astype("<f4").tobytes()).decode()
                            if req.encoding_format == "base64" else v.tolist()) for i, v in enumerate(vectors)]
        n = sum(len(ids) for ids in batch)
        return P.EmbeddingResponse(data=data, model=emb.name, usage=P.Usage(prompt_tokens=n, total_tokens=n))

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/config.json", include_in_schema=False)
    async def page_config() -> JSONResponse:
        return JSONResponse({"model": st.model_name, "max_model_len": st.max_model_len,
                             "api_key_required": st.api_key is not None})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
