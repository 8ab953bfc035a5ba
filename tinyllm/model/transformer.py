"""The decoder-only Transformer `CausalLM` (notes ch.02.8, 02.12–02.14: GPT / LLaMA / Qwen2 / Mistral / Mixtral).

embed_tokens (+ absolute positions) → N × DecoderLayer → final norm → lm_head (tied or untied).

A DecoderLayer is attention + feed-forward (dense MLP or MoE) wrapped by one of the residual placements of
norm.py, chosen at build time:
  pre-norm   h = x + Attn(LN₁(x));        y = h + FFN(LN₂(h))
  post-norm  h = LN₁(x + Attn(x));        y = LN₂(h + FFN(h))
  DeepNorm   h = LN₁(α·x + Attn(x));      y = LN₂(α·h + FFN(h))

`forward(input_ids, positions=None, cache=None, attn_meta=None)` returns logits [B, T, V]. Without a cache
and meta it is plain causal attention over the given tokens; with a cache the positions default to continue
after what the cache holds. Parameter names follow HF LLaMA so checkpoints map by name (DESIGN rule 9).
"""

from __future__ import annotations

import torch
from torch import nn

from tinyllm.model.attention import Attention, AttnMeta, KVCache, build_attn_meta
from tinyllm.model.config import ModelConfig
from tinyllm.model.mlp import build_mlp
from tinyllm.model.norm import build_norm, deepnorm_constants
from tinyllm.model.position import build_position


def build_ffn(cfg: ModelConfig) -> nn.Module:
    if cfg.num_local_experts:
        from tinyllm.model.moe import build_moe

        return build_moe(cfg)
    return build_mlp(cfg)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + Attn(LN(x)), then h + FFN(LN(h))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = build_ffn(cfg)
        self.input_layernorm = build_norm(cfg.norm_type, cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = build_norm(cfg.norm_type, cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, rotary, meta: AttnMeta, bias, cache) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), rotary, meta, bias, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class PostNormDecoderLayer(DecoderLayer):
    """Post-norm block LN(α·x + Attn(x)); α = 1 is the original Transformer, α > 1 is DeepNorm."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, alpha: float = 1.0) -> None:
        super().__init__(cfg, layer_idx)
        self.alpha = alpha

    def forward(self, x: torch.Tensor, rotary, meta: AttnMeta, bias, cache) -> torch.Tensor:
        h = self.input_layernorm(self.alpha * x + self.self_attn(x, rotary, meta, bias, cache))
        return self.post_attention_layernorm(self.alpha * h + self.mlp(h))


def build_layer(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    if cfg.norm_position == "pre":
        return DecoderLayer(cfg, layer_idx)
    if cfg.norm_position == "post":
        return PostNormDecoderLayer(cfg, layer_idx)
    alpha, _ = deepnorm_constants(cfg.num_hidden_layers)
    return PostNormDecoderLayer(cfg, layer_idx, alpha)


class DecoderModel(nn.Module):
    """The trunk: embeddings, layers, final norm. Returns hidden states [B, T, d]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos = build_position(cfg)
        self.layers = nn.ModuleList(build_layer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = build_norm(cfg.norm_type, cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, attn_meta: AttnMeta | None = None) -> torch.Tensor:
        b, t = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        if positions is None:
            positions = torch.arange(past, past + t, device=input_ids.device).expand(b, t)
        if attn_meta is None:
            attn_meta = build_attn_meta(t, past, b, sliding_window=self.config.sliding_window,
                                        device=input_ids.device)
        x = self.embed_tokens(input_ids)
        absolute = self.pos.embed(positions)
        if absolute is not None:
            x = x + absolute.to(x.dtype)
        rotary = self.pos.rotary(positions)
        k_pos = attn_meta.k_positions if attn_meta.k_positions is not None else positions
        bias = self.pos.bias(positions, k_pos)
        for layer in self.layers:
            x = layer(x, rotary, attn_meta, bias, cache)
        return self.norm(x)


class CausalLM(nn.Module):
    """Decoder-only language model: DecoderModel + lm_head (weights tied to embed_tokens when configured)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.is_encoder:
            raise ValueError(f"model_type={cfg.model_type!r} is an encoder; build it with BertModel")
        self.config = cfg
        self.model = DecoderModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, initializer_range) for weights, zeros for biases, ones for norms; DeepNorm β-scaling."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
        if self.config.norm_position == "deepnorm":
            _, beta = deepnorm_constants(self.config.num_hidden_layers)
            for name, p in self.named_parameters():
                if p.dim() >= 2 and any(s in name for s in ("v_proj", "o_proj", "mlp.")):
                    with torch.no_grad():
                        nn.init.xavier_normal_(p, gain=beta)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, attn_meta: AttnMeta | None = None,
                last_only: bool = False, hidden_only: bool = False) -> torch.Tensor:
        """Logits [B, T, V] (or [B, 1, V] for the last position when `last_only`).

        hidden_only: return the final-norm hidden states [B, T, d] instead, for a loss that applies lm_head
        itself (train.losses.linear_cross_entropy)."""
        h = self.model(input_ids, positions, cache, attn_meta)
        if last_only:
            h = h[:, -1:]
        return h if hidden_only else self.lm_head(h)

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the MoE auxiliary losses of the last forward (None for a dense model)."""
        # isinstance, not `is not None`: this module's own `aux_loss` is the bound method
        losses = [m.aux_loss for m in self.modules() if isinstance(getattr(m, "aux_loss", None), torch.Tensor)]
        return torch.stack(losses).sum() if losses else None

    def num_parameters(self, trainable_only: bool = False) -> int:
        seen: set[int] = set()
        total = 0
        for p in self.parameters():
            if id(p) in seen or (trainable_only and not p.requires_grad):
                continue
            seen.add(id(p))
            total += p.numel()
        return total

