"""W4A16: a matmul whose weights are 4-bit codes, dequantized inside the kernel (Triton).

Motivation (count the bytes). Decoding one token multiplies a (1, K) activation by a
(K, N) weight: 2KN flops for 2KN bytes of bf16 weights, so the GPU waits on memory, not
on its tensor cores. Stored as 4-bit codes with an fp16 scale and a 4-bit zero per group
of 128 inputs, the same weights are KN/2 + KN/64 + KN/256 bytes: ~3.8x fewer. The naive
twin `w4a16_matmul_naive` dequantizes them into a full (K, N) matrix first, which writes
and re-reads 2KN bytes and loses the gain; the kernel below dequantizes tile by tile in
registers, so only the packed bytes cross the memory bus.

Layout (GPTQ's, see `minillm.quant.packing`): qweight (K/8, N) int32 with row k of the
codes in nibble k % 8 of word row k // 8; scales (G, N) fp16; qzeros (G, N/8) int32 with
column n's zero in nibble n % 8. Rows are in group order: group g = k // group_size.

Pseudo-code, one program per (BLOCK_M rows of x, BLOCK_N columns, one of SPLIT_K slices of K):

    acc = 0
    for each K block of BLOCK_K rows (inside one group g) in this program's slice:
        packed = qweight[k0/8 : k0/8 + BLOCK_K/8, n-block]          # (BLOCK_K/8, BLOCK_N)
        for j in 0..7:                                               # nibble j = rows k0+8i+j
            part += x[m-block, k0 + 8i + j] @ (nibble j of packed - zero[g])
        acc += part * scale[g]                                       # one scale per column
    if SPLIT_K == 1: out[m-block, n-block] = acc
    else: partial[slice] = acc; the slice that finishes last adds the partials, writes out

A code becomes an exact float minus its zero point in two instructions and no shift:
nibble j (j < 4) of a word, masked in place and or-ed with 0x4B000000, reads as the fp32
2^23 + q 2^(4j); one fused multiply-add by 2^(-4j) with -(2^(23-4j) + zero) leaves
q - zero (nibbles 4..7 take the same path after one 16-bit shift of the word).

A single row (batch 1, decoding) has a second kernel, `_w4a16_gemv_kernel`: no matrix
unit at all (a 16-row tile would be 15/16 padding); nibble j of each packed word is
multiplied by the x entries of rows 8i + j and summed down the columns on the CUDA cores,
three instructions per code. The tuner times both kernels' candidates for M = 1 and
keeps the faster.

Split-K is what makes batch 1-16 fast: with only N/BLOCK_N column blocks there are too
few programs to keep every SM streaming weights, so K is cut into SPLIT_K slices too.
The slices meet in the same kernel: each stores its fp32 partial sums and counts itself
in at its tile's counter (an atomic add); the last to arrive adds the partials in slice
order (so the result does not depend on who finished first), writes the output in x's
dtype and resets the counter. One kernel per matmul: no zero-fill, no atomics on the
output, no separate reduction or cast, each of which costs a launch in a decode step.
Block sizes and SPLIT_K are tuned per shape on the GPU (timed, cached); the interpreter
runs a fixed small configuration.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from minillm.kernels import interpreting

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - platforms without triton use the naive twin
    triton = None


def unpack_int4_rows(qweight: torch.Tensor) -> torch.Tensor:
    """(K/8, N) int32 -> (K, N) int32 codes, nibble j of word row r = code row 8r + j."""
    shifts = torch.arange(0, 32, 4, device=qweight.device, dtype=torch.int32)  # (8,)
    codes = (qweight[:, None, :] >> shifts[None, :, None]) & 0xF  # (K/8, 8, N)
    return codes.reshape(-1, qweight.shape[1])


def dequantize_int4(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor,
    group_size: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The (K, N) weight scales[g] * (code - zero[g]), g = k // group_size, computed in fp32
    (fp64 for fp64 scales) and returned in `dtype` (default: scales' dtype)."""
    codes = unpack_int4_rows(qweight)  # (K, N)
    zeros = unpack_int4_rows(qzeros.t().contiguous()).t()  # (G, N)
    g = torch.arange(codes.shape[0], device=codes.device) // group_size
    compute = torch.float64 if scales.dtype == torch.float64 else torch.float32
    w = (codes - zeros[g]).to(compute) * scales[g].to(compute)
    return w.to(dtype or scales.dtype).contiguous()


def w4a16_matmul_naive(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    """x (M, K) @ dequantized W (K, N) -> (M, N) in x's dtype: the reference."""
    return x @ dequantize_int4(qweight, scales, qzeros, group_size, x.dtype)


if triton is not None:

    @triton.jit
    def _codes_minus_zero(src, c2, J: tl.constexpr):
        """Nibble J (0..3) of every word of `src`, minus the zero point, as exact fp32.

        The bits 0x4B000000 | (q << 4J) read as fp32 are 2^23 + q 2^(4J) (the code lands in
        the mantissa where it already sits: no shift); one fused multiply-add with
        2^(-4J) and c2 = -(2^(23-4J) + zero) leaves q - zero, exactly."""
        bits = (src & (0xF << (4 * J))) | 0x4B000000
        return bits.to(tl.float32, bitcast=True) * (1.0 / (1 << (4 * J))) + c2

    @triton.jit
    def _finish_split_k(
        acc, out_ptrs, part_ptrs, stride_ps, lock_ptr, mask,
        SPLIT_K: tl.constexpr,
    ):  # fmt: skip
        """Write `acc`, this program's partial sum of the output tile, so that the output
        gets the sum of all SPLIT_K slices in one kernel: each slice stores its partial
        sums, then counts itself in at the tile's lock; the slice that arrives last adds
        the partials in slice order (deterministic) and writes the output in its dtype,
        then resets the lock to 0 for the next call."""
        pid_k = tl.program_id(2)
        if SPLIT_K == 1:
            tl.store(out_ptrs, acc.to(out_ptrs.dtype.element_ty), mask=mask)
        else:
            tl.store(part_ptrs + pid_k * stride_ps, acc, mask=mask)
            tl.debug_barrier()  # every thread's partials are issued before the signal
            arrived = tl.atomic_add(lock_ptr, 1, sem="acq_rel")  # release ours, see theirs
            if arrived == SPLIT_K - 1:
                total = tl.zeros(acc.shape, dtype=tl.float32)
                for s in tl.static_range(SPLIT_K):
                    total += tl.load(
                        part_ptrs + s * stride_ps, mask=mask, other=0.0, cache_modifier=".cg"
                    )  # written by other SMs: read from L2, not a stale L1
                tl.store(out_ptrs, total.to(out_ptrs.dtype.element_ty), mask=mask)
                tl.atomic_xchg(lock_ptr, 0)

    @triton.jit
    def _w4a16_kernel(
        x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, part_ptr, lock_ptr,
        M, N, K,
        stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_zg, stride_om, stride_ps,
        GROUP_SIZE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr, DOT_FP32: tl.constexpr,
        IEEE: tl.constexpr,
    ):  # fmt: skip
        pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m, mask_n = offs_m < M, offs_n < N
        offs_p = tl.arange(0, BLOCK_K // 8)  # packed rows of one K block
        z_shift = (offs_n % 8) * 4
        n_iters = K // BLOCK_K
        per_split = tl.cdiv(n_iters, SPLIT_K)
        it_end = tl.minimum((pid_k + 1) * per_split, n_iters)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for it in range(pid_k * per_split, it_end):
            k0 = it * BLOCK_K
            g = k0 // GROUP_SIZE  # the whole block lies in one group
            packed = tl.load(
                qw_ptr + (k0 // 8 + offs_p)[:, None] * stride_qk + offs_n[None, :] * stride_qn,
                mask=mask_n[None, :],
                other=0,
            )  # (BLOCK_K/8, BLOCK_N) int32
            high = packed >> 16  # nibbles 4..7 moved to where nibbles 0..3 were
            scale = tl.load(s_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0)
            zero = (
                tl.load(z_ptr + g * stride_zg + offs_n // 8, mask=mask_n, other=0) >> z_shift
            ) & 0xF
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for j in tl.static_range(8):  # nibble j holds rows k0 + 8i + j
                c2 = -(zero.to(tl.float32) + (1 << (23 - 4 * (j % 4))))
                if j < 4:
                    w = _codes_minus_zero(packed, c2[None, :], j % 4)
                else:
                    w = _codes_minus_zero(high, c2[None, :], j % 4)
                xk = k0 + offs_p * 8 + j
                xj = tl.load(
                    x_ptr + offs_m[:, None] * stride_xm + xk[None, :] * stride_xk,
                    mask=mask_m[:, None],
                    other=0.0,
                )  # (BLOCK_M, BLOCK_K/8)
                if DOT_FP32:
                    if IEEE:
                        part += tl.dot(xj.to(tl.float32), w, input_precision="ieee")
                    else:
                        part += tl.dot(xj.to(tl.float32), w)
                else:
                    part += tl.dot(xj, w.to(xj.dtype))  # codes minus zero are exact in fp16/bf16
            acc += part * scale.to(tl.float32)[None, :]
        tile = offs_m[:, None] * stride_om + offs_n[None, :]
        _finish_split_k(
            acc, out_ptr + tile, part_ptr + tile, stride_ps,
            lock_ptr + pid_m * tl.num_programs(0) + pid_n,
            mask_m[:, None] & mask_n[None, :], SPLIT_K,
        )  # fmt: skip

    @triton.jit
    def _w4a16_gemv_kernel(
        x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, part_ptr, lock_ptr,
        N, K,
        stride_xk, stride_qk, stride_qn, stride_sg, stride_zg, stride_ps,
        GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr, PREFETCH: tl.constexpr,
    ):  # fmt: skip
        """One row: out[n-block] = sum over K of x[k] w[k, n], on the CUDA cores, with the
        arithmetic per code cut to three instructions (mask, fused multiply-add to q - zero,
        multiply-add into the sums): the packed tile is never reshaped; nibble j of every
        word is multiplied by the x entries of rows 8i + j (a strided slice of x, which
        stays in cache). With PREFETCH the next K block's words are loaded before this
        block's arithmetic, so the load is in flight while the cores work."""
        pid_n, pid_k = tl.program_id(0), tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        offs_p = tl.arange(0, BLOCK_K // 8)  # packed rows of one K block
        z_shift = (offs_n % 8) * 4
        n_iters = K // BLOCK_K
        per_split = tl.cdiv(n_iters, SPLIT_K)
        it_start = pid_k * per_split
        it_end = tl.minimum(it_start + per_split, n_iters)
        qw_tile = qw_ptr + offs_p[:, None] * stride_qk + offs_n[None, :] * stride_qn
        acc = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.float32)
        if PREFETCH:  # (the block after a slice's last is loaded in vain: clamped to K)
            first = tl.minimum(it_start, n_iters - 1)
            nxt = tl.load(qw_tile + first * (BLOCK_K // 8) * stride_qk, mask=mask_n[None, :])
        for it in range(it_start, it_end):
            k0 = it * BLOCK_K
            g = k0 // GROUP_SIZE  # the whole block lies in one group
            if PREFETCH:
                packed = nxt
                after = tl.minimum(it + 1, n_iters - 1)
                nxt = tl.load(qw_tile + after * (BLOCK_K // 8) * stride_qk, mask=mask_n[None, :])
            else:
                packed = tl.load(qw_tile + k0 // 8 * stride_qk, mask=mask_n[None, :], other=0)
            high = packed >> 16  # nibbles 4..7 moved to where nibbles 0..3 were
            zero = (
                tl.load(z_ptr + g * stride_zg + offs_n // 8, mask=mask_n, other=0) >> z_shift
            ) & 0xF
            scale = tl.load(s_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0)
            part = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.float32)
            for j in tl.static_range(8):
                c2 = -(zero.to(tl.float32) + (1 << (23 - 4 * (j % 4))))
                if j < 4:
                    w = _codes_minus_zero(packed, c2[None, :], j % 4)
                else:
                    w = _codes_minus_zero(high, c2[None, :], j % 4)
                xj = tl.load(x_ptr + (k0 + offs_p * 8 + j) * stride_xk).to(tl.float32)
                part += xj[:, None] * w
            acc += part * scale.to(tl.float32)[None, :]
        _finish_split_k(
            tl.sum(acc, axis=0), out_ptr + offs_n, part_ptr + offs_n, stride_ps,
            lock_ptr + pid_n, mask_n, SPLIT_K,
        )  # fmt: skip


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 3
    gemv: bool = False  # the one-row kernel (M = 1; block_m unused)
    prefetch: bool = False  # the one-row kernel loads the next K block before the arithmetic


def _gemv_configs() -> list[KernelConfig]:
    """Candidates for M <= 16: one BLOCK_M tile of rows, split-K for parallelism."""
    return [
        KernelConfig(16, bn, 128, sk, num_warps=w, num_stages=st)
        for bn, w in [(64, 4), (128, 4), (256, 8)]
        for sk in (1, 2, 4, 8, 16, 32)
        for st in (2, 3)
    ]


def _gemv1_configs() -> list[KernelConfig]:
    """Candidates of the one-row kernel (M = 1)."""
    return [
        KernelConfig(1, bn, 128, sk, num_warps=w, num_stages=st, gemv=True, prefetch=pf)
        for bn, w in [(128, 4), (256, 4), (256, 8), (512, 8)]
        for sk in (4, 8, 16, 32)
        for st, pf in [(1, True), (3, False)]
    ]  # fmt: skip


def _gemm_configs() -> list[KernelConfig]:
    """Candidates for M > 16 (prefill): classic tiles, no split."""
    return [
        KernelConfig(bm, bn, 128, 1, num_warps=w, num_stages=s)
        for bm, bn, w, s in [(32, 64, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3), (128, 128, 8, 3),
                             (128, 64, 4, 4), (64, 256, 8, 3)]
    ]  # fmt: skip


_TUNED: dict[tuple, KernelConfig] = {}
TUNE_TIMES: dict[tuple, dict[KernelConfig, float]] = {}  # every candidate's time (ms)
_LOCKS: dict[tuple, torch.Tensor] = {}


def _locks(n: int, device: torch.device) -> torch.Tensor:
    """n int32 counters, zero between calls (the last slice of a tile resets its own), one
    set per (device, stream, n): kernels of one stream run one after the other, so they
    can share a set; a CUDA graph captures the set of its capture stream, kept for good."""
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    key = (device, stream, n)
    if key not in _LOCKS:
        _LOCKS[key] = torch.zeros(n, device=device, dtype=torch.int32)
    return _LOCKS[key]


def kernel_supports(x: torch.Tensor, group_size: int) -> bool:
    """Whether the Triton kernel takes this input: K blocks of 128 rows inside a group."""
    if triton is None or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    return group_size % 128 == 0 and (x.is_cuda or interpreting())


def _check(x, qweight, scales, qzeros, group_size):
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (M, K), got {tuple(x.shape)}")
    K = x.shape[1]
    if qweight.dtype != torch.int32 or qweight.shape[0] * 8 != K:
        raise ValueError(
            f"qweight must be int32 (K/8, N) = ({K // 8}, N), "
            f"got {qweight.dtype} {tuple(qweight.shape)}"
        )
    N = qweight.shape[1]
    if group_size <= 0 or K % group_size:
        raise ValueError(f"group_size={group_size} must be positive and divide K={K}")
    if tuple(scales.shape) != (K // group_size, N):
        raise ValueError(
            f"scales must be (G, N) = ({K // group_size}, {N}), got {tuple(scales.shape)}"
        )
    if N % 8 or tuple(qzeros.shape) != (K // group_size, N // 8):
        raise ValueError(
            f"qzeros must be (G, N/8) = ({K // group_size}, {N // 8}), got {tuple(qzeros.shape)}"
        )


def _launch(x, qweight, scales, qzeros, group_size, cfg: KernelConfig) -> torch.Tensor:
    M, K = x.shape
    N = qweight.shape[1]
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    split = min(cfg.split_k, K // cfg.block_k)  # no slice without a K block
    # partial sums of the split-K slices (fp32); a dummy when there is no split
    part = torch.empty(split if split > 1 else 1, M, N, device=x.device, dtype=torch.float32)
    if cfg.gemv:
        if M != 1:
            raise ValueError(f"the one-row kernel takes M = 1, got M = {M}")
        grid = (triton.cdiv(N, cfg.block_n), 1, split)
        _w4a16_gemv_kernel[grid](
            x, qweight, scales, qzeros, out, part, _locks(grid[0], x.device),
            N, K,
            x.stride(1), qweight.stride(0), qweight.stride(1),
            scales.stride(0), qzeros.stride(0), part.stride(0),
            GROUP_SIZE=group_size, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            SPLIT_K=split, PREFETCH=cfg.prefetch,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        return out
    grid = (triton.cdiv(N, cfg.block_n), triton.cdiv(M, cfg.block_m), split)
    dot_fp32 = x.dtype == torch.float32 or (interpreting() and x.dtype == torch.bfloat16)
    _w4a16_kernel[grid](
        x, qweight, scales, qzeros, out, part, _locks(grid[0] * grid[1], x.device),
        M, N, K,
        x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1),
        scales.stride(0), qzeros.stride(0), out.stride(0), part.stride(0),
        GROUP_SIZE=group_size, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        SPLIT_K=split, DOT_FP32=dot_fp32, IEEE=x.dtype == torch.float32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out


def _tune(x, qweight, scales, qzeros, group_size) -> KernelConfig:
    """Time every candidate once for this shape on the GPU; keep the fastest."""
    M, K = x.shape
    key = (min(triton.next_power_of_2(M), 32), qweight.shape[1], K, group_size, x.dtype, x.device)
    if key not in _TUNED:
        from triton.testing import do_bench

        cands = _gemv_configs() if M <= 16 else _gemm_configs()
        if M == 1:
            cands += _gemv1_configs()
        times, errors = {}, []
        for cfg in cands:
            if group_size % cfg.block_k:
                continue
            try:
                times[cfg] = do_bench(
                    lambda cfg=cfg: _launch(x, qweight, scales, qzeros, group_size, cfg),
                    warmup=5, rep=20,
                )  # fmt: skip
            except Exception as e:  # a candidate this GPU cannot run (resources): skip it
                errors.append(f"{cfg}: {type(e).__name__}: {e}"[:200])
        if not times:
            raise RuntimeError("no W4A16 kernel configuration ran: " + "; ".join(errors[:3]))
        _TUNED[key] = min(times, key=times.get)
        TUNE_TIMES[key] = times
    return _TUNED[key]


def w4a16_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor,
    group_size: int,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """x (M, K) @ W (K, N) with W held as 4-bit codes (GPTQ layout) -> (M, N) in x's dtype.

    `config` fixes the block sizes (tests); by default they are tuned per shape on the
    GPU, and a small fixed configuration is used under the interpreter."""
    if triton is None:
        raise RuntimeError("triton is not installed: use w4a16_matmul_naive")
    _check(x, qweight, scales, qzeros, group_size)
    if not (x.is_cuda or interpreting()):
        raise ValueError("w4a16_matmul needs a CUDA tensor (or TRITON_INTERPRET=1 on CPU)")
    if config is None:
        if interpreting():
            block_k = next(b for b in (128, 64, 32, 16, 8) if group_size % b == 0)
            config = KernelConfig(16, 64, block_k, 2)
        else:
            config = _tune(x, qweight, scales, qzeros, group_size)
    if group_size % config.block_k:
        raise ValueError(f"block_k={config.block_k} must divide group_size={group_size}")
    return _launch(x, qweight, scales, qzeros, group_size, config)
