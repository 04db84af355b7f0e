"""FlashAttention backward in Triton: gradients without the (T, S) probability matrix.

Motivation (bytes). Autograd of naive attention saves the probabilities P (T x S per head)
and reads/writes dP and dS of the same size: for H=32, T=S=8192 in bf16 that is ~13 GB of
traffic per layer. FlashAttention-2 saves only O and the log-sum-exp (T floats per head)
and recomputes P tile by tile:

    P = exp(Q K^T * scale - LSE)          (recomputed from the saved lse)
    dV = P^T dO       dP = dO V^T
    dS = P * (dP - delta),  delta = rowsum(dO * O)   (= rowsum(P * dP), precomputed)
    dQ = dS K * scale     dK = dS^T Q * scale

Pseudo-code, two kernels and no atomics:
    dK/dV: one program per (key tile, batch, kv head); it keeps K, V and the dK, dV
           accumulators on chip and loops over every query head of its GQA group and over
           the query tiles that see its keys (causal: from the diagonal down).
    dQ:    one program per (query tile, batch, head); it loops over the key tiles of the
           forward pass, the same `key_tile_ranges` plan.
Tiles are masked only where the diagonal or the window's edge cuts through them. Padded
rows load as zeros (q = dO = 0), which makes their contributions vanish without a mask.

Tests: tests/test_flash_triton.py (against fp64 autograd). Benchmark: benchmarks/attention_flash.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from minillm.kernels import interpreting
from minillm.kernels.flash_attn import (  # switches the interpreter on when there is no GPU
    LOG2E,
    _key_tile_ranges,
    _seq_bounds,
    bht_strides,
    last_dim_contiguous,
    seq_bucket,
)


@triton.jit
def _query_tile_ranges(
    n0, T, S, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
):  # fmt: skip
    """For key tile [n0, n0 + BLOCK_N): query tiles in [a, b) and [c, hi) need a mask
    (the diagonal; the window's far edge), tiles in [b, c) see every key of the tile."""
    off = S - T
    if CAUSAL:
        lo = tl.maximum(n0 - off, 0)  # the first query that sees key n0
        full_start = tl.maximum(n0 + BLOCK_N - 1 - off, 0)  # ... that sees the whole tile
        if HAS_WINDOW:
            hi = tl.minimum(tl.maximum(n0 + BLOCK_N - 1 - off + window, 0), T)
            full_end = tl.minimum(tl.maximum(n0 - off + window, 0), T)
        else:
            hi = n0 * 0 + T
            full_end = n0 * 0 + T
    else:
        lo = n0 * 0
        full_start = n0 * 0
        hi = n0 * 0 + T
        full_end = n0 * 0 + T
    a = lo // BLOCK_M * BLOCK_M
    b = tl.minimum(tl.maximum(a, tl.cdiv(full_start, BLOCK_M) * BLOCK_M), hi)
    if HAS_WINDOW:  # noqa: SIM108
        c = tl.minimum(tl.maximum(b, full_end // BLOCK_M * BLOCK_M), hi)
    else:
        c = hi  # rows past T load as zeros and add nothing: no mask needed at the end
    return a, b, c, hi


@triton.jit
def _dkdv_tiles(
    dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_dot, start, end, k_pos, T, S, window,
    qk_scale, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(start, end, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows = start_m + offs_m
        row_ok = rows < T
        q = tl.load(
            Q + rows[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0
        )
        do = tl.load(
            DO + rows[:, None] * stride_dot + offs_d[None, :], mask=row_ok[:, None], other=0.0
        )
        if DOT_FP32:
            q, do = q.to(tl.float32), do.to(tl.float32)
        lse2 = tl.load(LSE + rows, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # (N, M)
        p_t = tl.math.exp2(s_t * qk_scale - lse2[None, :])
        if MASKED:
            q_pos = rows + (S - T)
            ok = k_pos[:, None] <= q_pos[None, :]
            if HAS_WINDOW:
                ok = ok & (k_pos[:, None] > q_pos[None, :] - window)
            p_t = tl.where(ok, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (N, M)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def flash_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, cu_seqlens_q, cu_seqlens_k,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
    stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
    stride_lb, stride_lh, num_kv_heads, group_size, seqlen_q, seqlen_k, window,
    sm_scale, qk_scale, seq_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, IS_VARLEN: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
    b = pid_bh // num_kv_heads
    hk = pid_bh % num_kv_heads
    q_start, T = _seq_bounds(cu_seqlens_q, b, seqlen_q, IS_VARLEN)
    k_start, S = _seq_bounds(cu_seqlens_k, b, seqlen_k, IS_VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= S:
        return
    b64, hk64 = b.to(tl.int64), hk.to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n[:, None] < S
    k_off = offs_n[:, None] * stride_kt + offs_d[None, :]
    K += b64 * stride_kb + hk64 * stride_kh + k_start * stride_kt
    V += b64 * stride_vb + hk64 * stride_vh + k_start * stride_vt
    k = tl.load(K + k_off, mask=col_ok, other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vt + offs_d[None, :], mask=col_ok, other=0.0)
    if DOT_FP32:
        k, v = k.to(tl.float32), v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    a, b_, c, hi = _query_tile_ranges(n0, T, S, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    for g in range(group_size):  # every query head that reads this kv head
        h64 = hk64 * group_size + g
        Qh = Q + b64 * stride_qb + h64 * stride_qh + q_start * stride_qt
        DOh = DO + b64 * stride_dob + h64 * stride_doh + q_start * stride_dot
        LSEh = LSE + b64 * stride_lb + h64 * stride_lh + q_start
        DELTAh = DELTA + b64 * stride_lb + h64 * stride_lh + q_start
        dk, dv = _dkdv_tiles(  # the diagonal
            dk, dv, k, v, Qh, DOh, LSEh, DELTAh, stride_qt, stride_dot, a, b_, offs_n, T, S,
            window, qk_scale, BLOCK_M, HEAD_DIM, True, CAUSAL, HAS_WINDOW, DOT_FP32,
            DOT_PRECISION,
        )  # fmt: skip
        dk, dv = _dkdv_tiles(  # query tiles that see the whole key tile: no mask
            dk, dv, k, v, Qh, DOh, LSEh, DELTAh, stride_qt, stride_dot, b_, c, offs_n, T, S,
            window, qk_scale, BLOCK_M, HEAD_DIM, False, CAUSAL, HAS_WINDOW, DOT_FP32,
            DOT_PRECISION,
        )  # fmt: skip
        if HAS_WINDOW:  # the window's far edge
            dk, dv = _dkdv_tiles(
                dk, dv, k, v, Qh, DOh, LSEh, DELTAh, stride_qt, stride_dot, c, hi, offs_n, T,
                S, window, qk_scale, BLOCK_M, HEAD_DIM, True, CAUSAL, HAS_WINDOW, DOT_FP32,
                DOT_PRECISION,
            )  # fmt: skip
    DK += b64 * stride_dkb + hk64 * stride_dkh + k_start * stride_dkt
    DV += b64 * stride_dvb + hk64 * stride_dvh + k_start * stride_dvt
    tl.store(
        DK + offs_n[:, None] * stride_dkt + offs_d[None, :],
        (dk * sm_scale).to(DK.dtype.element_ty),
        mask=col_ok,
    )
    tl.store(
        DV + offs_n[:, None] * stride_dvt + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=col_ok
    )


@triton.jit
def _dq_tiles(
    dq, q, do, lse2, delta, K, V, stride_kt, stride_vt, start, end, q_pos, S, window, qk_scale,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(start, end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        if MASKED:  # keys past S load as zeros; with k = 0 they add nothing to dQ
            k = tl.load(
                K + cols[:, None] * stride_kt + offs_d[None, :], mask=cols[:, None] < S, other=0.0
            )
            v = tl.load(
                V + cols[:, None] * stride_vt + offs_d[None, :], mask=cols[:, None] < S, other=0.0
            )
        else:
            k = tl.load(K + cols[:, None] * stride_kt + offs_d[None, :])
            v = tl.load(V + cols[:, None] * stride_vt + offs_d[None, :])
        if DOT_FP32:
            k, v = k.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (M, N)
        p = tl.math.exp2(s * qk_scale - lse2[:, None])
        if MASKED:  # noqa: SIM102 (constexpr flags, one per level)
            if CAUSAL:  # (without causal, only the end of the keys is masked: k = 0 there)
                ok = cols[None, :] <= q_pos[:, None]
                if HAS_WINDOW:
                    ok = ok & (cols[None, :] > q_pos[:, None] - window)
                p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def flash_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, cu_seqlens_q, cu_seqlens_k,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
    stride_dqb, stride_dqh, stride_dqt, stride_lb, stride_lh,
    num_heads, group_size, seqlen_q, seqlen_k, window, sm_scale, qk_scale, seq_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, IS_VARLEN: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    q_start, T = _seq_bounds(cu_seqlens_q, b, seqlen_q, IS_VARLEN)
    k_start, S = _seq_bounds(cu_seqlens_k, b, seqlen_k, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= T:
        return
    b64, h64, hk64 = b.to(tl.int64), h.to(tl.int64), (h // group_size).to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    Q += b64 * stride_qb + h64 * stride_qh + q_start * stride_qt
    DO += b64 * stride_dob + h64 * stride_doh + q_start * stride_dot
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(
        DO + offs_m[:, None] * stride_dot + offs_d[None, :], mask=row_ok[:, None], other=0.0
    )
    if DOT_FP32:
        q, do = q.to(tl.float32), do.to(tl.float32)
    lse_off = b64 * stride_lb + h64 * stride_lh + q_start + offs_m
    lse2 = tl.load(LSE + lse_off, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + lse_off, mask=row_ok, other=0.0)
    K += b64 * stride_kb + hk64 * stride_kh + k_start * stride_kt
    V += b64 * stride_vb + hk64 * stride_vh + k_start * stride_vt
    q_pos = offs_m + (S - T)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    a, b_, c, hi = _key_tile_ranges(m0, T, S, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    if HAS_WINDOW:
        dq = _dq_tiles(
            dq, q, do, lse2, delta, K, V, stride_kt, stride_vt, a, b_, q_pos, S, window,
            qk_scale, BLOCK_N, HEAD_DIM, True, CAUSAL, HAS_WINDOW, DOT_FP32, DOT_PRECISION,
        )  # fmt: skip
    dq = _dq_tiles(
        dq, q, do, lse2, delta, K, V, stride_kt, stride_vt, b_, c, q_pos, S, window,
        qk_scale, BLOCK_N, HEAD_DIM, False, CAUSAL, HAS_WINDOW, DOT_FP32, DOT_PRECISION,
    )  # fmt: skip
    dq = _dq_tiles(
        dq, q, do, lse2, delta, K, V, stride_kt, stride_vt, c, hi, q_pos, S, window,
        qk_scale, BLOCK_N, HEAD_DIM, True, CAUSAL, HAS_WINDOW, DOT_FP32, DOT_PRECISION,
    )  # fmt: skip
    DQ += b64 * stride_dqb + h64 * stride_dqh + q_start * stride_dqt
    tl.store(
        DQ + offs_m[:, None] * stride_dqt + offs_d[None, :],
        (dq * sm_scale).to(DQ.dtype.element_ty),
        mask=row_ok[:, None],
    )


def _configs(shapes):
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m, n, w, s in shapes
    ]


BWD_KEY = ["HEAD_DIM", "CAUSAL", "HAS_WINDOW", "IS_VARLEN", "seq_bucket"]
# dK/dV keeps K, V and two (BLOCK_N, D) fp32 accumulators on chip: narrow query tiles keep it
# within the register file (64-row tiles spill at head_dim 128 on sm_90).
DKDV_CONFIGS = _configs([(32, 128, 8, 2), (16, 128, 8, 3)])
DQ_CONFIGS = _configs([(128, 64, 8, 3), (64, 64, 4, 3)])
if interpreting():
    dkdv_kernel_tuned = dq_kernel_tuned = None
else:
    dkdv_kernel_tuned = triton.autotune(DKDV_CONFIGS, key=BWD_KEY)(flash_bwd_dkdv_kernel)
    dq_kernel_tuned = triton.autotune(DQ_CONFIGS, key=BWD_KEY)(flash_bwd_dq_kernel)


def flash_attn_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    window: int | None,
    scale: float,
    cu_seqlens: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_seqlens: tuple[int, int] | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv for the forward pass that produced (o, lse); layouts as in the forward."""
    varlen = cu_seqlens is not None
    do, q, k, v = last_dim_contiguous(do, q, k, v)
    delta = (do.float() * o.float()).sum(-1).contiguous()  # (B, H, T) or (Nq, H)
    if varlen:
        delta = delta.t().contiguous()  # (H, Nq), the layout of lse
        B, (T, S), (cu_q, cu_k) = cu_seqlens[0].numel() - 1, max_seqlens, cu_seqlens
        lse_strides = (0, lse.stride(0))
    else:
        B, T, S = q.shape[0], q.shape[2], k.shape[2]
        cu_q = cu_k = q  # unused (IS_VARLEN is False)
        lse_strides = (lse.stride(0), lse.stride(1))
    H, Hkv, D = q.shape[1], k.shape[1], q.shape[-1]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    strides = [bht_strides(t, varlen) for t in (q, k, v, do)]
    common = (window or 0, scale, scale * LOG2E, seq_bucket(max(T, S)))
    flags = dict(
        HEAD_DIM=D,
        CAUSAL=causal,
        HAS_WINDOW=window is not None,
        IS_VARLEN=varlen,
        DOT_FP32=interpreting() and q.dtype == torch.bfloat16,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    dkdv_args = (q, k, v, do, lse, delta, dk, dv, cu_q, cu_k, *sum(strides, ()),
                 *bht_strides(dk, varlen), *bht_strides(dv, varlen), *lse_strides,
                 Hkv, H // Hkv, T, S, *common)  # fmt: skip
    dq_args = (q, k, v, do, lse, delta, dq, cu_q, cu_k, *sum(strides, ()),
               *bht_strides(dq, varlen), *lse_strides, H, H // Hkv, T, S, *common)  # fmt: skip
    if dkdv_kernel_tuned is not None and block_m is None and block_n is None:
        dkdv_kernel_tuned[lambda m: (triton.cdiv(S, m["BLOCK_N"]), B * Hkv)](*dkdv_args, **flags)
        dq_kernel_tuned[lambda m: (triton.cdiv(T, m["BLOCK_M"]), B * H)](*dq_args, **flags)
    else:
        bm, bn = block_m or 64, block_n or 64
        flash_bwd_dkdv_kernel[(triton.cdiv(S, bn), B * Hkv)](
            *dkdv_args, **flags, BLOCK_M=bm, BLOCK_N=bn
        )
        flash_bwd_dq_kernel[(triton.cdiv(T, bm), B * H)](*dq_args, **flags, BLOCK_M=bm, BLOCK_N=bn)
    return dq, dk, dv
