"""Soft prompts: prompt tuning, prefix tuning and P-tuning v2 (notes ch.05.4.b–e).

Prompt tuning (Lester et al. 2021). P trainable vectors E ∈ R^{P×d} are prepended to the token embeddings,
only at the input: the model reads [E; embed(x)]. Trainable parameters: P·d. Init: random N(0, 1) (PEFT's
RANDOM), rows of the vocabulary embedding at sampled token ids ("vocab", the paper's sampled-vocabulary init),
or the embeddings of a text's tokens, repeated or cut to P ("text", PEFT's TEXT). `PromptTuningModel` feeds
P virtual token ids (V, V+1, …) through the model's embedding, whose forward hooks swap in E, and drops the
P virtual positions from the output, so logits keep the shape [B, T, V]; real tokens sit at positions P…
as in PEFT.

Prefix tuning (Li & Liang 2021) and P-tuning v2 (Liu et al. 2022). Every layer l gets P learned keys and
values K_l^P, V_l^P ∈ R^{H_kv×P×d_head} that every query attends to in front of the real keys:
attn(q, [K^P; K], [V^P; V]). They are injected through the model's KV-cache protocol: `PrefixCache.update`
returns [prefix; keys so far], so the attention code is untouched and the causal mask over "past" keys
lets every token read the whole prefix. Parameters: P·L·2·H_kv·d_head. Prefix tuning reparameterises
the prefix for stable training: an embedding P×d_t through an MLP d_t → h → L·2·d_t (tanh), d_t = H_kv·d_head
(`prefix_projection=True`); P-tuning v2 learns the prefix directly (`prefix_projection=False`). After
training only the MLP's output is kept (`prefix_states`), exactly what PEFT saves. Real tokens take
positions P…P+T−1 (the prefix counts as past tokens), as with PEFT on transformers; RoPE is relative, so
this only fixes where queries sit relative to the position-free prefix keys.

Not covered: P-tuning v1's LSTM prompt encoder and template insertion; encoder-decoder prefixes. Generation:
`tinyllm.infer.generate` works with a prefix-tuned model (its cache holds the real tokens only); for a
prompt-tuned model use the recompute path (no KV cache), since the cache would also hold the P soft tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tinyllm.model.attention import AttnMeta
from tinyllm.train.peft.select import freeze, register_config

PROMPT_INITS = ("random", "vocab", "text")


@dataclass
class PromptTuningConfig:
    num_virtual_tokens: int = 20
    init: str = "random"
    init_text: str = ""  # for init="text" (needs a tokenizer in apply_prompt_tuning)

    def __post_init__(self) -> None:
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens <= 0:
            raise ValueError(f"num_virtual_tokens={self.num_virtual_tokens!r} must be a positive integer")
        if self.init not in PROMPT_INITS:
            raise ValueError(f"init={self.init!r} is not one of {list(PROMPT_INITS)}")
        if self.init == "text" and not self.init_text:
            raise ValueError("init='text' needs init_text")


@dataclass
class PrefixTuningConfig:
    num_virtual_tokens: int = 20
    prefix_projection: bool = False  # True: prefix tuning's MLP; False: P-tuning v2
    encoder_hidden_size: int | None = None  # MLP width (default: H_kv·d_head)

    def __post_init__(self) -> None:
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens <= 0:
            raise ValueError(f"num_virtual_tokens={self.num_virtual_tokens!r} must be a positive integer")
        if self.encoder_hidden_size is not None and self.encoder_hidden_size <= 0:
            raise ValueError(f"encoder_hidden_size={self.encoder_hidden_size!r} must be positive")


def _meta_with_prefix(meta: AttnMeta | None, p: int, device: torch.device, query_prefix: bool) -> AttnMeta | None:
    """Widen a caller's mask by P always-visible prefix keys (and, with `query_prefix`, P causal prefix
    queries in front, for prompt tuning's virtual tokens)."""
    if meta is None:
        return None
    mask, kpos = meta.mask, meta.k_positions
    if kpos is not None:
        head = torch.arange(p, device=device).expand(kpos.shape[0], p)
        kpos = torch.cat([head, kpos + p], dim=1)
    if mask is not None:
        b, _, tq, tk = mask.shape
        mask = torch.cat([torch.ones(b, 1, tq, p, dtype=torch.bool, device=device), mask], dim=3)
        if query_prefix:
            top = torch.ones(p, p + tk, dtype=torch.bool, device=device).tril()
            top[:, p:] = False
            mask = torch.cat([top[None, None].expand(b, 1, p, p + tk), mask], dim=2)
    return AttnMeta(mask, meta.is_causal, kpos, meta.cache_meta)


# ------------------------------------------------------------------ prompt tuning
class PromptTuningModel(nn.Module):
    """[soft prompt; x] through the frozen model; returns logits (or hidden states) of x's positions only."""

    def __init__(self, model: nn.Module, cfg: PromptTuningConfig, init_ids: torch.Tensor | None = None) -> None:
        super().__init__()
        self.module = model
        self.prompt_config = cfg
        embed = model.model.embed_tokens
        self.vocab_size = embed.num_embeddings
        p, d = cfg.num_virtual_tokens, embed.embedding_dim
        self.prompt_embeddings = nn.Parameter(torch.empty(p, d, device=embed.weight.device, dtype=embed.weight.dtype))
        with torch.no_grad():
            if init_ids is None:
                nn.init.normal_(self.prompt_embeddings)
            else:
                self.prompt_embeddings.copy_(embed.weight[init_ids.to(embed.weight.device)])
        self._virtual: torch.Tensor | None = None
        self._hooks = [embed.register_forward_pre_hook(self._pre_hook), embed.register_forward_hook(self._hook)]

    @property
    def config(self) -> Any:
        return self.module.config

    def _pre_hook(self, module: nn.Module, args: tuple) -> tuple:
        ids = args[0]
        self._virtual = ids >= self.vocab_size
        return (ids.clamp(max=self.vocab_size - 1),)

    def _hook(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        virtual, self._virtual = self._virtual, None
        if virtual is None or not bool(virtual.any()):
            return out
        ids = args[0]  # the clamped ids; virtual rows are identified by the pre-hook's mask
        rows = self.prompt_embeddings.to(out.dtype)
        index = torch.cumsum(virtual.long(), dim=1) - 1  # k-th virtual token in the row → prompt row k
        soft = rows[index.clamp(min=0)]
        del ids
        return torch.where(virtual[..., None], soft, out)

    def remove(self) -> nn.Module:
        """Detach the soft prompt; returns the plain base model."""
        for h in self._hooks:
            h.remove()
        return self.module

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache: Any = None,
                attn_meta: AttnMeta | None = None, last_only: bool = False, hidden_only: bool = False) -> torch.Tensor:
        p = self.prompt_config.num_virtual_tokens
        b = input_ids.shape[0]
        prepend = cache is None or cache.get_seq_length() == 0
        if prepend:
            virtual = torch.arange(self.vocab_size, self.vocab_size + p, device=input_ids.device).expand(b, p)
            input_ids = torch.cat([virtual, input_ids], dim=1)
            if positions is not None:
                head = torch.arange(p, device=positions.device).expand(b, p)
                positions = torch.cat([head, positions + p], dim=1)
            attn_meta = _meta_with_prefix(attn_meta, p, input_ids.device, query_prefix=True)
        elif positions is not None:
            positions = positions + p
            attn_meta = _meta_with_prefix(attn_meta, 0, input_ids.device, query_prefix=False)
        out = self.module(input_ids, positions, cache, attn_meta, last_only=last_only, hidden_only=hidden_only)
        return out[:, p:] if prepend and not last_only else out


def _init_ids(model: nn.Module, cfg: PromptTuningConfig, tokenizer: Any) -> torch.Tensor | None:
    p = cfg.num_virtual_tokens
    if cfg.init == "random":
        return None
    if cfg.init == "vocab":
        return torch.randint(0, model.model.embed_tokens.num_embeddings, (p,))
    if tokenizer is None:
        raise ValueError("init='text' needs a tokenizer (apply_prompt_tuning(..., tokenizer=tok))")
    ids = list(tokenizer.encode(cfg.init_text))
    if not ids:
        raise ValueError(f"init_text={cfg.init_text!r} encodes to no tokens")
    ids = (ids * math.ceil(p / len(ids)))[:p]  # repeat or cut to P, as PEFT does
    return torch.tensor(ids)


def apply_prompt_tuning(model: nn.Module, cfg: PromptTuningConfig | None = None,
                        tokenizer: Any = None) -> PromptTuningModel:
    """Freeze `model` and wrap it with a trainable soft prompt."""
    cfg = cfg or PromptTuningConfig()
    freeze(model)
    wrapped = PromptTuningModel(model, cfg, _init_ids(model, cfg, tokenizer))
    register_config(wrapped, "default", cfg)
    return wrapped


# ------------------------------------------------------------------ prefix tuning / P-tuning v2
class PrefixCache:
    """KV-cache protocol wrapper: layer l attends over [prefix_l; what the inner cache (if any) returns]."""

    def __init__(self, prefix: list[tuple[torch.Tensor, torch.Tensor]], inner: Any = None) -> None:
        self.prefix, self.inner = prefix, inner
        self.num_prefix = prefix[0][0].shape[2]

    def get_seq_length(self) -> int:
        return self.num_prefix + (self.inner.get_seq_length() if self.inner is not None else 0)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, meta: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inner is not None:
            k, v = self.inner.update(layer_idx, k, v, meta)
        pk, pv = self.prefix[layer_idx]
        return torch.cat([pk.to(k.dtype), k], dim=2), torch.cat([pv.to(v.dtype), v], dim=2)


class PrefixEncoder(nn.Module):
    """P virtual tokens → flat prefix states [P, L·2·H_kv·d_head] (PEFT's layout: layer l's K, then its V)."""

    def __init__(self, cfg: PrefixTuningConfig, num_layers: int, token_dim: int) -> None:
        super().__init__()
        self.projection = cfg.prefix_projection
        p, out = cfg.num_virtual_tokens, num_layers * 2 * token_dim
        if self.projection:
            hidden = cfg.encoder_hidden_size or token_dim
            self.embedding = nn.Embedding(p, token_dim)
            self.transform = nn.Sequential(nn.Linear(token_dim, hidden), nn.Tanh(), nn.Linear(hidden, out))
        else:
            self.embedding = nn.Embedding(p, out)

    def forward(self) -> torch.Tensor:
        w = self.embedding.weight
        return self.transform(w) if self.projection else w


class PrefixTuningModel(nn.Module):
    """The frozen model with learned per-layer key/value prefixes fed through the KV-cache protocol."""

    def __init__(self, model: nn.Module, cfg: PrefixTuningConfig) -> None:
        super().__init__()
        mc = model.config
        self.module = model
        self.prompt_config = cfg
        self.num_layers, self.num_kv_heads, self.head_dim = mc.num_hidden_layers, mc.num_key_value_heads, mc.head_dim
        ref = next(model.parameters())
        self.prefix_encoder = PrefixEncoder(cfg, self.num_layers, self.num_kv_heads * self.head_dim).to(ref.device)

    @property
    def config(self) -> Any:
        return self.module.config

    def prefix_states(self) -> torch.Tensor:
        """The flat prefix [P, L·2·H_kv·d_head] (what PEFT saves as `prompt_embeddings`)."""
        return self.prefix_encoder()

    def prefix_kv(self, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        p = self.prompt_config.num_virtual_tokens
        flat = self.prefix_states().view(p, self.num_layers * 2, self.num_kv_heads, self.head_dim)
        kv = flat.permute(1, 2, 0, 3)  # [L·2, H_kv, P, D]
        return [(kv[2 * i].expand(batch, -1, -1, -1), kv[2 * i + 1].expand(batch, -1, -1, -1))
                for i in range(self.num_layers)]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache: Any = None,
                attn_meta: AttnMeta | None = None, last_only: bool = False, hidden_only: bool = False) -> torch.Tensor:
        p = self.prompt_config.num_virtual_tokens
        pcache = PrefixCache(self.prefix_kv(input_ids.shape[0]), cache)
        if positions is not None:
            positions = positions + p
        attn_meta = _meta_with_prefix(attn_meta, p, input_ids.device, query_prefix=False)
        return self.module(input_ids, positions, pcache, attn_meta, last_only=last_only, hidden_only=hidden_only)


def apply_prefix_tuning(model: nn.Module, cfg: PrefixTuningConfig | None = None) -> PrefixTuningModel:
    """Freeze `model` and wrap it with trainable per-layer key/value prefixes."""
    cfg = cfg or PrefixTuningConfig()
    freeze(model)
    wrapped = PrefixTuningModel(model, cfg)
    register_config(wrapped, "default", cfg)
    return wrapped


def prefix_parameter_count(num_virtual_tokens: int, num_layers: int, token_dim: int,
                           encoder_hidden_size: int | None = None) -> int:
    """P·L·2·d_t without projection; with it, P·d_t + (d_t·h + h) + (h·L·2·d_t + L·2·d_t)."""
    p, out = num_virtual_tokens, num_layers * 2 * token_dim
    if encoder_hidden_size is None:
        return p * out
    h = encoder_hidden_size
    return p * token_dim + token_dim * h + h + h * out + out
