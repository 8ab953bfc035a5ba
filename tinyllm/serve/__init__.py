"""Serving (notes ch.06.4): an OpenAI-compatible HTTP API and a chat page over one continuously batched engine.

`create_app(engine, model_name=...)` builds the FastAPI app (`app.py`); `tinyllm serve` runs it with uvicorn
(`cli.py`). Needs the `serve` extra (fastapi, uvicorn, pydantic).
"""

from tinyllm.serve.app import create_app
from tinyllm.serve.async_engine import AsyncEngine

__all__ = ["AsyncEngine", "create_app"]
