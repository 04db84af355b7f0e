"""Attention for a whole engine step in one kernel: prompt chunks and decodes, over paged K/V.

Motivation (launches). An engine step mixes sequences that decode one token with sequences
that bring a chunk of their prompt. Handled apart (`minillm.layers.attention_metadata`),
each layer launches a paged decode kernel for the first, then gathers every chunk's keys
and values out of the pool into contiguous copies and runs FlashAttention on them: four or
five launches per layer, and copies of K/V that the kernel reads once anyway. Yet a decode
is just a chunk of one query. This kernel (the idea of vLLM's "unified" Triton attention)
takes every sequence of the step at once and reads each key in place through the
sequence's block table:

    for each program (a block of BLOCK_Q queries of sequence b, kv head hk):
        T = queries of b, S = its keys (the queries are the last T of them)
        q = Q[queries of the block, the G query heads of hk]   (BLOCK_Q * G rows x D)
        for key positions p = 0 .. (the block's last query position), BLOCK_N at a time:
            slot = block_tables[b, p // PAGE] * PAGE + p % PAGE       (gather through pages)
            k, v = k_cache.flat[slot, hk], v_cache.flat[slot, hk]
            s = q k^T * scale, masked to p <= query position (and inside the window)
            online softmax update of (m, l, acc)                      (as in FlashAttention)
        O[rows] = acc / l

The G query heads that share a kv head (grouped-query attention) are rows of one program,
so each key and value is read once per group rather than once per query head, and a
decode (one query) still fills G rows of the tile. Each program holds 64 rows:
BLOCK_Q = 64 / G queries (G padded to a power of two).

A table maps each program to its (sequence, first query): built on the host from the
query lengths the scheduler already knows, so nothing is read back from the GPU.

Tests: tests/test_unified_attention.py (fp64 dense attention over the same pages).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from minillm.kernels import interpreting
from minillm.kernels.interpreter import use_interpreter_without_gpu
from minillm.kernels.paged_attention import check_queries_and_pool

from minillm.cache.paged import check_paged_inputs

use_interpreter_without_gpu()

# Query rows of one program (queries x the query heads of one kv head) and keys per tile.
# Measured on an H200 (1B shape, a 448-query chunk beside 64 decodes): 64 rows over
# 128-key tiles beat 128 rows over 64 keys at a 4096-token context (152 vs 198 us: twice
# the programs to spread over the SMs) and lose a little at 1024 (111 vs 99 us).
UNIFIED_ROWS = 64


def unified_block_q(group_size: int) -> int:
    """Queries per program for `group_size` query heads per kv head: UNIFIED_ROWS rows of
    (query, head) pairs, the group padded to a power of two. The engine builds its
    program table with it."""
    return max(1, UNIFIED_ROWS // triton.next_power_of_2(group_size))


@triton.jit
def unified_attention_kernel(
    Q, KC, VC, O, block_tables, cu_seqlens_q, context_lens, prog_seq, prog_start,
    stride_qn, stride_qh, stride_cb, stride_cp, stride_ch, stride_bt, stride_on, stride_oh,
    group_size, window, qk_scale,
    HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr,
    GROUP_PAD: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Program (pid, hk): BLOCK_Q queries of one sequence x the query heads of kv head hk,
    as BLOCK_Q * GROUP_PAD rows (row r: query r // GROUP_PAD, head r % GROUP_PAD of the
    group), so each key and value tile is read once for the whole group (GQA)."""
    pid, hk = tl.program_id(0), tl.program_id(1)
    b = tl.load(prog_seq + pid)
    m0 = tl.load(prog_start + pid)  # the block's first query, counted within sequence b
    q_begin = tl.load(cu_seqlens_q + b)
    T = tl.load(cu_seqlens_q + b + 1) - q_begin
    S = tl.load(context_lens + b)
    r = tl.arange(0, BLOCK_Q * GROUP_PAD)
    offs_m = m0 + r // GROUP_PAD  # the query of each row
    g = r % GROUP_PAD
    h = hk * group_size + g  # its query head
    row_ok = (offs_m < T) & (g < group_size)
    q_pos = S - T + offs_m  # positions of the queries
    offs_d = tl.arange(0, HEAD_DIM)
    rows = (q_begin + offs_m).to(tl.int64)
    q = tl.load(
        Q + rows[:, None] * stride_qn + h[:, None] * stride_qh + offs_d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    if DOT_FP32:
        q = q.to(tl.float32)
    KC += hk.to(tl.int64) * stride_ch
    VC += hk.to(tl.int64) * stride_ch
    table = block_tables + b.to(tl.int64) * stride_bt
    end = tl.minimum(S, S - T + m0 + BLOCK_Q)  # past the block's last query: never visible
    if HAS_WINDOW:  # noqa: SIM108
        start = tl.maximum(S - T + m0 - window + 1, 0)  # the first query's first key
    else:
        start = S * 0
    m_i = tl.zeros([BLOCK_Q * GROUP_PAD], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_Q * GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    for start_n in range(start, end, BLOCK_N):
        pos = start_n + tl.arange(0, BLOCK_N)
        key_ok = pos < end
        page = tl.load(table + pos // PAGE_SIZE, mask=key_ok, other=0).to(tl.int64)
        slot = page * stride_cb + (pos % PAGE_SIZE) * stride_cp  # (BLOCK_N,) offsets
        k = tl.load(KC + slot[:, None] + offs_d[None, :], mask=key_ok[:, None], other=0.0)
        v = tl.load(VC + slot[:, None] + offs_d[None, :], mask=key_ok[:, None], other=0.0)
        if DOT_FP32:
            k, v = k.to(tl.float32), v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        visible = key_ok[None, :] & (pos[None, :] <= q_pos[:, None])
        if HAS_WINDOW:
            visible &= pos[None, :] > q_pos[:, None] - window
        qk += tl.where(visible, 0.0, -1.0e6)  # finite: a row with no visible key stays NaN-free
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_ij
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = O + rows[:, None] * stride_on + h[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])


def program_table(
    query_lens: list[int], block_m: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence, first query) of every program: cdiv(T_b, block_m) programs for sequence b."""
    seqs, starts = [], []
    for b, t in enumerate(query_lens):
        for m0 in range(0, t, block_m):
            seqs.append(b)
            starts.append(m0)
    as_tensor = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
    return as_tensor(seqs), as_tensor(starts)


def unified_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    query_lens: list[int] | None,
    window: int | None = None,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    block_q: int | None = None,
    block_n: int = 128,
    programs: tuple[torch.Tensor, torch.Tensor] | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Causal attention of a packed step: q (N, H, D) holds sequence b's T_b queries in rows
    cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1, the last T_b of its context_lens[b] keys,
    which live in k_cache/v_cache (num_blocks, block_size, Hkv, D) through block_tables
    (B, max_blocks). `query_lens` is the host copy of T_b (no device sync). -> (N, H, D),
    written into `out` when given. The new tokens' K/V must already be in the pool.
    `programs`: `program_table(query_lens, block_m)` made beforehand (e.g. uploaded with the
    step's other metadata).

    Inside a CUDA graph (`minillm.engine.full_graphs`) nothing may depend on the step:
    there `query_lens` is None and `programs` is a fixed-length table whose unused entries
    name a sequence of no queries and no keys (its programs store nothing)."""
    if q.dim() != 3:
        raise ValueError(f"q must be packed (N, H, D), got {tuple(q.shape)}")
    N, H, D = q.shape
    page, Hkv = k_cache.shape[1:3]
    if query_lens is None and programs is None:
        raise ValueError("without query_lens, the program table must be given")
    B = block_tables.shape[0] if query_lens is None else len(query_lens)
    if block_tables.shape[0] != B or context_lens.shape[0] != B or cu_seqlens_q.numel() != B + 1:
        raise ValueError(
            f"{B} sequences: block_tables {tuple(block_tables.shape)}, context_lens "
            f"{tuple(context_lens.shape)} and cu_seqlens_q {tuple(cu_seqlens_q.shape)} disagree"
        )
    if query_lens is not None and sum(query_lens) != N:
        raise ValueError(f"the query lengths add up to {sum(query_lens)}, q has {N} rows")
    check_paged_inputs(k_cache, v_cache, block_tables, context_lens, check_bounds=False)
    check_queries_and_pool(q, k_cache, v_cache, window)
    q = q if q.stride(-1) == 1 else q.contiguous()
    out = torch.empty_like(q) if out is None else out
    block_q = block_q or unified_block_q(H // Hkv)
    prog_seq, prog_start = programs or program_table(query_lens, block_q, q.device)
    if prog_seq.numel() == 0:
        return out
    qk_scale = (D**-0.5 if scale is None else scale) * 1.4426950408889634  # log2(e) folded in
    unified_attention_kernel[(prog_seq.numel(), Hkv)](
        q, k_cache, v_cache, out, block_tables, cu_seqlens_q, context_lens, prog_seq, prog_start,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        H // Hkv, window or 0, qk_scale,
        HEAD_DIM=D, PAGE_SIZE=page, BLOCK_Q=block_q, GROUP_PAD=triton.next_power_of_2(H // Hkv),
        BLOCK_N=block_n, HAS_WINDOW=window is not None,
        DOT_FP32=interpreting() and q.dtype == torch.bfloat16,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps or 4,
        num_stages=num_stages or 3,
    )  # fmt: skip
    return out
