"""`tinyllm serve`: load a checkpoint into one `LLMEngine` and serve it over the OpenAI API with uvicorn
(notes ch.06.4; vLLM's `vllm serve`).

uvicorn owns the signals: on SIGTERM or Ctrl-C it stops accepting connections, lets in-flight requests finish
for up to `graceful_shutdown_s` seconds (streams still running then are cancelled, which aborts their engine
requests), and then the app's lifespan stops the engine loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ServeConfig:
    model: str = field(default="", metadata={"help": "HF checkpoint directory, GGUF file or short name (smollm2)"})
    host: str = field(default="127.0.0.1", metadata={"help": "interface to listen on"})
    port: int = field(default=8000, metadata={"help": "TCP port"})
    api_key: str | None = field(default=None, metadata={"help": "require 'Authorization: Bearer KEY' on /v1/*"})
    max_queue: int = field(default=256, metadata={
        "help": "requests allowed to wait beyond the running batch (max_num_seqs); more get HTTP 429"})
    served_model_name: str | None = field(default=None, metadata={
        "help": "model id clients send (default: the checkpoint's directory or file name)"})
    embedding_model: str | None = field(default=None, metadata={
        "help": "checkpoint for /v1/embeddings (BERT or decoder; default: the served model's mean hidden state)"})
    dtype: str = field(default="float32", metadata={"help": "weights dtype", "choices": ["float32", "bfloat16"]})
    device: str = field(default="cpu", metadata={"help": "torch device (cpu, cuda)"})
    quantization: str | None = field(default=None, metadata={"help": "weight-only quantization: int8, int4, or gguf (a .gguf model's own blocks, as llama.cpp)"})
    max_num_seqs: int = field(default=64, metadata={"help": "most sequences in one engine step"})
    max_model_len: int | None = field(default=None, metadata={"help": "context window (default: the model's)"})
    num_blocks: int | None = field(default=None, metadata={"help": "KV-cache blocks (default: sized to fit)"})
    speculative: str = field(default="none", metadata={
        "help": "speculative decoding: ngram (prompt lookup) or draft (a draft model)",
        "choices": ["none", "ngram", "draft"]})
    num_speculative_tokens: int = field(default=4, metadata={"help": "draft tokens verified per step"})
    draft_model: str | None = field(default=None, metadata={
        "help": "--speculative draft: the draft checkpoint (default: the Q4_1 copy of the served model)"})
    graceful_shutdown_s: float = field(default=30.0, metadata={"help": "seconds in-flight requests get on SIGTERM"})
    log_level: str = field(default="info", metadata={"help": "uvicorn log level"})
    tool_prompt: str = field(default="template", metadata={
        "help": "tools for a chat template that cannot render them: refuse (template) or write them into the "
                "system message, Hermes style (hermes)", "choices": ["template", "hermes"]})

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model='' : pass --model PATH (HF directory, GGUF file or short name)")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port={self.port} must be in [0, 65535]")
        if self.max_queue < 0:
            raise ValueError(f"max_queue={self.max_queue} must be >= 0")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs={self.max_num_seqs} must be >= 1")
        self.speculative_config()

    def speculative_config(self):
        if self.speculative == "none":
            return None
        from tinyllm.infer.drafters import SpeculativeConfig

        return SpeculativeConfig(self.speculative, self.num_speculative_tokens, draft_model=self.draft_model,
                                 draft_quantization=None if self.draft_model else "q4_1",
                                 draft_head_quantization=None if self.draft_model else "q8_0")


def check_address(host: str, port: int) -> None:
    """Fail fast, before the model loads, when uvicorn could not listen on host:port (an unknown host, an
    address not on this machine, a port in use or reserved); binds a probe socket the way uvicorn does."""
    import socket

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise ValueError(f"--host {host!r}: {getattr(e, 'strerror', None) or e}") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(addr)
        except OSError as e:
            raise OSError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None


def build_app(cfg: ServeConfig):
    import torch

    from tinyllm.infer.engine import LLM
    from tinyllm.model.hf import resolve_model_path
    from tinyllm.serve.app import create_app
    from tinyllm.serve.embeddings import Embedder

    kwargs = {"max_num_seqs": cfg.max_num_seqs, "max_model_len": cfg.max_model_len, "num_blocks": cfg.num_blocks,
              "speculative": cfg.speculative_config()}
    llm = LLM(cfg.model, dtype=getattr(torch, cfg.dtype), device=cfg.device, quantization=cfg.quantization,
              **{k: v for k, v in kwargs.items() if v is not None})
    if llm.engine.tokenizer is None:
        raise SystemExit(f"error: {cfg.model} has no tokenizer; the server needs one")
    name = cfg.served_model_name or Path(resolve_model_path(cfg.model)).name
    embedder = Embedder.from_pretrained(cfg.embedding_model) if cfg.embedding_model else None
    return create_app(llm.engine, model_name=name, api_key=cfg.api_key, max_queue=cfg.max_queue,
                      embedder=embedder, tool_prompt=cfg.tool_prompt)


def run_serve(cfg: ServeConfig) -> int:
    import uvicorn

    check_address(cfg.host, cfg.port)
    app = build_app(cfg)
    print(f"serving {app.state.server.model_name} at http://{cfg.host}:{cfg.port} (chat page at /)", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level,
                timeout_graceful_shutdown=int(cfg.graceful_shutdown_s))
    return 0
