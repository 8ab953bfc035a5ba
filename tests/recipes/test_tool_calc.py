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
    TEMPLATE,
    ToolCalcConfig,
    _examples,
    build_tokenizer,
    conversations,
    length_bucketed_batches,
    make_question,
    run_recipe,
)
from tinyllm.serve.chat_format import render_chat_tools
from tinyllm.serve.tool_calls import parse_tool_calls
from tinyllm.tokenizer import apply_chat_template


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    convs = [c for _ in range(3000) for c in conversations(*make_question(rng))]
    texts = [apply_chat_template(c, TEMPLATE, add_generation_prompt=False) for c in convs]
    return build_tokenizer(texts, ToolCalcConfig().vocab_size)


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
    with pytest.raises(ValueError, match=r"without_fraction=1\.5"):
        ToolCalcConfig(without_fraction=1.5)
    with pytest.raises(ValueError, match="heads=3"):
        ToolCalcConfig(heads=3)
    with pytest.raises(ValueError, match="pattern='gpt5'"):
        ToolCalcConfig(pattern="gpt5")
    with pytest.raises(ValueError, match="optimizer='sgd'"):
        ToolCalcConfig(optimizer="sgd")


def test_operands_split_alike_in_question_call_and_answer(tok):
    """Digits go in left-aligned groups of three wherever a number appears, so copying an operand into the
    call (and the result into the answer) is a token-by-token copy of the same tokens."""
    a, b = "81728738271872871871672", "28781729836746721"
    groups = [a[i: i + 3] for i in range(0, len(a), 3)]
    pieces = [tok.decode([i]) for i in tok.encode(f"What is {a} + {b}?")]
    assert pieces[3: 3 + len(groups)] == groups
    call = tok.encode(json.dumps({"expression": f"{a}+{b}"}))
    ids_a, ids_b = tok.encode(a), tok.encode(b)
    assert ids_a == tok.encode(" " + a)[1:] and len(ids_a) == len(groups)
    text = [tok.decode([i]) for i in call]
    start = text.index(groups[0])
    assert call[start: start + len(ids_a)] == ids_a and call[start + len(ids_a) + 1: start + len(ids_a) + 1 + len(ids_b)] == ids_b
    s = evaluate(f"{a}+{b}")
    assert tok.encode(f"<tool_response>\n{s}\n")[-len(tok.encode(s)) - 1: -1] == tok.encode(s)


def test_length_bucketed_batches():
    rng = random.Random(0)
    lengths = [rng.randint(5, 200) for _ in range(1000)]
    batches = length_bucketed_batches(lengths, 8, seed=0, epoch=0)
    flat = [i for b in batches for i in b]
    assert len(batches) == 125 and len(set(flat)) == 1000  # every example once per epoch
    pad = sum(max(lengths[i] for i in b) * 8 - sum(lengths[i] for i in b) for b in batches)
    assert pad < 0.05 * sum(lengths)  # little padding
    assert batches != length_bucketed_batches(lengths, 8, seed=0, epoch=1)
    with pytest.raises(ValueError, match="batch_size=8"):
        length_bucketed_batches([3, 4], 8, seed=0, epoch=0)


def test_tiny_run_writes_both_accuracies_and_well_formed_calls(tmp_path):
    """A tiny scale of the recipe: the report has both numbers and the model's first step is a parsed call."""
    cfg = ToolCalcConfig(out=str(tmp_path), train_questions=300, eval_questions=3, steps=250, batch_size=16, lr=1e-2,
                         hidden_size=64)
    run_recipe(cfg)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["n"] == 3 and 0 <= report["accuracy_with_tool"] <= 1 and 0 <= report["accuracy_without_tool"] <= 1
    assert "Action: calculator(" in report["long_addition"]["trace"]
    assert (tmp_path / "model" / "config.json").exists()
