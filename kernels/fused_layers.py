"""Fused elementwise kernels of a decoder layer: RMSNorm (with the residual add), RoPE on q
and k at once, and SiLU-and-multiply, in Triton.

Motivation (launches, then bytes). In eager PyTorch a Llama layer runs ~35 kernels, most of
them tiny elementwise ones: RMSNorm alone is 7 (cast, square, mean, add eps, rsqrt,
multiply, cast) and rotary embeddings 10 for q and k. At batch 1 a decode step of a 1B
model reads ~120 MB of weights per layer (~30 us at 4 TB/s) while each tiny kernel costs
2-5 us of launch and ramp-up even inside a CUDA graph: the elementwise tail costs as much
as the matmuls. Each of these kernels does one read and one write of its tensors:

    fused_add_rms_norm:  h = x + r;  y = w * h / sqrt(mean(h^2) + eps)    (1 kernel, was 8)
    rotary (q and k):    x' = x cos + rotate_half(x) sin, in place        (1 kernel, was ~10)
    silu_and_mul:        y = silu(gate) * up from one [gate | up] tensor  (1 kernel, was 2)

(DeepSpeed-Inference's kernel injection and vLLM's custom ops are these kernels.) Pseudo-code,
one program per token row; the casts follow the PyTorch twins in `minillm.layers` exactly
(statistics in fp32, each result rounded to the activations' dtype where PyTorch rounds).
Two launches more come off in the engine's fused layers: the residual add after the MLP
rides in the next layer's fused_add_rms_norm (`minillm.engine.fusion`), and RoPE on k goes
straight into the paged pool (`minillm.kernels.reshape_and_cache.rotary_and_cache`).

Tests: tests/test_engine_fusion.py (against the PyTorch layers, CPU interpreter and `gpu`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from minillm.kernels import interpreting
from minillm.kernels.interpreter import use_interpreter_without_gpu

use_interpreter_without_gpu()


@triton.jit
def rms_norm_kernel(
    X, R, W, Y, H, stride_x, stride_r, stride_y, stride_h, n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:  # h = x + r, rounded to the activations' dtype, is the new residual
        r = tl.load(R + row * stride_r + cols, mask=ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(H + row * stride_h + cols, x, mask=ok)
    x32 = x.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x32 * x32, axis=0) / n_cols + eps)
    normed = (x32 * rstd).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (w * normed).to(Y.dtype.element_ty), mask=ok)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _check(*ts: torch.Tensor) -> None:
    if any(t.device.type != "cuda" for t in ts) and not interpreting():
        raise ValueError("Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on a CPU)")


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of the last dim of x (..., C); with `residual`, normalizes h = x + residual
    and returns (y, h) (vLLM's fused_add_rms_norm: the add and the norm in one pass)."""
    _check(x, weight)
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"weight {tuple(weight.shape)} does not match x {tuple(x.shape)}")
    x2 = _rows(x)
    y = torch.empty_like(x2)
    h, r = y, x2  # placeholders when there is no residual (never touched)
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual {tuple(residual.shape)} differs from x {tuple(x.shape)}")
        r, h = _rows(residual), torch.empty_like(x2)
    C = x2.shape[1]
    if x2.shape[0]:
        rms_norm_kernel[(x2.shape[0],)](
            x2, r, weight, y, h, x2.stride(0), r.stride(0), y.stride(0), h.stride(0), C, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(C),
        )  # fmt: skip
    if residual is None:
        return y.view(x.shape)
    return y.view(x.shape), h.view(x.shape)


@triton.jit
def rope_halves(x1, x2, c, s):
    """The halves (x1, x2) of heads (BLOCK_H, BLOCK_D), rotated by the angles' cos/sin
    (BLOCK_D,): x' = x * cos + rotate_half(x) * sin, rounded like the twin."""
    dt = x1.dtype
    a1 = (x1.to(tl.float32) * c[None, :]).to(dt).to(tl.float32)
    b1 = (-x2.to(tl.float32) * s[None, :]).to(dt).to(tl.float32)
    a2 = (x2.to(tl.float32) * c[None, :]).to(dt).to(tl.float32)
    b2 = (x1.to(tl.float32) * s[None, :]).to(dt).to(tl.float32)
    return (a1 + b1).to(dt), (a2 + b2).to(dt)


@triton.jit
def rotate_heads(X, n, stride_n, stride_h, heads, c, s, HALF: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """Rotate the heads of token n in place."""
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    ok = (h[:, None] < heads) & (d[None, :] < HALF)
    p1 = X + n * stride_n + h[:, None] * stride_h + d[None, :]  # (BLOCK_H, BLOCK_D)
    x1, x2 = rope_halves(tl.load(p1, mask=ok, other=0.0), tl.load(p1 + HALF, mask=ok, other=0.0),
                         c, s)  # fmt: skip
    tl.store(p1, x1, mask=ok)
    tl.store(p1 + HALF, x2, mask=ok)


@triton.jit
def rotary_kernel(
    Q, K, COS, SIN, stride_qn, stride_qh, stride_kn, stride_kh, stride_cn,
    num_heads, num_kv_heads,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    c = tl.load(COS + n * stride_cn + d, mask=d < HALF, other=0.0).to(tl.float32)
    s = tl.load(SIN + n * stride_cn + d, mask=d < HALF, other=0.0).to(tl.float32)
    rotate_heads(Q, n, stride_qn, stride_qh, num_heads, c, s, HALF, BLOCK_H, BLOCK_D)
    rotate_heads(K, n, stride_kn, stride_kh, num_kv_heads, c, s, HALF, BLOCK_H, BLOCK_D)


def rotary_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate packed q (N, H, D) and k (N, Hkv, D) in place by cos/sin (N, D) (the
    "rotate half" layout of `minillm.layers.rotary`; cos/sin hold each angle twice)."""
    _check(q, k, cos, sin)
    N, H, D = q.shape
    if k.shape[0] != N or k.shape[2] != D or cos.shape != (N, D) or sin.shape != (N, D):
        raise ValueError(
            f"rotary_: q {tuple(q.shape)}, k {tuple(k.shape)}, cos/sin {tuple(cos.shape)}"
        )
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos.stride() != sin.stride():
        raise ValueError("rotary_ needs q, k, cos, sin contiguous in their last dim")
    if N:
        rotary_kernel[(N,)](
            q, k, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
            H, k.shape[1], HALF=D // 2, BLOCK_H=triton.next_power_of_2(max(H, k.shape[1])),
            BLOCK_D=triton.next_power_of_2(D // 2),
        )  # fmt: skip


@triton.jit
def silu_and_mul_kernel(X, Y, stride_x, stride_y, F, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1) * BLOCK
    cols = start + tl.arange(0, BLOCK)
    ok = cols < F
    g = tl.load(X + row * stride_x + cols, mask=ok, other=0.0)
    u = tl.load(X + row * stride_x + F + cols, mask=ok, other=0.0)
    g32 = g.to(tl.float32)
    act = (g32 / (1.0 + tl.exp(-g32))).to(g.dtype).to(tl.float32)  # silu, rounded like F.silu
    tl.store(Y + row * stride_y + cols, (act * u.to(tl.float32)).to(Y.dtype.element_ty), mask=ok)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """(..., 2F) = [gate | up] -> silu(gate) * up (..., F): the SwiGLU activation."""
    _check(x)
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul needs an even last dim [gate | up], got {x.shape[-1]}")
    x2 = _rows(x)
    F = x2.shape[1] // 2
    y = torch.empty(x2.shape[0], F, dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(F))
    if x2.shape[0]:
        silu_and_mul_kernel[(x2.shape[0], triton.cdiv(F, block))](
            x2, y, x2.stride(0), y.stride(0), F, BLOCK=block
        )
    return y.view(*x.shape[:-1], F)
