"""The vLLM-style engine: `LLMEngine` (add_request / step / abort, streaming) and the offline `LLM` front end
(notes ch.06.4 vLLM, ch.06.3.c continuous batching; Kwon et al. 2023).

One `step()` = schedule (continuous batching, chunked prefill, preemption; `scheduler.py`) → copy-on-write
block copies → one forward over the mixed batch on the paged KV cache (`runner.py`, `paged.py`) → fork
n > 1 requests whose prompt just finished → sample → append tokens, detokenize, check stop conditions,
free finished sequences' blocks → one `RequestOutput` per request that progressed. `LLM.generate` runs
steps until every request is done and returns the outputs in request order.

Stop conditions, in this order: a stop token id (`stop_reason` = the id), EOS unless `ignore_eos` (EOS ids
of the model config and tokenizer), a stop string in the text (the text is cut before it, `stop_reason` = the
string), `max_tokens` or the model's `max_model_len` ("length"). Stop tokens and EOS stay in `token_ids` but
not in the text. While a request streams, the last len(longest stop string) − 1 characters are held back so
that a stop string is never half-reported.

Faults: an exception that one request explains (its sampling, its detokenization) ends that request alone with
finish_reason "error"; any other (scheduler, block copies, the batched forward) raises `EngineStepError` with
the ids of the batch it hit, and `recover` fails those, audits the scheduler and block pool against the live
requests and rebuilds them (`reset`) if the fault left them inconsistent. A server keeps serving after either.

Speculative decoding (`speculative=`, a `drafters.SpeculativeConfig`): before the forward every decoding
sequence gets up to k draft tokens (prompt lookup or a draft model) in the KV slots the scheduler reserved;
the forward feeds pending token + draft for each, `speculative.verify_draft` keeps the accepted prefix plus
one target token, and the sequence's length and block table are rolled back past the rejected slots. Greedy
output is token-identical to plain decoding, sampled output has the same distribution; `stats` reports the
draft tokens proposed and accepted.

Not covered: beam search, best_of, LoRA per request, multi-device workers, async serving (see serve/).
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any

import torch

from tinyllm.infer.drafters import SpeculativeConfig, build_drafter
from tinyllm.infer.paged import BlockManager, PagedKVCache
from tinyllm.infer.runner import ModelRunner, Sampled
from tinyllm.infer.sampling_params import SamplingParams
from tinyllm.infer.scheduler import Scheduler, SchedulerOutput
from tinyllm.infer.sequence import CompletionOutput, Request, RequestOutput, SeqStatus, Sequence
from tinyllm.infer.speculative import SpecStats, verify_draft

DEFAULT_KV_CACHE_MEMORY = 1 << 30  # upper bound of the default pool (bytes)


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else [int(v) for v in value]


class EngineStepError(RuntimeError):
    """A step failed in a way no single request explains; `request_ids` are the requests of its batch (every
    request when the fault came before the batch was known) and `cause` the original exception."""

    def __init__(self, request_ids: list[str], cause: BaseException) -> None:
        super().__init__(f"engine step failed: {type(cause).__name__}: {cause}")
        self.request_ids, self.cause = request_ids, cause


class LLMEngine:
    """Continuous-batching engine over a paged KV cache.

    num_blocks or kv_cache_memory (bytes) size the pool; by default it holds max_num_seqs sequences of
    max_model_len tokens, at most 1 GiB. attention: "paged" (fast path) or "gather" (the reference).
    fused: run LLaMA-family models through `fused.FusedForward` (the model's forward is the reference).
    native: decode attention through the native CPU kernel (`cpu_kernels`, built on first use; the torch
    path is the reference and the fallback when it cannot be built).
    speculative: a `SpeculativeConfig` (or a dict of its fields, or "ngram"/"draft"); None decodes plainly.
    huge_pages: on the CPU, move the weights onto transparent huge pages (`hugepages.rehome`: the same values,
    faster weight streams; a no-op where the OS offers none).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any = None, *, block_size: int = 16,
                 num_blocks: int | None = None, kv_cache_memory: int | None = None,
                 max_num_batched_tokens: int = 2048, max_num_seqs: int = 256, enable_prefix_caching: bool = True,
                 enable_chunked_prefill: bool = True, attention: str = "paged",
                 max_model_len: int | None = None, fused: bool = True, native: bool = True,
                 speculative: SpeculativeConfig | dict[str, Any] | str | None = None,
                 huge_pages: bool = True) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        cfg = model.config
        self.max_model_len = max_model_len or cfg.max_position_embeddings
        if num_blocks is None and kv_cache_memory is None:
            per_block = PagedKVCache.bytes_per_block(model, block_size)
            wanted = max_num_seqs * -(-self.max_model_len // block_size)
            num_blocks = max(1, min(wanted, DEFAULT_KV_CACHE_MEMORY // per_block))
        if not enable_chunked_prefill and max_num_batched_tokens < self.max_model_len:
            raise ValueError(f"max_num_batched_tokens={max_num_batched_tokens} < max_model_len="
                             f"{self.max_model_len}: without chunked prefill a long prompt would never fit a step")
        self.cache = PagedKVCache.for_model(model, num_blocks, block_size, kv_cache_memory)
        self.cache.use_native(native and attention == "paged")
        self.block_manager = BlockManager(self.cache.num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_batched_tokens, max_num_seqs, enable_chunked_prefill)
        self.speculative = SpeculativeConfig.of(speculative)
        # the draft is built before the target's runner fuses its weights (a self-draft copies the target)
        self.drafter = None if self.speculative is None else build_drafter(
            self.speculative, model, self.cache, native and attention == "paged")
        self.spec_stats = SpecStats()
        self.runner = ModelRunner(model, self.cache, attention, fused, huge_pages)
        self.device = next(model.parameters()).device
        self.eos_ids = set(_ids(getattr(cfg, "eos_token_id", None)))
        if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
            self.eos_ids.add(tokenizer.eos_token_id)
        self.requests: dict[str, Request] = {}
        self._arrival = itertools.count()
        self._seq_ids = itertools.count()
        self._pending: list[RequestOutput] = []
        self._sched: SchedulerOutput | None = None  # the batch of the step in progress (which requests a fault hits)
        self.num_steps = 0

    # -------------------------------------------------------------- requests
    def add_request(self, request_id: str, prompt: str | list[int] | None = None,
                    params: SamplingParams | None = None, *, prompt_token_ids: list[int] | None = None) -> None:
        params = params or SamplingParams()
        if request_id in self.requests:
            raise ValueError(f"request_id={request_id!r} is already in use")
        text = None
        if prompt_token_ids is None:
            if isinstance(prompt, str):
                if self.tokenizer is None:
                    raise ValueError("a text prompt needs a tokenizer; pass prompt_token_ids instead")
                # as vLLM (and a transformers tokenizer) do: special-token spellings in a text prompt, e.g. a
                # rendered ChatML prompt's <|im_start|>, are the special tokens, not their characters as text
                text, prompt_token_ids = prompt, self.tokenizer.encode(prompt, allowed_special="all",
                                                                       add_special_tokens=True)
            elif prompt is not None:
                prompt_token_ids = list(prompt)
        else:
            text = prompt if isinstance(prompt, str) else None
        ids = [int(t) for t in (prompt_token_ids or [])]
        vocab = self.model.config.vocab_size
        if not ids:
            raise ValueError(f"request {request_id!r}: empty prompt")
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"request {request_id!r}: prompt token ids outside [0, {vocab}): "
                             f"min {min(ids)}, max {max(ids)}")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"request {request_id!r}: prompt of {len(ids)} tokens leaves no room under "
                             f"max_model_len={self.max_model_len}")
        need = -(-min(len(ids) + params.max_tokens, self.max_model_len) // self.cache.block_size)
        if need > self.cache.num_blocks:
            raise ValueError(f"request {request_id!r} may need {need} KV blocks but the pool has only "
                             f"{self.cache.num_blocks}; raise num_blocks/kv_cache_memory or lower max_tokens")
        if params.stop and self.tokenizer is None:
            raise ValueError(f"stop={params.stop!r}: stop strings need a tokenizer")
        req = Request(request_id, text, ids, params, next(self._arrival))
        req.seqs.append(self._new_seq(req, 0, list(ids)))
        self.requests[request_id] = req
        self.scheduler.add(req.seqs[0])

    def _new_seq(self, req: Request, index: int, token_ids: list[int]) -> Sequence:
        gen = None
        if req.params.seed is not None and not req.params.greedy:
            gen = torch.Generator(device=self.device).manual_seed(req.params.seed + index)
        seq = Sequence(next(self._seq_ids), req, index, token_ids, len(req.prompt_token_ids), generator=gen)
        if req.params.logprobs is not None:
            seq.logprobs, seq.cumulative_logprob = [], 0.0
        return seq

    def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks; its final output (finish_reason "abort") comes with the next step."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for seq in req.seqs:
            if not seq.finished:
                self.scheduler.finish(seq)
                seq.finish_reason = "abort"
        self._pending.append(self._output(req))

    def fail(self, request_id: str, error: str) -> None:
        """End a request because of a fault: as `abort`, but finish_reason "error" and `RequestOutput.error`."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        req.error = error
        for seq in req.seqs:
            if not seq.finished:
                self.scheduler.finish(seq)
                seq.finish_reason = "error"
        self._pending.append(self._output(req))

    def recover(self, request_ids: Seq[str], error: str) -> list[str]:
        """After a failed step: fail `request_ids` (the batch), then audit the scheduler and the block pool
        against the requests left; if they disagree, `reset`. Returns every request id that was failed."""
        failed = [rid for rid in request_ids if rid in self.requests]
        for rid in failed:
            self.fail(rid, error)
        self.block_manager.pending_copies.clear()  # copies for the failed batch's blocks, now freed
        if self._consistent():
            return failed
        return failed + self.reset(f"{error} (engine state reset)")

    def reset(self, error: str) -> list[str]:
        """Fail every request and rebuild the scheduler's queues and the block pool from scratch (the prefix
        cache is dropped): the way back from a fault that left the engine's bookkeeping unknown. Touches no
        sequence bookkeeping that could itself be broken. Returns the ids failed."""
        ids = list(self.requests)
        for req in self.requests.values():
            req.error = error
            for seq in req.seqs:
                if not seq.finished:
                    seq.status, seq.finish_reason = SeqStatus.FINISHED, "error"
                seq.block_table, seq.block_hashes, seq.num_computed = [], [], 0
            with contextlib.suppress(Exception):  # the caller learns of the failure from the returned ids
                self._pending.append(self._output(req))
        self.requests.clear()
        self.scheduler.waiting.clear()
        self.scheduler.running.clear()
        self.block_manager.reset()
        return ids

    def _consistent(self) -> bool:
        """Do the scheduler's queues and the pool's reference counts match the live requests' sequences?"""
        bm, sched = self.block_manager, self.scheduler
        live = [s for r in self.requests.values() for s in r.seqs if not s.finished]
        queued = list(sched.waiting) + list(sched.running)
        if sorted(id(s) for s in queued) != sorted(id(s) for s in live):
            return False
        held = [0] * bm.num_blocks
        for s in live:
            for b in s.block_table:
                held[b] += 1
        return held == bm.refcount and set(bm.free) == {b for b, n in enumerate(held) if n == 0}

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self._pending)

    @property
    def stats(self) -> dict[str, float]:
        bm = self.block_manager
        out: dict[str, float] = {
            "steps": self.num_steps, "preemptions": self.scheduler.num_preemptions,
            "prefix_hit_tokens": bm.prefix_hit_tokens, "cow_copies": bm.cow_copies,
            "free_blocks": bm.num_free_blocks, "num_blocks": bm.num_blocks}
        if self.drafter is not None:
            st = self.spec_stats
            # target_forwards counts verifications (one per speculating sequence per step)
            out.update(spec_proposed=st.proposed, spec_accepted=st.accepted, spec_verifications=st.target_forwards,
                       spec_draft_forwards=st.draft_forwards, spec_emitted=st.emitted,
                       spec_acceptance_rate=st.acceptance_rate,
                       spec_tokens_per_verification=st.tokens_per_target_forward)
        return out

    # -------------------------------------------------------------- one iteration
    def step(self) -> list[RequestOutput]:
        """One iteration. A fault that one request explains (its sampling, its detokenization) ends only that
        request (finish_reason "error", `RequestOutput.error`); any other fault raises `EngineStepError` naming
        the requests of the failed batch, with the engine left for `recover` (no output is lost)."""
        outputs, self._pending = self._pending, []
        self._sched = None
        try:
            self._step(outputs)
        except Exception as e:
            self._pending[:0] = outputs
            ids = list(self.requests) if self._sched is None else list(
                dict.fromkeys(s.request.request_id for s in self._sched.seqs))
            raise EngineStepError(ids, e) from e
        outputs += self._pending  # the requests that failed in this step
        self._pending = []
        return outputs

    def _lookahead(self, seq: Sequence) -> int:
        """Draft tokens this sequence may verify next step: k, less near max_tokens / max_model_len (a step
        emits up to k + 1 tokens), 0 unless it is decoding."""
        if seq.num_tokens - seq.num_computed != 1:
            return 0
        p = seq.request.params
        k = self.speculative.num_speculative_tokens if p.num_speculative_tokens is None else p.num_speculative_tokens
        room = min(p.max_tokens - (seq.num_tokens - seq.num_prompt_tokens), self.max_model_len - seq.num_tokens)
        return max(0, min(k, room - 1))

    def _fit_rows(self, seqs: list[Sequence]) -> None:
        """Lower the decoding sequences' lookaheads so that one step's rows (1 + lookahead each) stay within the
        runner's native step (`fast_step.max_rows`) where they would pass it. On a CPU a verification costs about
        its rows (the products are compute-bound there), and past that limit the step leaves the native path:
        SmolLM2 fp32, 8 sequences × (1 + 4) rows took 135 ms a step against 89 ms for 8 × (1 + 3) and 37 ms for
        plain decoding, so k = 4 ran slower than not speculating at all."""
        limit = getattr(self.runner.fast_step, "max_rows", None) if self.speculative.fit_native_step else None
        spec = [s for s in seqs if s.lookahead > 0]
        if limit is None or not spec or sum(1 + s.lookahead for s in spec) <= limit:
            return
        plain = sum(1 for s in seqs if s.lookahead == 0 and s.num_tokens - s.num_computed == 1)
        each = max(0, (limit - plain) // len(spec) - 1)
        for s in spec:
            s.lookahead = min(s.lookahead, each)

    def _propose(self, sched: SchedulerOutput) -> None:
        """Fill the reserved lookahead slots with draft tokens; feed 1 + len(draft) tokens per speculating
        sequence (a drafter may propose fewer than reserved; the spare slots are rolled back after the step)."""
        spec = [i for i, seq in enumerate(sched.seqs) if seq.lookahead > 0]
        if not spec:
            return
        self.spec_stats.draft_forwards += self.drafter.propose([sched.seqs[i] for i in spec])
        for i in spec:
            seq = sched.seqs[i]
            seq.draft = seq.draft[:seq.lookahead]
            sched.num_new[i] = 1 + len(seq.draft)
            self._trim(seq, seq.num_computed + sched.num_new[i])  # slots reserved for drafts not proposed

    def _trim(self, seq: Sequence, tokens: int) -> None:
        """Give back the blocks past the first `tokens` positions (fresh lookahead blocks, never shared)."""
        bm = self.block_manager
        keep = -(-tokens // bm.block_size)
        for b in seq.block_table[keep:]:
            bm.decref(b)
        del seq.block_table[keep:]

    def _step(self, outputs: list[RequestOutput]) -> None:
        if self.drafter is not None:
            for seq in self.scheduler.running:
                seq.draft, seq.draft_probs = [], None
                seq.lookahead = self._lookahead(seq)
            self._fit_rows(self.scheduler.running)
        sched = self._sched = self.scheduler.schedule()
        if not sched:
            return
        self.num_steps += 1
        bm = self.block_manager
        self.cache.copy_blocks(bm.pending_copies)
        if self.drafter is not None:
            self.drafter.copy_blocks(bm.pending_copies)
            self._propose(sched)
        bm.pending_copies.clear()
        wanted, logits = self.runner.forward(sched.seqs, sched.num_new)
        for seq, n in zip(sched.seqs, sched.num_new, strict=True):
            # a speculating sequence has computed its pending token; its draft counts once accepted
            seq.num_computed += 1 if seq.draft else n
            bm.commit_full_blocks(seq)
        seqs: list[Sequence] = []
        rows: list[int] = []
        verifying: list[tuple[Sequence, torch.Tensor]] = []
        row = 0
        for seq in wanted:
            if seq.draft:
                verifying.append((seq, logits[row:row + 1 + len(seq.draft)]))
                row += 1 + len(seq.draft)
                continue
            row += 1
            req = seq.request
            family = [seq]
            if req.params.n > 1 and not req.forked:  # prompt done: fork n samples sharing its blocks
                req.forked = True
                for i in range(1, req.params.n):
                    child = self._new_seq(req, i, list(seq.token_ids))
                    bm.fork(seq, child)
                    req.seqs.append(child)
                    self.scheduler.add_running(child)
                    family.append(child)
            seqs.extend(family)
            rows.extend([row - 1] * len(family))
        touched: dict[str, Request] = {}
        failed: dict[str, BaseException] = {}
        for seq, block in verifying:
            rid = seq.request.request_id
            try:
                self._verify(seq, block)
                touched[rid] = seq.request
            except Exception as e:  # this request's own fault (its processors, its detokenization)
                failed.setdefault(rid, e)
        for seq, smp in zip(seqs, self._sample(seqs, rows, logits), strict=True):
            rid = seq.request.request_id
            try:
                if isinstance(smp, BaseException):
                    raise smp
                if rid not in failed:
                    self._append(seq, smp)
                    touched[rid] = seq.request
            except Exception as e:  # this request's own fault (e.g. its tokens do not detokenize)
                failed.setdefault(rid, e)
        for rid, e in failed.items():
            touched.pop(rid, None)
            self.fail(rid, f"request {rid!r} failed: {type(e).__name__}: {e}")
        for req in touched.values():
            try:
                outputs.append(self._output(req))
            except Exception as e:
                self.fail(req.request_id, f"request {req.request_id!r} failed: {type(e).__name__}: {e}")
                continue
            if req.finished:
                self.requests.pop(req.request_id, None)

    def _sample(self, seqs: list[Sequence], rows: list[int], logits: torch.Tensor) -> list[Sampled | BaseException]:
        """Batched sampling; if it raises, each sequence is sampled alone (seeded generators rewound first) so
        that only the sequences whose own sampling fails get their exception instead of a token."""
        gens = [(s.generator, s.generator.get_state()) for s in seqs if s.generator is not None]
        try:
            return list(self.runner.sample(seqs, rows, logits))
        except Exception:
            for gen, state in gens:
                gen.set_state(state)
        out: list[Sampled | BaseException] = []
        for seq, row in zip(seqs, rows, strict=True):
            try:
                out.append(self.runner.sample([seq], [row], logits)[0])
            except Exception as e:
                out.append(e)
        return out

    def _verify(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Accept/reject `seq.draft` with the target's logits [1 + k, V], append the emitted tokens (stopping
        at a stop condition), roll the KV back past the rejected draft slots."""
        k = len(seq.draft)
        emitted = verify_draft(seq, logits)
        st = self.spec_stats
        st.proposed += k
        st.accepted += len(emitted) - 1
        st.target_forwards += 1
        st.emitted += len(emitted)
        seq.draft, seq.draft_probs, seq.lookahead = [], None, 0
        logp = torch.log_softmax(logits, dim=-1) if seq.logprobs is not None else None
        for i, tok in enumerate(emitted):
            smp = Sampled(tok)
            if logp is not None:
                kk = seq.request.params.logprobs
                smp.logprob = float(logp[i, tok])
                top = {}
                if kk:
                    vals, idx = torch.topk(logp[i], min(kk, logp.shape[-1]))
                    top = dict(zip(idx.tolist(), vals.tolist(), strict=True))
                top[tok] = smp.logprob
                smp.top = top
            self._append(seq, smp)
            if seq.finished:
                return  # its blocks are freed already
            if i < len(emitted) - 1:
                seq.num_computed += 1  # an accepted draft token: its K/V were written by this forward
        self._trim(seq, seq.num_computed)  # the rejected drafts' slots
        self.block_manager.commit_full_blocks(seq)
        seq.draft_computed = min(seq.draft_computed, seq.num_computed)

    def _append(self, seq: Sequence, smp: Sampled) -> None:
        p = seq.request.params
        tok = smp.token
        seq.token_ids.append(tok)
        if seq.logprobs is not None:
            seq.logprobs.append(smp.top or {})
            seq.cumulative_logprob += smp.logprob or 0.0
        reason: str | None = None
        stop_reason: int | str | None = None
        if tok in p.stop_token_ids:
            reason, stop_reason = "stop", tok
        elif not p.ignore_eos and tok in self.eos_ids:
            reason = "stop"
        if self.tokenizer is not None:
            out = seq.output_ids[:-1] if reason else seq.output_ids  # the stop token is not text
            text = self.tokenizer.decode(out, skip_special_tokens=p.skip_special_tokens)
            if p.stop and reason is None:
                hits = [(text.find(s), s) for s in p.stop if s in text]
                if hits:
                    cut, s = min(hits)
                    text, reason, stop_reason = text[:cut], "stop", s
            seq.text = text
        if reason is None and (len(seq.token_ids) - seq.num_prompt_tokens >= p.max_tokens
                               or seq.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None:
            seq.finish_reason, seq.stop_reason = reason, stop_reason
            self.scheduler.finish(seq)

    def _output(self, req: Request) -> RequestOutput:
        hold = max((len(s) for s in req.params.stop), default=1) - 1
        outs = []
        for seq in req.seqs:
            visible = seq.text
            if not seq.finished:
                visible = visible[:len(visible) - hold] if hold else visible
                visible = visible.rstrip("\ufffd")  # an incomplete UTF-8 character waits for its next byte
            delta = visible[seq.emitted_text:] if len(visible) > seq.emitted_text else ""
            seq.emitted_text = max(seq.emitted_text, len(visible))
            ids = seq.output_ids
            outs.append(CompletionOutput(
                seq.index, visible, ids, seq.cumulative_logprob,
                list(seq.logprobs) if seq.logprobs is not None else None, seq.finish_reason, seq.stop_reason,
                delta, ids[seq.emitted_tokens:]))
            seq.emitted_tokens = len(ids)
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, req.finished, req.error)


class LLM:
    """Offline batched generation: `LLM(model).generate(prompts, params)`.

    model: a model object, or anything `tinyllm.load_model` accepts (HF directory, GGUF file, short name);
    then the tokenizer comes from the same path. quantization "int8" or "int4" (group_size 32/64/128), or
    "q4_1" / "q8_0" (llama.cpp blocks written from the weights, int8-rounded activations), applies
    `quant.quantize_model` (in place, lm_head kept) before the engine is built;
    "gguf" (model a .gguf path) runs the file's Q4_0/Q4_1/Q8_0 blocks as stored (`ggml_linear`), with
    activations rounded to int8 blocks as llama.cpp does (`gguf_activations="int8"`, the fast default) or
    kept fp32 (`"fp32"`: the dequantized model's arithmetic, up to summation order).
    Other keyword arguments go to `LLMEngine`.
    """

    def __init__(self, model: torch.nn.Module | str | os.PathLike, tokenizer: Any = None, *,
                 dtype: torch.dtype | str | None = None, device: torch.device | str | None = None,
                 quantization: str | None = None, group_size: int = 128, gguf_activations: str = "int8",
                 **engine_kwargs: Any) -> None:
        from tinyllm.model.hf import load_model, resolve_model_path
        from tinyllm.tokenizer import load_tokenizer

        if gguf_activations not in ("int8", "fp32"):
            raise ValueError(f"gguf_activations={gguf_activations!r} is not 'int8' or 'fp32'")
        source = model if not isinstance(model, (str, os.PathLike)) else resolve_model_path(model)
        if isinstance(model, (str, os.PathLike)):
            path = resolve_model_path(model)
            if tokenizer is None and not (Path(path).is_dir() and not (Path(path) / "tokenizer.json").exists()):
                tokenizer = load_tokenizer(path)  # a directory without tokenizer.json serves token ids only
            model = load_model(path, dtype=dtype or torch.float32, device=device or "cpu")
        elif dtype is not None or device is not None:
            model = model.to(device=device, dtype=dtype)
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(tokenizer)
        if quantization == "gguf":
            from tinyllm.infer.ggml_linear import use_gguf_blocks

            if not (isinstance(source, (str, os.PathLike)) and Path(source).suffix == ".gguf"):
                raise ValueError(f"quantization='gguf' needs the model as a .gguf path, got "
                                 f"{source if isinstance(source, (str, os.PathLike)) else type(source).__name__!r}")
            model = use_gguf_blocks(model, source, x_q8=gguf_activations == "int8")
        elif quantization is not None:
            from tinyllm.infer.quant import quantize_model

            # lm_head stays full precision (it is usually tied to the embeddings)
            model = quantize_model(model, quantization, group_size)
        self.engine = LLMEngine(model, tokenizer, **engine_kwargs)
        self._counter = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(self, prompts: str | Seq[str] | Seq[int] | Seq[Seq[int]],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Run every prompt (text, or a list of token ids) to completion; outputs in prompt order."""
        if isinstance(prompts, str) or (isinstance(prompts, Seq) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        ids = []
        for prompt, p in zip(prompts, params, strict=True):
            rid = str(next(self._counter))
            if isinstance(prompt, str):
                self.engine.add_request(rid, prompt, p)
            else:
                self.engine.add_request(rid, None, p, prompt_token_ids=list(prompt))
            ids.append(rid)
        from tqdm.auto import tqdm

        done: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        return [done[r] for r in ids]
