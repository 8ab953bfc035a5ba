"""`tinyllm agent "task" [--model ... | --base-url ...] [--tools calc,python,rag,file] [--mode tools|react|plan]`:
run an agent on one task and stream its trace (Thought / Action / Observation / Final Answer) as it happens;
`--save-trace run.json` keeps it."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

from tinyllm.agent.tools import BUILTIN_NAMES


@dataclass
class AgentConfig:
    task: str = field(default="", metadata={"help": "what the agent should do", "positional": True})
    model: str = field(default="", metadata={"help": "a local checkpoint (HF directory, .gguf or short name)"})
    base_url: str = field(default="", metadata={"help": "an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1"})
    api_key: str = field(default="", metadata={"help": "API key for --base-url (default: $OPENAI_API_KEY)"})
    tools: str = field(default="calc", metadata={"help": f"comma-separated built-ins: {', '.join(BUILTIN_NAMES)}"})
    mode: str = field(default="tools", metadata={
        "help": "tools: OpenAI function calling; react: Thought/Action text; plan: plan-and-execute over tools",
        "choices": ["tools", "react", "plan"]})
    max_steps: int = field(default=8, metadata={"help": "model calls before the agent gives up"})
    store: str = field(default="", metadata={"help": "RAG store directory for the rag tool"})
    allow_dir: str = field(default="", metadata={"help": "directory the file tool may read (comma-separated)"})
    temperature: float = field(default=0.0, metadata={"help": "sampling temperature (0: greedy)"})
    save_trace: str = field(default="", metadata={"help": "write the trace as JSON here"})

    def __post_init__(self) -> None:
        if not self.task.strip():
            raise ValueError("task='' is empty: tinyllm agent \"what to do\"")
        if bool(self.model) == bool(self.base_url):
            raise ValueError(f"give exactly one of --model ({self.model!r}) and --base-url ({self.base_url!r})")
        names = [n.strip() for n in self.tools.split(",") if n.strip()]
        bad = [n for n in names if n not in BUILTIN_NAMES]
        if bad:
            raise ValueError(f"--tools {self.tools!r}: unknown {bad}; choose from {', '.join(BUILTIN_NAMES)}")
        if "rag" in names and not self.store:
            raise ValueError("--tools rag needs --store DIR (a tinyllm rag index)")
        if "file" in names and not self.allow_dir:
            raise ValueError("--tools file needs --allow-dir DIR")
        if self.max_steps < 1:
            raise ValueError(f"max_steps={self.max_steps} must be >= 1")


def _printer(out: Any) -> Any:
    def show(step: Any) -> None:
        print(step.line(), file=out, flush=True)

    return show


def run_agent(cfg: AgentConfig) -> int:
    from tinyllm.agent.backends import LocalChat, OpenAIChat
    from tinyllm.agent.function_calling import FunctionCallingAgent
    from tinyllm.agent.plan import PlanAndExecute
    from tinyllm.agent.react import ReActAgent
    from tinyllm.agent.tools import builtin_tools

    names = [n.strip() for n in cfg.tools.split(",") if n.strip()]
    store = None
    if "rag" in names:
        from tinyllm.rag.store import RagStore

        if not os.path.isdir(cfg.store):
            raise ValueError(f"--store {cfg.store}: no such directory (build one with tinyllm rag index)")
        store = RagStore.open(cfg.store)
    try:
        tools = builtin_tools(names, store=store, allowed_dirs=[d for d in cfg.allow_dir.split(",") if d])
        if cfg.base_url:
            backend: Any = OpenAIChat(cfg.base_url, api_key=cfg.api_key or os.environ.get("OPENAI_API_KEY", "none"),
                                      temperature=cfg.temperature)
        else:
            backend = LocalChat(cfg.model, temperature=cfg.temperature)
        if cfg.mode == "react":
            agent: Any = ReActAgent(backend, tools, max_steps=cfg.max_steps)
        else:
            agent = FunctionCallingAgent(backend, tools, max_steps=cfg.max_steps)
            if cfg.mode == "plan":
                agent = PlanAndExecute(backend, agent)
        trace = agent.run(cfg.task, on_step=_printer(sys.stdout))
    finally:
        if store is not None:
            store.close()
    if cfg.save_trace:
        trace.save(cfg.save_trace)
    return 0 if trace.answer is not None else 1
