"""Speculative decoding: a cheap draft proposes, the target verifies (notes ch.06.3.k "speculative inference";
papers: Leviathan, Kalman & Matias 2023 "Fast Inference from Transformers via Speculative Decoding", Chen et
al. 2023 "Accelerating Large Language Model Decoding with Speculative Sampling").

Decoding is memory-bound: one target forward over k+1 tokens costs about as much as over 1 token, because the
weights are read once either way. So a small draft model proposes k tokens autoregressively, the target scores
all k+1 positions in ONE forward over its KV cache, and a verification rule keeps a prefix of the proposal plus
one token of the target's own. Each target forward therefore emits between 1 and k+1 tokens.

Verification (`verify`, a pure function), with q_i the draft's and p_i the target's distribution at step i:

    accept x_i with probability min(1, p_i(x_i) / q_i(x_i));
    at the first rejection emit y ~ norm(max(0, p_i − q_i)) and stop;
    if all k are accepted emit a bonus y ~ p_{k+1}.

The emitted token at every position is distributed exactly as p (Leviathan et al., Theorem 1), so sampling
with a draft is indistinguishable from sampling the target alone. Greedy decoding (temperature 0) is the
same rule with one-hot p and q: accept while the draft token is the target's argmax, then emit the target's
argmax (`verify_greedy`), so the output is token-identical to target-only greedy decoding.

The notes describe only the greedy match-and-discard variant; the sampling rule comes from the papers.
Both caches are rolled back after a rejection with `cache.crop(n)`. `truncated_draft` builds a
self-speculative draft from the target's first N layers (shared embeddings, final norm and head; in the
spirit of LayerSkip / draft-and-verify with early exit, without the fine-tuning those papers add).

Two users of the one rule: `speculative_generate`, a batch-1 loop over contiguous caches, and the engine
(`engine.py`, drafters in `drafters.py`), where every decoding sequence of a batch feeds its pending token
plus its draft through the paged forward and `verify_draft` applies the rule with the request's own
processors. There penalties are fine: row i of the target is processed with the context the token at i
would really have (the prompt, the output and the draft tokens before i), so each row is the distribution
plain decoding would use if the draft so far is accepted, and everything after a rejection is thrown away.

Not covered: tree attention / multiple candidate sequences (SpecInfer, Medusa heads).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tinyllm.infer.kv_cache import ContiguousKVCache
from tinyllm.infer.runner import presence_frequency
from tinyllm.infer.sampling import apply_processors, build_processors, make_generator
from tinyllm.infer.sequence import Sequence


@dataclass
class SpecStats:
    """Counters of one speculative run. acceptance_rate = accepted / proposed (draft tokens kept by the target)."""

    proposed: int = 0
    accepted: int = 0
    target_forwards: int = 0
    draft_forwards: int = 0
    emitted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_target_forward(self) -> float:
        return self.emitted / self.target_forwards if self.target_forwards else 0.0


# ------------------------------------------------------------------ the acceptance rule
def verify_greedy(draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """Greedy verification: draft tokens [k], target logits [k+1, V] → the accepted draft prefix followed by
    the target's argmax at the first mismatch (or after the last draft token): 1 … k+1 tokens."""
    k = draft_tokens.shape[0]
    best = target_logits.argmax(dim=-1)  # [k+1]
    mismatch = (draft_tokens != best[:k]).nonzero()
    n = int(mismatch[0]) if mismatch.numel() else k
    return torch.cat([draft_tokens[:n], best[n:n + 1]])


def verify(draft_tokens: torch.Tensor, q_probs: torch.Tensor, p_probs: torch.Tensor,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Speculative sampling (Leviathan et al. Algorithm 1): draft tokens [k] drawn from q_probs [k, V]; target
    probabilities p_probs [k+1, V]. Returns the emitted tokens: the accepted draft prefix plus one token drawn
    from norm(max(0, p − q)) at the first rejection, or from p_{k+1} when all k are accepted."""
    k = draft_tokens.shape[0]
    if q_probs.shape[0] != k or p_probs.shape[0] != k + 1 or q_probs.shape[1] != p_probs.shape[1]:
        raise ValueError(f"verify: draft_tokens [{k}] needs q_probs [{k}, V] and p_probs [{k + 1}, V], got "
                         f"{tuple(q_probs.shape)} and {tuple(p_probs.shape)}")
    p_probs, q_probs = p_probs.double(), q_probs.double()
    idx = torch.arange(k, device=draft_tokens.device)
    p_x, q_x = p_probs[idx, draft_tokens], q_probs[idx, draft_tokens]
    r = torch.rand(k, generator=generator, dtype=torch.float64, device=draft_tokens.device)
    # r < p/q written without the division; q(x) > 0 because x was drawn from q
    rejected = (r * q_x >= p_x).nonzero()
    if not rejected.numel():
        bonus = torch.multinomial(p_probs[k], 1, generator=generator)
        return torch.cat([draft_tokens, bonus])
    n = int(rejected[0])
    residual = (p_probs[n] - q_probs[n]).clamp(min=0)
    # a rejection implies p(x) < q(x), so p has mass where it exceeds q; guard against round-off anyway
    if float(residual.sum()) <= 0:
        residual = p_probs[n]
    fix = torch.multinomial(residual / residual.sum(), 1, generator=generator)
    return torch.cat([draft_tokens[:n], fix])


# ------------------------------------------------------------------ the engine's side
def process_row(seq: Sequence, scores: torch.Tensor, context: list[int]) -> torch.Tensor:
    """The request's processors on one row of raw logits [1, V] whose next token follows `context` (token ids
    so far, draft tokens included): the scores plain decoding samples from (greedy: takes the argmax of)."""
    req = seq.request
    if req.plain_greedy:
        return scores
    p = req.params
    penalties, warpers = req.chains
    ids = torch.tensor([context], dtype=torch.long, device=scores.device) if penalties or warpers else None
    if penalties:
        scores = apply_processors(penalties, ids, scores)
    if p.has_penalties:
        scores = presence_frequency(scores, context[seq.num_prompt_tokens:], p.presence_penalty,
                                    p.frequency_penalty)
    if not p.greedy and warpers:
        scores = apply_processors(warpers, ids, scores)
    return scores


def verify_draft(seq: Sequence, logits: torch.Tensor) -> list[int]:
    """Verify `seq.draft` (k tokens) against the target's raw logits [k+1, V] at the pending token and at each
    draft token: the emitted tokens, the accepted draft prefix plus one token of the target's own. Greedy
    requests take `verify_greedy`; sampled ones `verify` with the draft's probabilities (`seq.draft_probs`,
    or one-hot rows for a deterministic drafter such as prompt lookup) and the sequence's generator."""
    draft = seq.draft
    k = len(draft)
    if logits.shape[0] != k + 1:
        raise ValueError(f"verify_draft: {k} draft tokens need {k + 1} logit rows, got {logits.shape[0]}")
    tokens = torch.tensor(draft, dtype=torch.long, device=logits.device)
    if seq.request.plain_greedy:
        return verify_greedy(tokens, logits).tolist()
    ctx = seq.token_ids
    scores = torch.cat([process_row(seq, logits[i:i + 1], ctx + draft[:i]) for i in range(k + 1)])
    if seq.request.params.greedy:
        return verify_greedy(tokens, scores).tolist()
    p = scores.float().softmax(dim=-1)
    q = seq.draft_probs
    if q is None:  # a deterministic draft: q is one-hot, so x is kept with probability p(x)
        q = torch.nn.functional.one_hot(tokens, p.shape[-1]).to(p.dtype)
    return verify(tokens, q, p, seq.generator).tolist()


# ------------------------------------------------------------------ the decoding loop
def _feed(model: nn.Module, cache: ContiguousKVCache, seq: torch.Tensor) -> torch.Tensor:
    """Run the tokens of `seq` [1, L] the cache has not seen; logits of those tokens [n, V] in fp32."""
    new = seq[:, cache.get_seq_length():]
    return model(new, cache=cache)[0].float()


def speculative_generate(target: nn.Module, draft: nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
                         k: int = 4, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                         seed: int | None = None, eos_token_id: int | list[int] | None = None,
                         generator: torch.Generator | None = None) -> tuple[torch.Tensor, SpecStats]:
    """Prompt [1, T] → (prompt + continuation [1, T + new], SpecStats).

    temperature 0 is greedy (token-identical to `generate(target, ...)`); temperature > 0 samples from the
    target's temperature/top-k/top-p distribution exactly. eos_token_id None means the target config's; an
    empty list disables stopping.
    """
    _check(target, draft, input_ids, max_new_tokens, k, temperature)
    greedy = temperature == 0
    chain = [] if greedy else build_processors(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    if generator is None and not greedy:
        generator = make_generator(seed, input_ids.device)
    if eos_token_id is None:
        eos_token_id = getattr(target.config, "eos_token_id", None)
    stops = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])

    def probs(logits: torch.Tensor) -> torch.Tensor:  # warped distribution, rows independent of the prefix
        return apply_processors(chain, None, logits).softmax(dim=-1)

    t = input_ids.shape[1]
    capacity = t + max_new_tokens + k + 1
    t_cache = ContiguousKVCache.for_model(target, 1, capacity)
    d_cache = ContiguousKVCache.for_model(draft, 1, capacity)
    seq = input_ids.long()
    stats = SpecStats()
    # invariant at the top of a round: both caches hold a prefix of seq[:, :-1]; seq[-1] is pending
    with torch.inference_mode():
        while seq.shape[1] - t < max_new_tokens:
            room = max_new_tokens - (seq.shape[1] - t)
            kk = min(k, room - 1)  # the round also emits one target token
            proposal, q_rows = [], []
            cur = seq
            for _ in range(kk):
                logits = _feed(draft, d_cache, cur)[-1]
                stats.draft_forwards += 1
                if greedy:
                    tok = logits.argmax(dim=-1, keepdim=True)
                else:
                    q = probs(logits[None])[0]
                    q_rows.append(q)
                    tok = torch.multinomial(q, 1, generator=generator)
                proposal.append(tok)
                cur = torch.cat([cur, tok[None]], dim=1)
            drafted = torch.cat(proposal) if proposal else seq.new_empty(0)
            p_logits = _feed(target, t_cache, cur)[-(kk + 1):]  # the k+1 verifying positions
            stats.target_forwards += 1
            if greedy:
                out = verify_greedy(drafted, p_logits)
            else:
                q_probs = torch.stack(q_rows) if q_rows else p_logits.new_empty(0, p_logits.shape[-1])
                out = verify(drafted, q_probs, probs(p_logits), generator)
            n_acc = out.shape[0] - 1
            stats.proposed += kk
            stats.accepted += n_acc
            hit = [i for i, tok in enumerate(out.tolist()) if tok in stops]
            if hit:
                out = out[:hit[0] + 1]
            seq = torch.cat([seq, out[None].to(seq)], dim=1)
            stats.emitted += out.shape[0]
            if hit:
                break
            # forget the rejected drafts: keep everything but the new pending last token
            keep = seq.shape[1] - 1
            t_cache.crop(min(keep, t_cache.get_seq_length()))
            d_cache.crop(min(keep, d_cache.get_seq_length()))
    return seq, stats


def _check(target: nn.Module, draft: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, k: int,
           temperature: float) -> None:
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [1, seq_len>0] (speculation is per sequence), got "
                         f"{tuple(input_ids.shape)}")
    if target.config.vocab_size != draft.config.vocab_size:
        raise ValueError(f"draft vocab_size={draft.config.vocab_size} != target vocab_size="
                         f"{target.config.vocab_size}: both must share one tokenizer")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r} must be a positive integer")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a non-negative integer")
    if temperature < 0:
        raise ValueError(f"temperature={temperature!r} must be >= 0 (0 = greedy)")


def truncated_draft(model: nn.Module, num_layers: int) -> nn.Module:
    """A self-speculative draft: the target's first `num_layers` decoder layers with its own embeddings, final
    norm and head (all modules shared, no weights copied). Exits early, so it is cheaper by ~layers ratio."""
    from tinyllm.model.transformer import CausalLM

    total = model.config.num_hidden_layers
    if not isinstance(num_layers, int) or not 1 <= num_layers <= total:
        raise ValueError(f"num_layers={num_layers!r} must be in [1, {total}]")
    cfg = model.config.replace(num_hidden_layers=num_layers)
    with torch.device("meta"):  # skeleton only: every submodule is replaced by the target's below
        draft = CausalLM(cfg)
    draft.model.embed_tokens = model.model.embed_tokens
    draft.model.pos = model.model.pos
    draft.model.layers = nn.ModuleList(list(model.model.layers[:num_layers]))
    draft.model.norm = model.model.norm
    draft.lm_head = model.lm_head
    return draft.eval()
