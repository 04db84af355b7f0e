"""The end of a decode graph in one kernel: the greedy token, fed back as the next input.

Motivation (launches, not bytes). A captured decode step (`minillm.engine.cuda_graphs`)
ends by choosing each row's greedy token and preparing the next step on the GPU, so that
the graph can be replayed again without the host (multi-step decoding, speculative
drafts). In PyTorch that tail is twenty small kernels: the second half of the two-pass
argmax (argmax over the block maxima, gather, scale, add), then recording the token,
advancing the replay counter, and writing the next token id, position, context length and
K/V slot (a division, a gather from the block table, a select). Each moves a few hundred
bytes and costs ~2 us on an H100 even inside a graph: ~40 us a replay, as much as a whole
layer of the bundled target model. This kernel does all of it in one launch.

Pseudo-code, one program; `values`, `within` (B, NB) are the first pass's block maxima and
their positions (`minillm.sampling.block_maxima`):

    s = step[0]                                          (the replay counter)
    for each block of rows r:
        j = argmax_b values[r, b]                        (first block holding the maximum)
        best = j * CHUNK + within[r, j]                  (== logits[r].argmax(), first index)
        steps[s, r] = best;  ids[r] = best
        pos[r] += 1;  lens[r] += 1
        slots[r] = valid[r] ? table[r, min(pos[r] // PAGE, W - 1)] * PAGE + pos[r] % PAGE : -1
    barrier;  step[0] = (s + 1) % MAX_STEPS              (every thread has read s by now)

The PyTorch twin is `greedy_feedback_ref`; tests/test_engine_graphs_tail.py checks that the
kernel and the twin leave the same state (under the interpreter on a CPU, and on the GPU).
"""

from __future__ import annotations

import torch

from minillm.sampling import ARGMAX_CHUNK, block_maxima, greedy_argmax

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - platforms without triton use the PyTorch twin
    triton = None


if triton is not None:
    from minillm.kernels.interpreter import use_interpreter_without_gpu

    use_interpreter_without_gpu()

    @triton.jit
    def greedy_feedback_kernel(
        values, within, steps, step, meta, tables, valid,
        B, NB, stride_v, stride_w, stride_steps, stride_meta, stride_t, max_blocks,
        CHUNK: tl.constexpr, PAGE: tl.constexpr, MAX_STEPS: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr,
    ):  # fmt: skip
        s = tl.load(step)
        cols = tl.arange(0, BLOCK_B)
        for r0 in range(0, B, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            ok = rows < B
            mask = ok[:, None] & (cols < NB)[None, :]
            v = tl.load(values + rows[:, None] * stride_v + cols[None, :], mask=mask,
                        other=float("-inf")).to(tl.float32)  # fmt: skip
            j = tl.argmax(v, axis=1, tie_break_left=True)  # (BLOCK_R,)
            w = tl.load(within + rows * stride_w + j, mask=ok, other=0)
            best = j.to(tl.int64) * CHUNK + w.to(tl.int64)
            tl.store(steps + s * stride_steps + rows, best, mask=ok)
            tl.store(meta + rows, best.to(tl.int32), mask=ok)  # row 0: token ids
            pos = tl.load(meta + stride_meta + rows, mask=ok, other=0) + 1
            tl.store(meta + stride_meta + rows, pos, mask=ok)
            lens = tl.load(meta + 3 * stride_meta + rows, mask=ok, other=0) + 1
            tl.store(meta + 3 * stride_meta + rows, lens, mask=ok)
            index = tl.minimum(pos // PAGE, max_blocks - 1)
            block = tl.load(tables + rows.to(tl.int64) * stride_t + index, mask=ok, other=0)
            live = tl.load(valid + rows, mask=ok, other=0) != 0
            slot = tl.where(live, block * PAGE + pos % PAGE, -1)
            tl.store(meta + 2 * stride_meta + rows, slot, mask=ok)
        tl.debug_barrier()  # every thread has read the counter before it changes
        tl.store(step, (s + 1) % MAX_STEPS)


def _check(values, within, steps, step, meta, tables, valid):
    B = values.shape[0]
    if values.shape != within.shape or values.dim() != 2:
        raise ValueError(f"values and within must be (B, NB), got {tuple(values.shape)} and "
                         f"{tuple(within.shape)}")  # fmt: skip
    if meta.dtype != torch.int32 or meta.shape[0] != 4 or meta.shape[1] < B:
        raise ValueError(f"meta must be int32 (4, >= {B}), got {meta.dtype} {tuple(meta.shape)}")
    if tables.dtype != torch.int32 or tables.shape[0] < B or tables.stride(1) != 1:
        raise ValueError(f"tables must be int32 (>= {B}, W), rows contiguous")
    if steps.dtype != torch.int64 or step.dtype != torch.int64 or step.numel() != 1:
        raise ValueError("steps (MAX_STEPS, n) and step (1,) must be int64")
    if valid.shape[0] < B or within.dtype != torch.int64:
        raise ValueError("valid must cover every row and within must be int64")
    if meta.stride(1) != 1 or steps.stride(1) != 1 or values.stride(1) != 1:
        raise ValueError("meta, steps and values need contiguous rows")


def greedy_feedback(
    logits: torch.Tensor,
    steps: torch.Tensor,
    step: torch.Tensor,
    meta: torch.Tensor,
    tables: torch.Tensor,
    valid: torch.Tensor,
    page: int,
    chunk: int = ARGMAX_CHUNK,
) -> None:
    """The greedy token of each row of logits (B, V) and the next decode step's inputs, in
    place (see the module docstring): steps[step] and meta's token ids get the argmax,
    positions and context lengths advance, slots follow the block tables (-1 where not
    valid), and step advances modulo len(steps). meta is the (4, n) int32 of token ids,
    positions, slots and context lengths, rows 0..B-1 in use."""
    if triton is None:
        raise RuntimeError("triton is not installed: use greedy_feedback_ref")
    values, within = block_maxima(logits, chunk)
    _check(values, within, steps, step, meta, tables, valid)
    B, NB = values.shape
    valid_i = valid.view(torch.uint8) if valid.dtype == torch.bool else valid
    greedy_feedback_kernel[(1,)](
        values, within, steps, step, meta, tables, valid_i,
        B, NB, values.stride(0), within.stride(0), steps.stride(0), meta.stride(0),
        tables.stride(0), tables.shape[1],
        CHUNK=chunk, PAGE=page, MAX_STEPS=steps.shape[0],
        BLOCK_R=16, BLOCK_B=max(triton.next_power_of_2(NB), 2), num_warps=4,
    )  # fmt: skip


def greedy_feedback_ref(
    logits: torch.Tensor,
    steps: torch.Tensor,
    step: torch.Tensor,
    meta: torch.Tensor,
    tables: torch.Tensor,
    valid: torch.Tensor,
    page: int,
) -> None:
    """`greedy_feedback` in PyTorch (the twenty kernels it replaces on a GPU)."""
    B = logits.shape[0]
    ids, pos, slots, lens = meta[:, :B]
    best = greedy_argmax(logits)  # (B,)
    steps[:, :B].index_copy_(0, step, best[None])
    step.add_(1).remainder_(steps.shape[0])
    ids.copy_(best)
    pos.add_(1)
    lens.add_(1)
    index = (pos // page).long().clamp(max=tables.shape[1] - 1)
    block = tables[:B].gather(1, index[:, None])[:, 0]
    slots.copy_(torch.where(valid[:B] != 0, block * page + pos % page, -1))
