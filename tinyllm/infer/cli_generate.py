"""`tinyllm generate` and `tinyllm chat`: the reference generator behind a command line (notes ch.02.13,
ch.02.15; the decoding knobs are those of 02.15.e: temperature, top-k, top-p, repetition penalty, beams).

`generate` prints the continuation of one prompt, streaming it as tokens arrive (decoded incrementally so a
multi-byte Chinese character prints only when complete). `chat` is an interactive loop on stdin that keeps
the conversation, renders it with the checkpoint's chat template each turn and streams the reply; `/reset`
clears the history, `/exit` (or end of input) quits. Each turn re-encodes the whole conversation (no KV cache
kept across turns) and drops the oldest turns when it outgrows the context window.

Errors a user can cause (a bad path, a corrupt checkpoint, a bad value) print one line naming the problem
and exit with status 2.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from tinyllm.infer.generate import GenerationConfig, generate

_SAMPLING_HELP = {
    "temperature": "sampling temperature; 0 = greedy decoding",
    "top_k": "keep the k most likely tokens (0 = off)",
    "top_p": "nucleus sampling: keep the smallest set with probability mass >= p (1 = off)",
    "min_p": "keep tokens with p >= min_p * max p (0 = off)",
    "repetition_penalty": "CTRL penalty for tokens already present (1 = off)",
}


@dataclass
class GenerateConfig:
    model: str = field(default="smollm2", metadata={"help": "HF checkpoint directory, .gguf file or short name"})
    prompt: str = field(default="", metadata={"help": "text to continue"})
    max_new_tokens: int = field(default=64, metadata={"help": "tokens to generate at most"})
    temperature: float = field(default=0.0, metadata={"help": _SAMPLING_HELP["temperature"]})
    top_k: int = field(default=0, metadata={"help": _SAMPLING_HELP["top_k"]})
    top_p: float = field(default=1.0, metadata={"help": _SAMPLING_HELP["top_p"]})
    min_p: float = field(default=0.0, metadata={"help": _SAMPLING_HELP["min_p"]})
    repetition_penalty: float = field(default=1.0, metadata={"help": _SAMPLING_HELP["repetition_penalty"]})
    num_beams: int = field(default=1, metadata={"help": "beam search width (1 = no beam search)"})
    seed: int | None = field(default=None, metadata={"help": "seed for reproducible sampling"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N or auto"})
    dtype: str = field(default="auto", metadata={"help": "weights dtype (auto: bfloat16 on CUDA, else float32)",
                                                 "choices": ["auto", "float32", "bfloat16"]})
    chat: bool = field(default=False, metadata={"help": "wrap the prompt in the checkpoint's chat template"})
    system: str | None = field(default=None, metadata={"help": "system message (with --chat)"})
    stream: bool = field(default=True, metadata={"help": "print tokens as they are generated"})

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature!r} must be >= 0 (0 = greedy)")
        if self.num_beams > 1 and self.temperature > 0:
            raise ValueError(f"num_beams={self.num_beams} needs greedy decoding (--temperature 0)")
        self.generation()  # validate the decoding values now, with their names

    def generation(self, **extra: Any) -> GenerationConfig:
        sampling = self.temperature > 0
        return GenerationConfig(max_new_tokens=self.max_new_tokens, do_sample=sampling,
                                temperature=self.temperature if sampling else 1.0, top_k=self.top_k,
                                top_p=self.top_p, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                                num_beams=self.num_beams, seed=self.seed, **extra)


@dataclass
class ChatConfig(GenerateConfig):
    max_new_tokens: int = field(default=256, metadata={"help": "reply length at most, in tokens"})
    temperature: float = field(default=0.7, metadata={"help": _SAMPLING_HELP["temperature"]})
    top_p: float = field(default=0.9, metadata={"help": _SAMPLING_HELP["top_p"]})
    chat: bool = field(default=True, init=False)


# ------------------------------------------------------------------ shared plumbing
class _UserError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


def _load(cfg: GenerateConfig) -> tuple[torch.nn.Module, Any]:
    from tinyllm.model.hf import load_model
    from tinyllm.tokenizer import load_tokenizer
    from tinyllm.utils import pick_device, pick_dtype

    try:
        device = pick_device(cfg.device)
        dtype = pick_dtype(cfg.dtype, device)
        tokenizer = load_tokenizer(cfg.model)
        model = load_model(cfg.model, dtype=dtype, device=device)
    except (ValueError, OSError) as e:  # CheckpointError and ConfigError are ValueErrors
        raise _UserError(f"--model {cfg.model}: {e}" if str(cfg.model) not in str(e) else str(e)) from None
    return model, tokenizer


def _stop_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    ids = [tokenizer.eos_token_id]
    eos = model.config.eos_token_id
    ids += eos if isinstance(eos, list) else [eos]
    return sorted({i for i in ids if i is not None})


def _render(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    from tinyllm.tokenizer import apply_chat_template

    return apply_chat_template(messages, tokenizer.chat_template, add_generation_prompt=True,
                               bos_token=tokenizer.bos_token or "", eos_token=tokenizer.eos_token or "")


def _complete(model: torch.nn.Module, tokenizer: Any, ids: list[int], gen: GenerationConfig, stream: bool) -> str:
    """Generate after `ids`; print (streaming or at the end) and return the continuation's text."""
    from tinyllm.tokenizer import IncrementalDecoder

    prompt = torch.tensor([ids], dtype=torch.long)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else None
    gen = dataclasses.replace(gen, eos_token_id=_stop_ids(model, tokenizer), pad_token_id=pad)
    if stream and gen.num_beams == 1:
        decoder = IncrementalDecoder(tokenizer)

        def emit(new: list[int]) -> None:
            sys.stdout.write(decoder.push(new))
            sys.stdout.flush()

        out = generate(model, prompt, gen, streamer=emit)
        sys.stdout.write(decoder.flush() + "\n")
    else:
        out = generate(model, prompt, gen)
    text = tokenizer.decode(_until_stop(out[0, len(ids):].tolist(), gen.eos_token_id), skip_special_tokens=True)
    if not (stream and gen.num_beams == 1):
        sys.stdout.write(text + "\n")
    sys.stdout.flush()
    return text


def _until_stop(ids: list[int], stops: list[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in stops:
            return ids[:i]
    return ids


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


# ------------------------------------------------------------------ commands
def run_generate(cfg: GenerateConfig) -> int:
    try:
        model, tokenizer = _load(cfg)
        if cfg.chat:
            messages = ([{"role": "system", "content": cfg.system}] if cfg.system else [])
            text = _render(tokenizer, [*messages, {"role": "user", "content": cfg.prompt}])
            ids = tokenizer.encode(text, allowed_special="all")  # the template's special tokens stay whole
        else:
            ids = tokenizer.encode(cfg.prompt, add_special_tokens=True)
        if not ids:
            raise _UserError("--prompt is empty and the tokenizer adds no BOS token; give a prompt")
        _complete(model, tokenizer, ids, cfg.generation(), cfg.stream)
    except _UserError as e:
        return _fail(str(e))
    return 0


def _fit_context(model: torch.nn.Module, tokenizer: Any, messages: list[dict[str, str]], budget: int) -> list[int]:
    """Encode the conversation, dropping the oldest turns (never the system message) until it fits."""
    while True:
        ids = tokenizer.encode(_render(tokenizer, messages), allowed_special="all")
        first = 1 if messages and messages[0]["role"] == "system" else 0
        if len(ids) <= budget or len(messages) - first <= 1:
            return ids[-budget:]
        messages[first:first + 2] = []


def run_chat(cfg: ChatConfig) -> int:
    try:
        model, tokenizer = _load(cfg)
    except _UserError as e:
        return _fail(str(e))
    base = [{"role": "system", "content": cfg.system}] if cfg.system else []
    history = list(base)
    budget = max(1, model.config.max_position_embeddings - cfg.max_new_tokens)
    print(f"chatting with {cfg.model} — /reset clears the conversation, /exit quits", flush=True)
    while True:
        sys.stdout.write("> ")
        sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:  # end of input
            sys.stdout.write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = list(base)
            print("(conversation cleared)", flush=True)
            continue
        if text.startswith("/"):
            print(f"unknown command {text!r}; commands: /reset, /exit", flush=True)
            continue
        history.append({"role": "user", "content": text})
        ids = _fit_context(model, tokenizer, history, budget)
        reply = _complete(model, tokenizer, ids, cfg.generation(), cfg.stream)
        history.append({"role": "assistant", "content": reply})
