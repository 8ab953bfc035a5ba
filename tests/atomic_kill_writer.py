"""The writer that tests/test_atomic.py kills: it forks children that rewrite artefacts until SIGKILLed.

Run as `python atomic_kill_writer.py`. It imports torch and tinyllm once, prints `ready`, then answers commands
on stdin (one answer line each):
- `init ROOT`: write version 0 of every artefact under ROOT; answers `ok`;
- `spawn ROOT BASE MODE`: fork a child that writes versions BASE, BASE+1, ... of all artefacts under ROOT in a
  loop until it is killed, swapping directories by MODE (`rename-exchange`, or `rename-aside` as on systems
  without RENAME_EXCHANGE); answers the child's pid once the child has started;
- `reap`: wait for that child; answers the signal that ended it (-1 for none) and its count of complete rounds.

Version v of the artefacts: ROOT/model (a tiny LLaMA, every weight equal to v, written by `save_pretrained`,
then a BPE tokenizer whose chat template is "v{v}" saved into the same directory), ROOT/state.json
({"v": v, "payload": [v] * n}) and ROOT/run/checkpoints/step-{v} (a training checkpoint, the newest two kept).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from tinyllm import atomic
from tinyllm.atomic import atomic_write_json
from tinyllm.model.config import preset
from tinyllm.model.hf import build_model, save_pretrained
from tinyllm.tokenizer.bpe import train_bpe
from tinyllm.train.checkpoint import save_checkpoint

PAYLOAD = 20_000


def tiny_model() -> torch.nn.Module:
    cfg = preset("tiny", vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return build_model(cfg)


def write_version(root: Path, v: int, model: torch.nn.Module, tok: object, opt: torch.optim.Optimizer) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(v))
    save_pretrained(model, root / "model")
    tok.chat_template = f"v{v}"  # type: ignore[attr-defined]
    tok.save(root / "model")  # type: ignore[attr-defined]
    atomic_write_json(root / "state.json", {"v": v, "payload": [v] * PAYLOAD})
    save_checkpoint(root / "run", v, model, opt, {"rng": None, "data": None}, {"v": v}, keep_last=2)


def _child(root: Path, v: int, model: torch.nn.Module, tok: object, opt: torch.optim.Optimizer,
           pipe: int) -> None:
    code = 0
    try:
        os.write(pipe, b"s")
        while True:
            write_version(root, v, model, tok, opt)
            os.write(pipe, b".")
            v += 1
    except BaseException as e:  # a writer that fails on its own must not pass for a killed one
        print(f"writer failed: {e!r}", file=sys.stderr, flush=True)
        code = 3
    os._exit(code)


def main() -> None:
    torch.set_num_threads(1)  # no OpenMP pool before fork()
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tok = train_bpe(["hello world, atomic writes " * 20, "你好，世界 " * 20], 300, show_progress=False,
                    eos_token="<|endoftext|>", special_tokens=("<|endoftext|>",))
    exchange = atomic._exchange
    print("ready", flush=True)
    child, reader = 0, -1
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "init":
            write_version(Path(cmd[1]), 0, model, tok, opt)
            print("ok", flush=True)
        elif cmd[0] == "spawn":
            reader, writer = os.pipe()
            child = os.fork()
            if child == 0:
                os.close(reader)
                atomic._exchange = exchange if cmd[3] == "rename-exchange" else (lambda a, b: False)
                _child(Path(cmd[1]), int(cmd[2]), model, tok, opt, writer)
            os.close(writer)
            os.read(reader, 1)  # the child has started
            print(child, flush=True)
        elif cmd[0] == "reap":
            _, status = os.waitpid(child, 0)
            rounds = 0
            while chunk := os.read(reader, 4096):
                rounds += len(chunk)
            os.close(reader)
            print(os.WTERMSIG(status) if os.WIFSIGNALED(status) else -1, rounds, flush=True)


if __name__ == "__main__":
    main()
