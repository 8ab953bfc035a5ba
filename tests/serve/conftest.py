"""Fixtures of the server tests: a tiny random LLaMA checkpoint with a BPE tokenizer trained here and a
ChatML template (tools rendered Hermes-style), and live uvicorn servers on 127.0.0.1 at a free port."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from tinyllm.model.config import ModelConfig
from tinyllm.model.hf import build_model, save_pretrained
from tinyllm.tokenizer import train_bpe

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOOLS_CHATML = (
    "{% if tools %}<|im_start|>system\nYou may call these tools:\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
    "Reply with <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>.<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = ["hello world, how are you today?", "the quick brown fox jumps over the lazy dog",
          "language models predict the next token", "你好，世界！今天天气很好。", "servers batch requests together",
          "continuous batching keeps the accelerator busy"] * 20
VOCAB = 320
CONTEXT = 384


def build_checkpoint(directory: Path, chat_template: str | None = None, seed: int = 0) -> Path:
    tok = train_bpe(CORPUS, VOCAB, special_tokens=SPECIALS, show_progress=False, eos_token="<|im_end|>",
                    pad_token="<|endoftext|>", chat_template=chat_template or TOOLS_CHATML)
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                      initializer_range=0.2)
    save_pretrained(build_model(cfg).eval(), directory)
    tok.save(directory)
    return directory


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("tiny-chat"))


@pytest.fixture(scope="session")
def plain_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same model, a ChatML template that knows nothing of tools."""
    from tinyllm.tokenizer.chat import CHATML_TEMPLATE

    return build_checkpoint(tmp_path_factory.mktemp("tiny-plain"), CHATML_TEMPLATE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_tcp_port() -> int:
    return free_port()


class LiveServer:
    """uvicorn serving `app` in a background thread; `url` is its base URL."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.app = app
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    @property
    def state(self) -> Any:
        return self.app.state.server


@pytest.fixture(scope="module")
def make_server(request: pytest.FixtureRequest) -> Iterator[Callable[..., LiveServer]]:
    """Factory: `make_server(checkpoint, api_key=None, max_queue=256, **engine_kwargs)` → a started LiveServer."""
    from tinyllm.infer.engine import LLM
    from tinyllm.serve import create_app

    started: list[LiveServer] = []

    def make(path: Path, *, api_key: str | None = None, max_queue: int = 256, embedder: Any = None,
             name: str = "tiny", **engine_kwargs: Any) -> LiveServer:
        llm = LLM(str(path), **engine_kwargs)
        app = create_app(llm.engine, model_name=name, api_key=api_key, max_queue=max_queue, embedder=embedder)
        server = LiveServer(app).__enter__()
        started.append(server)
        return server

    yield make
    for s in started:
        s.__exit__()


@pytest.fixture(scope="module", autouse=True)
def _two_threads() -> Iterator[None]:
    """Tiny models run fastest on few threads and leave the other cores alone."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
