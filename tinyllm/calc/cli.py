"""`tinyllm calc params|flops|kv-cache|memory`: the interview calculators on the command line.

Each command is a config dataclass (fields = flags, help in `metadata["help"]`) and a `run_*` function that
prints an aligned table (thousands separators, GiB and GB side by side) or, with `--json`, one JSON object.
`--model` takes a preset name (`llama-7b`), a config.json, a checkpoint directory, a .gguf file or a known
checkpoint short name. Counts accept suffixes: `--params 7.5B`, `--tokens 1.4T`.
"""

from __future__ import annotations

import json as jsonlib
from dataclasses import dataclass, field
from typing import Any

from tinyllm.calc import flops as fl
from tinyllm.calc import memory as mem
from tinyllm.calc.params import count_parameters, resolve_config
from tinyllm.model.config import ModelConfig

_SUFFIX = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}
_MODEL_HELP = "preset name (e.g. llama-7b), config.json, checkpoint directory or .gguf file"


def parse_count(text: str | float | int, name: str = "value") -> float:
    """'7.5B' → 7.5e9, '1.4T' → 1.4e12, '6e9' → 6e9 (suffixes K, M, B/G, T)."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        s = str(text).strip().replace(",", "").replace("_", "")
        scale = _SUFFIX.get(s[-1:].upper(), 1.0)
        try:
            value = float(s[:-1] if scale != 1.0 else s) * scale
        except ValueError:
            raise ValueError(f"{name}={text!r} is not a number (suffixes K/M/B/T allowed)") from None
    if not value > 0:
        raise ValueError(f"{name}={text!r} must be > 0")
    return value


def _model(name: str) -> ModelConfig:
    try:
        return resolve_config(name)
    except (ValueError, OSError) as e:  # ConfigError / CheckpointError are ValueErrors
        raise SystemExit(f"error: --model {name!r}: {e}") from None


def _print_table(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(title)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def _emit(as_json: bool, title: str, rows: list[tuple[str, str]], data: dict[str, Any]) -> None:
    if as_json:
        print(jsonlib.dumps(data, sort_keys=True))
    else:
        _print_table(title, rows)


def _n(x: float) -> str:
    return f"{round(x):,}"


def _sci(x: float) -> str:
    return f"{x:.4g}"


# ------------------------------------------------------------------ params
@dataclass
class ParamsConfig:
    model: str = field(default="llama-7b", metadata={"help": _MODEL_HELP})
    include_head: bool = field(default=True, metadata={"help": "count an untied lm_head"})
    include_pooler: bool = field(default=True, metadata={"help": "count BERT's pooler"})
    json: bool = field(default=False, metadata={"help": "print one JSON object instead of a table"})


def run_params(cfg: ParamsConfig) -> int:
    mc = _model(cfg.model)
    pc = count_parameters(mc, include_head=cfg.include_head, include_pooler=cfg.include_pooler)
    rows = [(k, _n(v)) for k, v in (
        ("embeddings", pc.embeddings), ("attention", pc.attention), ("mlp", pc.mlp), ("experts", pc.experts),
        ("shared experts", pc.shared_experts), ("router", pc.router), ("norms", pc.norms), ("head", pc.head),
        ("pooler", pc.pooler)) if v]
    rows += [("per layer", _n(pc.per_layer)), ("non-embedding", _n(pc.non_embedding)), ("total", _n(pc.total)),
             ("total (billions)", f"{pc.total / 1e9:.3f} B")]
    if mc.num_local_experts:
        rows.append(("active per token", f"{pc.active:,} ({pc.active / 1e9:.3f} B)"))
    _emit(cfg.json, f"parameters of {cfg.model} ({mc.model_type}, {mc.num_hidden_layers} layers)", rows,
          {"model": cfg.model, **pc.as_dict()})
    return 0


# ------------------------------------------------------------------ flops
@dataclass
class FlopsConfig:
    model: str = field(default="llama-7b", metadata={"help": _MODEL_HELP})
    tokens: str | None = field(default=None, metadata={
        "help": "training tokens D (e.g. 1T); default: Chinchilla-optimal 20·N"})
    seq_len: int = field(default=2048, metadata={"help": "context length n_ctx for the attention term"})
    json: bool = field(default=False, metadata={"help": "print one JSON object instead of a table"})

    def __post_init__(self) -> None:
        if self.tokens is not None:
            parse_count(self.tokens, "tokens")
        if self.seq_len < 0:
            raise ValueError(f"seq_len={self.seq_len} must be >= 0")


def run_flops(cfg: FlopsConfig) -> int:
    mc = _model(cfg.model)
    pc = count_parameters(mc)
    tokens = parse_count(cfg.tokens, "tokens") if cfg.tokens else fl.chinchilla_tokens(pc.total)
    fwd = fl.forward_flops_per_token(mc, cfg.seq_len)
    attn = fl.attention_flops_per_token(mc, cfg.seq_len)
    train = fl.training_flops(mc, tokens, cfg.seq_len)
    simple = fl.six_nd(pc.active, tokens)
    data = {"model": cfg.model, "params": pc.total, "active_params": pc.active, "tokens": tokens,
            "seq_len": cfg.seq_len, "forward_flops_per_token": fwd, "attention_flops_per_token": attn,
            "training_flops": train, "six_nd": simple, "gopher_units": fl.gopher_units(train)}
    rows = [("parameters N", _n(pc.total)), ("training tokens D", f"{_n(tokens)} ({tokens / 1e9:,.1f} B)"),
            ("forward FLOPs/token", f"{fwd:,} (attention {attn:,} at n_ctx={cfg.seq_len})"),
            ("6·N·D", _sci(simple)), ("training FLOPs (3×fwd·D)", _sci(train)),
            ("Gopher units", f"{fl.gopher_units(train):.4g}")]
    if mc.num_local_experts:
        rows.insert(1, ("active parameters", _n(pc.active)))
    _emit(cfg.json, f"FLOPs of {cfg.model}", rows, data)
    return 0


# ------------------------------------------------------------------ kv cache
@dataclass
class KVCacheConfig:
    model: str = field(default="llama2-7b", metadata={"help": _MODEL_HELP})
    batch: int = field(default=1, metadata={"help": "sequences held at once"})
    seq_len: int = field(default=4096, metadata={"help": "tokens per sequence"})
    dtype: str = field(default="fp16", metadata={"help": "cache element type or bytes (fp16, bf16, fp32, int8, 2)"})
    json: bool = field(default=False, metadata={"help": "print one JSON object instead of a table"})

    def __post_init__(self) -> None:
        mem.dtype_bytes(self.dtype)
        if self.batch < 1 or self.seq_len < 1:
            raise ValueError(f"batch={self.batch} and seq_len={self.seq_len} must be positive")


def run_kv_cache(cfg: KVCacheConfig) -> int:
    mc = _model(cfg.model)
    nbytes = mem.dtype_bytes(cfg.dtype)
    per_token = mem.kv_cache_bytes_per_token(mc, nbytes)
    total = mem.kv_cache_bytes(mc, cfg.batch, cfg.seq_len, nbytes)
    data = {"model": cfg.model, "batch": cfg.batch, "seq_len": cfg.seq_len, "bytes_per_elem": nbytes,
            "bytes_per_token": per_token, "bytes_per_token_per_layer": per_token / mc.num_hidden_layers,
            "bytes": total, "GiB": total / mem.GiB, "GB": total / mem.GB}
    rows = [("layers × KV heads × head dim", f"{mc.num_hidden_layers} × {mc.num_key_value_heads} × {mc.head_dim}"),
            ("bytes per element", f"{nbytes:g}"),
            ("per token per layer", f"{per_token / mc.num_hidden_layers / 1024:,.2f} KiB"),
            ("per token", f"{per_token / 1024:,.2f} KiB"),
            ("batch × seq_len", f"{cfg.batch:,} × {cfg.seq_len:,}"),
            ("KV cache", mem.format_bytes(total))]
    _emit(cfg.json, f"KV cache of {cfg.model}", rows, data)
    return 0


# ------------------------------------------------------------------ training memory
@dataclass
class MemoryConfig:
    model: str | None = field(default=None, metadata={"help": _MODEL_HELP + " (or give --params)"})
    params: str | None = field(default=None, metadata={"help": "parameter count Ψ instead of a model, e.g. 7.5B"})
    precision: str = field(default="mixed", metadata={"help": "fp32 or mixed (fp16/bf16 + fp32 master)",
                                                      "choices": list(mem.PRECISIONS)})
    optimizer: str = field(default="adam", metadata={"help": "optimizer whose states are kept",
                                                     "choices": sorted(mem.OPTIMIZERS)})
    zero_stage: int = field(default=0, metadata={"help": "ZeRO stage 0-3", "choices": [0, 1, 2, 3]})
    gpus: int = field(default=1, metadata={"help": "data-parallel GPUs N the states are sharded over"})
    seq_len: int = field(default=0, metadata={"help": "with --model: add activation memory for this length"})
    batch: int = field(default=1, metadata={"help": "micro-batch size for the activation estimate"})
    tp: int = field(default=1, metadata={"help": "tensor-parallel size t for the activation estimate"})
    sequence_parallel: bool = field(default=False, metadata={"help": "Megatron sequence parallelism"})
    recompute: str = field(default="none", metadata={"help": "activation recomputation",
                                                     "choices": list(mem.RECOMPUTE)})
    zero_table: bool = field(default=False, metadata={"help": "all four ZeRO stages side by side with their "
                                                                "communication per step (mixed-precision Adam)"})
    json: bool = field(default=False, metadata={"help": "print one JSON object instead of a table"})

    def __post_init__(self) -> None:
        if (self.model is None) == (self.params is None):
            raise ValueError(f"give exactly one of --model ({self.model!r}) and --params ({self.params!r})")
        if self.params is not None:
            parse_count(self.params, "params")
        if self.gpus < 1 or self.tp < 1 or self.batch < 1 or self.seq_len < 0:
            raise ValueError(f"gpus={self.gpus}, tp={self.tp}, batch={self.batch} must be positive and "
                             f"seq_len={self.seq_len} >= 0")
        if self.seq_len and self.model is None:
            raise ValueError(f"seq_len={self.seq_len} needs --model (the activation estimate needs the shapes)")
        if self.zero_stage and (self.precision != "mixed" or self.optimizer not in ("adam", "adamw")):
            raise ValueError(f"zero_stage={self.zero_stage} is computed for mixed-precision Adam; "
                             f"got precision={self.precision!r}, optimizer={self.optimizer!r}")


def run_memory(cfg: MemoryConfig) -> int:
    mc = _model(cfg.model) if cfg.model is not None else None
    psi = float(count_parameters(mc).total) if mc is not None else parse_count(cfg.params, "params")
    if cfg.zero_table:
        return _zero_table(cfg, psi)
    if cfg.precision == "mixed" and cfg.optimizer in ("adam", "adamw"):
        states = mem.zero_model_state_bytes(psi, cfg.gpus, cfg.zero_stage)  # stage 0 = 16Ψ, unsharded
    else:
        states = mem.model_state_bytes(psi, cfg.precision, cfg.optimizer)
    rows = [("parameters Ψ", _n(psi)), ("weights", mem.format_bytes(states.weights)),
            ("gradients", mem.format_bytes(states.gradients)), ("optimizer states", mem.format_bytes(states.optimizer)),
            (f"model states per GPU (ZeRO-{cfg.zero_stage}, N={cfg.gpus})", mem.format_bytes(states.total))]
    data: dict[str, Any] = {"params": psi, "precision": cfg.precision, "optimizer": cfg.optimizer,
                            "zero_stage": cfg.zero_stage, "gpus": cfg.gpus, "weights": states.weights,
                            "gradients": states.gradients, "optimizer_states": states.optimizer,
                            "model_states": states.total}
    if mc is not None and cfg.seq_len:
        per_layer = mem.activation_bytes_per_layer(cfg.seq_len, cfg.batch, mc.hidden_size, mc.num_attention_heads,
                                                   cfg.tp, cfg.sequence_parallel, cfg.recompute)
        act = per_layer * mc.num_hidden_layers
        rows += [("activations per layer", mem.format_bytes(per_layer)), ("activations, all layers", mem.format_bytes(act)),
                 ("states + activations", mem.format_bytes(states.total + act))]
        data.update(activations_per_layer=per_layer, activations=act)
    _emit(cfg.json, f"training memory of {cfg.model or cfg.params} ({cfg.precision}, {cfg.optimizer})", rows, data)
    return 0


def _zero_table(cfg: MemoryConfig, psi: float) -> int:
    """The ZeRO paper's table (and the notes'): per-GPU model states of stages 0-3 over N GPUs, K = 12, plus the
    communication each GPU sends per step in fp16 bytes (the notes' ZeRO-3 figure counts 1 byte per element)."""
    rows: list[tuple[str, str]] = [("parameters Ψ", _n(psi)), ("data-parallel GPUs N", str(cfg.gpus))]
    data: dict[str, Any] = {"params": psi, "gpus": cfg.gpus, "k": 12, "stages": []}
    names = ("baseline (DP)", "P_os (ZeRO-1)", "P_os+g (ZeRO-2)", "P_os+g+p (ZeRO-3)")
    for stage, name in enumerate(names):
        st = mem.zero_model_state_bytes(psi, cfg.gpus, stage)
        comm = mem.zero_communication_bytes(psi, stage)
        rows.append((f"{name}: states per GPU", f"{st.total / mem.GB:,.1f} GB"))
        times = mem.zero_communication_elements(psi, stage) / psi
        rows.append((f"{name}: sent per step per GPU", f"{comm / mem.GB:,.1f} GB ({times:.0f}Ψ fp16)"))
        data["stages"].append({"stage": stage, "model_states": st.total, "weights": st.weights,
                               "gradients": st.gradients, "optimizer_states": st.optimizer, "comm_bytes": comm})
    _emit(cfg.json, f"ZeRO model states, Ψ = {cfg.params or cfg.model}, K = 12, N = {cfg.gpus}", rows, data)
    return 0
