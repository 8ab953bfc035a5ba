"""The BERT encoder (notes ch.02.9; Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers").

    x₀ = LN(E_tok[input_ids] + E_seg[token_type_ids] + E_pos[positions])
    h  = LN₁(x + Attn(x))            attention is bidirectional; padded keys are masked out
    y  = LN₂(h + W_down·GELU(W_up·h))  (post-LN, one block per layer)

Heads on top of the last hidden states H [B, T, d]:
- MLM head: logits = LN(GELU(H·W_t + b_t)) · E_tokᵀ + b — the decoder is tied to the token embeddings;
- pooler:   tanh(W_p · H[:, 0] + b_p), the [CLS] vector used by NSP / sequence classification;
- sentence embeddings (`embed`): mean over real tokens (sentence-transformers' "mean pooling") or the raw
  [CLS] hidden state, optionally L2-normalised.

Sizes: BERT-base (L=12, H=768, A=12) has 109,482,240 parameters and BERT-large (L=24, H=1024, A=16)
335,141,888, counting embeddings, encoder and pooler — what `transformers.BertModel` holds and what the notes
call "110M"/"340M". `num_parameters()` counts exactly that; the MLM head (transform dense + LayerNorm +
output bias, 622,650 for base; its decoder matrix is the tied embedding) is added with
`include_mlm_head=True`.

The layers are the package's post-norm block (transformer.PostNormDecoderLayer: attention → add & LN → FFN →
add & LN) run with a non-causal mask, so the attention backend (eager / sdpa / tiled) follows
`cfg.attn_implementation`. The padding mask is BERT's: every query row reads all real keys, padded query rows
included (their outputs are computed exactly as transformers computes them, then ignored by pooling).

`bert_from_hf` / `bert_to_hf` map Hugging Face names (BertModel, BertForMaskedLM or BertForPreTraining
checkpoints, with or without the `bert.` prefix; old `gamma`/`beta` LayerNorm names) onto ours.
A checkpoint without an MLM head or without a pooler loads with those parts left at their initial values.

Not covered: NSP head and pre-training losses, masking collators (02.9.c/e), relative position variants,
cross-attention / decoder use, dropout (inference and fine-tuning here run without it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tinyllm.model.activation import ACTIVATIONS
from tinyllm.model.attention import AttnMeta
from tinyllm.model.config import ModelConfig
from tinyllm.model.norm import LayerNorm
from tinyllm.model.position import LearnedPosition
from tinyllm.model.transformer import build_layer

POOLINGS = ("mean", "cls")


def encoder_attn_meta(attention_mask: torch.Tensor | None, batch: int, seq_len: int,
                      device: torch.device | str | None = None) -> AttnMeta:
    """Bidirectional mask from a [B, T] key padding mask (1 = real token, 0 = padding).

    Only keys are masked, as transformers does: a padded query still reads every real key. A row with no
    real token at all reads every key, so no softmax row is empty (its output is meaningless, never NaN).
    """
    if attention_mask is None:
        return AttnMeta(None, is_causal=False)
    if attention_mask.shape != (batch, seq_len):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(batch, seq_len)}")
    valid = attention_mask.to(device=device, dtype=torch.bool)  # [B, T]
    valid = valid | ~valid.any(-1, keepdim=True)
    # expanded (not broadcast) so that the tiled backend can slice query blocks out of it
    return AttnMeta(valid[:, None, None, :].expand(batch, 1, seq_len, seq_len), is_causal=False)


class BertEmbeddings(nn.Module):
    """Sum of token, segment and learned position embeddings, then LayerNorm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.position = LearnedPosition(cfg)
        self.norm = LayerNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                positions: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        return self.norm(x + self.position.embed(positions))


class BertPooler(nn.Module):
    """tanh(W·h_[CLS] + b)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class BertMLMHead(nn.Module):
    """LN(act(h·W_t + b_t)) · Eᵀ + b; E (the token embedding matrix) is passed in, so it is stored once."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.norm = LayerNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, hidden: torch.Tensor, decoder_weight: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(self.act(self.dense(hidden))), decoder_weight, self.bias)


class BertModel(nn.Module):
    """BERT encoder with pooler and MLM head. `forward` returns the last hidden states [B, T, d]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if not cfg.is_encoder:
            raise ValueError(f"model_type={cfg.model_type!r} is a decoder; build it with CausalLM")
        if cfg.position_type != "learned":
            raise ValueError(f"position_type={cfg.position_type!r}: BertModel uses learned absolute positions")
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.layers = nn.ModuleList(build_layer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.pooler = BertPooler(cfg)
        self.mlm_head = BertMLMHead(cfg)
        self.reset_parameters()

    # parts a checkpoint may lack (BertModel files have no MLM head, BertForMaskedLM files no pooler)
    optional_weight_prefixes = ("pooler.", "mlm_head.")

    def reset_parameters(self) -> None:
        """BERT's init: Normal(0, initializer_range) for matrices, zero biases, LayerNorm (1, 0), zero pad row."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.ones_(p)
        pad = self.config.pad_token_id
        if pad is not None and not self.embeddings.word_embeddings.weight.is_meta:
            with torch.no_grad():
                self.embeddings.word_embeddings.weight[pad].zero_()

    @property
    def device(self) -> torch.device:
        return self.embeddings.word_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.word_embeddings.weight.dtype

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}, expected [batch, seq_len]")
        b, t = input_ids.shape
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if positions is None:
            positions = torch.arange(t, device=input_ids.device).expand(b, t)
        meta = encoder_attn_meta(attention_mask, b, t, input_ids.device)
        x = self.embeddings(input_ids, token_type_ids, positions)
        for layer in self.layers:
            x = layer(x, None, meta, None, None)
        return x

    def mlm_logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """MLM logits [B, T, V] from hidden states the caller already has."""
        return self.mlm_head(hidden, self.embeddings.word_embeddings.weight)

    def mlm_logits(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                   attention_mask: torch.Tensor | None = None,
                   positions: torch.Tensor | None = None) -> torch.Tensor:
        """Masked-LM logits [B, T, V] (BertForMaskedLM's `logits`)."""
        return self.mlm_logits_from_hidden(self(input_ids, token_type_ids, attention_mask, positions))

    def pooled(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None,
               positions: torch.Tensor | None = None) -> torch.Tensor:
        """Pooler output [B, d] (BertModel's `pooler_output`)."""
        return self.pooler(self(input_ids, token_type_ids, attention_mask, positions))

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              pooling: str = "mean", normalize: bool = True,
              token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Sentence embeddings [B, d].

        mean: Σ_t m_t·h_t / max(Σ_t m_t, 1e-9) over real tokens (m = attention_mask), as sentence-transformers;
        cls: the [CLS] hidden state h_0. `normalize` divides by the L2 norm (cosine = dot product).
        """
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r} is not one of {list(POOLINGS)}")
        h = self(input_ids, token_type_ids, attention_mask)
        if pooling == "cls":
            out = h[:, 0]
        else:
            m = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            m = m.to(h.dtype)[..., None]  # [B, T, 1]
            out = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return F.normalize(out, p=2, dim=-1) if normalize else out

    def num_parameters(self, include_mlm_head: bool = False, trainable_only: bool = False) -> int:
        """Embeddings + encoder + pooler (transformers' BertModel); plus the MLM head when asked."""
        total = 0
        for name, p in self.named_parameters():
            if (trainable_only and not p.requires_grad) or (not include_mlm_head and name.startswith("mlm_head.")):
                continue
            total += p.numel()
        return total


# ------------------------------------------------------------------ HF name maps
_LAYER_MAP = {
    "attention.self.query": "self_attn.q_proj",
    "attention.self.key": "self_attn.k_proj",
    "attention.self.value": "self_attn.v_proj",
    "attention.output.dense": "self_attn.o_proj",
    "attention.output.LayerNorm": "input_layernorm",
    "intermediate.dense": "mlp.up_proj",
    "output.dense": "mlp.down_proj",
    "output.LayerNorm": "post_attention_layernorm",
}
_TOP_MAP = {
    "embeddings.word_embeddings": "embeddings.word_embeddings",
    "embeddings.token_type_embeddings": "embeddings.token_type_embeddings",
    "embeddings.position_embeddings": "embeddings.position.embed_positions",
    "embeddings.LayerNorm": "embeddings.norm",
    "pooler.dense": "pooler.dense",
    "cls.predictions.transform.dense": "mlm_head.dense",
    "cls.predictions.transform.LayerNorm": "mlm_head.norm",
}
# dropped on import: buffers, the tied decoder matrix, the NSP classifier
_IGNORED = ("embeddings.position_ids", "cls.predictions.decoder.weight", "cls.seq_relationship.")


def _split_leaf(key: str) -> tuple[str, str]:
    module, _, leaf = key.rpartition(".")
    return module, {"gamma": "weight", "beta": "bias"}.get(leaf, leaf)


def bert_from_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF BERT names → ours. Unknown keys are kept as they are, so the loader reports them."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        key = key.removeprefix("bert.")
        if key.startswith(_IGNORED):
            continue
        if key in ("cls.predictions.bias", "cls.predictions.decoder.bias"):
            out["mlm_head.bias"] = value  # two names for one tied tensor
            continue
        module, leaf = _split_leaf(key)
        if module.startswith("encoder.layer."):
            idx, _, sub = module.removeprefix("encoder.layer.").partition(".")
            if sub in _LAYER_MAP:
                out[f"layers.{idx}.{_LAYER_MAP[sub]}.{leaf}"] = value
                continue
        elif module in _TOP_MAP:
            out[f"{_TOP_MAP[module]}.{leaf}"] = value
            continue
        out[key] = value
    return out


def bert_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names → a BertForPreTraining-style file: `bert.`-prefixed encoder and pooler, `cls.predictions` head.

    transformers' BertModel (and AutoModel / sentence-transformers) strips the prefix and ignores the head;
    BertForMaskedLM loads encoder and head and ignores the pooler.
    """
    layer_back = {v: k for k, v in _LAYER_MAP.items()}
    top_back = {v: k for k, v in _TOP_MAP.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key == "mlm_head.bias":
            out["cls.predictions.bias"] = value
            continue
        module, leaf = _split_leaf(key)
        if module.startswith("layers."):
            idx, _, sub = module.removeprefix("layers.").partition(".")
            name = f"encoder.layer.{idx}.{layer_back[sub]}"
        else:
            name = top_back[module]
        prefix = "" if name.startswith("cls.") else "bert."
        out[f"{prefix}{name}.{leaf}"] = value
    return out
