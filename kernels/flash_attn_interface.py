"""The public FlashAttention functions: checked inputs, autograd, dense and packed batches.

`flash_attn_func` takes minillm's (B, H, T, D) layout; `flash_attn_varlen_func` takes a
packed batch (N, H, D) with `cu_seqlens` (the prefix sums of the sequence lengths, as in
FlashAttention's `flash_attn_varlen_func`), so sequences of different lengths need no
padding. Both are differentiable: the forward saves only O and the log-sum-exp, and the
backward (`minillm.kernels.flash_attn_bwd`) recomputes the probabilities tile by tile.
Queries are the last T of the S key positions (causal masks align bottom-right), query
head h reads kv head h // (H / Hkv), and `window` W keeps only the W most recent keys.
"""

from __future__ import annotations

import itertools

import torch
from minillm.kernels import interpreting
from minillm.kernels.flash_attn import DTYPES, HEAD_DIMS, flash_attn_forward
from minillm.kernels.flash_attn_bwd import flash_attn_backward


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Clear errors for what the kernels cannot take: dtype, head_dim, head counts, device.
    Heads are dim 1 in both layouts: (B, H, T, D) and packed (N, H, D)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; the kernels take fp16, bf16 or fp32")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q has head_dim {q.shape[-1]} but k has {k.shape[-1]}")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"head_dim {q.shape[-1]} is not supported; supported: {HEAD_DIMS}")
    H, Hkv = q.shape[1], k.shape[1]
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"{H} query heads cannot be grouped over {Hkv} kv heads")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    if q.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"Triton kernels need CUDA tensors, got {q.device}; on a CPU set TRITON_INTERPRET=1 "
            "before importing minillm.kernels to run them in Triton's interpreter"
        )


def _check_window(causal: bool, window: int | None) -> None:
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1 or None, got {window!r}")
        if not causal:
            raise ValueError("a sliding window needs causal=True")


class _FlashAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, window, scale, cu_seqlens, max_seqlens, blocks):
        o, lse = flash_attn_forward(
            q, k, v, causal, window, scale, cu_seqlens, max_seqlens, *blocks
        )
        ctx.save_for_backward(q, k, v, o, lse, *(cu_seqlens or ()))
        ctx.args = (causal, window, scale, max_seqlens, blocks)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, *cu = ctx.saved_tensors
        causal, window, scale, max_seqlens, blocks = ctx.args
        cu_seqlens = tuple(cu) if cu else None
        dq, dk, dv = flash_attn_backward(
            do, q, k, v, o, lse, causal, window, scale, cu_seqlens, max_seqlens, *blocks
        )
        return dq, dk, dv, None, None, None, None, None, None


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    window: int | None = None,
    softmax_scale: float | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """FlashAttention: q (B, H, T, D), k/v (B, Hkv, S, D) -> (B, H, T, D), differentiable.

    fp16/bf16, or fp32 (kept in full fp32, slower), head_dim in 16/32/64/128.
    `block_m`/`block_n` pin the tile sizes (tests); by default the GPU autotunes them."""
    check_attention_inputs(q, k, v)
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"flash_attn_func expects (B, H, T, D) tensors, got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}; packed batches go to flash_attn_varlen_func"
        )
    (B, _, T, _), (Bk, _, S, _) = q.shape, k.shape
    if Bk != B:
        raise ValueError(f"q has batch {B} but k has batch {Bk}")
    if T == 0 or S == 0:
        raise ValueError(f"empty sequence: T={T}, S={S}")
    if causal and T > S:
        raise ValueError(f"more queries ({T}) than keys ({S}): queries are the last T of S")
    _check_window(causal, window)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    return _FlashAttn.apply(q, k, v, causal, window, scale, None, None, (block_m, block_n))


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    causal: bool = True,
    window: int | None = None,
    softmax_scale: float | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Packed variable-length FlashAttention: q (Nq, H, D), k/v (Nk, Hkv, D) -> (Nq, H, D).

    Sequence b owns rows cu_seqlens_q[b]:cu_seqlens_q[b+1] of q and the matching rows of
    k/v; its queries are the last T_b of its S_b keys. `max_seqlen_*` default to the
    longest length. The input checks read cu_seqlens on the host (one device sync)."""
    check_attention_inputs(q, k, v)
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(
            f"flash_attn_varlen_func expects packed (N, H, D) tensors, got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}"
        )
    lens = []
    packed = (
        ("cu_seqlens_q", cu_seqlens_q, q.shape[0]),
        ("cu_seqlens_k", cu_seqlens_k, k.shape[0]),
    )
    for name, cu, n in packed:
        if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.dtype != torch.int32:
            raise TypeError(f"{name} must be a 1-D int32 tensor of B + 1 prefix sums")
        if cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device}, q on {q.device}")
        c = cu.tolist()
        steps = [y - x for x, y in itertools.pairwise(c)]
        if len(c) < 2 or c[0] != 0 or c[-1] != n or min(steps) < 0:
            raise ValueError(f"{name} must rise from 0 to the {n} packed rows, got {c}")
        lens.append(steps)
    if len(lens[0]) != len(lens[1]):
        raise ValueError(f"cu_seqlens_q has {len(lens[0])} sequences, cu_seqlens_k {len(lens[1])}")
    if causal and any(t > s for t, s in zip(*lens, strict=True)):
        raise ValueError("a sequence has more queries than keys: queries are the last T of S")
    _check_window(causal, window)
    max_q = max(lens[0]) if max_seqlen_q is None else max_seqlen_q
    max_k = max(lens[1]) if max_seqlen_k is None else max_seqlen_k
    if max_q < max(lens[0]) or max_k < max(lens[1]):
        raise ValueError("max_seqlen_q/max_seqlen_k are smaller than the longest sequence")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    return _FlashAttn.apply(
        q, k, v, causal, window, scale, (cu_seqlens_q, cu_seqlens_k), (max_q, max_k),
        (block_m, block_n),
    )  # fmt: skip
