"""Training checkpoints that resume exactly (notes ch.04: what training state consists of).

`out_dir/checkpoints/step-000100/` holds
- the weights as a Hugging Face checkpoint (`config.json`, `model.safetensors`) written by
  `tinyllm.model.hf.save_pretrained`, so any intermediate checkpoint loads in transformers; a model that is
  not a tinyllm CausalLM/BERT (a wrapper with its own `save_pretrained`, or a bare module) is saved by its own
  method or as a raw `model.safetensors` state dict;
- `trainer_state.pt`: optimizer state (AdamW moments and step counts), the step, the schedule position (a pure
  function of the step), the python / numpy / torch (and CUDA) RNG states and the data iterator's position;
- `train_config.json`: the resolved TrainConfig.

A checkpoint is assembled in a temporary directory and swapped into place (`tinyllm.atomic`), and only then is
the `latest` pointer file (which names the directory) replaced — an interrupted save never leaves a half-written
checkpoint, and `latest` always names a complete one. Optionally only the newest `keep_last` are kept.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tinyllm.atomic import atomic_dir, atomic_write_text, json_text, remove_dir

STATE = "trainer_state.pt"
LATEST = "latest"


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _is_tinyllm_model(model: nn.Module) -> bool:
    from tinyllm.model.config import ModelConfig

    return isinstance(getattr(model, "config", None), ModelConfig)


def save_model(model: nn.Module, directory: Path) -> None:
    """Weights into an existing `directory`: HF format for tinyllm models, else the model's own format."""
    if _is_tinyllm_model(model):
        from tinyllm.model.hf import save_pretrained

        save_pretrained(model, directory)
    elif hasattr(model, "save_pretrained"):
        model.save_pretrained(directory)
    else:
        from safetensors.torch import save_model as save_st

        save_st(model, str(directory / "model.safetensors"))


def load_model_weights(model: nn.Module, directory: Path) -> None:
    if _is_tinyllm_model(model):
        from tinyllm.model.hf import hf_to_tinyllm, load_state_dict_into, read_hf_weights

        sd = hf_to_tinyllm(model.config, read_hf_weights(directory))
        load_state_dict_into(model, sd, str(directory))
    elif hasattr(model, "load_pretrained_weights"):
        model.load_pretrained_weights(directory)
    else:
        from safetensors.torch import load_model as load_st

        load_st(model, str(directory / "model.safetensors"))


def save_checkpoint(out_dir: str | os.PathLike, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], config: dict[str, Any], keep_last: int = 0) -> Path:
    """Atomically write `checkpoints/step-XXXXXX` and point `latest` at it; return its path."""
    root = Path(out_dir) / "checkpoints"
    target = root / step_dir_name(step)
    # re-saving a step (e.g. Ctrl-C right after a periodic save) swaps the new directory in whole
    with atomic_dir(target) as tmp:
        save_model(model, tmp)
        state = {"step": step, "optimizer": optimizer.state_dict(), **trainer_state}
        torch.save(state, tmp / STATE)
        (tmp / "train_config.json").write_text(json_text(config, default=str, ensure_ascii=True))
    atomic_write_text(root / LATEST, target.name + "\n")
    if keep_last > 0:
        for old_dir in list_checkpoints(out_dir)[:-keep_last]:
            remove_dir(old_dir)  # renamed aside first: a half-deleted checkpoint never looks complete
    return target


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under out_dir/checkpoints, oldest first."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and (p / STATE).exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The directory `latest` names (falling back to the highest complete step), or None."""
    root = Path(out_dir) / "checkpoints"
    pointer = root / LATEST
    if pointer.exists():
        cand = root / pointer.read_text().strip()
        if (cand / STATE).exists():
            return cand
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def load_checkpoint(directory: str | os.PathLike, model: nn.Module | None,
                    optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Load weights (and optimizer state) from a checkpoint directory; return the trainer state dict.
    model=None reads the trainer state only (sharded strategies load the weights their own way)."""
    d = Path(directory)
    if not (d / STATE).exists():
        raise FileNotFoundError(f"{d}: no {STATE}; not a training checkpoint")
    if model is not None:
        load_model_weights(model, d)
    # weights_only=False: the RNG states are python/numpy objects; only load checkpoints you wrote
    state = torch.load(d / STATE, map_location="cpu", weights_only=False)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    return state
