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
            part += x[m-block, k0 + 8i + j] @ ((packed >> 4j) & 15 - zero[g])
        acc += part * scale[g]                                       # one scale per column
    out[m-block, n-block] (+)= acc      # atomic add of the SPLIT_K partial sums in fp32

A single row (batch 1, decoding) has a second kernel, `_w4a16_gemv_kernel`: no matrix
unit at all (a 16-row tile would be 15/16 padding); nibble j of each packed word is
multiplied by the x entries of rows 8i + j and summed down the columns on the CUDA cores,
a code turned into a float by a bit trick rather than a conversion, the zero point taken
out of the inner loop; each SPLIT_K slice writes its partial sums to its own row of a
buffer that one reduction adds up (no zero-fill, no atomics). The tuner times both
kernels' candidates for M = 1 and keeps the faster (on an H200 the one-row kernel won at
every shape but 4096 -> 11008).

Split-K is what makes batch 1-16 fast: with only N/BLOCK_N column blocks there are too
few programs to keep every SM streaming weights, so K is cut into SPLIT_K slices too.
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
    def _w4a16_kernel(
        x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr,
        M, N, K,
        stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_zg, stride_om,
        GROUP_SIZE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
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
            scale = tl.load(s_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0)
            zero = (
                tl.load(z_ptr + g * stride_zg + offs_n // 8, mask=mask_n, other=0) >> z_shift
            ) & 0xF
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for j in tl.static_range(8):  # nibble j holds rows k0 + 8i + j
                w = ((packed >> (4 * j)) & 0xF) - zero[None, :]  # (BLOCK_K/8, BLOCK_N) in [-15, 15]
                xk = k0 + offs_p * 8 + j
                xj = tl.load(
                    x_ptr + offs_m[:, None] * stride_xm + xk[None, :] * stride_xk,
                    mask=mask_m[:, None],
                    other=0.0,
                )  # (BLOCK_M, BLOCK_K/8)
                if DOT_FP32:
                    if IEEE:
                        part += tl.dot(xj.to(tl.float32), w.to(tl.float32), input_precision="ieee")
                    else:
                        part += tl.dot(xj.to(tl.float32), w.to(tl.float32))
                else:
                    part += tl.dot(xj, w.to(xj.dtype))  # codes minus zero are exact in fp16/bf16
            acc += part * scale.to(tl.float32)[None, :]
        out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        mask = mask_m[:, None] & mask_n[None, :]
        if SPLIT_K == 1:
            tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.atomic_add(out, acc, mask=mask)

    @triton.jit
    def _w4a16_gemv_kernel(
        x_ptr, qw_ptr, s_ptr, z_ptr, part_ptr,
        N, K,
        stride_xk, stride_qk, stride_qn, stride_sg, stride_zg, stride_ps,
        GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr,
    ):  # fmt: skip
        """One row: part[pid_k, n-block] = sum over this program's K slice of x[k] w[k, n],
        on the CUDA cores, with the arithmetic per code cut to the bone:

        - the packed tile is never reshaped: nibble j of every word is multiplied by the
          x entries of rows 8i + j (a strided slice of x, which stays in cache);
        - a code becomes a float without a conversion instruction: the bits
          0x4B000000 | code read as fp32 are 2^23 + code, so one subtraction gives it;
        - the zero point leaves the inner loop: sum_k x_k (q_k - z) = sum_k x_k q_k
          - z sum_k x_k, and the per-row sums are reduced across the tile only once."""
        pid_n, pid_k = tl.program_id(0), tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        offs_p = tl.arange(0, BLOCK_K // 8)  # packed rows of one K block
        z_shift = (offs_n % 8) * 4
        n_iters = K // BLOCK_K
        per_split = tl.cdiv(n_iters, SPLIT_K)
        it_end = tl.minimum((pid_k + 1) * per_split, n_iters)
        acc = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.float32)
        for it in range(pid_k * per_split, it_end):
            k0 = it * BLOCK_K
            g = k0 // GROUP_SIZE  # the whole block lies in one group
            packed = tl.load(
                qw_ptr + (k0 // 8 + offs_p)[:, None] * stride_qk + offs_n[None, :] * stride_qn,
                mask=mask_n[None, :],
                other=0,
            )  # (BLOCK_K/8, BLOCK_N) int32
            zero = (
                tl.load(z_ptr + g * stride_zg + offs_n // 8, mask=mask_n, other=0) >> z_shift
            ) & 0xF
            scale = tl.load(s_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0)
            part = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.float32)
            xsum = tl.zeros((BLOCK_K // 8,), dtype=tl.float32)
            for j in tl.static_range(8):
                xj = tl.load(x_ptr + (k0 + offs_p * 8 + j) * stride_xk).to(tl.float32)
                bits = ((packed >> (4 * j)) & 0xF) | 0x4B000000
                q = bits.to(tl.float32, bitcast=True) - 8388608.0  # exact: the code
                part += xj[:, None] * q
                xsum += xj
            zf = zero.to(tl.float32)
            acc += (part - xsum[:, None] * zf[None, :]) * scale.to(tl.float32)[None, :]
        tl.store(part_ptr + pid_k * stride_ps + offs_n, tl.sum(acc, axis=0), mask=mask_n)


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 3
    gemv: bool = False  # the one-row kernel (M = 1; block_m unused)


def _gemv_configs() -> list[KernelConfig]:
    """Candidates for M <= 16: one BLOCK_M tile of rows, split-K for parallelism."""
    cfgs = [KernelConfig(16, bn, 128, sk) for bn in (64, 128) for sk in (1, 2, 4, 8, 16)]
    cfgs += [KernelConfig(16, 256, 128, sk, num_warps=8) for sk in (2, 4, 8, 16)]
    return cfgs


def _gemv1_configs() -> list[KernelConfig]:
    """Candidates of the one-row kernel (M = 1)."""
    return [
        KernelConfig(1, bn, bk, sk, num_warps=w, num_stages=st, gemv=True)
        for bn, bk, w in [(64, 128, 2), (128, 128, 4), (256, 128, 4), (256, 128, 8),
                          (512, 128, 8), (128, 64, 2)]
        for sk in (1, 2, 4, 8)
        for st in (3, 5)
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
    if cfg.gemv:
        if M != 1:
            raise ValueError(f"the one-row kernel takes M = 1, got M = {M}")
        part = torch.empty(cfg.split_k, N, device=x.device, dtype=torch.float32)
        _w4a16_gemv_kernel[(triton.cdiv(N, cfg.block_n), cfg.split_k)](
            x, qweight, scales, qzeros, part,
            N, K,
            x.stride(1), qweight.stride(0), qweight.stride(1),
            scales.stride(0), qzeros.stride(0), part.stride(0),
            GROUP_SIZE=group_size, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            SPLIT_K=cfg.split_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        return (part[0] if cfg.split_k == 1 else part.sum(0))[None].to(x.dtype)  # (1, N)
    if cfg.split_k == 1:
        out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    else:
        out = torch.zeros(M, N, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(N, cfg.block_n), triton.cdiv(M, cfg.block_m), cfg.split_k)
    dot_fp32 = x.dtype == torch.float32 or (interpreting() and x.dtype == torch.bfloat16)
    _w4a16_kernel[grid](
        x, qweight, scales, qzeros, out,
        M, N, K,
        x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1),
        scales.stride(0), qzeros.stride(0), out.stride(0),
        GROUP_SIZE=group_size, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        SPLIT_K=cfg.split_k, DOT_FP32=dot_fp32, IEEE=x.dtype == torch.float32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out if cfg.split_k == 1 else out.to(x.dtype)


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
