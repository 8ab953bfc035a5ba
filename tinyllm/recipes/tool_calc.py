"""A tiny model taught to use a calculator tool (notes ch.08 tool use: the multi-digit addition "simple hard
problem", 81728738271872871871672 + 28781729836746721; Toolformer's idea at toy scale).

`tinyllm recipe tool-calc [--out runs/tool-calc] [--steps 8000]`:

1. data      -- synthetic questions (English and Chinese phrasings) about multi-digit +, -, × with 2-24 digit
                operands and unit conversions (km→m, h→min, kg→g, m→cm, cm→m, min→s). Each becomes two
                conversations: *with the tool* (a system turn lists the tools; the assistant writes a
                `<tool_call>` with the expression, the calculator's result comes back as `<tool_response>`,
                the assistant answers with it) and, for a share of them, *without* (the assistant answers
                directly; enough to measure the difference, not so many that they eat the training budget);
2. tokenizer -- byte-level BPE on the rendered conversations with GPT-4's pre-tokenizer: digits in groups of
                up to three, and a vocabulary (1800) large enough that every 3-digit group is one token. An
                operand is split the same way in the question, in the call and in the tool's response, so
                copying it is a token-by-token copy of tokens that rarely repeat within a number (with one
                token per digit each digit recurs ~2-3 times in a 24-digit operand and copies slip);
3. sft       -- a ~0.6M-parameter, 2-layer LLaMA-style model trained from scratch with assistant-only loss,
                through THE training loop (`tinyllm.train.loop`), batches of similar length (little padding),
                Muon on the hidden matrices. Copying random strings at a varying offset needs an
                induction-style circuit that appears after a loss plateau; Muon leaves the plateau after
                ~1500 steps where AdamW needs ~3500 (measured: 100 % vs 64 % held-out accuracy after 8000);
4. evaluate  -- on held-out questions (another seed): with the tool, the function-calling agent
                (`FunctionCallingAgent` + `LocalChat` + the real calculator) must end with the exact answer;
                without it, the model's direct reply must equal it. Plus the notes' long-addition example.
5. report    -- `report.json` and the model in `model/` (an HF directory; its chat template renders OpenAI
                `tools`, `tool_calls` and `role: tool` messages, so `tinyllm serve` offers it function calling).

The chat template is this recipe's own (Hermes `<tool_call>` convention, tools listed by name), so training
text and the agent's prompts are rendered by the same template. About ten minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tinyllm.agent.calculator import evaluate

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools: {% for t in tools %}{{ t['function']['name'] }}"
    "{% if not loop.last %}, {% endif %}{% endfor %}<|im_end|>{{ '\n' }}{% endif %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' and m['tool_calls'] %}<|im_start|>assistant\n"
    "{% for c in m['tool_calls'] %}<tool_call>\n{{ {'name': c['function']['name'], "
    "'arguments': c['function']['arguments']} | tojson }}\n</tool_call>{% endfor %}<|im_end|>{{ '\n' }}"
    "{%- elif m['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m['content'] }}\n</tool_response>"
    "<|im_end|>{{ '\n' }}"
    "{%- else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>{{ '\n' }}{% endif %}"
    "{%- endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LONG_ADDITION = ("81728738271872871871672", "28781729836746721")  # the notes' example; sum ...53602708618393
_OPS = {"+": ["What is {a} + {b}?", "Compute {a} plus {b}.", "{a} + {b} = ?", "{a}加{b}等于多少？"],
        "-": ["What is {a} - {b}?", "Subtract {b} from {a}.", "{a} - {b} = ?", "{a}减{b}等于多少？"],
        "*": ["What is {a} * {b}?", "Multiply {a} by {b}.", "{a} × {b} = ?", "{a}乘以{b}等于多少？"]}
_UNITS = [("How many meters are in {x} km?", "{x}*1000"), ("{x}公里是多少米？", "{x}*1000"),
          ("How many minutes are in {x} hours?", "{x}*60"), ("{x}小时是多少分钟？", "{x}*60"),
          ("How many grams are in {x} kg?", "{x}*1000"), ("How many centimeters are in {x} m?", "{x}*100"),
          ("How many meters are in {x} cm?", "{x}/100"), ("How many seconds are in {x} minutes?", "{x}*60")]


@dataclass
class ToolCalcConfig:
    out: str = field(default="runs/tool-calc", metadata={"help": "output directory"})
    train_questions: int = field(default=20000, metadata={"help": "synthetic training questions"})
    eval_questions: int = field(default=100, metadata={"help": "held-out questions per mode"})
    without_fraction: float = field(default=0.3, metadata={"help": "share of questions also trained without the tool"})
    steps: int = field(default=8000, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=16, metadata={"help": "conversations per step"})
    lr: float = field(default=5e-4, metadata={"help": "peak learning rate"})
    hidden_size: int = field(default=128, metadata={"help": "model width"})
    layers: int = field(default=2, metadata={"help": "decoder layers"})
    heads: int = field(default=4, metadata={"help": "attention heads (as many key/value heads)"})
    seed: int = field(default=0, metadata={"help": "seed of the data, the model and the order"})
    pattern: str = field(default="gpt4", metadata={"help": "pre-tokenizer: gpt4 (digits in groups of up to 3) or "
                                                           "qwen (one token per digit)"})
    vocab_size: int = field(default=1800, metadata={"help": "BPE vocabulary size"})
    optimizer: str = field(default="muon", metadata={"help": "muon (Muon on the hidden matrices, AdamW on the rest) "
                                                             "or adamw"})

    def __post_init__(self) -> None:
        for name in ("train_questions", "eval_questions", "steps", "batch_size", "hidden_size", "layers", "heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of heads={self.heads}")
        if not 0 <= self.without_fraction <= 1:
            raise ValueError(f"without_fraction={self.without_fraction} must be in [0, 1]")
        from tinyllm.tokenizer.pretokenize import PATTERNS
        from tinyllm.train.optim import OPTIMIZERS

        if self.pattern not in PATTERNS:
            raise ValueError(f"pattern={self.pattern!r} is not one of {sorted(PATTERNS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r} is not one of {list(OPTIMIZERS)}")
        if self.vocab_size < 300:
            raise ValueError(f"vocab_size={self.vocab_size} must be >= 300 (256 bytes, the specials and some merges)")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0")


def _number(rng: random.Random, lo: int, hi: int) -> str:
    n = rng.randint(lo, hi)
    return str(rng.randint(10 ** (n - 1), 10**n - 1))


def make_question(rng: random.Random) -> tuple[str, str]:
    """(question, calculator expression)."""
    if rng.random() < 0.25:
        text, expr = rng.choice(_UNITS)
        x = str(rng.randint(1, 999)) if rng.random() < 0.6 else f"{rng.randint(0, 99)}.{rng.randint(1, 9)}"
        return text.format(x=x), expr.format(x=x)
    op = rng.choice("+-*")
    hi = 12 if op == "*" else 24
    a, b = _number(rng, 2, hi), _number(rng, 2, hi)
    return rng.choice(_OPS[op]).format(a=a, b=b), f"{a}{op}{b}"


CALC_TOOL = {"type": "function", "function": {"name": "calculator", "description": "Evaluate arithmetic.",
                                              "parameters": {"type": "object", "properties": {
                                                  "expression": {"type": "string"}}, "required": ["expression"]}}}


def conversations(question: str, expr: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(with the tool, without it) as OpenAI messages; the tool one starts with the rendered tools line."""
    answer = evaluate(expr)
    call = {"id": "call_0", "type": "function",
            "function": {"name": "calculator", "arguments": {"expression": expr}}}
    with_tool = [{"role": "system", "content": "Tools: calculator"}, {"role": "user", "content": question},
                 {"role": "assistant", "content": "", "tool_calls": [call]},
                 {"role": "tool", "content": answer}, {"role": "assistant", "content": answer}]
    without = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return with_tool, without


def build_tokenizer(texts: list[str], vocab_size: int, pattern: str = "gpt4") -> Any:
    """The recipe's BPE over rendered conversations, with its specials and chat template."""
    from tinyllm.tokenizer import train_bpe

    return train_bpe(texts, vocab_size, pattern=pattern, special_tokens=SPECIALS, show_progress=False,
                     eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=TEMPLATE)


def _examples(convs: list[list[dict[str, Any]]], tok: Any) -> list[Any]:
    """Assistant-only SFT examples; each assistant turn's render is the learned segment (template prefixes)."""
    from tinyllm.data.sft import IGNORE_INDEX, SFTExample
    from tinyllm.tokenizer.chat import apply_chat_template

    out = []
    for conv in convs:
        ids: list[int] = []
        labels: list[int] = []
        prev = ""
        for i, m in enumerate(conv):
            if m["role"] != "assistant":
                continue
            prompt = apply_chat_template(conv[:i], TEMPLATE, add_generation_prompt=True)
            full = apply_chat_template(conv[: i + 1], TEMPLATE, add_generation_prompt=False)
            for text, learn in ((prompt[len(prev):], False), (full[len(prompt):].rstrip("\n"), True)):
                piece = tok.encode(text, allowed_special="all")
                ids += piece
                labels += piece if learn else [IGNORE_INDEX] * len(piece)
            prev = full.rstrip("\n")
        out.append(SFTExample(ids, labels))
    return out


def length_bucketed_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch of batches of example indices: shuffled, then sorted by length within windows of 64 batches
    (so a batch pads little), the batches in shuffled order; a last short batch is dropped."""
    import numpy as np

    order = np.random.default_rng([seed, epoch]).permutation(len(lengths))
    window = batch_size * 64
    batches = []
    for i in range(0, len(order), window):
        chunk = sorted(order[i: i + window].tolist(), key=lambda j: lengths[j])
        batches += [chunk[k: k + batch_size] for k in range(0, len(chunk) - batch_size + 1, batch_size)]
    if not batches:
        raise ValueError(f"{len(lengths)} examples make no batch of batch_size={batch_size}")
    return [batches[b] for b in np.random.default_rng([seed, epoch, 1]).permutation(len(batches))]


def _sft_task_class() -> type:
    from tinyllm.data.sft import pad_collate
    from tinyllm.train.sft import SFTTask

    class _LengthBucketedSFT(SFTTask):
        def train_batches(self) -> Any:
            lengths = [len(e.ids) for e in self.train_examples]
            epoch = 0
            while True:
                for b in length_bucketed_batches(lengths, self.batch_size, self.seed, epoch):
                    yield pad_collate([self.train_examples[j] for j in b], self.pad_id)
                epoch += 1

    return _LengthBucketedSFT


def length_bucketed_task(*args: Any) -> Any:
    """`SFTTask` whose training batches come from `length_bucketed_batches` (endless, epoch after epoch)."""
    return _sft_task_class()(*args)


def evaluate_model(model_dir: Path, questions: list[tuple[str, str]]) -> dict[str, Any]:
    from tinyllm.agent.backends import LocalChat
    from tinyllm.agent.function_calling import FunctionCallingAgent
    from tinyllm.agent.tools import builtin_tools

    chat = LocalChat(str(model_dir), tool_prompt="template", max_tokens=128)
    agent = FunctionCallingAgent(chat, builtin_tools(["calc"]), max_steps=3)
    with_tool = without = 0
    samples = []
    for q, expr in questions:
        want = evaluate(expr)
        trace = agent.run(q)
        direct = (chat.chat([{"role": "user", "content": q}]).content or "").strip()
        with_tool += trace.answer == want
        without += direct == want
        if len(samples) < 5:
            samples.append({"question": q, "expected": want, "with_tool": trace.answer, "without_tool": direct,
                            "trace": str(trace)})
    n = len(questions)
    a, b = LONG_ADDITION
    long_trace = agent.run(f"What is {a} + {b}?")
    return {"n": n, "accuracy_with_tool": with_tool / n, "accuracy_without_tool": without / n,
            "long_addition": {"answer": long_trace.answer, "expected": evaluate(f"{a}+{b}"),
                              "correct": long_trace.answer == evaluate(f"{a}+{b}"), "trace": str(long_trace)},
            "samples": samples}


def run_recipe(cfg: ToolCalcConfig) -> int:
    from tinyllm.atomic import atomic_write_json
    from tinyllm.model.config import ModelConfig
    from tinyllm.model.hf import build_model, save_pretrained
    from tinyllm.train.loop import TrainConfig, train

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rng = random.Random(cfg.seed)
    train_q = [make_question(rng) for _ in range(cfg.train_questions)]
    held = random.Random(cfg.seed + 10_000)
    seen = {q for q, _ in train_q}
    eval_q = []
    while len(eval_q) < cfg.eval_questions:
        q = make_question(held)
        if q[0] not in seen:
            eval_q.append(q)
    pick = random.Random(cfg.seed + 1)
    convs = []
    for q, e in train_q:
        with_tool, without = conversations(q, e)
        convs += [with_tool, without] if pick.random() < cfg.without_fraction else [with_tool]
    from tinyllm.tokenizer.chat import apply_chat_template

    texts = [apply_chat_template(c, TEMPLATE, add_generation_prompt=False) for c in convs[:6000]]
    tok = build_tokenizer(texts, cfg.vocab_size, cfg.pattern)
    examples = _examples(convs, tok)
    torch.manual_seed(cfg.seed)
    mcfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.hidden_size * 3,
                       num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                       max_position_embeddings=256, tie_word_embeddings=True)
    model = build_model(mcfg)
    pad = tok.encode("<|endoftext|>", allowed_special="all")[0]
    tcfg = TrainConfig(out_dir=str(out / "train"), max_steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                       min_lr=cfg.lr / 10, warmup_steps=min(100, cfg.steps // 10), weight_decay=0.0,
                       eval_interval=0, eval_steps=0, save_interval=0, seed=cfg.seed, device="cpu",
                       precision="fp32", progress=False, log_interval=50, optimizer=cfg.optimizer)
    result = train(model, length_bucketed_task(examples, [], cfg.batch_size, pad, cfg.seed), tcfg)
    model_dir = out / "model"
    save_pretrained(model.eval(), model_dir)
    tok.save(model_dir)
    train_s = time.time() - t0
    metrics = evaluate_model(model_dir, eval_q)
    report = {"config": cfg.__dict__, "params": sum(p.numel() for p in model.parameters()),
              "train_seconds": round(train_s, 1), "final_loss": round(sum(result.losses[-20:]) / max(1, len(result.losses[-20:])), 4),
              "total_seconds": round(time.time() - t0, 1), **metrics}
    atomic_write_json(out / "report.json", report)
    print(json.dumps({k: report[k] for k in ("params", "train_seconds", "accuracy_with_tool",
                                             "accuracy_without_tool")}), flush=True)
    print("long addition:", report["long_addition"]["trace"].replace("\n", " | "), flush=True)
    return 0 if metrics["accuracy_with_tool"] >= 0.9 else 1
