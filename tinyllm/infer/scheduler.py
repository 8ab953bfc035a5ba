"""Iteration-level scheduling: continuous batching with chunked prefill and preemption (notes ch.06.3.c
"static vs continuous (in-flight) batching", ch.06.4.c; Yu et al. 2022 "Orca" for iteration-level
scheduling, Kwon et al. 2023 (vLLM) for preemption by recompute, Agrawal et al. 2024 "Sarathi" for chunked
prefill mixed with decodes).

Every step picks the tokens of the next forward under a token budget (`max_num_batched_tokens`) and a
sequence cap (`max_num_seqs`):
1. running sequences first, oldest first: each gets its remaining tokens (one while decoding, the next
   prefill chunk otherwise). If the pool cannot hold them, the *youngest* running sequence is preempted
   (its blocks freed; it goes back to the front of the waiting queue and is recomputed later; blocks that
   were named for prefix caching usually survive, so recompute is often a cache hit);
2. then waiting sequences in arrival order (FCFS, no overtaking) while budget and blocks last: prefix cache
   lookup, then the prompt (or the first chunk of it). After a preemption no new request is admitted that
   step, so freed blocks go to the sequences that were already running.

A finished sequence leaves the batch at once and its slot goes to the next request: that is continuous
batching. With speculative decoding a decoding sequence asks for `lookahead` extra slots (its draft tokens,
verified in the same forward); they are the first thing given up when the budget or the pool runs short.
Not covered: priorities, swapping to host memory, a waiting-time fairness policy.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from tinyllm.infer.paged import BlockManager
from tinyllm.infer.sequence import SeqStatus, Sequence


@dataclass
class SchedulerOutput:
    seqs: list[Sequence] = field(default_factory=list)
    num_new: list[int] = field(default_factory=list)  # tokens fed for each scheduled sequence
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_new)

    def __bool__(self) -> bool:
        return bool(self.seqs)


def _order(seq: Sequence) -> tuple[int, int]:
    return seq.request.arrival, seq.index


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_batched_tokens: int = 2048, max_num_seqs: int = 256,
                 enable_chunked_prefill: bool = True) -> None:
        if max_num_batched_tokens <= 0:
            raise ValueError(f"max_num_batched_tokens={max_num_batched_tokens} must be positive")
        if max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs={max_num_seqs} must be positive")
        self.bm = block_manager
        self.max_num_batched_tokens, self.max_num_seqs = max_num_batched_tokens, max_num_seqs
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A sequence that already holds its blocks (a fork)."""
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)
        self.running.sort(key=_order)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.bm.free_seq(seq)
        seq.lookahead, seq.draft_computed = 0, 0
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        queue = list(self.running)
        kept: list[Sequence] = []
        while queue:
            seq = queue.pop(0)
            pending = seq.num_tokens - seq.num_computed
            # speculative decoding: a decoding sequence also reserves slots for the draft tokens it will verify
            look = seq.lookahead if pending == 1 else 0
            n = min(pending + look, budget)
            if n <= 0 or len(out.seqs) >= self.max_num_seqs:
                seq.lookahead = 0
                kept.append(seq)  # no budget left this step: it keeps its blocks and waits a step
                continue
            while not self.bm.allocate_slots(seq, n):
                if n > pending:  # drop the speculation before preempting anyone
                    n = min(pending, budget)
                    continue
                victim = queue.pop() if queue else seq  # the youngest running sequence makes room
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is SeqStatus.WAITING:
                break  # it preempted itself: nothing younger is left to schedule
            seq.lookahead = max(n - pending, 0)
            kept.append(seq)
            out.seqs.append(seq)
            out.num_new.append(n)
            budget -= n
        self.running = kept + queue
        if out.preempted:
            return out
        admitted = False
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_table:
                blocks, hashes = self.bm.match_prefix(seq.token_ids)
                for b in blocks:
                    self.bm.incref(b)
                seq.block_table, seq.block_hashes = list(blocks), list(hashes)
                seq.num_computed = len(blocks) * self.bm.block_size
            n = seq.num_tokens - seq.num_computed
            if n > budget and not self.enable_chunked_prefill:
                self.bm.free_seq(seq)
                break
            n = min(n, budget)
            if not self.bm.allocate_slots(seq, n):
                self.bm.free_seq(seq)  # hand back the prefix hits; retried next step
                break
            self.bm.prefix_hit_tokens += seq.num_computed  # what the prefix cache spared
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            out.seqs.append(seq)
            out.num_new.append(n)
            budget -= n
            admitted = True
        if admitted:
            self.running.sort(key=_order)
        return out

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and return its blocks."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.free_seq(seq)
        seq.status = SeqStatus.FINISHED
