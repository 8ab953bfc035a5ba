"""Agents (notes ch.08 planning / memory / tool use / ReAct, ch.10 LangChain): a Python sandbox, a tool registry,
and the function-calling and ReAct loops that drive a model through them."""
