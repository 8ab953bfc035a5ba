"""Train a dense retriever on inews title → article pairs: a bi-encoder (DPR, Karpukhin et al. 2020; notes
ch.98.6.e).

One encoder E (shared by queries and documents, "siamese") maps a text to an L2-normalised vector. A batch
holds B (title, article) pairs; every other article in the batch is a negative for a title ("in-batch
negatives"), so one batch gives B·(B−1) negatives for the price of B encodings; mined hard negatives add M
more article rows. The loss is InfoNCE with temperature τ:

    S_ij = ⟨E(q_i), E(d_j)⟩ / τ          L = −(1/B) Σ_i log softmax_j(S_ij)[i]  = cross_entropy(S, arange(B))

Cosines live in [−1, 1]; dividing by a small τ (0.05) spreads the logits so the softmax can become confident.
A batch can hold two pairs whose articles are identical (inews repeats a few articles under different
titles); such an entry is not a negative and is masked out of the softmax (a false negative would teach
the model to push a document away from itself).

Two encoders (`--arch`), both trained through THE training loop (`tinyllm.train.loop.train`):

- `dssm` (default; Huang et al. 2013, "DSSM"): the input layer is fixed feature hashing of character
  1–2-grams (`HashingEmbedder`, 16384 buckets, sublinear tf, unit L2: x̂); E(x̂) = normalize([g ⊙ x̂ ; Wᵀx̂])
  with learned per-bucket weights g (initialised to the buckets' IDF over the training articles) and a learned
  projection W (16384 × 256, initialised N(0, 1/256)). Step 0 is therefore IDF-weighted hashing; training
  (`HashedBiEncoderTask`) adjusts the term weights and learns the dense part. Each title also meets one hard
  negative: the article that the step-0 model ranks highest among the wrong ones (mined once). Stages:
  hash train/dev → IDF → mine → train → `model/` (weights.npz + hashed_projection.json, read by
  `tinyllm.rag.embed.HashedProjectionEmbedder`). Defaults (B = 128, 150 steps, lr 3e-4, weight decay 0.1 on
  W) train in 46 s on one thread of a shared 2-core machine (71 s with hashing and evaluation); dev
  recall@10 0.927, MRR 0.870 (hashing 4096: 0.899 / 0.829; the untrained step-0 model 0.924 / 0.866 — most
  of the gain is the IDF start and the larger bucket count). Higher learning rates overfit the 5.3k pairs
  (lr 1e-2 without hard negatives: train loss 0.03, dev recall@10 0.900), so training is kept gentle.
- `transformer`: a small BERT on our byte-level BPE (tokenizer trained on inews train), mean-pooled
  (`BiEncoderTask`); title ↔ the first `doc_len` tokens of the article; `model/` is an HF BERT checkpoint with
  our tokenizer.json (`BertEmbedder`). Defaults (1 layer, width 512, 8 heads, FFN 1024, B = 48, 150 steps ≈
  1.4 epochs) trained in 315 s on the shared machine; dev recall@10 0.783, MRR 0.672 — below hashing: 5.3k
  pairs are too few for a from-scratch encoder, which memorises them (train loss → 0.01, dev loss 0.93).
  Width helped at equal steps (2 layers × 128 wide 0.710, 1 × 256 0.754, 1 × 512 0.783); fewer steps did
  not (1 × 256 for 80 steps: 0.731).

`load_trained_embedder(out/"model")` opens either; dev retrieval metrics go to `retriever.json`.
Run: `python -m tinyllm.recipes.dense_retriever --out runs/dense-retriever [--arch transformer]`.
Not covered: BM25-mined negatives (the DSSM mines with its own starting model), ANCE index refresh, separate
query/document towers, data augmentation (ICT pseudo-queries, random article windows).
"""

from __future__ import annotations

import random
import shutil
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tinyllm.atomic import atomic_dir, atomic_write_json

PAD = "<|endoftext|>"


def info_nce(q: torch.Tensor, d: torch.Tensor, temperature: float,
             doc_keys: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """In-batch InfoNCE loss of unit query rows q [B, D] against unit document rows d [B + M, D]: row i's
    positive is d[i]; the other B − 1 in-batch documents and M extra rows (mined hard negatives) are negatives.

    Returns (loss, logits [B, B + M]). With `doc_keys` [B + M] (a content hash per document), entries other
    than the positive whose document equals the positive one are masked out (−inf) — duplicates are not
    negatives.
    """
    if q.dim() != 2 or d.dim() != 2 or q.shape[1] != d.shape[1] or d.shape[0] < q.shape[0]:
        raise ValueError(f"query {tuple(q.shape)} and document {tuple(d.shape)} embeddings must both be [B, D] "
                         "(documents may add extra negative rows)")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    logits = q @ d.T / temperature  # [B, B + M]
    if doc_keys is not None:
        same = doc_keys[:q.shape[0], None] == doc_keys[None, :]
        same[:, :q.shape[0]].fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
    labels = torch.arange(q.shape[0], device=q.device)
    return F.cross_entropy(logits, labels), logits


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into ids [B, T] and a 0/1 attention mask [B, T]."""
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


class PairBatches:
    """Endless, seeded epochs over (query ids, doc ids, doc key) triples; position saved with the run."""

    def __init__(self, pairs: Sequence[tuple[list[int], list[int], int]], batch_size: int, pad_id: int,
                 seed: int) -> None:
        if len(pairs) < batch_size:
            raise ValueError(f"{len(pairs)} pairs cannot fill a batch of {batch_size}")
        self.pairs, self.batch_size, self.pad_id, self.seed = pairs, batch_size, pad_id, seed
        self.epoch, self.pos = 0, 0
        self._order = self._perm()

    def _perm(self) -> list[int]:
        order = list(range(len(self.pairs)))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._perm()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.pos + self.batch_size > len(self._order):  # drop the ragged tail: every batch has B pairs
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._perm()
        idx = self._order[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return self.collate([self.pairs[i] for i in idx])

    def collate(self, items: Sequence[Any]) -> dict[str, torch.Tensor]:
        return collate(items, self.pad_id)


def collate(items: Sequence[tuple[list[int], list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    q_ids, q_mask = pad_batch([q for q, _, _ in items], pad_id)
    d_ids, d_mask = pad_batch([d for _, d, _ in items], pad_id)
    keys = torch.tensor([k for _, _, k in items], dtype=torch.long)
    return {"q_ids": q_ids, "q_mask": q_mask, "d_ids": d_ids, "d_mask": d_mask, "doc_keys": keys}


class BiEncoderTask:
    """The training loop's Task for a shared-encoder bi-encoder with in-batch negatives."""

    def __init__(self, train_pairs: Sequence[tuple[list[int], list[int], int]],
                 eval_pairs: Sequence[tuple[list[int], list[int], int]], batch_size: int, pad_id: int,
                 temperature: float = 0.05, seed: int = 0) -> None:
        self.train_pairs, self.eval_pairs = train_pairs, eval_pairs
        self.batch_size, self.pad_id, self.temperature, self.seed = batch_size, pad_id, temperature, seed

    def train_batches(self) -> PairBatches:
        return PairBatches(self.train_pairs, self.batch_size, self.pad_id, self.seed)

    def eval_batches(self) -> Iterator[dict[str, torch.Tensor]] | None:
        if len(self.eval_pairs) < self.batch_size:
            return None
        n = len(self.eval_pairs) // self.batch_size * self.batch_size
        return (collate(self.eval_pairs[i:i + self.batch_size], self.pad_id) for i in range(0, n, self.batch_size))

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        enc = getattr(model, "_orig_mod", model)  # torch.compile wrapper → the module with .embed
        q = enc.embed(batch["q_ids"], batch["q_mask"], pooling="mean", normalize=True).float()
        d = enc.embed(batch["d_ids"], batch["d_mask"], pooling="mean", normalize=True).float()
        loss, logits = info_nce(q, d, self.temperature, batch["doc_keys"])
        acc = (logits.argmax(-1) == torch.arange(len(q), device=q.device)).float().mean()
        tokens = int(batch["q_mask"].sum() + batch["d_mask"].sum())
        return loss, {"tokens": tokens, "in_batch_acc": float(acc)}

    def trainable_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        # the MLM head and pooler take no part in mean-pooled embeddings
        return [(n, p) for n, p in model.named_parameters()
                if p.requires_grad and not n.startswith(("mlm_head.", "pooler."))]


# ------------------------------------------------------------------ DSSM: hashed n-grams → learned projection
class HashedProjectionEncoder(nn.Module):
    """x̂ (unit hashed n-gram rows, [B, in_dim]) → normalize([g ⊙ x̂ ; x̂ W]); the torch twin of
    `tinyllm.rag.embed.hashed_projection`. g starts at the buckets' IDF (so the untrained model is IDF-weighted
    hashing), W at N(0, 1/k): a random projection whose share of the cosine is small next to the IDF part."""

    def __init__(self, idf: torch.Tensor, proj_dim: int, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.g = nn.Parameter(idf.detach().clone().float())
        self.w = nn.Parameter(torch.randn(idf.numel(), proj_dim, generator=gen) / proj_dim ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(torch.cat([x * self.g, x @ self.w], dim=-1), dim=-1)


def bucket_idf(x: Any) -> torch.Tensor:
    """Smoothed IDF per hash bucket over the rows of a CSR matrix: ln((1 + N) / (1 + df)) + 1."""
    import numpy as np

    df = np.bincount(x.indices, minlength=x.shape[1])
    return torch.tensor(np.log((1 + x.shape[0]) / (1 + df)) + 1, dtype=torch.float32)


def densify(x: Any, rows: Sequence[int]) -> torch.Tensor:
    sub = x[list(rows)].tocoo()
    out = torch.zeros(sub.shape, dtype=torch.float32)
    out[torch.as_tensor(sub.row, dtype=torch.long), torch.as_tensor(sub.col, dtype=torch.long)] = \
        torch.as_tensor(sub.data, dtype=torch.float32)
    return out


class HashedPairBatches(PairBatches):
    """PairBatches over (row, row, content hash) triples whose rows index CSR title / article matrices; with
    `hard` (per pair, a list of article rows) those articles join the batch as extra negatives."""

    def __init__(self, pairs: Sequence[tuple[int, int, int]], queries: Any, docs: Any, batch_size: int,
                 seed: int, hard: Sequence[Sequence[int]] | None = None) -> None:
        super().__init__(pairs, batch_size, 0, seed)  # type: ignore[arg-type]
        self.queries, self.docs, self.hard = queries, docs, hard
        self.keys = {d: k for _, d, k in pairs}

    def collate(self, items: Sequence[Any]) -> dict[str, torch.Tensor]:
        drows = [d for _, d, _ in items]
        if self.hard is not None:
            drows += [h for q, _, _ in items for h in self.hard[q]]
        return {"q": densify(self.queries, [q for q, _, _ in items]), "d": densify(self.docs, drows),
                "doc_keys": torch.tensor([self.keys[d] for d in drows], dtype=torch.long)}


def mine_hard_negatives(queries: Any, docs: Any, keys: Sequence[int], weights: torch.Tensor, n: int,
                        block: int = 512) -> list[list[int]]:
    """For every title, the n articles (other than its own content) that score highest under the untrained
    model's exact-match part ⟨g ⊙ x̂_q, g ⊙ x̂_d⟩ (g = IDF) — its own top mistakes, mined once before training (static hard negatives,
    as DPR mines them with BM25)."""
    import numpy as np
    import scipy.sparse as sp

    if n <= 0:
        return [[] for _ in keys]
    w = sp.diags(weights.numpy().astype(np.float32) ** 2)
    k = np.asarray(keys)
    out = []
    dt = (w @ docs.T).tocsr()
    for i in range(0, queries.shape[0], block):
        s = (queries[i:i + block] @ dt).toarray()
        s[k[i:i + block, None] == k[None, :]] = -np.inf
        out.extend(np.argsort(-s, axis=1, kind="stable")[:, :n].tolist())
    return out


class HashedBiEncoderTask:
    """The training loop's Task for the DSSM bi-encoder: InfoNCE over in-batch negatives, as BiEncoderTask."""

    def __init__(self, train: tuple[Any, Any, list[int]], dev: tuple[Any, Any, list[int]], batch_size: int,
                 temperature: float = 0.05, seed: int = 0, hard: Sequence[Sequence[int]] | None = None) -> None:
        self.train, self.dev, self.hard = train, dev, hard
        self.batch_size, self.temperature, self.seed = batch_size, temperature, seed

    @staticmethod
    def _pairs(keys: list[int]) -> list[tuple[int, int, int]]:
        return [(i, i, k) for i, k in enumerate(keys)]

    def train_batches(self) -> HashedPairBatches:
        q, d, keys = self.train
        return HashedPairBatches(self._pairs(keys), q, d, self.batch_size, self.seed, self.hard)

    def eval_batches(self) -> Iterator[dict[str, torch.Tensor]] | None:
        q, d, keys = self.dev
        pairs = self._pairs(keys)
        if len(pairs) < self.batch_size:
            return None
        loader = HashedPairBatches(pairs, q, d, self.batch_size, self.seed)
        n = len(pairs) // self.batch_size * self.batch_size
        return (loader.collate(pairs[i:i + self.batch_size]) for i in range(0, n, self.batch_size))

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        q, d = model(batch["q"]), model(batch["d"])
        loss, logits = info_nce(q, d, self.temperature, batch["doc_keys"])
        acc = (logits.argmax(-1) == torch.arange(len(q), device=q.device)).float().mean()
        return loss, {"tokens": int((batch["q"] != 0).sum() + (batch["d"] != 0).sum()), "in_batch_acc": float(acc)}


    def trainable_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


ARCH_DEFAULTS = {"dssm": {"batch_size": 128, "max_steps": 150, "lr": 3e-4, "warmup_steps": 10},
                 "transformer": {"batch_size": 48, "max_steps": 150, "lr": 1e-3, "warmup_steps": 15}}


@dataclass
class DenseRetrieverConfig:
    out: str = field(default="runs/dense-retriever", metadata={"help": "output directory"})
    arch: str = field(default="dssm", metadata={"help": "dssm (hashed n-grams → learned projection) or "
                                                "transformer (BERT encoder from scratch)",
                                                "choices": ["dssm", "transformer"]})
    hash_dim: int = field(default=16384, metadata={"help": "dssm: hash buckets of the input layer"})
    proj_dim: int = field(default=256, metadata={"help": "dssm: width of the learned dense projection"})
    hard_negatives: int = field(default=1, metadata={"help": "dssm: mined hard negatives per title (0: none)"})
    tokenizer: str = field(default="", metadata={"help": "an existing tokenizer directory (default: train one)"})
    vocab_size: int = field(default=8192, metadata={"help": "BPE vocabulary size when training a tokenizer"})
    tokenizer_chars: int = field(default=1_500_000, metadata={"help": "characters of inews train for BPE"})
    hidden_size: int = field(default=512, metadata={"help": "encoder width"})
    num_hidden_layers: int = field(default=1, metadata={"help": "encoder layers"})
    num_attention_heads: int = field(default=8, metadata={"help": "attention heads"})
    intermediate_size: int = field(default=1024, metadata={"help": "FFN width"})
    query_len: int = field(default=48, metadata={"help": "max query (title) tokens"})
    doc_len: int = field(default=128, metadata={"help": "max document tokens (the article's beginning)"})
    batch_size: int = field(default=0, metadata={"help": "pairs per batch (in-batch negatives: B − 1 each; "
                                                 "0: 128 dssm, 48 transformer)"})
    temperature: float = field(default=0.05, metadata={"help": "InfoNCE temperature τ"})
    max_steps: int = field(default=0, metadata={"help": "optimizer steps (0: 100 dssm, 150 transformer)"})
    lr: float = field(default=0.0, metadata={"help": "peak learning rate (0: 3e-4 dssm, 1e-3 transformer)"})
    warmup_steps: int = field(default=-1, metadata={"help": "linear warm-up steps (-1: 10 dssm, 15 transformer)"})
    precision: str = field(default="auto", metadata={"help": "fp32, bf16 autocast, or auto (bf16 only where "
                                                             "measured faster)", "choices": ["auto", "fp32", "bf16"]})
    device: str = field(default="auto", metadata={"help": "cpu, cuda or auto"})
    limit: int = field(default=0, metadata={"help": "use only the first N train pairs (0: all; tests)"})
    seed: int = field(default=0, metadata={"help": "seed for data order and initial weights"})
    fresh: bool = field(default=False, metadata={"help": "delete previous outputs and start over"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})

    def __post_init__(self) -> None:
        if self.arch not in ARCH_DEFAULTS:
            raise ValueError(f"arch={self.arch!r} is not one of {sorted(ARCH_DEFAULTS)}")
        for name, default in ARCH_DEFAULTS[self.arch].items():  # 0 / -1 = the architecture's default
            v = getattr(self, name)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == (-1 if name == "warmup_steps" else 0):
                setattr(self, name, default)
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r} must be > 0")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps!r} must be a non-negative integer")
        if not isinstance(self.hard_negatives, int) or self.hard_negatives < 0:
            raise ValueError(f"hard_negatives={self.hard_negatives!r} must be a non-negative integer")
        for name in ("vocab_size", "tokenizer_chars", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "query_len", "doc_len", "batch_size", "max_steps", "hash_dim",
                     "proj_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name}={v!r} must be a positive integer")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature!r} must be > 0")


def _log(msg: str) -> None:
    print(f"[dense-retriever] {msg}", flush=True)


def doc_key(text: str) -> int:
    """Stable content hash (duplicates in a batch are masked, not treated as negatives)."""
    return zlib.crc32(text.encode("utf-8"))


def stage_tokenizer(cfg: DenseRetrieverConfig, out: Path) -> Any:
    from tinyllm.data.corpora import inews
    from tinyllm.tokenizer import load_tokenizer
    from tinyllm.tokenizer.bpe import train_bpe

    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    tdir = out / "tokenizer"
    if not (tdir / "tokenizer.json").exists():
        t0 = time.time()
        arts = inews("train")
        random.Random(cfg.seed).shuffle(arts)
        texts, n = [], 0
        for a in arts:
            texts.append(f"{a.title}\n{a.content}")
            n += len(texts[-1])
            if n >= cfg.tokenizer_chars:
                break
        tok = train_bpe(texts, cfg.vocab_size, special_tokens=(PAD,), show_progress=cfg.progress,
                        eos_token=PAD, pad_token=PAD)
        with atomic_dir(tdir) as tmp:
            tok.save(tmp)
        _log(f"tokenizer: {tok.vocab_size} tokens from {n:,} characters in {time.time() - t0:.0f}s")
    return load_tokenizer(tdir)


def make_pairs(split: str, tokenizer: Any, query_len: int, doc_len: int,
               limit: int = 0) -> list[tuple[list[int], list[int], int]]:
    """(title ids, article-beginning ids, content hash) for an inews split. ~1.4 characters per token, so
    3·doc_len characters of the article always give doc_len tokens when the article is long enough."""
    from tinyllm.data.corpora import inews

    arts = [a for a in inews(split) if a.title and a.content]
    if limit:
        arts = arts[:limit]
    return [(tokenizer.encode(a.title)[:query_len], tokenizer.encode(a.content[:3 * doc_len])[:doc_len],
             doc_key(a.content)) for a in arts]


def build_encoder(cfg: DenseRetrieverConfig, vocab_size: int, pad_id: int) -> nn.Module:
    from tinyllm.model.config import preset
    from tinyllm.model.hf import build_model

    mcfg = preset("bert-base", vocab_size=vocab_size, hidden_size=cfg.hidden_size,
                  intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                  num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_attention_heads,
                  head_dim=cfg.hidden_size // cfg.num_attention_heads,
                  max_position_embeddings=max(cfg.doc_len, cfg.query_len), pad_token_id=pad_id)
    return build_model(mcfg)


def dev_metrics(model_dir: Path, split: str = "dev", progress: bool = False, limit: int = 0) -> dict[str, float]:
    """Title → article retrieval over a whole inews split with the exported model (brute-force cosine)."""
    import numpy as np

    from tinyllm.data.corpora import inews
    from tinyllm.rag.embed import encode_queries, load_trained_embedder
    from tinyllm.rag.metrics import evaluate_rankings

    arts = [a for a in inews(split) if a.title and a.content]
    if limit:
        arts = arts[:limit]
    emb = load_trained_embedder(model_dir)
    docs = emb.encode([a.content for a in arts], batch_size=64, progress=progress)
    queries = encode_queries(emb, [a.title for a in arts], batch_size=64)
    top = np.argsort(-(queries @ docs.T), axis=1)[:, :10]
    by_content: dict[str, set[int]] = {}
    for i, a in enumerate(arts):
        by_content.setdefault(a.content, set()).add(i)
    return evaluate_rankings([list(r) for r in top], [by_content[a.content] for a in arts])


def _train_config(cfg: DenseRetrieverConfig, out: Path, weight_decay: float) -> Any:
    from tinyllm.train.loop import TrainConfig

    return TrainConfig(out_dir=str(out / "train"), max_steps=cfg.max_steps, batch_size=cfg.batch_size,
                       lr=cfg.lr, min_lr=cfg.lr / 10, warmup_steps=min(cfg.warmup_steps, cfg.max_steps - 1),
                       weight_decay=weight_decay, precision=cfg.precision, eval_interval=0,
                       eval_steps=8, log_interval=max(1, min(20, cfg.max_steps)), save_interval=0, keep_last=1,
                       seed=cfg.seed, device=cfg.device, progress=cfg.progress)


def _finish(cfg: DenseRetrieverConfig, out: Path, model_dir: Path, result: Any, train_seconds: float,
            t_start: float, spec: dict[str, Any]) -> dict[str, Any]:
    metrics = dev_metrics(model_dir, progress=cfg.progress, limit=cfg.limit)
    summary = {"config": asdict(cfg), "train_seconds": train_seconds, "total_seconds": time.time() - t_start,
               "final_loss": result.losses[-1] if result.losses else None, "eval_losses": result.eval_losses,
               "dev": metrics, "model": str(model_dir), "embedder_spec": spec}
    path = out / "retriever.json"
    atomic_write_json(path, summary, default=str)
    _log(f"trained in {train_seconds:.0f}s; dev recall@10 {metrics['recall@10']:.3f}, MRR {metrics['mrr']:.3f}")
    return summary


def hashed_split(split: str, hasher: Any, limit: int = 0, progress: bool = False) -> tuple[Any, Any, list[int]]:
    """(title CSR rows, article CSR rows, content hashes) of an inews split, rows unit-L2 hashed n-grams."""
    from tinyllm.data.corpora import inews

    arts = [a for a in inews(split) if a.title and a.content]
    if limit:
        arts = arts[:limit]
    return (hasher.encode_sparse([a.title for a in arts], progress),
            hasher.encode_sparse([a.content for a in arts], progress), [doc_key(a.content) for a in arts])


def run_dssm(cfg: DenseRetrieverConfig) -> dict[str, Any]:
    """Hash train/dev → IDF init → training loop (HashedBiEncoderTask) → export a hashed-projection dir."""
    from tinyllm.rag.embed import HashingEmbedder, save_hashed_projection
    from tinyllm.train.loop import train

    out = Path(cfg.out)
    t_start = time.time()
    hasher = HashingEmbedder(cfg.hash_dim, (1, 2), sublinear=True)
    train_set = hashed_split("train", hasher, cfg.limit, cfg.progress)
    dev_set = hashed_split("dev", hasher, cfg.limit, cfg.progress)
    _log(f"{train_set[0].shape[0]} train pairs, {dev_set[0].shape[0]} dev pairs, {cfg.hash_dim} buckets")
    idf = bucket_idf(train_set[1])
    model = HashedProjectionEncoder(idf, cfg.proj_dim, cfg.seed)
    hard = mine_hard_negatives(train_set[0], train_set[1], train_set[2], idf, cfg.hard_negatives) \
        if cfg.hard_negatives else None
    task = HashedBiEncoderTask(train_set, dev_set, cfg.batch_size, cfg.temperature, cfg.seed, hard)
    t_train = time.time()
    result = train(model, task, _train_config(cfg, out, weight_decay=0.1))
    train_seconds = time.time() - t_train
    model_dir = save_hashed_projection(out / "model", model.g.detach().cpu().numpy(),
                                       model.w.detach().cpu().numpy(), cfg.hash_dim, (1, 2), True)
    return _finish(cfg, out, model_dir, result, train_seconds, t_start,
                   {"type": "hashed_projection", "path": str(model_dir)})


def run_recipe(cfg: DenseRetrieverConfig) -> dict[str, Any]:
    """Train the chosen architecture; returns the run's summary (also in retriever.json)."""
    out = Path(cfg.out)
    if cfg.fresh:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.arch == "dssm":
        return run_dssm(cfg)
    return run_transformer(cfg)


def run_transformer(cfg: DenseRetrieverConfig) -> dict[str, Any]:
    """Tokenizer → pairs → training loop → export an HF BERT directory."""
    from tinyllm.model.hf import save_pretrained
    from tinyllm.train.loop import train

    out = Path(cfg.out)
    t_start = time.time()
    tok = stage_tokenizer(cfg, out)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    train_pairs = make_pairs("train", tok, cfg.query_len, cfg.doc_len, cfg.limit)
    eval_pairs = make_pairs("dev", tok, cfg.query_len, cfg.doc_len, cfg.limit)
    _log(f"{len(train_pairs)} train pairs, {len(eval_pairs)} dev pairs")
    torch.manual_seed(cfg.seed)
    model = build_encoder(cfg, tok.vocab_size, pad_id)
    task = BiEncoderTask(train_pairs, eval_pairs, cfg.batch_size, pad_id, cfg.temperature, cfg.seed)
    tcfg = _train_config(cfg, out, weight_decay=0.01)
    t_train = time.time()
    result = train(model, task, tcfg)
    train_seconds = time.time() - t_train
    model_dir = out / "model"
    with atomic_dir(model_dir) as tmp:  # weights and tokenizer replace the old model together
        save_pretrained(model.cpu(), tmp)
        tok.save(tmp)
    return _finish(cfg, out, model_dir, result, train_seconds, t_start, {"type": "bert", "path": str(model_dir)})


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    import argparse

    from tinyllm.cli import add_dataclass_arguments, build_config

    parser = argparse.ArgumentParser(prog="python -m tinyllm.recipes.dense_retriever", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None, help="TOML file with field values (flags override it)")
    add_dataclass_arguments(parser, DenseRetrieverConfig)
    return run_recipe(build_config(DenseRetrieverConfig, parser.parse_args(argv)))


if __name__ == "__main__":
    main()
