"""GEMV for batch-1 decoding: y = x @ W^T for one row of activations (M == 1), in Triton.

Motivation (count the bytes). Decoding one sequence multiplies one activation row x (K,)
by each nn.Linear weight W (N, K): 2NK flops for 2NK bytes of bf16 weights, one flop per
byte, while an H100 does ~300 bf16 flops in the time it reads one byte. Nothing but the
weight stream matters: a 1B model's gate_up_proj (16384 x 2048) is 67 MB, 20 us at
3.35 TB/s, whatever the arithmetic. A matrix unit would idle on 15/16 padding rows (a
tensor-core tile has 16), so this kernel multiplies on the CUDA cores and only has to keep
every SM streaming W. cuBLAS picks a GEMM kernel for M == 1, sometimes with a split-K that
costs a second kernel for its reduction; here each program owns whole output rows, so one
launch, no partial sums in memory and no atomics.

Pseudo-code, one program per BLOCK_N output rows (cdiv(N, BLOCK_N) programs):

    acc = zeros(BLOCK_N, BLOCK_K) fp32
    for k0 in 0, BLOCK_K, 2 BLOCK_K, ... < K:
        acc += W[rows, k0 : k0 + BLOCK_K] * x[k0 : k0 + BLOCK_K]     # fp32 multiply-add
    y[rows] = sum(acc, axis=1) (+ bias)                              # rounded to x's dtype

The sum runs in another order than cuBLAS's, so the result is within fp32 accumulation
error of F.linear, not its bits. `silu_mul_gemv` is the MLP's down projection at batch 1
with SwiGLU's activation as a prologue: its input is gate_up_proj's output [gate | up]
(2F,), and each x_k = silu(gate_k) * up_k is computed while loading, rounded where
`minillm.kernels.fused_layers.silu_and_mul` rounds (the same bits), so that kernel and its
write and re-read of (F,) are gone. Config: a fixed rule per shape (`gemv_config`), no
timing and no host sync, so a call can be captured in a CUDA graph.

Tests: tests/test_gemv.py (CPU interpreter in fp32/fp16 on irregular shapes; bf16 `gpu`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from minillm.kernels import interpreting
from minillm.kernels.interpreter import use_interpreter_without_gpu

use_interpreter_without_gpu()

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def gemv_kernel(
    X, W, B, Y, N, K, stride_wn,
    HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    w_rows = W + rows.to(tl.int64)[:, None] * stride_wn  # (BLOCK_N, 1) row starts
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        if SILU_MUL:  # X is [gate | up] (2K,): silu_and_mul_kernel's math, op for op
            g = tl.load(X + cols, mask=col_ok, other=0.0)
            u = tl.load(X + K + cols, mask=col_ok, other=0.0)
            g32 = g.to(tl.float32)
            act = (g32 / (1.0 + tl.exp(-g32))).to(g.dtype).to(tl.float32)  # rounded like F.silu
            x = (act * u.to(tl.float32)).to(g.dtype).to(tl.float32)  # silu_and_mul's output
        else:
            x = tl.load(X + cols, mask=col_ok, other=0.0).to(tl.float32)
        w = tl.load(w_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc += w.to(tl.float32) * x[None, :]  # (BLOCK_N, BLOCK_K)
    y = tl.sum(acc, axis=1)  # (BLOCK_N,)
    if HAS_BIAS:  # added in fp32, one rounding (as cuBLAS's bias epilogue)
        y += tl.load(B + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(Y + rows, y.to(Y.dtype.element_ty), mask=row_ok)


@dataclass(frozen=True)
class GemvConfig:
    """One launch of `gemv_kernel`: rows and inputs per program step, warps, pipeline depth."""

    block_n: int = 4
    block_k: int = 512
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_n", "block_k", "num_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"GemvConfig.{name} must be a power of 2, got {value}")
        if self.num_stages < 1:
            raise ValueError(f"GemvConfig.num_stages must be >= 1, got {self.num_stages}")


# H100, bf16, CUDA-graph replays over weight copies larger than L2 (us; torch = F.linear):
#   shape                 N x K         torch   GEMV   GEMV config (BLOCK_N, BLOCK_K, warps, stages)
#   qkv_proj 1B       3072 x 2048        6.83   6.41   (4, 512, 4, 4)
#   o_proj 1B         2048 x 2048        6.39   5.28   (4, 512, 4, 2)
#   gate_up_proj 1B  16384 x 2048       24.42  23.85   (8, 512, 4, 2)
#   down_proj 1B      2048 x 8192  15.95 + 1.6  14.37  (4, 512, 4, 2)  (torch: + split-K reduce)
#   qkv_proj 7B      12288 x 4096       36.55  34.38   (8, 512, 4, 4)
#   down_proj 7B      4096 x 11008      34.54  37.29   (8, 256, 4, 2)  <- torch wins
# The rule below reproduces those blocks and warps: BLOCK_N 4 up to N = 4096, else 8, BLOCK_K
# 512, 4 warps. num_stages is moot: with no tl.dot in the loop Triton 3.9 does not pipeline
# it, and 1, 2 and 4 stages compile to the same PTX (sm_90), so the qkv runs' 4 is the 2 here.
# `gemv_beats_torch` keeps torch for K > 8192.


def gemv_config(N: int, K: int) -> GemvConfig:
    """The launch config for a weight (N, K): a fixed rule from the H100 table above."""
    if interpreting():  # the CPU interpreter pays per program: few, tall blocks
        return GemvConfig(
            block_n=min(64, triton.next_power_of_2(max(N, 1))),
            block_k=min(512, triton.next_power_of_2(max(K, 1))),
        )
    return GemvConfig(block_n=4 if N <= 4096 else 8, block_k=512, num_warps=4, num_stages=2)


def gemv_beats_torch(N: int, K: int) -> bool:
    """Whether the GEMV was measured faster than F.linear for this shape (table above): every
    shape up to K = 8192; above it (down_proj 7B, K = 11008) cuBLAS won, 34.5 vs 37.3 us."""
    return K <= 8192


def _one_row(x: torch.Tensor, width: int, name: str) -> torch.Tensor:
    if x.dim() == 0 or x.shape[-1] != width:
        raise ValueError(f"{name}: x {tuple(x.shape)} must end in {width} (the weight's K)")
    if math.prod(x.shape[:-1]) != 1:
        raise ValueError(f"{name} takes one row of activations (batch 1), got x {tuple(x.shape)}")
    row = x.reshape(width)
    return row if row.stride(0) == 1 else row.contiguous()


def _launch(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu_mul: bool,
    config: GemvConfig | None, name: str,
) -> torch.Tensor:  # fmt: skip
    if weight.dim() != 2:
        raise ValueError(f"{name}: weight must be 2-D (N, K), got {tuple(weight.shape)}")
    N, K = weight.shape
    row = _one_row(x, 2 * K if silu_mul else K, name)
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if x.dtype not in DTYPES or any(t.dtype != x.dtype for t in tensors):
        allowed, got = [str(d) for d in DTYPES], [str(t.dtype) for t in tensors]
        raise ValueError(f"{name}: x, weight and bias must share one dtype of {allowed}, got {got}")
    if any(t.device != x.device for t in tensors):
        raise ValueError(f"{name}: x, weight and bias must be on one device, got "
                         f"{[str(t.device) for t in tensors]}")  # fmt: skip
    if x.device.type != "cuda" and not interpreting():
        raise ValueError(f"{name} needs CUDA tensors (or TRITON_INTERPRET=1 on a CPU)")
    if weight.stride(1) != 1:
        raise ValueError(f"{name}: weight rows must be contiguous (stride {weight.stride()})")
    if bias is not None and (bias.shape != (N,) or bias.stride(0) != 1):
        raise ValueError(f"{name}: bias must be contiguous ({N},), got {tuple(bias.shape)}")
    cfg = config if config is not None else gemv_config(N, K)
    y = torch.empty(N, dtype=x.dtype, device=x.device)
    if N:
        gemv_kernel[(triton.cdiv(N, cfg.block_n),)](
            row, weight, y if bias is None else bias, y, N, K, weight.stride(0),
            HAS_BIAS=bias is not None, SILU_MUL=silu_mul, BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
    return y.view(*x.shape[:-1], N)


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """F.linear(x, weight, bias) for one row x (..., K) (the leading dims multiply to 1) and
    weight (N, K): returns (..., N) in x's dtype, accumulated in fp32."""
    return _launch(x, weight, bias, False, config, "gemv")


def silu_mul_gemv(
    gate_up: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """F.linear(silu_and_mul(gate_up), weight, bias) in one kernel, for one row gate_up
    (..., 2F) = [gate | up] and weight (N, F): returns (..., N)."""
    return _launch(gate_up, weight, bias, True, config, "silu_mul_gemv")
