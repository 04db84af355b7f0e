"""FlashAttention forward in Triton: fused, tiled, online-softmax attention.

Motivation (bytes). Naive attention writes the (T, S) score matrix and reads it back at
least twice (softmax, then probs @ V). For B=1, H=32, T=S=8192 in bf16 that is 4.3 GB of
scores per pass against 0.27 GB of Q, K, V and O: at 4.3 TB/s three passes cost ~3 ms,
more than the ~1.6 ms the 1.1 TFLOP of matmuls take on an H200's tensor cores. A fused
kernel keeps a (BLOCK_M, BLOCK_N) tile of scores in registers and never writes it, so HBM
traffic falls to reading Q, K, V and writing O, and the kernel becomes compute-bound.

Pseudo-code, one program per (query tile of BLOCK_M rows, batch, head); the tile ranges
are `minillm.layers.flash.key_tile_ranges` (masked tiles only where the causal diagonal,
the window's edge or the end of the keys cuts through them; hidden tiles are skipped):

    q = load Q[tile]                        # stays in registers/SRAM
    m, l, acc = -inf, 0, 0
    for each key tile j in the ranges:
        s = q @ K[j]^T * scale * log2(e)    # exp2 is cheaper than exp: fold log2(e) in
        (mask s if the tile needs it)
        m_new = max(m, rowmax(s));  p = exp2(s - m_new);  alpha = exp2(m - m_new)
        l = alpha * l + rowsum(p);  acc = alpha * acc + p @ V[j];  m = m_new
    O[tile] = acc / l;  LSE[tile] = (m + log2(l)) * ln(2)

SPLIT_M (a tuned config): a program takes 2 x BLOCK_M/2 query rows as two independent
halves that share each loaded K/V tile, QK^T and softmax of one half interleaved with the
other's. Each K/V tile is read from shared memory once per 256 rows instead of per 128,
and while one half waits on its softmax the tensor cores run the other's matmul (the
ping-pong that FlashAttention-3 gets from two warpgroups). With causal masking or a
window each half keeps its own key ranges: both halves fold the tiles they both see,
then each the rest of its own.

Queries are the last T of S positions (bottom-right causal alignment), GQA reads kv head
h // (H / Hkv), and packed variable-length batches use `cu_seqlens` (the prefix sums of
the lengths) exactly as FlashAttention's `flash_attn_varlen_func`. The backward pass lives
in `minillm.kernels.flash_attn_bwd`; `flash_attn_func` / `flash_attn_varlen_func` (in
`minillm.kernels.flash_attn_interface`) tie both into autograd.

Tests: tests/test_flash_triton.py (fp64 naive attention; CPU interpreter and `gpu`).
Benchmark: `python -m benchmarks.attention_flash` (TFLOP/s against PyTorch SDPA).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from minillm.kernels import interpreting
from minillm.kernels.interpreter import use_interpreter_without_gpu

use_interpreter_without_gpu()  # no CUDA: the kernels below run in Triton's interpreter

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _key_tile_ranges(
    m0, T, S, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
):  # fmt: skip
    """The kernel's copy of `minillm.layers.flash.key_tile_ranges` (same names)."""
    m1 = tl.minimum(m0 + BLOCK_M, T)
    off = S - T
    if CAUSAL:
        hi = tl.minimum(m1 + off, S)
        full_end = tl.minimum(m0 + off + 1, S)
        if HAS_WINDOW:
            lo = tl.maximum(m0 + off - window + 1, 0)
            full_lo = tl.maximum(m1 + off - window, 0)
        else:
            lo = m0 * 0
            full_lo = m0 * 0
    else:
        hi = m0 * 0 + S
        full_end = m0 * 0 + S
        lo = m0 * 0
        full_lo = m0 * 0
    a = lo // BLOCK_N * BLOCK_N
    c = tl.maximum(a, full_end // BLOCK_N * BLOCK_N)
    b = tl.minimum(c, tl.maximum(a, tl.cdiv(full_lo, BLOCK_N) * BLOCK_N))
    return a, b, c, hi


@triton.jit
def _fold_tile(
    acc, l_i, m_i, qk, v_ptrs, cols, q_pos, S, window, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Fold one key tile's scores `qk` = q @ k^T (fp32, unscaled) and its values into
    (acc, l_i, m_i): the online-softmax step; MASKED tiles get the masks. V is loaded
    only once the scores are reduced (fewer registers live at once: no spills)."""
    if MASKED:
        ok = cols[None, :] < S
        if CAUSAL:
            ok = ok & (cols[None, :] <= q_pos[:, None])
        if HAS_WINDOW:
            ok = ok & (cols[None, :] > q_pos[:, None] - window)
        # A large finite negative instead of -inf: a row that sees no key in this tile
        # stays finite, and the next real key's alpha = exp2(-1e6 - m) wipes it out.
        qk = qk * qk_scale + tl.where(ok, 0.0, -1.0e6)
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        qk = qk - m_ij[:, None]
    else:
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        qk = qk * qk_scale - m_ij[:, None]
    p = tl.math.exp2(qk)
    alpha = tl.math.exp2(m_i - m_ij)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_tile(v_ptrs, cols, S, MASKED, DOT_FP32)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_ij


@triton.jit
def _load_tile(ptrs, cols, S, MASKED: tl.constexpr, DOT_FP32: tl.constexpr):
    """A (BLOCK_N, HEAD_DIM) tile of K or V; MASKED tiles zero the rows past the keys."""
    if MASKED:  # noqa: SIM108 (plain constexpr branches read best in a kernel)
        t = tl.load(ptrs, mask=cols[:, None] < S, other=0.0)
    else:
        t = tl.load(ptrs)
    if DOT_FP32:
        t = t.to(tl.float32)
    return t


@triton.jit
def _fwd_tiles(
    acc, l_i, m_i, q, K, V, stride_kt, stride_vt, start, end, q_pos, S, window, qk_scale,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Fold the key tiles [start, end) into (acc, l_i, m_i)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(start, end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n  # key positions of this tile
        k = _load_tile(K + cols[:, None] * stride_kt + offs_d[None, :], cols, S, MASKED, DOT_FP32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N) fp32
        acc, l_i, m_i = _fold_tile(
            acc, l_i, m_i, qk, V + cols[:, None] * stride_vt + offs_d[None, :], cols, q_pos,
            S, window, qk_scale, MASKED, CAUSAL, HAS_WINDOW, DOT_FP32, DOT_PRECISION,
        )  # fmt: skip
    return acc, l_i, m_i


@triton.jit
def _fwd_tiles_pair(
    acc0, l0, m0, q0, qpos0, acc1, l1, m1, q1, qpos1,
    K, V, stride_kt, stride_vt, start, end, S, window, qk_scale,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """`_fwd_tiles` for a query tile cut into two halves that share each K/V tile: the
    halves are independent chains (scores -> softmax -> P @ V), so the tensor cores can
    work on one half's matmuls while the other half's exponentials run."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(start, end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        k = _load_tile(K + cols[:, None] * stride_kt + offs_d[None, :], cols, S, MASKED, DOT_FP32)
        v_ptrs = V + cols[:, None] * stride_vt + offs_d[None, :]
        qk0 = tl.dot(q0, tl.trans(k), input_precision=DOT_PRECISION)
        qk1 = tl.dot(q1, tl.trans(k), input_precision=DOT_PRECISION)
        acc0, l0, m0 = _fold_tile(
            acc0, l0, m0, qk0, v_ptrs, cols, qpos0, S, window, qk_scale,
            MASKED, CAUSAL, HAS_WINDOW, DOT_FP32, DOT_PRECISION,
        )  # fmt: skip
        acc1, l1, m1 = _fold_tile(
            acc1, l1, m1, qk1, v_ptrs, cols, qpos1, S, window, qk_scale,
            MASKED, CAUSAL, HAS_WINDOW, DOT_FP32, DOT_PRECISION,
        )  # fmt: skip
    return acc0, l0, m0, acc1, l1, m1


@triton.jit
def _seq_bounds(cu_seqlens, b, seqlen, IS_VARLEN: tl.constexpr):
    """(start row, length) of sequence b: from cu_seqlens when packed, else (0, seqlen)."""
    if IS_VARLEN:
        start = tl.load(cu_seqlens + b).to(tl.int64)
        length = (tl.load(cu_seqlens + b + 1) - tl.load(cu_seqlens + b)).to(tl.int32)
    else:
        start = b.to(tl.int64) * 0
        length = b * 0 + seqlen
    return start, length


@triton.jit
def _init_rows(Q, stride_qt, r0, T, S, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
               DOT_FP32: tl.constexpr):  # fmt: skip
    """Query rows [r0, r0 + ROWS) (zeros past T), their key positions, and the empty
    online-softmax state (acc, l, m)."""
    offs_m = r0 + tl.arange(0, ROWS)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    q_pos = offs_m + (S - T)  # key position of each query row
    m_i = tl.zeros([ROWS], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
    return q, q_pos, acc, l_i, m_i


@triton.jit
def _store_rows(O, LSE, stride_ot, acc, l_i, m_i, r0, T, ROWS: tl.constexpr,
                HEAD_DIM: tl.constexpr):  # fmt: skip
    """O[rows] = acc / l and LSE[rows] = (m + log2 l) ln 2, for the rows before T."""
    offs_m = r0 + tl.arange(0, ROWS)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    acc = acc / l_i[:, None]
    tl.store(LSE + offs_m, (m_i + tl.math.log2(l_i)) * 0.6931471805599453, mask=row_ok)
    o_ptrs = O + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None])


# The lengths change from one engine step to the next: not specialized on them (a value
# not divisible by 16 would otherwise compile the kernel again, ~0.5 s, inside a step).
@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k"])
def flash_fwd_kernel(
    Q, K, V, O, LSE, cu_seqlens_q, cu_seqlens_k,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot, stride_lb, stride_lh,
    num_heads, group_size, seqlen_q, seqlen_k, window, qk_scale, seq_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, IS_VARLEN: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT_M: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    if CAUSAL:  # the longest rows (most key tiles) first: better load balance
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    hk = h // group_size  # GQA: the kv head this query head reads
    q_start, T = _seq_bounds(cu_seqlens_q, b, seqlen_q, IS_VARLEN)
    k_start, S = _seq_bounds(cu_seqlens_k, b, seqlen_k, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= T:  # this packed sequence is shorter than the longest one
        return
    b64, h64, hk64 = b.to(tl.int64), h.to(tl.int64), hk.to(tl.int64)
    Q += b64 * stride_qb + h64 * stride_qh + q_start * stride_qt
    K += b64 * stride_kb + hk64 * stride_kh + k_start * stride_kt
    V += b64 * stride_vb + hk64 * stride_vh + k_start * stride_vt
    O += b64 * stride_ob + h64 * stride_oh + q_start * stride_ot
    LSE += b64 * stride_lb + h64 * stride_lh + q_start

    a, b_, c, hi = _key_tile_ranges(m0, T, S, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    if SPLIT_M:  # two halves of the query tile, interleaved over each key tile
        HALF: tl.constexpr = BLOCK_M // 2
        q0, qpos0, acc0, l0, mx0 = _init_rows(Q, stride_qt, m0, T, S, HALF, HEAD_DIM, DOT_FP32)
        q1, qpos1, acc1, l1, mx1 = _init_rows(
            Q, stride_qt, m0 + HALF, T, S, HALF, HEAD_DIM, DOT_FP32
        )
        # Each half has its own diagonal: the halves share the tiles both see whole (up to
        # half 0's diagonal), then each folds its own remaining tiles alone, so no half
        # computes scores for a tile it cannot see (causal masks waste no tensor-core work).
        _, b0, c0, hi0 = _key_tile_ranges(m0, T, S, window, HALF, BLOCK_N, CAUSAL, HAS_WINDOW)
        _, b1, c1, hi1 = _key_tile_ranges(
            m0 + HALF, T, S, window, HALF, BLOCK_N, CAUSAL, HAS_WINDOW
        )
        b_ = tl.maximum(b0, b1)  # the first tile both halves see whole
        c0 = tl.maximum(c0, b_)
        c1 = tl.maximum(c1, c0)
        if HAS_WINDOW:  # tiles cut by either half's window edge
            acc0, l0, mx0, acc1, l1, mx1 = _fwd_tiles_pair(
                acc0, l0, mx0, q0, qpos0, acc1, l1, mx1, q1, qpos1,
                K, V, stride_kt, stride_vt, a, b_, S, window, qk_scale,
                BLOCK_N, HEAD_DIM, True, CAUSAL, HAS_WINDOW, DOT_FP32, DOT_PRECISION,
            )  # fmt: skip
        acc0, l0, mx0, acc1, l1, mx1 = _fwd_tiles_pair(  # tiles both halves see whole
            acc0, l0, mx0, q0, qpos0, acc1, l1, mx1, q1, qpos1,
            K, V, stride_kt, stride_vt, b_, c0, S, window, qk_scale,
            BLOCK_N, HEAD_DIM, False, CAUSAL, HAS_WINDOW, DOT_FP32, DOT_PRECISION,
        )  # fmt: skip
        acc0, l0, mx0 = _fwd_tiles(  # half 0: its diagonal and the end of the keys
            acc0, l0, mx0, q0, K, V, stride_kt, stride_vt, c0, hi0, qpos0, S, window, qk_scale,
            BLOCK_N, HEAD_DIM, True, CAUSAL, HAS_WINDOW, DOT_FP32, DOT_PRECISION,
        )  # fmt: skip
        acc1, l1, mx1 = _fwd_tiles(  # half 1: the tiles it still sees whole
            acc1, l1, mx1, q1, K, V, stride_kt, stride_vt, c0, c1, qpos1, S, window, qk_scale,
            BLOCK_N, HEAD_DIM, False, CAUSAL, HAS_WINDOW, DOT_FP32, DOT_PRECISION,
        )  # fmt: skip
        acc1, l1, mx1 = _fwd_tiles(  # half 1: its diagonal and the end of the keys
            acc1, l1, mx1, q1, K, V, stride_kt, stride_vt, c1, hi1, qpos1, S, window, qk_scale,
            BLOCK_N, HEAD_DIM, True, CAUSAL, HAS_WINDOW, DOT_FP32, DOT_PRECISION,
        )  # fmt: skip
        _store_rows(O, LSE, stride_ot, acc0, l0, mx0, m0, T, HALF, HEAD_DIM)
        _store_rows(O, LSE, stride_ot, acc1, l1, mx1, m0 + HALF, T, HALF, HEAD_DIM)
    else:
        q, q_pos, acc, l_i, m_i = _init_rows(Q, stride_qt, m0, T, S, BLOCK_M, HEAD_DIM, DOT_FP32)
        if HAS_WINDOW:  # tiles cut by the window's lower edge
            acc, l_i, m_i = _fwd_tiles(
                acc, l_i, m_i, q, K, V, stride_kt, stride_vt, a, b_, q_pos, S, window, qk_scale,
                BLOCK_N, HEAD_DIM, True, CAUSAL, HAS_WINDOW, DOT_FP32, DOT_PRECISION,
            )  # fmt: skip
        acc, l_i, m_i = _fwd_tiles(  # tiles every row sees whole: no mask
            acc, l_i, m_i, q, K, V, stride_kt, stride_vt, b_, c, q_pos, S, window, qk_scale,
            BLOCK_N, HEAD_DIM, False, CAUSAL, HAS_WINDOW, DOT_FP32, DOT_PRECISION,
        )  # fmt: skip
        acc, l_i, m_i = _fwd_tiles(  # the diagonal and the end of the keys
            acc, l_i, m_i, q, K, V, stride_kt, stride_vt, c, hi, q_pos, S, window, qk_scale,
            BLOCK_N, HEAD_DIM, True, CAUSAL, HAS_WINDOW, DOT_FP32, DOT_PRECISION,
        )  # fmt: skip
        _store_rows(O, LSE, stride_ot, acc, l_i, m_i, m0, T, BLOCK_M, HEAD_DIM)


# On the GPU, the tile sizes and pipeline depth are tuned per head_dim, mask kind and length
# (Hopper: 128-row query tiles over 64/128-key tiles, 8 warps, 3-4 stages of prefetch; the
# configs compile for sm_90 with no or a few bytes of register spills at head_dim 128, see
# `python -m minillm.kernels.compile_check`). SPLIT_M runs a 256-row tile as two 128-row
# halves over each K/V tile: two independent chains of matmul -> softmax -> matmul, which
# the warps interleave (one half's exponentials while the other's matmuls run: what
# FlashAttention-3 schedules by hand), and each K/V tile is loaded once for 256 queries.
# On an H100 at head_dim 128, N = 4096-8192, non-causal, it ran at 550-569 TFLOP/s against
# 490-497 for the best 128-row config (2026-12-07). Few configs: each one costs a compile.
FWD_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "SPLIT_M": False}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "SPLIT_M": False}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "SPLIT_M": False}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 256, "BLOCK_N": 64, "SPLIT_M": True}, num_warps=8, num_stages=3),
]
FWD_KEY = ["HEAD_DIM", "CAUSAL", "HAS_WINDOW", "IS_VARLEN", "seq_bucket"]
flash_fwd_kernel_tuned = (
    None if interpreting() else triton.autotune(FWD_CONFIGS, key=FWD_KEY)(flash_fwd_kernel)
)


def bht_strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, head, token) strides: (B, H, T, D) dense, or (N, H, D) packed (batch via offsets)."""
    return (0, t.stride(1), t.stride(0)) if varlen else (t.stride(0), t.stride(1), t.stride(2))


def seq_bucket(n: int) -> int:
    """Autotuning key for a length: the next power of two (so 4000 and 4096 share a config)."""
    return 1 << max(4, (max(n, 1) - 1).bit_length())


def last_dim_contiguous(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t if t.stride(-1) == 1 else t.contiguous() for t in ts]


def flash_attn_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    window: int | None,
    scale: float,
    cu_seqlens: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_seqlens: tuple[int, int] | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    out: torch.Tensor | None = None,
    split_m: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel on checked inputs; returns (o, lse), lse fp32 natural log.

    Dense: q (B, H, T, D), k/v (B, Hkv, S, D) -> o like q, lse (B, H, T).
    Packed (`cu_seqlens` given): q (Nq, H, D), k/v (Nk, Hkv, D) -> o like q, lse (H, Nq).
    `out` (like q, last dim contiguous) receives o instead of a new tensor. With explicit
    block sizes, `split_m` runs the query tile as two interleaved halves (as the tuned
    configs with SPLIT_M do)."""
    varlen = cu_seqlens is not None
    q, k, v = last_dim_contiguous(q, k, v)
    # o keeps q's memory layout, e.g. (B, T, H, D) seen as (B, H, T, D); or the caller's `out`
    o = torch.empty_like(q) if out is None else out
    H, Hkv, D = q.shape[1], k.shape[1], q.shape[-1]
    if varlen:
        B, (T, S), (cu_q, cu_k) = cu_seqlens[0].numel() - 1, max_seqlens, cu_seqlens
        lse = torch.empty(H, q.shape[0], dtype=torch.float32, device=q.device)  # (H, Nq)
        lse_strides = (0, lse.stride(0))
    else:
        B, T, S = q.shape[0], q.shape[2], k.shape[2]
        cu_q = cu_k = q  # unused (IS_VARLEN is False)
        lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)  # (B, H, T)
        lse_strides = (lse.stride(0), lse.stride(1))
    args = (
        q, k, v, o, lse, cu_q, cu_k,
        *bht_strides(q, varlen), *bht_strides(k, varlen), *bht_strides(v, varlen),
        *bht_strides(o, varlen), *lse_strides,
        H, H // Hkv, T, S, window or 0, scale * LOG2E, seq_bucket(T),
    )  # fmt: skip
    flags = dict(
        HEAD_DIM=D,
        CAUSAL=causal,
        HAS_WINDOW=window is not None,
        IS_VARLEN=varlen,
        DOT_FP32=interpreting() and q.dtype == torch.bfloat16,  # bf16 dot is broken there
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 stays fp32
    )
    if flash_fwd_kernel_tuned is not None and block_m is None and block_n is None:
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)  # noqa: E731
        flash_fwd_kernel_tuned[grid](*args, **flags)
    else:
        bm, bn = block_m or 64, block_n or 64
        flash_fwd_kernel[(triton.cdiv(T, bm), B * H)](
            *args, **flags, BLOCK_M=bm, BLOCK_N=bn, SPLIT_M=split_m
        )
    return o, lse
