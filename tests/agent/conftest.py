"""Fixtures of the agent tests: a tiny model trained in a few seconds to *script* a tool-using conversation
(ask → tool call → tool result → answer), so the server's and the loops' tool plumbing is tested on real
greedy generation rather than on mocks, and live servers on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# a Qwen-like template, written here: tools in the system turn, calls as <tool_call> blocks, results as a
# user turn of <tool_response> blocks
QWENISH = (
    "{%- if tools %}<|im_start|>system\n{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}"
    "{{ '\n\n' }}{% endif %}# Tools\n<tools>{% for t in tools %}{{ '\n' }}{{ t | tojson }}{% endfor %}"
    "{{ '\n' }}</tools>\nCall a tool with <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>"
    "{{ '\n' }}{%- elif messages[0]['role'] == 'system' %}<|im_start|>system\n{{ messages[0]['content'] }}"
    "<|im_end|>{{ '\n' }}{% endif %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'system' %}"
    "{%- elif m['role'] == 'assistant' and m['tool_calls'] %}<|im_start|>assistant\n{{ m['content'] }}"
    "{%- for c in m['tool_calls'] %}<tool_call>\n{{ {'name': c['function']['name'], "
    "'arguments': c['function']['arguments']} | tojson }}\n</tool_call>{% endfor %}<|im_end|>{{ '\n' }}"
    "{%- elif m['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m['content'] }}\n</tool_response>"
    "<|im_end|>{{ '\n' }}"
    "{%- else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>{{ '\n' }}{% endif %}"
    "{%- endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
QUESTION = "What is the weather in Paris?"
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
RESULT = "sunny, 21 C"
ANSWER = "It is sunny in Paris."


def call_message(call_id: str = "call_1") -> dict[str, Any]:
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}


def script(tool_prompt_style: str = "template") -> list[tuple[list[dict[str, Any]], str]]:
    """(conversation, reply) pairs the scripted model learns."""
    ask = [{"role": "user", "content": QUESTION}]
    return [(ask, CALL_TEXT), ([*ask, call_message(), {"role": "tool", "tool_call_id": "call_1", "content": RESULT}],
                               ANSWER),
            ([{"role": "user", "content": "Say hi."}], "Hi!")]


def train_scripted(directory: Path, template: str, tool_prompt: str = "template", steps: int = 80) -> Path:
    """Train a tiny LLaMA to reproduce `script()` greedily under `template`; save it as an HF directory."""
    from tinyllm.model.config import ModelConfig
    from tinyllm.model.hf import build_model, save_pretrained
    from tinyllm.serve.chat_format import render_chat_tools
    from tinyllm.tokenizer import train_bpe

    pairs = script()
    # the tokenizer learns from the rendered texts themselves, so they are short in tokens
    tmp_tok = train_bpe(["x"], 260, special_tokens=SPECIALS, show_progress=False, eos_token="<|im_end|>",
                        pad_token="<|endoftext|>", chat_template=template)
    texts = [render_chat_tools(tmp_tok, conv, [WEATHER_TOOL], None, tool_prompt).text + reply
             for conv, reply in pairs]
    tok = train_bpe(texts * 20 + [json.dumps(WEATHER_TOOL)] * 20, 600, special_tokens=SPECIALS,
                    show_progress=False, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=template)
    end = tok.encode("<|im_end|>", allowed_special="all")
    rows = []
    for conv, reply in pairs:
        prompt = render_chat_tools(tok, conv, [WEATHER_TOOL], None, tool_prompt).ids
        full = tok.encode(tok.decode(prompt) + reply, allowed_special="all") + end
        rows.append((full, len(prompt)))
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(steps):
        loss = 0.0
        for ids, n_prompt in rows:
            x = torch.tensor([ids])
            logits = model(x[:, :-1])[0]
            target = x[0, 1:].clone()
            target[: n_prompt - 1] = -100  # learn the reply only
            loss = loss + torch.nn.functional.cross_entropy(logits.float(), target, ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_pretrained(model.eval(), directory)
    tok.save(directory)
    return directory


@pytest.fixture(scope="session")
def scripted_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_scripted(tmp_path_factory.mktemp("scripted"), QWENISH)


@pytest.fixture(scope="session")
def scripted_plain_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same script under a template that knows nothing of tools, with tools in Hermes system text."""
    from tinyllm.tokenizer.chat import CHATML_TEMPLATE

    return train_scripted(tmp_path_factory.mktemp("scripted-plain"), CHATML_TEMPLATE, tool_prompt="hermes")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, app: Any) -> None:
        import uvicorn

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def serve() -> Iterator[Callable[..., LiveServer]]:
    """Factory: `serve(checkpoint, tool_prompt="template")` → a started LiveServer on 127.0.0.1."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from tinyllm.infer.engine import LLM
    from tinyllm.serve import create_app

    started: list[LiveServer] = []

    def make(path: Path, tool_prompt: str = "template") -> LiveServer:
        llm = LLM(str(path))
        server = LiveServer(create_app(llm.engine, model_name="tiny", tool_prompt=tool_prompt)).start()
        started.append(server)
        return server

    yield make
    for s in started:
        s.stop()
