"""Lookahead positions: computing tokens past those the block manager holds, then keeping
the ones that turn out right.

Two techniques compute positions n, n + 1, ... of a sequence before their tokens are
final: speculative decoding (the draft's guesses, verified by the target) and multi-step
decoding (S greedy steps on the GPU, vLLM's `num_scheduler_steps`; the CPU learns the
tokens only afterwards). Their K/V must be written somewhere before the block manager
knows the tokens (a block enters the prefix cache when its tokens are appended), so the
positions follow the sequence's block table into *lookahead slots*: the free slots of its
last block, then scratch blocks past the block manager's pool,

    table = block_table + scratch blocks;   slot(p) = table[p // S] * S + p % S

Once the tokens are known, `commit_lookahead` appends the kept ones to the block manager
and copies the K/V of those that sat in scratch blocks to the blocks it hands out
(positions in the last block are already where they belong). The scheduler reserves the
blocks this may need (`Scheduler.lookahead`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from minillm.engine.model_runner import BatchRow
from minillm.engine.scheduler import ScheduledSeq, SchedulerOutput
from minillm.engine.sequence import Sequence

if TYPE_CHECKING:
    from minillm.engine.engine import LLMEngine


def lookahead_tables(engine: LLMEngine, items: list[ScheduledSeq]) -> dict[int, list[int]]:
    """Block tables extended with scratch blocks (the i-th item gets its own for this step)."""
    per, out = engine.scratch_per_seq, {}
    for i, it in enumerate(items):
        first = engine.scratch_block + i * per
        out[it.seq.seq_id] = engine.bm.block_table(it.seq.seq_id) + list(range(first, first + per))
    return out


def commit_lookahead(engine: LLMEngine, seq: Sequence, m: int, table: list[int]) -> None:
    """The next m positions of `seq` were computed in their lookahead slots (via `table`):
    add them to its blocks, and move the K/V of those that sat in scratch blocks."""
    n, bs = seq.num_computed_tokens, engine.config.block_size
    where = [table[p // bs] * bs + p % bs for p in range(n, n + m)]
    real = engine.scheduler.grow(seq, n + m)
    moved = [(a, b) for a, b in zip(where, real, strict=True) if a != b]
    for runner in engine.runners:
        runner.copy_slots([a for a, _ in moved], [b for _, b in moved])
    seq.num_computed_tokens += m


def run_multi_step(engine: LLMEngine, batch: SchedulerOutput) -> bool:
    """Run S greedy decode steps on the decode graph when the whole batch qualifies (every
    row decodes with the same lookahead S - 1); False when it does not."""
    decodes, graphs = batch.decodes, engine.runner.graphs
    L = decodes[0].num_lookahead if decodes else 0
    if not L or batch.prefills or graphs is None or not graphs.fits(len(decodes)):
        return False
    if any(it.num_lookahead != L for it in decodes):
        return False
    tables = lookahead_tables(engine, decodes)
    rows = [BatchRow(it.seq.token_ids[it.start : it.start + 1], it.start, it.slots,
                     tables[it.seq.seq_id]) for it in decodes]  # fmt: skip
    engine.runner.num_graph_steps += L + 1
    engine.num_multi_steps += 1
    tokens = graphs.run_steps(rows, L + 1).T.tolist()  # (B, L + 1)
    now = time.perf_counter()
    for it, new in zip(decodes, tokens, strict=True):
        seq = it.seq
        seq.first_scheduled_time = seq.first_scheduled_time or now
        seq.num_computed_tokens += 1
        for t in new:
            engine.append_token(seq, t, now)
            if seq.finished:
                break
        if not seq.finished:
            commit_lookahead(engine, seq, L, tables[seq.seq_id])
    return True
