"""Continuous batching: which sequences compute which tokens in the next step.

Orca (Yu et al., OSDI 2022) schedules at the granularity of one iteration: a finished
sequence leaves the batch at once and a waiting one joins at the next step, instead of the
whole batch waiting for its longest member (static batching). vLLM adds paged KV blocks,
and Sarathi (Agrawal et al., 2023/2024) chunked prefill: every step has a token budget,
decodes take theirs first, and prompts fill the rest in chunks, so a long prompt no longer
stalls the decodes running beside it. One `schedule()` call:

  1. running sequences that decode (one token each; 1 + k with speculative decoding), in
     arrival order; when the pool has no block for one, the newest running sequence is
     preempted (its blocks freed, recomputed later) until it fits;
  2. running sequences in the middle of their prompt: the next chunk;
  3. waiting sequences, oldest first, while the budget, `max_num_seqs` and the pool allow:
     prefix-cache hits are skipped, the rest is computed in chunks.

Invariant: the block manager holds exactly the tokens whose K/V the step computes or has
computed (`allocate` the first chunk, `append_slot` the rest as they are scheduled), so a
block enters the prefix cache only in the step that writes its K/V.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from minillm.cache.block_manager import BlockManager
from minillm.engine.config import EngineConfig
from minillm.engine.sequence import Sequence, SequenceStatus


@dataclass(eq=False)  # identity: two sequences are never "equal"
class ScheduledSeq:
    """Tokens start .. start + num_tokens - 1 of `seq` are computed this step."""

    seq: Sequence
    start: int
    num_tokens: int
    slots: list[int]  # pool slots of those tokens' K/V
    num_lookahead: int = 0  # lookahead positions computed after them (decodes only)

    def __post_init__(self) -> None:
        # Whether the step reaches the end of the known tokens (so a new one is sampled).
        self.samples = self.start + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    decodes: list[ScheduledSeq] = field(default_factory=list)
    prefills: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def scheduled(self) -> list[ScheduledSeq]:
        return self.decodes + self.prefills

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_tokens + s.num_lookahead for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Scheduler:
    """Waiting and running queues over one `BlockManager` (see the module docstring)."""

    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.config = config
        self.bm = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_partial_prefills = 0  # prefill chunks that stopped short of the prompt's end
        self._reserved = 0
        self.multi_step = 1  # S when the engine runs multi-step decodes (CUDA graphs)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def lookahead(self, seq: Sequence) -> int:
        """Positions a decode may compute past its pending token this step: k draft tokens
        to verify, or S - 1 more greedy steps (multi-step); fewer near max_tokens or the
        context's end."""
        k = self.config.num_speculative_tokens
        if not k and self.multi_step > 1 and seq.params.greedy and not seq.params.has_penalties:
            k = self.multi_step - 1
        if not k:
            return 0
        left = self.config.max_model_len - seq.num_tokens
        if seq.params.max_tokens is not None:
            left = min(left, seq.params.max_tokens - seq.num_output_tokens)
        return max(0, min(k, left - 1))

    # ---- KV blocks ---------------------------------------------------------------------
    def _room(self, seq: Sequence) -> int:
        """Tokens the sequence can still add: its last block's free slots, plus the free
        blocks not reserved for this step's speculative tokens."""
        n, bs = seq.num_computed_tokens, self.bm.block_size
        return _cdiv(n, bs) * bs - n + (self.bm.num_free_blocks - self._reserved) * bs

    def _can_allocate(self, token_ids: list[int]) -> bool:
        """`can_allocate`, keeping the reserved blocks free (counting every block as new:
        hits still in use would cost nothing, so this errs on the safe side)."""
        if not self._reserved:
            return self.bm.can_allocate(token_ids)
        need = _cdiv(len(token_ids), self.bm.block_size)
        return self.bm.num_free_blocks - self._reserved >= need

    def grow(self, seq: Sequence, end: int) -> list[int]:
        """Append tokens num_computed .. end - 1 to the sequence's blocks; their slots."""
        # Engine sequences never share a partly filled block: no copy-on-write.
        return self.bm.append_slots(seq.seq_id, seq.token_ids[seq.num_computed_tokens : end])

    def preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Preemption by recompute: free the blocks, back to the front of the queue."""
        self.bm.free(seq.seq_id)
        self.running.remove(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = seq.num_draft_computed = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def free(self, seq: Sequence) -> None:
        """Release a finished (or failed) sequence's blocks."""
        if seq in self.running:
            self.running.remove(seq)
            self.bm.free(seq.seq_id)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    # ---- one step ------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        self._reserved = 0  # blocks kept free for accepted speculative tokens
        scheduled: set[int] = set()
        order = [s for s in self.running if s.is_decode] + [
            s for s in self.running if not s.is_decode
        ]
        for seq in order:  # 1. decodes, 2. prompts in the middle of their prefill
            if seq.status is not SequenceStatus.RUNNING or budget == 0:
                continue
            decode = seq.is_decode
            while self._room(seq) < 1 and seq.status is SequenceStatus.RUNNING:
                victims = [s for s in self.running if s.seq_id not in scheduled]
                self.preempt(victims[-1], out)  # the newest; maybe seq itself
            if seq.status is not SequenceStatus.RUNNING:
                continue
            room, start = self._room(seq), seq.num_computed_tokens
            n = 1 if decode else min(seq.num_tokens - start, budget, room)
            lookahead = min(self.lookahead(seq), budget - 1, room - 1) if decode else 0
            item = ScheduledSeq(seq, start, n, self.grow(seq, start + n), lookahead)
            bs = self.bm.block_size
            self._reserved += _cdiv(start + 1 + lookahead, bs) - _cdiv(start + 1, bs)
            (out.decodes if decode else out.prefills).append(item)
            self.num_partial_prefills += not item.samples
            scheduled.add(seq.seq_id)
            budget -= n + lookahead
        self._admit(out, budget)
        return out

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        """3. waiting sequences (a new static batch only once the previous one is done)."""
        cfg, bs = self.config, self.bm.block_size
        static = cfg.scheduling == "static"
        if static:
            if self.running:
                return
            budget = cfg.max_num_seqs * cfg.max_model_len  # a static batch prefills at once
            if cfg.sort_by_length:
                self.waiting = deque(sorted(self.waiting, key=lambda s: -s.num_tokens))
        while self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
            seq = self.waiting[0]
            hits = self.bm.num_prefix_hit_tokens(seq.token_ids) if cfg.enable_prefix_caching else 0
            todo = seq.num_tokens - hits
            if not cfg.enable_chunked_prefill and todo > budget:
                break
            n = min(todo, budget)
            while n >= 1 and not self._can_allocate(seq.token_ids[: hits + n]):
                # a whole prompt or nothing; or else a chunk one block shorter
                n = (_cdiv(hits + n, bs) - 1) * bs - hits if cfg.enable_chunked_prefill else 0
            if n < 1:
                break
            cached = self.bm.allocate(seq.seq_id, seq.token_ids[: hits + n])
            assert cached == hits, (cached, hits)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            seq.num_computed_tokens = seq.num_cached_tokens = seq.num_draft_computed = hits
            self.running.append(seq)
            slots = self.bm.slot_mapping(seq.seq_id, hits, hits + n)
            out.prefills.append(item := ScheduledSeq(seq, hits, n, slots))
            self.num_partial_prefills += not item.samples
            budget -= n
