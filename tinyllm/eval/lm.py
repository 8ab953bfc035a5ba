"""Language-model backends for evaluation, with lm-evaluation-harness request semantics (notes ch.09 评估).

Three request types, each answered exactly as lm-eval 0.4 answers them, so that a number here is the
field's number:

- `loglikelihood([(context, continuation)])` → `(Σ log p(continuation tokens | context), is_greedy)`.
  Trailing spaces of the context move to the continuation; the pair is tokenised as a whole and split at
  the length of the context's own encoding (a word's leading space belongs to the word's token). An empty
  context conditions on the prefix token (BOS, else EOS). Inputs longer than `max_length + 1` tokens are
  cut from the left. `is_greedy`: every continuation token is the argmax at its position.
- `loglikelihood_rolling([text])` → Σ log p over the whole text: the tokens are cut into disjoint windows
  of `max_length` predictions, the first conditioned on the prefix token, later ones on the tokens that
  precede them (`rolling_windows`). Word/byte perplexity and bits per byte are computed from this sum.
- `generate_until([(context, {"until": [...], "max_gen_toks": n})])` → greedy text cut at the first stop
  string.

Backends: `TinyLM` (a tinyllm model: multiple-choice requests that share a context share one forward of
it — a single-token choice set costs one row, longer choices run on a KV cache expanded from the shared
prefix), `HFLM` (a transformers model), `OpenAILM` (an OpenAI-compatible `/v1/completions` endpoint with
`echo` + `logprobs`). `score_naive` is the reference every backend's fast path is tested against: one
right-padded row per request, as lm-eval runs it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

Pair = tuple[list[int], list[int]]


def encode_pair(encode: Callable[[str], list[int]], context: str, continuation: str) -> Pair:
    """lm-eval's `_encode_pair`: move the context's trailing spaces to the continuation, encode the whole
    string, and split it after the context's own token count."""
    if not context:
        raise ValueError("encode_pair needs a non-empty context (an empty one conditions on the prefix token)")
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = encode(context + continuation), encode(context)
    return ctx, whole[len(ctx):]


def rolling_windows(tokens: Sequence[int], prefix_token: int, max_len: int) -> list[Pair]:
    """Disjoint (context, predicted) windows covering every token once (lm-eval's
    `get_rolling_token_windows` with context_len=1, then `make_disjoint_window`)."""
    if max_len < 1:
        raise ValueError(f"max_len={max_len} must be at least 1")
    tokens = list(tokens)
    if not tokens:
        return []
    first = min(max_len, len(tokens))
    out = [([prefix_token], tokens[:first])]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_len)
        end = done + n
        window = tokens[max(end - max_len - 1, 0): end - 1]
        out.append((window[: len(window) - (n - 1)], tokens[done:end]))
        done = end
    return out


def cut_at_stops(text: str, until: Iterable[str]) -> str:
    """Text before the earliest stop string (lm-eval cuts at each stop in turn: the same result)."""
    for s in until:
        if s:
            text = text.split(s)[0]
    return text


class LM:
    """What the harness asks of a model. Subclasses give `encode`, `prefix_token_id`, `max_length` and
    `score` (token-level log-likelihood), and `generate_until`."""

    max_length: int = 2048
    prefix_token_id: int = 0

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def score(self, pairs: Sequence[Pair], batch_size: int = 1) -> list[tuple[float, bool]]:
        raise NotImplementedError

    def generate_until(self, requests: Sequence[tuple[str, dict[str, Any]]], batch_size: int = 1) -> list[str]:
        raise NotImplementedError

    def tokenize_requests(self, requests: Sequence[tuple[str, str]]) -> list[Pair]:
        out = []
        for context, continuation in requests:
            if context:
                out.append(encode_pair(self.encode, context, continuation))
                continue
            cont = self.encode(continuation)
            if not cont:
                raise ValueError(f"continuation {continuation!r} encodes to no tokens")
            # lm-eval: when the continuation already starts with the prefix token it conditions on itself
            out.append(([self.prefix_token_id], cont) if cont[0] != self.prefix_token_id else (cont[:1], cont[1:]))
        return out

    def loglikelihood(self, requests: Sequence[tuple[str, str]], batch_size: int = 1) -> list[tuple[float, bool]]:
        return self.score(self.tokenize_requests(requests), batch_size)

    def loglikelihood_rolling(self, texts: Sequence[str], batch_size: int = 1) -> list[float]:
        windows, owner = [], []
        for i, text in enumerate(texts):
            for w in rolling_windows(self.encode(text), self.prefix_token_id, self.max_length):
                windows.append(w)
                owner.append(i)
        sums = [0.0] * len(texts)
        for i, (lp, _) in zip(owner, self.score(windows, batch_size)):
            sums[i] += lp
        return sums


def _truncate(ctx: list[int], cont: list[int], max_length: int) -> list[int]:
    """The model input of lm-eval: (context + continuation) cut to max_length + 1 from the left, minus the
    last token (nothing predicts past it)."""
    if not ctx or not cont:
        raise ValueError(f"empty context or continuation ({len(ctx)}, {len(cont)} tokens)")
    return (ctx + cont)[-(max_length + 1):][:-1]


# logits_at(ids [B, T], rows [n], cols [n], cache) → logits [n, V] at those positions only: the vocabulary
# projection of the positions nobody scores is most of the work when the answers are single tokens
LogitsAt = Callable[..., torch.Tensor]


def full_logits_at(forward: Callable[[torch.Tensor], torch.Tensor]) -> LogitsAt:
    """A LogitsAt over a forward that returns all logits [B, T, V] (transformers models, lm-eval's way)."""
    def at(ids: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, cache: Any = None) -> torch.Tensor:
        return forward(ids)[rows, cols]

    return at


@torch.no_grad()
def score_naive(logits_at: LogitsAt, pairs: Sequence[Pair], max_length: int, batch_size: int = 1,
                pad_id: int = 0, device: torch.device | str = "cpu") -> list[tuple[float, bool]]:
    """One right-padded row per request, longest first (padding sits after the scored tokens, so causal
    attention never sees it)."""
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        rows = [_truncate(*pairs[i], max_length) for i in idx]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        rr, cc, spans = [], [], []
        for r, row in enumerate(rows):
            ids[r, : len(row)] = torch.tensor(row)
            n = len(pairs[idx[r]][1])
            spans.append((len(rr), n))
            rr += [r] * n
            cc += range(len(row) - n, len(row))
        logp = F.log_softmax(logits_at(ids.to(device), torch.tensor(rr, device=device),
                                       torch.tensor(cc, device=device)).float(), dim=-1).cpu()
        for (start, n), i in zip(spans, idx):
            out[i] = _pick(logp[start: start + n], pairs[i][1])
    return out


def _pick(logp: torch.Tensor, cont: Sequence[int]) -> tuple[float, bool]:
    """(Σ log p of `cont` under the rows of `logp` [len(cont), V], whether each is the row's argmax)."""
    c = torch.tensor(list(cont))
    return float(logp.gather(1, c[:, None]).sum()), bool((logp.argmax(-1) == c).all())


class TinyLM(LM):
    """A tinyllm CausalLM and its tokenizer. `prefix_sharing=False` scores through `score_naive`."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, max_length: int | None = None,
                 prefix_sharing: bool = True) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_length = max_length or model.config.max_position_embeddings
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        if bos is None and eos is None:
            raise ValueError("the tokenizer has neither a BOS nor an EOS token to condition empty contexts on")
        self.prefix_token_id = bos if bos is not None else eos
        self.prefix_sharing = prefix_sharing
        self.device = next(model.parameters()).device

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=bool(self.tokenizer.add_bos_token))

    def _logits_at(self, ids: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, cache: Any = None) -> torch.Tensor:
        h = self.model(ids, cache=cache, hidden_only=True)  # [B, T, d]
        return self.model.lm_head(h[rows, cols])

    def score(self, pairs: Sequence[Pair], batch_size: int = 1) -> list[tuple[float, bool]]:
        if not self.prefix_sharing:
            return score_naive(self._logits_at, pairs, self.max_length, batch_size, device=self.device)
        return score_shared(self._logits_at, self.model, pairs, self.max_length, batch_size, self.device)

    def generate_until(self, requests: Sequence[tuple[str, dict[str, Any]]], batch_size: int = 1) -> list[str]:
        from tinyllm.infer.engine import LLM
        from tinyllm.infer.sampling_params import SamplingParams

        llm = LLM(self.model, self.tokenizer, max_model_len=self.max_length, max_num_seqs=max(batch_size, 1))
        prompts, params = [], []
        for context, kw in requests:
            n = int(kw.get("max_gen_toks", 256))
            prompts.append(self.encode(context)[-(self.max_length - n):])
            params.append(SamplingParams(max_tokens=n, stop=list(kw.get("until", [])) or None,
                                         temperature=float(kw.get("temperature", 0.0)),
                                         seed=kw.get("seed")))
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [cut_at_stops(o.outputs[0].text, kw.get("until", [])) for o, (_, kw) in zip(outs, requests)]


@torch.no_grad()
def score_shared(logits_at: LogitsAt, model: torch.nn.Module, pairs: Sequence[Pair],
                 max_length: int, batch_size: int, device: torch.device | str) -> list[tuple[float, bool]]:
    """Requests grouped by context. A group whose continuations are one token each is one row (the context):
    its last position scores every choice; such rows are batched, a batch's common prefix run once. Other groups prefill the context once
    into a KV cache, repeat it over the choices, and run only the continuations. Requests that need left
    truncation go through `score_naive`."""
    from tinyllm.infer.kv_cache import ContiguousKVCache

    out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    groups: dict[tuple[int, ...], list[int]] = {}
    naive = []
    for i, (ctx, cont) in enumerate(pairs):
        if not ctx or not cont:
            raise ValueError(f"empty context or continuation ({len(ctx)}, {len(cont)} tokens)")
        if len(ctx) + len(cont) > max_length + 1 or len(ctx) > max_length:
            naive.append(i)
        else:
            groups.setdefault(tuple(ctx), []).append(i)
    for i, r in zip(naive, score_naive(logits_at, [pairs[i] for i in naive], max_length, batch_size, device=device)):
        out[i] = r
    single = [(c, m) for c, m in groups.items() if all(len(pairs[i][1]) == 1 for i in m)]
    multi = [(c, m) for c, m in groups.items() if not all(len(pairs[i][1]) == 1 for i in m)]
    for chunk in _prefix_chunks(single, batch_size):
        logp = _last_logprobs(logits_at, model, [c for c, _ in chunk], device)
        for r, (_, members) in enumerate(chunk):
            for i in members:
                out[i] = _pick(logp[r: r + 1], pairs[i][1])
    for ctx, members in multi:
        for s in range(0, len(members), batch_size):
            part = members[s: s + batch_size]
            conts = [pairs[i][1] for i in part]
            cache = ContiguousKVCache.for_model(model, 1, capacity=len(ctx) + max(len(c) for c in conts))
            one = torch.zeros(1, dtype=torch.long, device=device)
            head = F.log_softmax(logits_at(torch.tensor([list(ctx)], device=device), one, one + len(ctx) - 1,
                                           cache)[0].float(), -1).cpu()
            width = max(len(c) for c in conts) - 1
            rows = None
            if width > 0:
                cache.reorder(torch.zeros(len(part), dtype=torch.long, device=device))
                ids = torch.zeros((len(part), width), dtype=torch.long)
                for r, c in enumerate(conts):
                    ids[r, : len(c) - 1] = torch.tensor(c[:-1])
                r_idx = torch.arange(len(part), device=device).repeat_interleave(width)
                c_idx = torch.arange(width, device=device).repeat(len(part))
                rows = F.log_softmax(logits_at(ids.to(device), r_idx, c_idx, cache).float(), -1).cpu()
                rows = rows.view(len(part), width, -1)
            for r, (i, c) in enumerate(zip(part, conts)):
                lp = head[None] if rows is None or len(c) == 1 else torch.cat([head[None], rows[r, : len(c) - 1]])
                out[i] = _pick(lp, c)
    return out


MIN_SHARED_PREFIX = 16  # tokens; below this a separate prefix pass costs more than it saves


def common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    first = seqs[0]
    n = min(len(x) for x in seqs)
    for x in seqs[1:]:
        k = 0
        while k < n and x[k] == first[k]:
            k += 1
        n = k
    return n


def _prefix_chunks(groups: list[tuple[tuple[int, ...], list[int]]], batch_size: int) -> Iterator[list]:
    """Batches of at most batch_size contexts. Contexts in lexicographic order form runs that share most of
    their tokens (five-shot prompts of one subject: the same examples); a run is batched on its own so its
    common prefix runs once. The rest are batched longest first, so rows of a batch have similar lengths
    and padding stays small (a batch of mixed lengths pads every row to the longest)."""
    runs: list[list] = []
    for g in sorted(groups, key=lambda x: x[0]):
        if runs:
            head = runs[-1][0][0]
            lcp = common_prefix_length([head, g[0]])
            if lcp >= max(MIN_SHARED_PREFIX, min(len(head), len(g[0])) // 2):
                runs[-1].append(g)
                continue
        runs.append([g])
    loose = sorted((r[0] for r in runs if len(r) == 1), key=lambda x: -len(x[0]))
    for s in range(0, len(loose), batch_size):
        yield loose[s: s + batch_size]
    for run in runs:
        if len(run) > 1:
            run.sort(key=lambda x: -len(x[0]))
            for s in range(0, len(run), batch_size):
                yield run[s: s + batch_size]


def _last_logprobs(logits_at: LogitsAt, model: torch.nn.Module, contexts: Sequence[Sequence[int]],
                   device: torch.device | str) -> torch.Tensor:
    """log-softmax of the next-token logits after each context [len(contexts), V]. The contexts' common
    prefix (less one token, so every row keeps a token of its own) runs once into a KV cache that is then
    repeated over the rows; the rest is right-padded."""
    from tinyllm.infer.kv_cache import ContiguousKVCache

    n = len(contexts)
    shared = common_prefix_length(contexts) if n > 1 else 0
    shared = min(shared, min(len(c) for c in contexts) - 1)
    cache = None
    if shared >= MIN_SHARED_PREFIX:
        cache = ContiguousKVCache.for_model(model, 1, capacity=max(len(c) for c in contexts))
        none = torch.zeros(0, dtype=torch.long, device=device)
        logits_at(torch.tensor([list(contexts[0][:shared])], device=device), none, none, cache)
        cache.reorder(torch.zeros(n, dtype=torch.long, device=device))
    else:
        shared = 0
    tails = [c[shared:] for c in contexts]
    ids = torch.zeros((n, max(len(t) for t in tails)), dtype=torch.long)
    for r, t in enumerate(tails):
        ids[r, : len(t)] = torch.tensor(list(t))
    last = torch.tensor([len(t) - 1 for t in tails], device=device)
    rows = torch.arange(n, device=device)
    return F.log_softmax(logits_at(ids.to(device), rows, last, cache).float(), -1).cpu()


class HFLM(LM):
    """A transformers causal LM and tokenizer, scored one row per request as lm-eval's HF backend does."""

    def __init__(self, model: Any, tokenizer: Any, max_length: int | None = None) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        cfg = model.config
        self.max_length = max_length or next(
            (getattr(cfg, a) for a in ("n_positions", "max_position_embeddings", "n_ctx") if getattr(cfg, a, None)),
            2048)
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.prefix_token_id = bos if bos is not None else eos
        self.device = next(model.parameters()).device

    @classmethod
    def from_pretrained(cls, path: str, **kw: Any) -> HFLM:
        from pathlib import Path

        from transformers import AutoModelForCausalLM, AutoTokenizer

        p = Path(path)
        extra = {"gguf_file": p.name} if p.suffix == ".gguf" else {}
        where = p.parent if extra else p
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **extra)
        return cls(model, AutoTokenizer.from_pretrained(where, **extra), **kw)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def score(self, pairs: Sequence[Pair], batch_size: int = 1) -> list[tuple[float, bool]]:
        return score_naive(full_logits_at(lambda ids: self.model(ids).logits), pairs, self.max_length, batch_size,
                           device=self.device)

    @torch.no_grad()
    def generate_until(self, requests: Sequence[tuple[str, dict[str, Any]]], batch_size: int = 1) -> list[str]:
        out = []
        for context, kw in requests:
            n = int(kw.get("max_gen_toks", 256))
            ids = torch.tensor([self.encode(context)[-(self.max_length - n):]], device=self.device)
            gen = self.model.generate(ids, max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(ids),
                                      pad_token_id=self.tokenizer.eos_token_id)
            text = self.tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
            out.append(cut_at_stops(text, kw.get("until", [])))
        return out
