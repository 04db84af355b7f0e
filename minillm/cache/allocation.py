"""How much KV memory a serving system wastes: contiguous preallocation against paging.

Before PagedAttention, servers gave each request one contiguous KV region sized for the
longest possible sequence (`max_model_len` tokens), because the output length is unknown in
advance. Kwon et al. (SOSP 2023) measured that only 20-38% of that memory ever held a token:
60-80% is reserved for tokens that never come. Paging allocates a block of `block_size`
tokens only when the previous one is full, so the waste is the unfilled tail of each
sequence's last block: at most block_size - 1 tokens per sequence.

    waste = 1 - (token slots holding a token) / (token slots allocated)

measured over a simulated run of continuous batching (time-weighted: every decode step
counts), with request lengths drawn from a ShareGPT-like distribution.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from minillm.cache.block_manager import BlockManager

# Mean prompt and output lengths of the ShareGPT traces used in the vLLM paper (Fig. 11).
SHAREGPT_MEAN_PROMPT, SHAREGPT_MEAN_OUTPUT = 161, 338


def sample_request_lengths(
    n: int, max_model_len: int = 2048, seed: int = 0, sigma: float = 1.0
) -> list[tuple[int, int]]:
    """n (prompt_len, output_len) pairs: log-normal with ShareGPT's means and spread `sigma`,
    at least 1 token each, prompt + output clipped to max_model_len."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = rng.lognormvariate(math.log(SHAREGPT_MEAN_PROMPT) - sigma**2 / 2, sigma)
        o = rng.lognormvariate(math.log(SHAREGPT_MEAN_OUTPUT) - sigma**2 / 2, sigma)
        prompt = min(max(1, round(p)), max_model_len - 1)
        out.append((prompt, min(max(1, round(o)), max_model_len - prompt)))
    return out


@dataclass
class WasteReport:
    """Token slots held vs allocated, summed over every step of the simulated run."""

    tokens: int  # slots holding a token (the same for every scheme)
    contiguous_max_len: int  # each running request reserves max_model_len slots
    contiguous_exact: int  # each reserves prompt + output (an oracle knowing the length)
    paged: int  # blocks in use * block_size, from a real BlockManager
    steps: int
    per_step: list[tuple[int, int, int, int]]  # (tokens, max_len, exact, paged) per step

    def waste(self, scheme: str) -> float:
        return 1.0 - self.tokens / getattr(self, scheme)


def simulate_kv_waste(
    requests: list[tuple[int, int]],
    max_model_len: int = 2048,
    block_size: int = 16,
    max_batch: int = 32,
) -> WasteReport:
    """Continuous batching of `requests`: up to `max_batch` run at once, each decode step adds
    one token to every running request, finished requests leave and waiting ones join."""
    if any(p + o > max_model_len for p, o in requests):
        raise ValueError(f"a request is longer than max_model_len={max_model_len}")
    total_blocks = max_batch * -(-max_model_len // block_size)  # room for a full batch
    bm = BlockManager(total_blocks, block_size, enable_prefix_caching=False)
    waiting = list(enumerate(requests))[::-1]
    running: dict[int, list[int]] = {}  # id -> [prompt, output, generated]
    tokens = max_len = exact = paged = steps = 0
    per_step = []
    while waiting or running:
        while waiting and len(running) < max_batch:
            rid, (p, o) = waiting.pop()
            bm.allocate(rid, [0] * p)  # token values do not matter here
            running[rid] = [p, o, 0]
        for rid, state in running.items():  # one decode step for everyone
            bm.append_slot(rid, 0)
            state[2] += 1
        step = (
            sum(p + g for p, _, g in running.values()),
            len(running) * max_model_len,
            sum(p + o for p, o, _ in running.values()),
            (bm.num_blocks - bm.num_free_blocks) * block_size,
        )
        per_step.append(step)
        tokens, max_len, exact, paged = (a + b for a, b in zip((tokens, max_len, exact, paged),
                                                                step, strict=True))  # fmt: skip
        steps += 1
        for rid in [r for r, (_, o, g) in running.items() if g == o]:
            bm.free(rid)
            del running[rid]
    return WasteReport(tokens, max_len, exact, paged, steps, per_step)
