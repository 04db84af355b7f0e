"""Tiled attention with an online softmax, in plain PyTorch: FlashAttention's algorithm.

FlashAttention (Dao et al., 2022; FlashAttention-2, Dao 2023) never builds the (T, S) score
matrix. It walks over tiles of keys and keeps, per query row, a running maximum m, a running
denominator l and an unnormalized output o. A new tile with scores s and values V_j updates

    m' = max(m, rowmax(s))
    l' = exp(m - m') l + rowsum(exp(s - m'))
    o' = exp(m - m') o + exp(s - m') V_j

and after the last tile the output is o / l, with the log-sum-exp lse = m + log(l) saved for
the backward pass. Tiles that the causal mask (or a sliding window) hides entirely are
skipped, tiles that it hides partly are masked, the rest need no mask at all: `tile_plan`
shows which is which, and the Triton kernel (`minillm.kernels.flash_attn`) walks the same
plan. This module is the readable twin of that kernel and runs on any device.
"""

from __future__ import annotations

import torch

from minillm.layers.attention import _check, causal_mask, repeat_kv

SKIP, MASKED, FULL = 0, 1, 2  # what a (query tile, key tile) pair needs


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """Materialized softmax attention in fp64: the oracle every kernel is tested against.

    q (B, H, T, D), k/v (B, Hkv, S, D) -> (B, H, T, D) in fp64. Queries are the last T of
    the S positions; `causal=False` lets every query see every key (no window then)."""
    _check(q, k, v)
    H, Hkv, T, S = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    q, k, v = q.double(), repeat_kv(k.double(), H // Hkv), repeat_kv(v.double(), H // Hkv)
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, T, S)
    if causal:
        scores = scores.masked_fill(~causal_mask(T, S, window, q.device), float("-inf"))
    elif window is not None:
        raise ValueError("a sliding window needs causal=True")
    return scores.softmax(dim=-1) @ v  # (B, H, T, D)


def online_softmax_merge(
    o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two attention results over disjoint key sets into the result over their union.

    Each part is normalized over its own keys: o (..., D) and its log-sum-exp lse (...,).
    The union weighs each part by its share of the total softmax mass:
        lse = log(exp(lse1) + exp(lse2)),  o = exp(lse1 - lse) o1 + exp(lse2 - lse) o2.
    A part with no keys has lse = -inf and weighs nothing (two empty parts give o = 0).
    This is how split-K (flash-decoding) and ring attention combine their pieces."""
    lse = torch.logaddexp(lse1, lse2)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)  # -inf - -inf is NaN
    w1 = torch.exp(lse1 - safe).unsqueeze(-1)
    w2 = torch.exp(lse2 - safe).unsqueeze(-1)
    return w1 * o1 + w2 * o2, lse


def key_tile_ranges(
    m0: int, T: int, S: int, block_m: int, block_n: int, causal: bool, window: int | None
) -> tuple[int, int, int, int]:
    """The keys one query tile [m0, m0 + block_m) visits, split by what they need.

    Returns (a, b, c, hi): key tiles starting in [a, b) and [c, hi) need a mask (the window's
    edge; the diagonal and the end of the keys), tiles in [b, c) need none; keys before a and
    from hi on are skipped. Key tiles start at multiples of block_n. Query t sits at key
    position t + S - T."""
    m1, off = min(m0 + block_m, T), S - T
    if causal:
        hi = min(S, m1 + off)  # one past the last key the last query sees
        full_end = min(S, m0 + off + 1)  # keys below this are seen by the first query
        lo = 0 if window is None else max(0, m0 + off - window + 1)
        full_lo = 0 if window is None else max(0, m1 + off - window)  # seen by the last query
    else:
        hi = full_end = S
        lo = full_lo = 0
    a = lo // block_n * block_n
    c = max(a, full_end // block_n * block_n)
    b = min(c, max(a, -(-full_lo // block_n) * block_n))
    return a, b, c, hi


def tile_plan(
    T: int,
    S: int,
    block_m: int,
    block_n: int,
    causal: bool = True,
    window: int | None = None,
) -> torch.Tensor:
    """(ceil(T / block_m), ceil(S / block_n)) int tensor: SKIP, MASKED or FULL per tile pair."""
    plan = torch.full((-(-T // block_m), -(-S // block_n)), SKIP, dtype=torch.int8)
    for i in range(plan.shape[0]):
        a, b, c, hi = key_tile_ranges(i * block_m, T, S, block_m, block_n, causal, window)
        for n0 in range(a, hi, block_n):
            plan[i, n0 // block_n] = FULL if b <= n0 < c else MASKED
    return plan


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | None = None,
    *,
    causal: bool = True,
    block_m: int = 64,
    block_n: int = 64,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Tiled online-softmax attention; the contract of `naive_attention`, plus `causal`.

    q (B, H, T, D), k/v (B, Hkv, S, D) -> o (B, H, T, D) in q's dtype (and lse (B, H, T)
    in fp32 with `return_lse`). Scores and the running statistics are kept in fp32 (fp64
    for fp64 inputs). Differentiable through autograd."""
    _check(q, k, v)
    if window is not None and not causal:
        raise ValueError("a sliding window needs causal=True")
    if block_m < 1 or block_n < 1:
        raise ValueError(f"block sizes must be >= 1, got block_m={block_m}, block_n={block_n}")
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = D**-0.5
    k = repeat_kv(k, H // Hkv).to(acc_dtype)  # (B, H, S, D)
    v = repeat_kv(v, H // Hkv).to(acc_dtype)
    allowed = causal_mask(T, S, window, device=q.device) if causal else None  # (T, S)
    outs, lses = [], []
    for m0 in range(0, T, block_m):
        qi = q[:, :, m0 : m0 + block_m].to(acc_dtype) * scale  # (B, H, M, D)
        M = qi.shape[2]
        m = torch.full((B, H, M), float("-inf"), dtype=acc_dtype, device=q.device)
        l = torch.zeros_like(m)
        o = torch.zeros(B, H, M, D, dtype=acc_dtype, device=q.device)
        a, b, c, hi = key_tile_ranges(m0, T, S, block_m, block_n, causal, window)
        for n0 in range(a, hi, block_n):
            s = qi @ k[:, :, n0 : n0 + block_n].transpose(-2, -1)  # (B, H, M, N)
            if not b <= n0 < c:  # a tile on the diagonal or the window's edge
                tile_mask = allowed[m0 : m0 + M, n0 : n0 + block_n] if causal else None
                if tile_mask is not None:
                    s = s.masked_fill(~tile_mask, float("-inf"))
            m_new = torch.maximum(m, s.amax(dim=-1))
            # A row that has seen only masked keys keeps m = -inf: shift by 0 instead.
            m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - m_safe.unsqueeze(-1))  # (B, H, M, N)
            alpha = torch.exp(m - m_safe)  # rescales what was accumulated so far
            l = alpha * l + p.sum(dim=-1)
            o = alpha.unsqueeze(-1) * o + p @ v[:, :, n0 : n0 + block_n]
            m = m_new
        outs.append(o / l.unsqueeze(-1))
        lses.append(m + torch.log(l))
    out = torch.cat(outs, dim=2).to(q.dtype)  # (B, H, T, D)
    if return_lse:
        return out, torch.cat(lses, dim=2).float()  # (B, H, T)
    return out


def online_softmax_steps(
    s: torch.Tensor, v: torch.Tensor, block_n: int
) -> list[dict[str, torch.Tensor]]:
    """The running state of one query row after each tile of `block_n` keys, for teaching.

    s (S,) scores, v (S, D) values. Entry i holds m, l (running max and denominator), the
    normalized output o = acc / l and the weights exp(s - m) / l of the keys seen so far.
    After the last tile, o equals softmax(s) @ v."""
    m, l = torch.tensor(float("-inf"), dtype=s.dtype), torch.tensor(0.0, dtype=s.dtype)
    acc = torch.zeros(v.shape[-1], dtype=s.dtype)
    steps = []
    for n0 in range(0, s.shape[0], block_n):
        tile = s[n0 : n0 + block_n]
        m_new = torch.maximum(m, tile.max())
        alpha = torch.exp(m - m_new)
        p = torch.exp(tile - m_new)
        l = alpha * l + p.sum()
        acc = alpha * acc + p @ v[n0 : n0 + block_n]
        m = m_new
        seen = s[: n0 + block_n]
        steps.append(dict(m=m, l=l, o=acc / l, weights=torch.exp(seen - m) / l))
    return steps


def attention_cost(
    B: int,
    H: int,
    T: int,
    S: int,
    D: int,
    Hkv: int | None = None,
    causal: bool = True,
    elem_bytes: int = 2,
    fused: bool = True,
) -> tuple[float, float]:
    """(FLOPs, HBM bytes) of one attention forward, for rooflines.

    FLOPs: two matmuls, 4 * B * H * T * S * D, about halved by causal masking when T == S.
    Bytes: read Q, K, V and write O; without fusion also write the fp32 scores, read them
    for the softmax, write the probabilities and read them for P @ V (4 passes)."""
    Hkv = H if Hkv is None else Hkv
    flops = 4.0 * B * H * T * S * D * (0.5 if causal and T == S else 1.0)
    nbytes = elem_bytes * B * D * (2 * H * T + 2 * Hkv * S)
    if not fused:
        nbytes += 4 * 4.0 * B * H * T * S
    return flops, nbytes
