"""`tinyllm generate` and `tinyllm chat`: the inference engine and the reference generator behind a command
line (notes ch.02.13, ch.02.15; the decoding knobs are those of 02.15.e: temperature, top-k, top-p,
repetition penalty, beams; ch.06.4 for the engine).

`generate` prints the continuation of one prompt, streaming it as tokens arrive (decoded incrementally so a
multi-byte Chinese character prints only when complete). By default it runs through the engine (`LLMEngine`:
paged KV cache, continuous batching); `--engine false` (and beam search, which the engine lacks) uses the
reference generator; under greedy decoding both print the same text. `--input-file` reads one prompt per line
(blank lines skipped), runs them all as one batch with a progress bar on stderr and writes one JSON object per
prompt (prompt, text, num_tokens, finish_reason) to `--output-file` or stdout. `--quantization int8|int4`
quantizes the weights (`quant.quantize_model`, lm_head kept) before generation; `--quantization gguf` runs a
.gguf model's own Q4_0/Q4_1/Q8_0 blocks as llama.cpp does (int8-rounded activations, the batch-1 fast path). `--speculative ngram|draft`
decodes speculatively in the engine (`drafters.py`: prompt lookup, or a draft model — `--draft-model`, by
default the Q4_1 copy of the target), `--num-speculative-tokens` draft tokens per step; same greedy text. `chat` is an interactive loop on stdin that keeps
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
from pathlib import Path
from typing import Any

import torch

from tinyllm.infer.generate import GenerationConfig, generate

_SAMPLING_HELP = {
    "temperature": "sampling temperature; 0 = greedy decoding",
    "top_k": "keep the k most likely tokens (0 = off)",
    "top_p": "nucleus sampling: keep the smallest set with probability mass >= p (1 = off)",
    "min_p": "keep tokens with p >= min_p * max p (0 = off)",
    "repetition_penalty": "CTRL penalty for tokens already present (1 = off)",
    "encoder_repetition_penalty": "reward for tokens of the prompt, > 1 favours copying from it (1 = off)",
    "no_repeat_ngram_size": "never let an n-gram of this many tokens occur twice (0 = off)",
    "no_repeat_ngram_scope": "where --no-repeat-ngram-size looks: all (prompt and reply, as transformers) or "
                             "output (the reply only, so it may still quote the prompt once)",
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
    encoder_repetition_penalty: float = field(default=1.0, metadata={
        "help": _SAMPLING_HELP["encoder_repetition_penalty"]})
    no_repeat_ngram_size: int = field(default=0, metadata={"help": _SAMPLING_HELP["no_repeat_ngram_size"]})
    no_repeat_ngram_scope: str = field(default="all", metadata={"help": _SAMPLING_HELP["no_repeat_ngram_scope"],
                                                                "choices": ["all", "output"]})
    num_beams: int = field(default=1, metadata={"help": "beam search width (1 = no beam search)"})
    seed: int | None = field(default=None, metadata={"help": "seed for reproducible sampling"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N or auto"})
    dtype: str = field(default="auto", metadata={"help": "weights dtype (auto: bfloat16 on CUDA, else float32)",
                                                 "choices": ["auto", "float32", "bfloat16"]})
    chat: bool = field(default=False, metadata={"help": "wrap the prompt in the checkpoint's chat template"})
    system: str | None = field(default=None, metadata={"help": "system message (with --chat)"})
    stream: bool = field(default=True, metadata={"help": "print tokens as they are generated"})
    engine: bool = field(default=True, metadata={"help": "generate with the LLM engine (false: the reference "
                                                         "generator)"})
    input_file: str | None = field(default=None, metadata={"help": "file with one prompt per line (JSONL out)"})
    output_file: str | None = field(default=None, metadata={"help": "JSONL output of --input-file (default "
                                                                    "stdout)"})
    quantization: str = field(default="none", metadata={
        "help": "weight-only quantization before generating (gguf: a .gguf model's own blocks, as llama.cpp)",
        "choices": ["none", "int8", "int4", "gguf"]})
    group_size: int = field(default=128, metadata={"help": "int4 group size", "choices": [32, 64, 128]})
    speculative: str = field(default="none", metadata={
        "help": "speculative decoding in the engine: ngram (prompt lookup) or draft (a draft model)",
        "choices": ["none", "ngram", "draft"]})
    num_speculative_tokens: int = field(default=4, metadata={"help": "draft tokens verified per step"})
    draft_model: str | None = field(default=None, metadata={
        "help": "--speculative draft: the draft checkpoint (default: the Q4_1 copy of the target)"})
    draft_layers: int | None = field(default=None, metadata={"help": "keep only the draft's first N layers"})

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature!r} must be >= 0 (0 = greedy)")
        if self.quantization not in ("none", "int8", "int4", "gguf"):
            raise ValueError(f"quantization={self.quantization!r} must be none, int8, int4 or gguf")
        if self.num_beams > 1 and self.temperature > 0:
            raise ValueError(f"num_beams={self.num_beams} needs greedy decoding (--temperature 0)")
        if self.speculative != "none" and (not self.engine or self.num_beams > 1):
            raise ValueError(f"speculative={self.speculative!r} runs in the engine: drop --engine false / "
                             f"--num-beams {self.num_beams}")
        self.speculative_config()
        self.generation()  # validate the decoding values now, with their names

    def generation(self, **extra: Any) -> GenerationConfig:
        sampling = self.temperature > 0
        return GenerationConfig(max_new_tokens=self.max_new_tokens, do_sample=sampling,
                                temperature=self.temperature if sampling else 1.0, top_k=self.top_k,
                                top_p=self.top_p, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                                encoder_repetition_penalty=self.encoder_repetition_penalty,
                                no_repeat_ngram_size=self.no_repeat_ngram_size,
                                no_repeat_ngram_scope=self.no_repeat_ngram_scope,
                                num_beams=self.num_beams, seed=self.seed, **extra)

    def speculative_config(self) -> Any:
        if self.speculative == "none":
            return None
        from tinyllm.infer.drafters import SpeculativeConfig

        # a separate draft checkpoint is taken as it is; the self-draft is the Q4_1 copy of the target
        return SpeculativeConfig(self.speculative, self.num_speculative_tokens, draft_model=self.draft_model,
                                 draft_quantization=None if self.draft_model else "q4_1",
                                 draft_head_quantization=None if self.draft_model else "q8_0",
                                 draft_num_layers=self.draft_layers)

    def sampling_params(self) -> Any:
        from tinyllm.infer.sampling_params import SamplingParams

        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                              repetition_penalty=self.repetition_penalty,
                              encoder_repetition_penalty=self.encoder_repetition_penalty,
                              no_repeat_ngram_size=self.no_repeat_ngram_size,
                              no_repeat_ngram_scope=self.no_repeat_ngram_scope, seed=self.seed,
                              max_tokens=self.max_new_tokens)


@dataclass
class ChatConfig(GenerateConfig):
    max_new_tokens: int = field(default=256, metadata={"help": "reply length at most, in tokens"})
    temperature: float = field(default=0.7, metadata={"help": _SAMPLING_HELP["temperature"]})
    top_p: float = field(default=0.9, metadata={"help": _SAMPLING_HELP["top_p"]})
    chat: bool = field(default=True, init=False)
    engine: bool = field(default=False, init=False)  # a chat turn runs the reference generator
    speculative: str = field(default="none", init=False)
    input_file: str | None = field(default=None, init=False)
    output_file: str | None = field(default=None, init=False)


# ------------------------------------------------------------------ shared plumbing
class _UserError(ValueError):
    """A problem the user can fix; `tinyllm` prints it as one line and exits with status 2."""


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
    if cfg.quantization == "gguf":
        from tinyllm.infer.ggml_linear import use_gguf_blocks
        from tinyllm.model.hf import resolve_model_path

        path = resolve_model_path(cfg.model)
        if Path(path).suffix != ".gguf":
            raise _UserError(f"--quantization gguf runs a .gguf file's own blocks; --model {cfg.model} is not one")
        model = use_gguf_blocks(model, path, x_q8=True)
    elif cfg.quantization != "none":
        from tinyllm.infer.quant import quantize_model

        model = quantize_model(model, cfg.quantization, cfg.group_size)
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


def _engine(model: torch.nn.Module, tokenizer: Any, num_prompts: int, cfg: GenerateConfig) -> Any:
    from tinyllm.infer.engine import LLMEngine

    return LLMEngine(model, tokenizer, max_num_seqs=max(1, min(num_prompts, 256)),
                     speculative=cfg.speculative_config())


def _complete_engine(model: torch.nn.Module, tokenizer: Any, ids: list[int], cfg: GenerateConfig) -> str:
    """The engine's continuation of one prompt, streamed from its per-step text deltas."""
    engine = _engine(model, tokenizer, 1, cfg)
    engine.add_request("0", None, cfg.sampling_params(), prompt_token_ids=ids)
    text = ""
    while engine.has_unfinished_requests():
        for out in engine.step():
            text = out.outputs[0].text
            if cfg.stream:
                sys.stdout.write(out.outputs[0].delta_text)
                sys.stdout.flush()
    sys.stdout.write("\n" if cfg.stream else text + "\n")
    sys.stdout.flush()
    return text


def _fits(model: torch.nn.Module, ids: list[int], where: str) -> list[int]:
    """`ids` when they leave room for at least one new token in the model's context, else a clear error."""
    limit = model.config.max_position_embeddings
    if len(ids) >= limit:
        raise _UserError(f"{where} is {len(ids)} tokens; the model's context holds {limit} positions, so no "
                         "room is left to generate (shorten the prompt)")
    return ids


def _encode(cfg: GenerateConfig, tokenizer: Any, prompt: str) -> list[int]:
    if cfg.chat:
        messages = ([{"role": "system", "content": cfg.system}] if cfg.system else [])
        text = _render(tokenizer, [*messages, {"role": "user", "content": prompt}])
        ids = tokenizer.encode(text, allowed_special="all")  # the template's special tokens stay whole
    else:
        ids = tokenizer.encode(prompt, allowed_special="all", add_special_tokens=True)  # as vLLM and LLM.generate
    if not ids:
        raise _UserError("the prompt is empty and the tokenizer adds no BOS token; give a prompt")
    return ids


def _read_prompts(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.rstrip("\r\n") for line in f]
    except OSError as e:
        raise _UserError(f"--input-file {path}: {e.strerror or e}") from None
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise _UserError(f"--input-file {path}: no prompts (one per line expected)")
    return prompts


def _batch_rows(cfg: GenerateConfig, model: torch.nn.Module, tokenizer: Any, prompts: list[str]) -> list[dict]:
    from tqdm.auto import tqdm

    encoded = [_fits(model, _encode(cfg, tokenizer, p), f"--input-file prompt {i + 1}") for i, p in enumerate(prompts)]
    rows: list[dict] = [{} for _ in prompts]
    with tqdm(total=len(prompts), desc="prompts", file=sys.stderr, disable=None) as bar:
        if cfg.engine and cfg.num_beams == 1:
            engine = _engine(model, tokenizer, len(prompts), cfg)
            for i, ids in enumerate(encoded):
                engine.add_request(str(i), None, cfg.sampling_params(), prompt_token_ids=ids)
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        o = out.outputs[0]
                        rows[int(out.request_id)] = {"text": o.text, "num_tokens": len(o.token_ids),
                                                     "finish_reason": o.finish_reason}
                        bar.update(1)
        else:
            stops = _stop_ids(model, tokenizer)
            pad = tokenizer.pad_token_id
            gen = dataclasses.replace(cfg.generation(), eos_token_id=stops, pad_token_id=pad)
            for i, ids in enumerate(encoded):
                new = generate(model, torch.tensor([ids]), gen)[0, len(ids):].tolist()
                kept = _until_stop(new, stops)
                reason = "stop" if len(kept) < len(new) else "length"
                rows[i] = {"text": tokenizer.decode(kept, skip_special_tokens=True),
                           "num_tokens": len(kept) + (reason == "stop"), "finish_reason": reason}
                bar.update(1)
    return [{"prompt": p, **r} for p, r in zip(prompts, rows, strict=True)]


def _write_jsonl(rows: list[dict], path: str | None) -> None:
    import json

    from tinyllm.atomic import atomic_write_text

    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if path is None:
        sys.stdout.write(lines)
        sys.stdout.flush()
        return
    try:
        atomic_write_text(path, lines)  # no half-written output
    except OSError as e:
        raise _UserError(f"--output-file {path}: {e.strerror or e}") from None


# ------------------------------------------------------------------ commands
def run_generate(cfg: GenerateConfig) -> int:
    prompts = _read_prompts(cfg.input_file) if cfg.input_file else None
    model, tokenizer = _load(cfg)
    if prompts is not None:
        _write_jsonl(_batch_rows(cfg, model, tokenizer, prompts), cfg.output_file)
        return 0
    ids = _fits(model, _encode(cfg, tokenizer, cfg.prompt), "--prompt")
    if cfg.engine and cfg.num_beams == 1:
        _complete_engine(model, tokenizer, ids, cfg)
    else:
        _complete(model, tokenizer, ids, cfg.generation(), cfg.stream)
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
    model, tokenizer = _load(cfg)
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
