"""No traceback for a user's mistake: every `tinyllm` command, given a missing or unreadable path, a corrupt
checkpoint / tokenizer / shard index / RAG store, a dead or misbehaving OpenAI endpoint, or a prompt longer
than the model's context, prints one line `tinyllm <command>: error: <message naming the bad value>` and exits
non-zero.

The commands come from `cli.COMMANDS` (what `tinyllm --help` lists), so a new command without a case here
fails `test_bad_input`. Cases run in-process through `cli.main`; a few run `python -m tinyllm` to prove the
real entry point. Fixtures: one tiny llama checkpoint (512 positions) with a byte-level BPE tokenizer, damaged
copies of it, a small RAG store and damaged copies, and HTTP stubs on 127.0.0.1 that answer 500, garbage or
not HTTP at all.
"""

from __future__ import annotations

import http.server
import os
import shutil
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tinyllm import cli

pytestmark = pytest.mark.usefixtures("one_thread")

Fx = SimpleNamespace
Case = tuple[str, Callable[[Fx], list[str]], Callable[[Fx], str]]  # (id, argv, text the error must contain)


# ------------------------------------------------------------------ fixtures
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Answer500(http.server.BaseHTTPRequestHandler):
    status, body = 500, b"internal\nserver error"

    def _answer(self) -> None:
        self.send_response(self.status)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


class _AnswerGarbage(_Answer500):
    status, body = 200, b"\x00\xffnot json{"


class _NotHTTP(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.recv(65536)
        self.request.sendall(b"SSH-2.0-not-http\r\n\r\n")


@pytest.fixture(scope="module")
def endpoints() -> Iterator[dict[str, str]]:
    """base URLs: closed (nothing listens), 500, garbage (200 with non-JSON), raw (answers but not HTTP)."""
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answer500),
               http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AnswerGarbage),
               socketserver.ThreadingTCPServer(("127.0.0.1", 0), _NotHTTP)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    urls = [f"http://127.0.0.1:{s.server_address[1]}/v1" for s in servers]
    yield {"closed": f"http://127.0.0.1:{_free_port()}/v1", "500": urls[0], "garbage": urls[1], "raw": urls[2],
           "busy_port": str(servers[0].server_address[1])}
    for s in servers:
        s.shutdown()
        s.server_close()


DOCS = {"attention.md": "注意力机制是 Transformer 的核心：查询与键的相似度给值加权。" * 40,
        "rag.txt": "RAG 先检索相关文档，再把编号的资料和问题一起交给模型生成带引用的答案。" * 40,
        "bm25.txt": "BM25 是经典的稀疏检索算法，按词频和逆文档频率给文档打分。" * 40}


def _build(root: Path) -> Fx:
    from tinyllm.data.text import write_shards
    from tinyllm.model.config import ModelConfig
    from tinyllm.model.hf import build_model, save_pretrained
    from tinyllm.rag.pipeline import PROMPT, SYSTEM
    from tinyllm.rag.store import RagStore
    from tinyllm.tokenizer.bpe_train import train_bpe
    from tinyllm.tokenizer.chat import CHATML_TEMPLATE

    fx = Fx(root=root, missing=root / "does-not-exist", file=root / "a-file")
    fx.file.write_text("a regular file where a directory is expected\n")
    # the RAG instructions are in the training text (a 512-position model keeps room for sources), the
    # documents are not (their Chinese costs about a token a byte, so 1,500 tokens of them overflow 512)
    texts = [PROMPT, SYSTEM, "the model reads the prompt and writes tokens 1+2=3"] * 3
    tok = train_bpe(texts, 700, special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                    eos_token="<|endoftext|>", pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE,
                    show_progress=False)
    fx.ckpt = root / "ckpt"
    tok.save(fx.ckpt)
    torch.manual_seed(0)
    cfg = ModelConfig(model_type="llama", vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=True, eos_token_id=tok.eos_token_id)
    save_pretrained(build_model(cfg), fx.ckpt)
    damage = {"garbage_weights": ("model.safetensors", b"\x00garbage bytes" * 8),
              "truncated_config": ("config.json", (fx.ckpt / "config.json").read_bytes()[:40]),
              "broken_tokenizer": ("tokenizer.json", b'{"model": {"type": "BPE", "vocab": [1,')}
    for name, (file, data) in damage.items():
        shutil.copytree(fx.ckpt, root / name)
        (root / name / file).write_bytes(data)
        setattr(fx, name, root / name)
    fx.empty = root / "empty"
    fx.empty.mkdir()
    # data files
    fx.bad_jsonl = root / "bad.jsonl"
    fx.bad_jsonl.write_text('{"messages": [{"role": "user"\n')
    fx.bad_toml = root / "bad.toml"
    fx.bad_toml.write_text("prompt = [unclosed\n")
    fx.binary = fx.ckpt / "model.safetensors"  # not UTF-8 text
    fx.shards = root / "shards"
    write_shards(list(DOCS.values()) * 4, tok, fx.shards, progress=False, val_fraction=0.25)
    fx.bad_shards = root / "bad-shards"
    fx.bad_shards.mkdir()
    (fx.bad_shards / "index.json").write_text('{"dtype": ')
    fx.bad_adapter = root / "bad-adapter"
    fx.bad_adapter.mkdir()
    (fx.bad_adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    fx.bad_pos_model = root / "pos.json"
    fx.bad_pos_model.write_text('{"format": "tinyllm-hmm-pos", "params": ')
    # RAG stores: a good one and damaged copies
    fx.docs = root / "docs"
    fx.docs.mkdir()
    for name, text in DOCS.items():
        (fx.docs / name).write_text(text, encoding="utf-8")
    from tinyllm.rag.cli import load_documents
    from tinyllm.rag.embed import HashingEmbedder

    fx.store = root / "store"
    with RagStore.open(fx.store, embedder=HashingEmbedder(256)) as store:
        store.add(load_documents([str(fx.docs)])[0])
    (index_dir,) = fx.store.glob("index-*")
    for name, file, data in [("store_bad_db", "store.sqlite", os.urandom(64) * 8),
                             ("store_bad_bm25", f"{index_dir.name}/bm25.npz", b"garbage"),
                             ("store_bad_dense", f"{index_dir.name}/dense.npz",
                              (index_dir / "dense.npz").read_bytes()[:300])]:
        shutil.copytree(fx.store, root / name)
        (root / name / file).write_bytes(data)
        setattr(fx, name, root / name)
    return fx


@pytest.fixture(scope="module")
def fx(tmp_path_factory, endpoints) -> Fx:
    built = _build(tmp_path_factory.mktemp("bad-input"))
    built.url = endpoints
    built.busy_port = int(endpoints["busy_port"])  # a port something listens on
    return built


# ------------------------------------------------------------------ the cases, per command
def _s(x: object) -> str:
    return str(x)


NO_PROGRESS = ["--progress", "false"]
TRAIN = ["--max-steps", "1", "--device", "cpu", *NO_PROGRESS]


def _ask(*extra: str) -> Callable[[Fx], list[str]]:
    return lambda f: ["rag", "ask", "--question", "什么是注意力机制", "--store", _s(f.store), *extra]


CASES: dict[str, list[Case]] = {
    "generate": [
        ("missing model", lambda f: ["generate", "--model", _s(f.missing), "--prompt", "x"], lambda f: _s(f.missing)),
        ("garbage weights", lambda f: ["generate", "--model", _s(f.garbage_weights), "--prompt", "x"],
         lambda f: _s(f.garbage_weights / "model.safetensors")),
        ("truncated config.json", lambda f: ["generate", "--model", _s(f.truncated_config), "--prompt", "x"],
         lambda f: _s(f.truncated_config / "config.json")),
        ("broken tokenizer.json", lambda f: ["generate", "--model", _s(f.broken_tokenizer), "--prompt", "x"],
         lambda f: _s(f.broken_tokenizer / "tokenizer.json")),
        ("prompt longer than the context", lambda f: ["generate", "--model", _s(f.ckpt), "--prompt",
                                                      "1+2=3 " * 600, "--max-new-tokens", "2"],
         lambda f: "--prompt"),
        ("missing input file", lambda f: ["generate", "--model", _s(f.ckpt), "--input-file", _s(f.missing)],
         lambda f: _s(f.missing)),
        ("bad TOML config", lambda f: ["generate", "--config", _s(f.bad_toml)], lambda f: _s(f.bad_toml)),
    ],
    "chat": [
        ("missing model", lambda f: ["chat", "--model", _s(f.missing)], lambda f: _s(f.missing)),
        ("broken tokenizer.json", lambda f: ["chat", "--model", _s(f.broken_tokenizer)],
         lambda f: _s(f.broken_tokenizer / "tokenizer.json")),
    ],
    "serve": [
        ("missing model", lambda f: ["serve", "--model", _s(f.missing), "--port", str(_free_port())],
         lambda f: _s(f.missing)),
        ("garbage weights", lambda f: ["serve", "--model", _s(f.garbage_weights), "--port", str(_free_port())],
         lambda f: _s(f.garbage_weights / "model.safetensors")),
        ("port in use", lambda f: ["serve", "--model", _s(f.ckpt), "--port", str(f.busy_port)],
         lambda f: f"--port {f.busy_port}"),
    ],
    "pretrain": [
        ("missing data dir", lambda f: ["pretrain", "--data-dir", _s(f.missing), "--out-dir", _s(f.root / "o"),
                                        *TRAIN], lambda f: _s(f.missing)),
        ("broken index.json", lambda f: ["pretrain", "--data-dir", _s(f.bad_shards), "--out-dir",
                                         _s(f.root / "o"), *TRAIN], lambda f: _s(f.bad_shards / "index.json")),
        ("garbage init weights", lambda f: ["pretrain", "--data-dir", _s(f.shards), "--init-from",
                                            _s(f.garbage_weights), "--out-dir", _s(f.root / "o"), *TRAIN],
         lambda f: _s(f.garbage_weights)),
    ],
    "sft": [
        ("missing init", lambda f: ["sft", "--init-from", _s(f.missing), "--data", "builtin:arith",
                                    "--out-dir", _s(f.root / "o"), *TRAIN], lambda f: _s(f.missing)),
        ("missing data", lambda f: ["sft", "--init-from", _s(f.ckpt), "--data", _s(f.missing),
                                    "--out-dir", _s(f.root / "o"), *TRAIN], lambda f: _s(f.missing)),
        ("broken JSONL", lambda f: ["sft", "--init-from", _s(f.ckpt), "--data", _s(f.bad_jsonl),
                                    "--out-dir", _s(f.root / "o"), *TRAIN], lambda f: _s(f.bad_jsonl)),
    ],
    "recipe tiny-zh": [
        ("out is a file", lambda f: ["recipe", "tiny-zh", "--out", _s(f.file), "--quick", *NO_PROGRESS],
         lambda f: _s(f.file)),
    ],
    "recipe dense-retriever": [
        ("out under a file", lambda f: ["recipe", "dense-retriever", "--out", _s(f.file / "x"), "--limit", "8",
                                        *NO_PROGRESS], lambda f: _s(f.file)),
        ("broken tokenizer", lambda f: ["recipe", "dense-retriever", "--arch", "transformer", "--tokenizer",
                                        _s(f.broken_tokenizer), "--out", _s(f.root / "dr"), "--limit", "8",
                                        *NO_PROGRESS], lambda f: _s(f.broken_tokenizer / "tokenizer.json")),
    ],
    "calc params": [("missing model", lambda f: ["calc", "params", "--model", _s(f.missing)],
                     lambda f: _s(f.missing))],
    "calc flops": [("truncated config.json", lambda f: ["calc", "flops", "--model", _s(f.truncated_config)],
                    lambda f: _s(f.truncated_config / "config.json"))],
    "calc kv-cache": [("no config.json", lambda f: ["calc", "kv-cache", "--model", _s(f.empty)],
                       lambda f: _s(f.empty))],
    "calc memory": [("missing model", lambda f: ["calc", "memory", "--model", _s(f.missing)],
                     lambda f: _s(f.missing))],
    "merge-adapter": [
        ("missing adapter", lambda f: ["merge-adapter", "--base", _s(f.ckpt), "--adapter", _s(f.missing),
                                       "--out", _s(f.root / "merged")], lambda f: _s(f.missing)),
        ("truncated adapter_config.json", lambda f: ["merge-adapter", "--base", _s(f.ckpt), "--adapter",
                                                     _s(f.bad_adapter), "--out", _s(f.root / "merged")],
         lambda f: _s(f.bad_adapter / "adapter_config.json")),
    ],
    "reward": [
        ("missing init", lambda f: ["reward", "--init-from", _s(f.missing), "--out-dir", _s(f.root / "o"), *TRAIN],
         lambda f: _s(f.missing)),
        ("broken JSONL", lambda f: ["reward", "--init-from", _s(f.ckpt), "--data", _s(f.bad_jsonl),
                                    "--out-dir", _s(f.root / "o"), *TRAIN], lambda f: _s(f.bad_jsonl)),
    ],
    "dpo": [
        ("truncated config.json", lambda f: ["dpo", "--init-from", _s(f.truncated_config), "--out-dir",
                                             _s(f.root / "o"), *TRAIN], lambda f: _s(f.truncated_config)),
        ("missing data", lambda f: ["dpo", "--init-from", _s(f.ckpt), "--data", _s(f.missing),
                                    "--out-dir", _s(f.root / "o"), *TRAIN], lambda f: _s(f.missing)),
    ],
    "ppo": [
        ("missing reward model", lambda f: ["ppo", "--init-from", _s(f.ckpt), "--reward-model", _s(f.missing),
                                            "--out-dir", _s(f.root / "o"), *TRAIN], lambda f: _s(f.missing)),
        ("garbage weights", lambda f: ["ppo", "--init-from", _s(f.garbage_weights), "--out-dir",
                                       _s(f.root / "o"), *TRAIN], lambda f: _s(f.garbage_weights)),
    ],
    "grpo": [
        ("broken tokenizer.json", lambda f: ["grpo", "--init-from", _s(f.broken_tokenizer), "--out-dir",
                                             _s(f.root / "o"), *TRAIN], lambda f: _s(f.broken_tokenizer)),
        ("missing task file", lambda f: ["grpo", "--init-from", _s(f.ckpt), "--task", _s(f.root / "none.jsonl"),
                                         "--out-dir", _s(f.root / "o"), *TRAIN], lambda f: _s(f.root / "none.jsonl")),
    ],
    "seg": [
        ("missing input", lambda f: ["seg", "--input", _s(f.missing)], lambda f: _s(f.missing)),
        ("missing dict", lambda f: ["seg", "--text", "我爱北京", "--dict", _s(f.missing)], lambda f: _s(f.missing)),
        ("input not UTF-8", lambda f: ["seg", "--input", _s(f.binary)], lambda f: _s(f.binary)),
    ],
    "pos": [
        ("missing input", lambda f: ["pos", "--input", _s(f.missing), "--model", _s(f.bad_pos_model)],
         lambda f: _s(f.missing)),
        ("corrupt model", lambda f: ["pos", "--text", "我爱北京", "--model", _s(f.bad_pos_model)],
         lambda f: _s(f.bad_pos_model)),
    ],
    "title": [
        ("missing model", lambda f: ["title", "--model", _s(f.missing), "--text", "北京下雪"], lambda f: _s(f.missing)),
        ("not a tagger", lambda f: ["title", "--model", _s(f.ckpt), "--text", "北京下雪"], lambda f: _s(f.ckpt)),
        ("missing input", lambda f: ["title", "--model", _s(f.ckpt), "--input", _s(f.missing)],
         lambda f: _s(f.missing)),
        ("negative chars", lambda f: ["title", "--chars", "-3", "--text", "北京"], lambda f: "chars=-3"),
    ],
    "keywords": [
        ("missing input", lambda f: ["keywords", "--input", _s(f.missing)], lambda f: _s(f.missing)),
        ("missing idf", lambda f: ["keywords", "--text", "注意力机制", "--idf", _s(f.missing)],
         lambda f: _s(f.missing)),
        ("missing stop words", lambda f: ["keywords", "--text", "注意力机制", "--stop-words", _s(f.missing)],
         lambda f: _s(f.missing)),
        ("corrupt POS model", lambda f: ["keywords", "--text", "注意力机制", "--tagger", "hmm", "--pos-model",
                                         _s(f.bad_pos_model)], lambda f: _s(f.bad_pos_model)),
    ],
    "word2vec": [
        ("missing corpus", lambda f: ["word2vec", "--corpus", _s(f.missing), *NO_PROGRESS], lambda f: _s(f.missing)),
        ("broken JSONL corpus", lambda f: ["word2vec", "--corpus", _s(f.bad_jsonl), *NO_PROGRESS],
         lambda f: _s(f.bad_jsonl)),
    ],
    "rag index": [
        ("missing path", lambda f: ["rag", "index", "--paths", _s(f.missing), "--store", _s(f.root / "new-store"),
                                    *NO_PROGRESS], lambda f: _s(f.missing)),
        ("damaged database", lambda f: ["rag", "index", "--paths", _s(f.docs), "--store", _s(f.store_bad_db),
                                        *NO_PROGRESS], lambda f: _s(f.store_bad_db)),
        ("embedder dir without config", lambda f: ["rag", "index", "--paths", _s(f.docs), "--store",
                                                   _s(f.root / "new-store"), "--embedder", _s(f.empty),
                                                   *NO_PROGRESS], lambda f: _s(f.empty)),
    ],
    "rag search": [
        ("missing store", lambda f: ["rag", "search", "--query", "注意力", "--store", _s(f.missing)],
         lambda f: _s(f.missing)),
        ("damaged database", lambda f: ["rag", "search", "--query", "注意力", "--store", _s(f.store_bad_db)],
         lambda f: _s(f.store_bad_db)),
        ("garbage BM25 index", lambda f: ["rag", "search", "--query", "注意力", "--store", _s(f.store_bad_bm25)],
         lambda f: _s(f.store_bad_bm25)),
        ("truncated dense index", lambda f: ["rag", "search", "--query", "注意力", "--store",
                                             _s(f.store_bad_dense)], lambda f: _s(f.store_bad_dense)),
    ],
    "rag ask": [
        ("closed port", lambda f: _ask("--base-url", f.url["closed"])(f), lambda f: f.url["closed"]),
        ("endpoint answers 500", lambda f: _ask("--base-url", f.url["500"])(f), lambda f: f.url["500"]),
        ("endpoint answers garbage", lambda f: _ask("--base-url", f.url["garbage"])(f), lambda f: f.url["garbage"]),
        ("endpoint is not HTTP", lambda f: _ask("--base-url", f.url["raw"], "--served-model", "m")(f),
         lambda f: f.url["raw"]),
        ("missing model", lambda f: _ask("--model", _s(f.missing))(f), lambda f: _s(f.missing)),
        ("damaged store", lambda f: ["rag", "ask", "--question", "注意力", "--store", _s(f.store_bad_dense),
                                     "--model", _s(f.ckpt)], lambda f: _s(f.store_bad_dense)),
        ("question longer than the context", lambda f: ["rag", "ask", "--question", "注意力机制 " * 400, "--store",
                                                        _s(f.store), "--model", _s(f.ckpt)],
         lambda f: f"--model {f.ckpt}"),
    ],
    "recipe tool-calc": [
        ("out under a file", lambda f: ["recipe", "tool-calc", "--out", _s(f.file / "x"), "--steps", "1"],
         lambda f: _s(f.file)),
    ],
    "agent": [
        ("missing model", lambda f: ["agent", "--task", "1+2", "--model", _s(f.missing)], lambda f: _s(f.missing)),
        ("unknown tool", lambda f: ["agent", "--task", "1+2", "--model", _s(f.ckpt), "--tools", "calc,teleport"],
         lambda f: "teleport"),
        ("closed port", lambda f: ["agent", "--task", "1+2", "--base-url", f.url["closed"]],
         lambda f: f.url["closed"]),
        ("endpoint answers 500", lambda f: ["agent", "--task", "1+2", "--base-url", f.url["500"]],
         lambda f: f.url["500"]),
    ],
    "eval": [
        ("missing model", lambda f: ["eval", "--model", _s(f.missing), "--tasks", "arithmetic"],
         lambda f: _s(f.missing)),
        ("unknown task", lambda f: ["eval", "--model", _s(f.ckpt), "--tasks", "no_such_task"],
         lambda f: "no_such_task"),
        ("missing task file", lambda f: ["eval", "--model", _s(f.ckpt), "--tasks", _s(f.root / "none.jsonl")],
         lambda f: _s(f.root / "none.jsonl")),
        ("broken task file", lambda f: ["eval", "--model", _s(f.ckpt), "--tasks", _s(f.bad_jsonl)],
         lambda f: _s(f.bad_jsonl)),
        ("closed port", lambda f: ["eval", "--base-url", f.url["closed"], "--tokenizer", _s(f.ckpt),
                                   "--tasks", "arithmetic", "--limit", "2", *NO_PROGRESS],
         lambda f: f.url["closed"]),
    ],
    "parallel check": [
        ("unknown strategy", lambda f: ["parallel", "check", "--strategy", "warp-drive"], lambda f: "warp-drive"),
    ],
    "parallel schedule": [
        ("unknown kind", lambda f: ["parallel", "schedule", "--kind", "zigzag"], lambda f: "zigzag"),
        ("zero stages", lambda f: ["parallel", "schedule", "--stages", "0"], lambda f: "stages=0"),
        ("plot under a file", lambda f: ["parallel", "schedule", "--plot", _s(f.file / "s.png")],
         lambda f: _s(f.file)),
    ],
    "ask": [
        ("missing docs directory", lambda f: ["ask", "注意力", "--docs", _s(f.missing), "--search-only"],
         lambda f: _s(f.missing)),
        ("store that is not a docs store", lambda f: ["ask", "注意力", "--store", _s(f.store_bad_dense),
                                                      "--search-only"], lambda f: _s(f.store_bad_dense)),
        ("closed port", lambda f: ["ask", "注意力", "--base-url", f.url["closed"]], lambda f: f.url["closed"]),
        ("missing model", lambda f: ["ask", "注意力", "--model", _s(f.missing)], lambda f: _s(f.missing)),
    ],
}


def _cases() -> list[tuple[str, str]]:
    """(command, case id) for every command `tinyllm --help` lists; (command, "") when it has no case."""
    return [(name, case[0]) for name in cli.COMMANDS for case in CASES.get(name, [("", None, None)])]


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's own errors exit this way
        rc = e.code if isinstance(e.code, int) else 1
    return rc, capsys.readouterr().err


def test_help_lists_exactly_the_command_table(capsys) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name.split()[0] in out for name in cli.COMMANDS)
    assert not set(CASES) - set(cli.COMMANDS), "cases for commands that no longer exist"


@pytest.mark.parametrize(("command", "case"), _cases(), ids=[f"{c}: {i}" for c, i in _cases()])
def test_bad_input(command: str, case: str, fx: Fx, capsys, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """One line naming the bad value, exit status 2, no traceback; `serve` never starts listening."""
    assert case, f"`tinyllm {command}` has no bad-input case in CASES"
    _, argv_of, named = next(c for c in CASES[command] if c[0] == case)
    monkeypatch.chdir(tmp_path)  # nothing a command might write by default lands in the checkout
    if command == "serve":
        import uvicorn

        monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("serve started listening"))
    rc, err = _run(argv_of(fx), capsys)
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    assert rc == 2, err
    assert lines and lines[-1].startswith(f"tinyllm {command}: error: "), err
    assert named(fx) in lines[-1], lines[-1]
    assert sum("error" in line for line in lines) == 1, err


def test_serve_checks_the_port_before_loading_the_model(fx: Fx, capsys, monkeypatch) -> None:
    from tinyllm.serve import cli as serve_cli

    monkeypatch.setattr(serve_cli, "build_app", lambda cfg: pytest.fail("the model was loaded"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc, err = _run(["serve", "--model", str(fx.ckpt), "--port", str(port)], capsys)
    assert rc == 2 and f"--port {port}: cannot listen there" in err


def test_rag_ask_fits_the_sources_to_a_short_context(fx: Fx, capsys) -> None:
    """Regression: `rag ask --model` with the default 1,500-token source budget on a 512-position model used
    to overflow the context; now the sources get what the instructions and the answer leave."""
    from tinyllm.rag.pipeline import LocalLLM, build_prompt
    from tinyllm.rag.store import RagStore

    question = "什么是注意力机制"
    llm = LocalLLM(str(fx.ckpt), max_tokens=16)
    with RagStore.open(fx.store) as store:
        hits = store.search(question, k=5)
    unfitted, _ = build_prompt(question, hits, 1500, llm.count_tokens)
    assert llm.count_tokens(llm.render(unfitted)) > 512  # what used to be sent
    budget = llm.source_budget(question, 1500)
    fitted, used = build_prompt(question, hits, budget, llm.count_tokens)
    assert used and llm.count_tokens(llm.render(fitted)) + 16 <= 512
    rc = cli.main(_ask("--model", str(fx.ckpt), "--max-tokens", "16")(fx))
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "\nsources:\n[1]" in out  # the answer came back with its (fitted) numbered sources


def test_the_real_entry_point(fx: Fx, tmp_path) -> None:
    """`python -m tinyllm` prints one line and exits 2 (a missing model; a dead endpoint; serve with garbage
    weights exits without listening)."""
    port = _free_port()
    runs = {
        "generate": ["generate", "--model", str(fx.missing), "--prompt", "x"],
        "rag ask": _ask("--base-url", fx.url["closed"])(fx),
        "serve": ["serve", "--model", str(fx.garbage_weights), "--port", str(port)],
    }
    env = {**os.environ, "PYTHONPATH": str(Path(cli.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    env.pop("TINYLLM_DEBUG", None)
    start = time.monotonic()
    procs = {k: subprocess.Popen([sys.executable, "-m", "tinyllm", *argv], cwd=tmp_path, env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for k, argv in runs.items()}
    for name, p in procs.items():
        _, err = p.communicate(timeout=120)
        assert p.returncode == 2, err
        assert "Traceback" not in err and err.strip().startswith(f"tinyllm {name}: error: "), err
        assert len(err.strip().splitlines()) == 1, err
    assert time.monotonic() - start < 60
    with socket.socket() as s:  # serve never bound its port
        s.bind(("127.0.0.1", port))
