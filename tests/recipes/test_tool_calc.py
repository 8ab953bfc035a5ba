"""tool-calc recipe: the training conversations render exactly the prompts the function-calling agent sends
at evaluation time (so the learned call format is the one the server and LocalChat parse), data is exact,
and only assistant turns are learned. The full run is a recipe, not a test (minutes on 2 cores)."""

from __future__ import annotations

import json
import random

import pytest

from tinyllm.agent.calculator import evaluate
from tinyllm.recipes.tool_calc import (
    CALC_TOOL,
    SPECIALS,
    TEMPLATE,
    ToolCalcConfig,
    _examples,
    conversations,
    make_question,
)
from tinyllm.serve.chat_format import render_chat_tools
from tinyllm.serve.tool_calls import parse_tool_calls
from tinyllm.tokenizer import apply_chat_template, train_bpe


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    convs = [c for _ in range(200) for c in conversations(*make_question(rng))]
    texts = [apply_chat_template(c, TEMPLATE, add_generation_prompt=False) for c in convs]
    return train_bpe(texts, 400, special_tokens=SPECIALS, show_progress=False, eos_token="<|im_end|>",
                     pad_token="<|endoftext|>", chat_template=TEMPLATE)


def test_training_text_equals_agent_prompts(tok):
    rng = random.Random(1)
    for _ in range(50):
        q, expr = make_question(rng)
        with_tool, without = conversations(q, expr)
        train_text = apply_chat_template(with_tool, TEMPLATE, add_generation_prompt=False)
        # step 1: the agent asks with tools; the training text continues with the call
        first = render_chat_tools(tok, [{"role": "user", "content": q}], [CALC_TOOL])
        assert train_text.startswith(first.text)
        reply = train_text[len(first.text):].split("<|im_end|>")[0]
        content, calls = parse_tool_calls(reply, first.fmt)
        assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"expression": expr}
        # step 2: the history as the agent sends it (arguments as a JSON string, role tool)
        history = [{"role": "user", "content": q}, {"role": "assistant", "content": None, "tool_calls": calls},
                   {"role": "tool", "tool_call_id": calls[0]["id"], "content": evaluate(expr)}]
        second = render_chat_tools(tok, history, [CALC_TOOL])
        assert train_text.startswith(second.text)
        assert train_text[len(second.text):] == evaluate(expr) + "<|im_end|>\n"
        plain = render_chat_tools(tok, [{"role": "user", "content": q}])
        assert apply_chat_template(without, TEMPLATE, add_generation_prompt=False) == \
            plain.text + evaluate(expr) + "<|im_end|>\n"


def test_only_assistant_turns_are_learned(tok):
    q, expr = "What is 12 + 30?", "12+30"
    ex = _examples([conversations(q, expr)[0]], tok)[0]
    learned = tok.decode([t for t in ex.labels if t != -100])
    assert learned == '<tool_call>\n{"name": "calculator", "arguments": {"expression": "12+30"}}\n</tool_call>' \
        "<|im_end|>42<|im_end|>"
    assert tok.decode(ex.ids) == apply_chat_template(conversations(q, expr)[0], TEMPLATE, add_generation_prompt=False).rstrip("\n")


def test_questions_and_config():
    rng = random.Random(0)
    qs = [make_question(rng) for _ in range(300)]
    assert all(evaluate(e) for _, e in qs)
    assert any("公里" in q or "加" in q for q, _ in qs) and any("km" in q for q, _ in qs)
    assert max(len(e.split("+")[0]) for _, e in qs if "+" in e) > 15
    with pytest.raises(ValueError, match="steps=0"):
        ToolCalcConfig(steps=0)
