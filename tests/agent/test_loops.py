"""Agent loops: the ReAct parser on small-model noise, ReAct / function-calling / plan-and-execute loops on
scripted backends (bad calls and sandbox failures come back as observations and the loop goes on; max
steps; stop on answer), memory, traces, and the function-calling loop against our server and a local model."""

from __future__ import annotations

import json

import pytest
from conftest import ANSWER, QUESTION, RESULT, WEATHER_TOOL

from tinyllm.agent.backends import ChatReply, LocalChat, OpenAIChat, make_backend
from tinyllm.agent.function_calling import FunctionCallingAgent
from tinyllm.agent.memory import BufferMemory, SummaryMemory
from tinyllm.agent.plan import PlanAndExecute, parse_plan
from tinyllm.agent.react import ReActAgent, parse_react
from tinyllm.agent.tools import Tool, ToolRegistry, builtin_tools, python_tool


class Scripted:
    """A backend that replays canned replies and records what it was sent."""

    def __init__(self, replies: list[ChatReply | str]) -> None:
        self.replies = [r if isinstance(r, ChatReply) else ChatReply(r) for r in replies]
        self.sent: list[list[dict]] = []

    def chat(self, messages, **kw):
        self.sent.append([dict(m) for m in messages])
        return self.replies.pop(0)


def _call(name: str, args: str, i: int = 0) -> dict:
    return {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": args}}


NOISY = [
    ("Thought: add them\nAction: calculator\nAction Input: {\"expression\": \"2+3\"}", ("calculator", '{"expression": "2+3"}')),
    ("**Thought:** add\n**Action:** calculator\n**Action Input:** `2+3`", ("calculator", "2+3")),
    ("thought: x\naction: Calculator[12*7]", ("Calculator", "12*7")),
    ("Action 1: calculator(2 ** 10)\n", ("calculator", "2 ** 10")),
    ("思考：先算\n行动：calculator\n行动输入：{\"expression\": \"1+1\"}", ("calculator", '{"expression": "1+1"}')),
    ("Thought: ok\nAction: calculator\nAction Input:\n```json\n{\"expression\": \"5*5\"}\n```",
     ("calculator", '{"expression": "5*5"}')),
    ("- Action: calculator: 3*3", ("calculator", "3*3")),
    ("Thought: t\nAction: calculator\nAction Input: 1+2\nObservation: 3\nThought: done\nFinal Answer: 3",
     ("calculator", "1+2")),
    ("## Action: python\nAction Input: print(1)", ("python", "print(1)")),
]


@pytest.mark.parametrize(("text", "want"), NOISY)
def test_parse_react_actions(text, want):
    step = parse_react(text)
    assert step.error is None and step.final is None
    assert (step.action, step.action_input) == want


@pytest.mark.parametrize(("text", "want"), [
    ("Thought: I know it\nFinal Answer: 42", "42"),
    ("final answer: **Paris**", "Paris"),
    ("最终答案：北京", "北京"),
    ("Final Answer: 7\nAction: calculator", "7"),
    ("Just the answer, no labels.", "Just the answer, no labels."),
])
def test_parse_react_answers(text, want):
    assert parse_react(text).final == want


def test_parse_react_errors():
    assert parse_react("Thought: hmm, what now").error
    assert parse_react("Action Input: 5").error
    assert parse_react("no labels", lenient=False).error


def test_react_loop_recovers_and_answers():
    backend = Scripted(["I am confused",  # lenient=False: an error observation, then the model recovers
                        "Thought: use the tool\nAction: calculator\nAction Input: 123456789123456789 + 1",
                        "Thought: and a bad one\nAction: nosuchtool\nAction Input: {}",
                        "Thought: done\nFinal Answer: 123456789123456790"])
    agent = ReActAgent(backend, builtin_tools(["calc"]), lenient=False)
    trace = agent.run("What is 123456789123456789 + 1?")
    assert trace.stopped == "answer" and trace.answer == "123456789123456790"
    obs = [s for s in trace.steps if s.kind == "observation"]
    assert obs[0].ok and obs[0].text == "123456789123456790"
    assert not obs[1].ok and "unknown tool 'nosuchtool'" in obs[1].text
    assert [s.kind for s in trace.steps].count("error") == 1
    last_prompt = backend.sent[-1][-1]["content"]
    assert "Observation: 123456789123456790" in last_prompt and last_prompt.count("Observation:") == 4


def test_sandbox_failures_are_observations_and_the_agent_continues():
    tools = ToolRegistry([python_tool(timeout_s=1.0, memory_mb=128)])
    bombs = ["while True: pass", "x = bytearray(10**10)", "import os\nwhile True: os.fork()",
             "open('/tmp/agent-escape.txt', 'w').write('x')", "import socket\nsocket.create_connection(('1.1.1.1', 80))"]
    replies = [ChatReply(None, [_call("python", json.dumps({"code": b}), i)]) for i, b in enumerate(bombs)]
    backend = Scripted([*replies, ChatReply("all contained")])
    trace = FunctionCallingAgent(backend, tools, max_steps=10).run("try to break out")
    obs = [s for s in trace.steps if s.kind == "observation"]
    assert len(obs) == 5 and not any(o.ok for o in obs)
    assert ("[timeout]" in obs[0].text or "[cpu_limit]" in obs[0].text) and "[memory_limit]" in obs[1].text
    assert all("[blocked]" in o.text for o in obs[2:])
    assert trace.answer == "all contained"
    tool_msgs = [m for m in backend.sent[-1] if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in tool_msgs] == [f"call_{i}" for i in range(5)]


def test_function_calling_bad_calls_and_max_steps():
    reg = builtin_tools(["calc"])
    backend = Scripted([ChatReply(None, [_call("calculator", "{not json"), _call("calculator", '{"expr": "1"}', 1)]),
                        ChatReply("thinking", [_call("calculator", '{"expression": "6*7"}', 2)]),
                        ChatReply("42")])
    trace = FunctionCallingAgent(backend, reg).run("6*7?")
    obs = [s.text for s in trace.steps if s.kind == "observation"]
    assert "not valid JSON" in obs[0] and "missing required argument 'expression'" in obs[1] and obs[2] == "42"
    assert trace.answer == "42" and [s.kind for s in trace.steps].count("thought") == 1
    loop = Scripted([ChatReply(None, [_call("calculator", '{"expression": "1"}')])] * 3)
    trace = FunctionCallingAgent(loop, reg, max_steps=3).run("forever")
    assert trace.stopped == "max_steps" and trace.answer is None and len(trace.tool_calls) == 3


def test_trace_prints_and_saves(tmp_path):
    seen = []
    backend = Scripted([ChatReply(None, [_call("calculator", '{"expression": "2+2"}')]), ChatReply("4")])
    trace = FunctionCallingAgent(backend, builtin_tools(["calc"])).run("2+2?", on_step=seen.append)
    assert str(trace).splitlines() == ["Task: 2+2?", 'Action: calculator({"expression": "2+2"})',
                                       "Observation: 4", "Final Answer: 4"]
    assert [s.kind for s in seen] == ["task", "action", "observation", "answer"]
    saved = json.loads(trace.save(tmp_path / "t.json").read_text())
    assert saved["answer"] == "4" and saved["stopped"] == "answer" and len(saved["steps"]) == 4


def test_memory_buffer_and_summary():
    mem = BufferMemory(max_messages=3)
    for m in [{"role": "user", "content": "a"}, {"role": "assistant", "content": None, "tool_calls": [{}]},
              {"role": "tool", "content": "r"}, {"role": "tool", "content": "r2"}, {"role": "assistant", "content": "b"}]:
        mem.add(m)
    assert [m["role"] for m in mem.messages()] == ["assistant"]  # the window never starts at a tool result
    summariser = Scripted(["The user asked about Paris; it is sunny."])
    mem = SummaryMemory(summariser, max_messages=2)
    agent = FunctionCallingAgent(Scripted(["sunny", "yes, 21 C"]), ToolRegistry(), memory=mem)
    agent.run("weather in Paris?")
    agent.run("and the temperature?")
    assert mem.summary == "The user asked about Paris; it is sunny."
    assert "weather in Paris?" in summariser.sent[0][0]["content"]
    assert mem.messages()[0]["role"] == "system" and "sunny" in mem.messages()[0]["content"]
    with pytest.raises(ValueError, match="max_messages=0"):
        BufferMemory(0)


def test_plan_and_execute():
    assert parse_plan("Plan:\n1. find a\n2) find b\n- add them", 5) == ["find a", "find b", "add them"]
    assert parse_plan("just do it", 5) == ["just do it"]
    planner = Scripted(["1. compute 2**10\n2. add 24", "The answer is 1048."])
    executor = FunctionCallingAgent(Scripted([ChatReply(None, [_call("calculator", '{"expression": "2**10"}')]),
                                              ChatReply("1024"),
                                              ChatReply(None, [_call("calculator", '{"expression": "1024+24"}')]),
                                              ChatReply("1048")]), builtin_tools(["calc"]))
    trace = PlanAndExecute(planner, executor).run("2**10 + 24?")
    kinds = [s.kind for s in trace.steps]
    assert kinds[:2] == ["task", "plan"] and kinds.count("action") == 2 and trace.answer == "The answer is 1048."
    assert "1. compute 2**10 -> 1024" in planner.sent[-1][0]["content"]


def _weather_registry() -> ToolRegistry:
    fn = WEATHER_TOOL["function"]
    t = Tool(fn["name"], fn["description"], fn["parameters"], lambda city: RESULT if city == "Paris" else "?")
    assert t.schema() == WEATHER_TOOL
    return ToolRegistry([t])


def test_function_calling_against_our_server_and_locally(serve, scripted_checkpoint):
    pytest.importorskip("openai")
    server = serve(scripted_checkpoint)
    traces = []
    for backend in (OpenAIChat(server.url), LocalChat(str(scripted_checkpoint), tool_prompt="template")):
        for streaming in (False, True):
            chunks: list[str] = []
            trace = FunctionCallingAgent(backend, _weather_registry()).run(
                QUESTION, on_text=chunks.append if streaming else None)
            assert trace.answer == ANSWER and trace.tool_calls[0].arguments == '{"city": "Paris"}'
            traces.append([s.line() for s in trace.steps])
    assert all(t == traces[0] for t in traces)
    assert OpenAIChat(server.url).model == "tiny"
    with pytest.raises(ValueError, match="exactly one of"):
        make_backend()


def test_cli_agent_against_our_server(serve, scripted_checkpoint, tmp_path, capsys):
    pytest.importorskip("openai")
    from tinyllm.cli import main

    server = serve(scripted_checkpoint)
    out = tmp_path / "trace.json"
    rc = main(["agent", "What is 2+2?", "--base-url", server.url, "--tools", "calc", "--max-steps", "2",
               "--save-trace", str(out)])
    printed = capsys.readouterr().out
    assert printed.startswith("Task: What is 2+2?") and rc in (0, 1)
    assert json.loads(out.read_text())["steps"][0]["text"] == "What is 2+2?"
    assert main(["agent", "x", "--tools", "web", "--base-url", server.url]) == 2
    assert "unknown ['web']" in capsys.readouterr().err
