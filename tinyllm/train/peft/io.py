"""Adapter directories (DESIGN §4: "adapters are PEFT directories").

`save_adapter(model, dir)` writes `adapter_config.json` + `adapter_model.safetensors`:
- LoRA, prompt tuning, prefix tuning / P-tuning v2 in HF PEFT's own format, which
  `peft.PeftModel.from_pretrained(<the transformers export of the same base>, dir)` loads:
  LoRA keys `base_model.model.<module>.lora_A.weight` / `.lora_B.weight` (tinyllm's module names are HF's,
  DESIGN rule 9), soft prompts as `prompt_embeddings` ([P, d] for prompt tuning, the flat prefix
  [P, L·2·H_kv·d_head] for prefix tuning — the MLP's output when there is one, as PEFT saves it);
- bottleneck adapters and BitFit, which PEFT does not have, in the same two files with tinyllm's own
  `peft_type` (BOTTLENECK_ADAPTER, BITFIT) and tinyllm parameter names.

`load_adapter(model, dir)` reads either library's directory back onto a base model and returns the adapted
model (the same object for LoRA/adapters/BitFit, a wrapper for soft prompts). `PeftModel(model)` is the view
the training loop trains: its checkpoints are adapter directories (plus `trainable_state.safetensors`, every
trainable tensor, so a prefix MLP resumes exactly), and `.module` lets the loop's fused lm_head loss reach
the CausalLM inside. A directory is built beside its target and swapped in as a whole (`tinyllm.atomic`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tinyllm.atomic import atomic_dir, json_text
from tinyllm.train.peft.adapter import AdapterConfig, apply_adapters
from tinyllm.train.peft.lora import LoraConfig, apply_lora, load_lora_state_dict, lora_layers, lora_state_dict
from tinyllm.train.peft.prompt import (
    PrefixTuningConfig,
    PrefixTuningModel,
    PromptTuningConfig,
    PromptTuningModel,
    apply_prefix_tuning,
    apply_prompt_tuning,
)
from tinyllm.train.peft.select import BitFitConfig, apply_bitfit, trainable_named_parameters

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
TRAINABLE_NAME = "trainable_state.safetensors"
KNOWN_TYPES = ("LORA", "PROMPT_TUNING", "PREFIX_TUNING", "BOTTLENECK_ADAPTER", "BITFIT")
PEFT_PREFIX = "base_model.model."
# PEFT LoRA options whose non-default values change the math; refused rather than silently ignored
_LORA_UNSUPPORTED = {"use_dora": False, "bias": "none", "modules_to_save": None, "layers_to_transform": None,
                     "rank_pattern": {}, "alpha_pattern": {}, "fan_in_fan_out": False, "target_parameters": None,
                     "layer_replication": None, "trainable_token_indices": None}


class AdapterError(ValueError):
    """An adapter directory is missing, malformed or does not fit the base model; the message names it."""


def method_of(model: nn.Module) -> str:
    """"lora" | "prompt" | "prefix" | "adapter" | "bitfit" for a model adapted by this package."""
    if isinstance(model, PromptTuningModel):
        return "prompt"
    if isinstance(model, PrefixTuningModel):
        return "prefix"
    if any(True for _ in lora_layers(model)):
        return "lora"
    cfg = getattr(model, "peft_config", {}).get("default")
    if isinstance(cfg, AdapterConfig):
        return "adapter"
    if isinstance(cfg, BitFitConfig):
        return "bitfit"
    raise ValueError(f"{type(model).__name__} carries no PEFT method of tinyllm")


def _peft_common(model: nn.Module, base_path: str | None) -> dict[str, Any]:
    return {"base_model_name_or_path": base_path, "revision": None, "inference_mode": True,
            "task_type": "CAUSAL_LM", "auto_mapping": None, "library": "tinyllm"}


def adapter_files(model: nn.Module, adapter_name: str = "default",
                  base_path: str | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config.json content, tensors of adapter_model.safetensors) for `model`'s adapter."""
    method = method_of(model)
    cfg = _peft_common(model, base_path)
    if method == "lora":
        lc: LoraConfig = model.peft_config[adapter_name]
        cfg.update(peft_type="LORA", r=lc.r, lora_alpha=lc.lora_alpha, lora_dropout=lc.lora_dropout,
                   target_modules=lc.target_modules, use_rslora=lc.use_rslora, init_lora_weights=True,
                   bias="none", fan_in_fan_out=False, use_dora=False, modules_to_save=None,
                   layers_to_transform=None, layers_pattern=None, rank_pattern={}, alpha_pattern={})
        return cfg, {PEFT_PREFIX + k: v for k, v in lora_state_dict(model, adapter_name).items()}
    mc = model.config
    if method == "prompt":
        pc: PromptTuningConfig = model.prompt_config
        cfg.update(peft_type="PROMPT_TUNING", num_virtual_tokens=pc.num_virtual_tokens, token_dim=mc.hidden_size,
                   num_transformer_submodules=1, num_attention_heads=mc.num_attention_heads,
                   num_layers=mc.num_hidden_layers, prompt_tuning_init="RANDOM", prompt_tuning_init_text=None,
                   tokenizer_name_or_path=None, modules_to_save=None)
        return cfg, {"prompt_embeddings": model.prompt_embeddings.detach()}
    if method == "prefix":
        xc: PrefixTuningConfig = model.prompt_config
        token_dim = mc.num_key_value_heads * mc.head_dim
        cfg.update(peft_type="PREFIX_TUNING", num_virtual_tokens=xc.num_virtual_tokens, token_dim=token_dim,
                   num_transformer_submodules=1, num_attention_heads=mc.num_key_value_heads,
                   num_layers=mc.num_hidden_layers, encoder_hidden_size=xc.encoder_hidden_size or token_dim,
                   prefix_projection=xc.prefix_projection, modules_to_save=None)
        return cfg, {"prompt_embeddings": model.prefix_states().detach()}
    own = model.peft_config["default"]
    cfg.update(peft_type="BOTTLENECK_ADAPTER" if method == "adapter" else "BITFIT",
               tinyllm_config=dataclasses.asdict(own), added_biases=list(getattr(model, "bitfit_added", [])))
    return cfg, {n: p.detach() for n, p in trainable_named_parameters(model)}


def _write_dir(target: Path, files: dict[str, Any]) -> Path:
    """files: name → dict of tensors (safetensors) or JSON-able object; `target` is replaced as a whole
    (other files already in it are kept)."""
    from safetensors.torch import save_file

    with atomic_dir(target, keep_existing=True) as tmp:
        for name, obj in files.items():
            if name.endswith(".safetensors"):
                save_file({k: v.detach().cpu().contiguous() for k, v in obj.items()}, str(tmp / name),
                          metadata={"format": "pt"})
            else:
                (tmp / name).write_text(json_text(obj, sort_keys=True, default=str, ensure_ascii=True))
    return target


def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default",
                 base_path: str | None = None, trainable_state: bool = False) -> Path:
    """Write the adapter directory (see the module docstring); returns its path."""
    cfg, tensors = adapter_files(model, adapter_name, base_path)
    files: dict[str, Any] = {CONFIG_NAME: cfg, WEIGHTS_NAME: tensors}
    if trainable_state:
        files[TRAINABLE_NAME] = dict(trainable_named_parameters(model))
    return _write_dir(Path(directory), files)


# ------------------------------------------------------------------ reading
def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    if not path.exists():
        raise AdapterError(f"{directory}: no {CONFIG_NAME} (not an adapter directory)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None
    if "peft_type" not in cfg:
        raise AdapterError(f"{path}: no peft_type")
    return cfg


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    st, binary = directory / WEIGHTS_NAME, directory / "adapter_model.bin"
    try:
        if st.exists():
            return load_file(str(st))
        if binary.exists():
            return torch.load(binary, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterError(f"{directory}: cannot read the adapter weights ({e})") from None
    raise AdapterError(f"{directory}: no {WEIGHTS_NAME} or adapter_model.bin")


def _lora_config(cfg: dict[str, Any], source: str) -> LoraConfig:
    for key, default in _LORA_UNSUPPORTED.items():
        value = cfg.get(key, default)
        empty = value is None or (isinstance(value, (dict, list)) and not value)
        if value != default and not empty:
            raise AdapterError(f"{source}: LoRA option {key}={value!r} is not supported")
    targets = cfg.get("target_modules")
    if targets is None:
        raise AdapterError(f"{source}: target_modules is missing")
    return LoraConfig(r=int(cfg["r"]), lora_alpha=float(cfg["lora_alpha"]),
                      lora_dropout=float(cfg.get("lora_dropout", 0.0)),
                      target_modules=targets if isinstance(targets, str) else sorted(targets),
                      use_rslora=bool(cfg.get("use_rslora", False)))


def _strip_lora_keys(sd: dict[str, torch.Tensor], adapter_name: str) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        k = k.removeprefix(PEFT_PREFIX)
        for part in ("lora_A", "lora_B"):  # a key saved with an adapter name: ...lora_A.<name>.weight
            k = k.replace(f".{part}.{adapter_name}.weight", f".{part}.weight")
        out[k] = v
    return out


def _copy_named(model: nn.Module, sd: dict[str, torch.Tensor], source: str, strict: bool = True) -> None:
    params = dict(model.named_parameters())
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in sd) if strict else []
    unexpected = sorted(set(sd) - set(params))
    if missing or unexpected:
        raise AdapterError(f"{source}: weights do not fit the model: missing {missing[:4]}, "
                           f"unexpected {unexpected[:4]}")
    with torch.no_grad():
        for n, t in sd.items():
            if tuple(params[n].shape) != tuple(t.shape):
                raise AdapterError(f"{source}: {n} has shape {tuple(t.shape)}, expected {tuple(params[n].shape)}")
            params[n].copy_(t.to(params[n].dtype))


def load_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default",
                 is_trainable: bool = False) -> nn.Module:
    """Apply the adapter saved in `directory` (PEFT's or tinyllm's format) to `model`; return the result."""
    directory = Path(directory)
    cfg = read_adapter_config(directory)
    source = str(directory)
    kind = cfg["peft_type"]
    if kind not in KNOWN_TYPES:
        raise AdapterError(f"{source}: peft_type={kind!r} is not supported ({', '.join(KNOWN_TYPES)})")
    lora_cfg = _lora_config(cfg, source) if kind == "LORA" else None
    sd = _read_weights(directory)
    try:
        if kind == "LORA":
            apply_lora(model, lora_cfg, adapter_name)
            load_lora_state_dict(model, _strip_lora_keys(sd, adapter_name), adapter_name)
            out = model
        elif kind in ("PROMPT_TUNING", "PREFIX_TUNING"):
            if int(cfg.get("num_transformer_submodules", 1) or 1) != 1:
                raise AdapterError(f"{source}: encoder-decoder soft prompts are not supported")
            if "prompt_embeddings" not in sd:
                raise AdapterError(f"{source}: no prompt_embeddings tensor")
            p = int(cfg["num_virtual_tokens"])
            if kind == "PROMPT_TUNING":
                out = apply_prompt_tuning(model, PromptTuningConfig(num_virtual_tokens=p))
                _copy_named(out, {"prompt_embeddings": sd["prompt_embeddings"]}, source)
            else:  # the saved flat prefix is the trained state whether or not an MLP produced it
                out = apply_prefix_tuning(model, PrefixTuningConfig(num_virtual_tokens=p))
                _copy_named(out, {"prefix_encoder.embedding.weight": sd["prompt_embeddings"]}, source)
        elif kind == "BOTTLENECK_ADAPTER":
            out = apply_adapters(model, AdapterConfig(**cfg["tinyllm_config"]))
            _copy_named(out, sd, source)
        else:  # BITFIT
            out = apply_bitfit(model, BitFitConfig(**cfg["tinyllm_config"]))
            _copy_named(out, sd, source)
    except (KeyError, TypeError) as e:
        raise AdapterError(f"{source}: adapter_config.json lacks or mistypes a field ({e})") from None
    if not is_trainable:
        for p in out.parameters():
            p.requires_grad_(False)
    return out


# ------------------------------------------------------------------ the training view
class PeftModel(nn.Module):
    """What the training loop trains when fine-tuning with a PEFT method.

    forward = the adapted model's forward; `save_pretrained(dir)` writes the adapter directory (the loop's
    checkpoints become adapter directories, not full models); `load_pretrained_weights(dir)` restores every
    trainable tensor for an exact resume. It has no `config`, so the loop's checkpoint code does not mistake
    it for a full tinyllm model."""

    def __init__(self, model: nn.Module, base_path: str | None = None) -> None:
        super().__init__()
        self.module = model
        self.base_path = base_path

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.module(*args, **kwargs)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        cfg, tensors = adapter_files(self.module, base_path=self.base_path)
        trainable = dict(trainable_named_parameters(self.module))
        _write_dir(Path(directory), {WEIGHTS_NAME: tensors, TRAINABLE_NAME: trainable, CONFIG_NAME: cfg})

    def load_pretrained_weights(self, directory: str | os.PathLike) -> None:
        from safetensors.torch import load_file

        path = Path(directory) / TRAINABLE_NAME
        if not path.exists():
            raise AdapterError(f"{directory}: no {TRAINABLE_NAME} to resume from")
        _copy_named(self.module, load_file(str(path)), str(directory))
