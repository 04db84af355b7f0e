"""Paged attention for decoding, in Triton: one query per sequence over its paged KV cache.

Motivation (bytes). A decode step reads every cached key and value once and does 2 FLOPs per
byte or so: it is bound by memory bandwidth. For 32 sequences of 4096 tokens with 8 kv heads
of dim 128 in bf16 that is 32 * 4096 * 8 * 128 * 2 (K and V) * 2 bytes = 537 MB, ~0.13 ms
at 4.3 TB/s. The naive way gathers the pages into a contiguous copy (read 537 MB, write
537 MB) and runs dense attention on it (read 537 MB again, plus padding and repeated kv
heads): several times the minimum traffic. The kernel reads each page in place, once.

Pseudo-code, one program per (sequence b, kv head, split s); the program serves the whole
GQA group of query heads of its kv head, so each K/V tile is loaded once for all of them:

    q = Q[b, heads of the group]                                      (G x D, padded to 16)
    for positions p in split s of [0, context_lens[b]), BLOCK_N at a time:
        slot = block_tables[b, p // PAGE] * PAGE + p % PAGE           (gather through pages)
        k, v = k_cache.flat[slot, kv head], v_cache.flat[slot, kv head]
        online softmax update of (m, l, acc) with s = q k^T * scale    (as in FlashAttention)
    one split:  O[b, group] = acc / l
    many splits (flash-decoding, for long contexts and small batches: more programs than
    sequences x kv heads keep all SMs busy): write (acc / l, lse) per split, then a second
    kernel merges the splits: O = sum_s exp(lse_s - lse) O_s with lse = logsumexp_s lse_s.

Tests: tests/test_paged.py (the PyTorch reference and fp64 dense attention).
Benchmark: `python -m benchmarks.attention_paged` (GB/s against the copy bandwidth).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from minillm.kernels import interpreting
from minillm.kernels.interpreter import use_interpreter_without_gpu

from minillm.cache.paged import check_paged_inputs

use_interpreter_without_gpu()

HEAD_DIMS = (16, 32, 64, 128, 256)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SPLIT_ALIGN = 256  # a split covers a multiple of this many positions (>= every BLOCK_N)


@triton.jit
def paged_decode_kernel(
    Q, KC, VC, block_tables, context_lens, O, O_part, LSE_part,
    stride_qb, stride_qh, stride_cb, stride_cp, stride_ch, stride_bt,
    stride_ob, stride_oh, stride_pb, stride_ph, stride_ps,
    group_size, window, qk_scale, split_len, ctx_bucket,
    HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, SPLIT: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    b, hk, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    L = tl.load(context_lens + b)
    if HAS_WINDOW:  # noqa: SIM108
        first = tl.maximum(L - window, 0)  # the first position the query sees
    else:
        first = L * 0
    start = first + s * split_len
    end = tl.minimum(start + split_len, L)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    heads = hk * group_size + offs_g
    head_ok = offs_g < group_size
    b64 = b.to(tl.int64)
    q = tl.load(
        Q + b64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=head_ok[:, None],
        other=0.0,
    )
    if DOT_FP32:
        q = q.to(tl.float32)
    m_i = tl.zeros([BLOCK_G], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
    table = block_tables + b64 * stride_bt
    KC += hk.to(tl.int64) * stride_ch
    VC += hk.to(tl.int64) * stride_ch
    for start_n in range(start, end, BLOCK_N):
        pos = start_n + tl.arange(0, BLOCK_N)
        ok = pos < end
        page = tl.load(table + pos // PAGE_SIZE, mask=ok, other=0).to(tl.int64)
        row = page * stride_cb + (pos % PAGE_SIZE) * stride_cp  # (BLOCK_N,) offsets
        k = tl.load(KC + row[:, None] + offs_d[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(VC + row[:, None] + offs_d[None, :], mask=ok[:, None], other=0.0)
        if DOT_FP32:
            k, v = k.to(tl.float32), v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        qk += tl.where(ok, 0.0, -1.0e6)[None, :]
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_ij[:, None])  # (BLOCK_G, BLOCK_N)
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_ij
    has_keys = l_i > 0  # False only for an empty split
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    if SPLIT:
        part = b64 * stride_pb + heads * stride_ph + s * stride_ps  # (BLOCK_G,)
        lse = tl.where(has_keys, m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0)), -float("inf"))
        tl.store(LSE_part + part, lse, mask=head_ok)
        tl.store(O_part + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=head_ok[:, None])
    else:
        o_ptrs = O + b64 * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=head_ok[:, None])


@triton.jit
def merge_splits_kernel(
    O_part, LSE_part, O, stride_pb, stride_ph, stride_ob, stride_oh, num_splits, num_heads,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """O[b, h] = sum_s 2^(lse_s - lse) O_part[b, h, s], lse = log2(sum_s 2^lse_s)."""
    b, h = tl.program_id(0), tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    base = b.to(tl.int64) * stride_pb + h.to(tl.int64) * stride_ph
    lse = tl.load(LSE_part + base + offs_s, mask=offs_s < num_splits, other=float("-inf"))
    m = tl.max(lse, 0)  # finite: the first split always holds keys
    w = tl.math.exp2(lse - m)  # (BLOCK_S,), 0 for empty splits
    parts = tl.load(
        O_part + (base + offs_s[:, None]) * HEAD_DIM + offs_d[None, :],
        mask=offs_s[:, None] < num_splits,
        other=0.0,
    )
    out = tl.sum(w[:, None] * parts, 0) / tl.sum(w, 0)
    o_ptrs = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_d
    tl.store(o_ptrs, out.to(O.dtype.element_ty))


DECODE_CONFIGS = [
    triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s)
    for n, w, s in [(32, 4, 3), (64, 4, 3), (128, 4, 3)]
]
DECODE_KEY = ["HEAD_DIM", "PAGE_SIZE", "BLOCK_G", "SPLIT", "HAS_WINDOW", "ctx_bucket"]
paged_decode_kernel_tuned = (
    None if interpreting() else triton.autotune(DECODE_CONFIGS, key=DECODE_KEY)(paged_decode_kernel)
)


def default_num_splits(num_programs: int, max_context: int, device: torch.device) -> int:
    """Flash-decoding's choice: enough splits for ~2 waves of programs on the GPU, each split
    at least SPLIT_ALIGN positions long."""
    sms = (
        torch.cuda.get_device_properties(device).multi_processor_count
        if device.type == "cuda"
        else 4
    )
    want = -(-2 * sms // num_programs)
    return max(1, min(want, -(-max_context // SPLIT_ALIGN), 64))


def check_queries_and_pool(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, window: int | None
) -> None:
    """What the paged kernels need of q (N, H, D) and the pool (num_blocks, block_size,
    Hkv, D): one supported dtype and head_dim, H a multiple of Hkv, a valid window,
    contiguous caches, CUDA tensors (or the interpreter)."""
    H, D = q.shape[1:]
    Hkv, Dc = k_cache.shape[2:]
    if q.dtype not in DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"q and the caches must share one of fp16/bf16/fp32, got {q.dtype}, "
                        f"{k_cache.dtype}, {v_cache.dtype}")  # fmt: skip
    if Dc != D or D not in HEAD_DIMS:
        raise ValueError(f"head_dim: q {D}, cache {Dc}; supported: {HEAD_DIMS}")
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"{H} query heads cannot be grouped over {Hkv} kv heads")
    if window is not None and (
        isinstance(window, bool) or not isinstance(window, int) or window < 1
    ):
        raise ValueError(f"window must be an int >= 1 or None, got {window!r}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")
    if q.device.type != "cuda" and not interpreting():
        raise ValueError(f"Triton kernels need CUDA tensors, got {q.device}")


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    window: int | None = None,
    scale: float | None = None,
    num_splits: int | None = None,
    max_context_len: int | None = None,
    check_bounds: bool = True,
    block_n: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention: q (B, H, D) at position context_lens[b] - 1 of each sequence, over
    k_cache/v_cache (num_blocks, block_size, Hkv, D) through block_tables (B, max_blocks)
    -> (B, H, D), written into `out` when given. `num_splits` > 1 is the split-K
    (flash-decoding) variant; None picks it
    from the GPU's size. `max_context_len` (else read from context_lens: a device sync)
    sizes the splits. `check_bounds` validates the tables on the host (another sync)."""
    check_paged_inputs(k_cache, v_cache, block_tables, context_lens, check_bounds)
    if q.dim() != 3:
        raise ValueError(f"q must be (B, H, D) with one query per sequence, got {tuple(q.shape)}")
    B, H, D = q.shape
    page, Hkv = k_cache.shape[1:3]
    check_queries_and_pool(q, k_cache, v_cache, window)
    if block_tables.shape[0] != B:
        raise ValueError(f"q has {B} sequences but there are {block_tables.shape[0]} block tables")
    q = q if q.stride(-1) == 1 else q.contiguous()
    G = H // Hkv
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be an int >= 1 or None, got {num_splits!r}")
    max_ctx = int(context_lens.max()) if max_context_len is None else max_context_len
    if check_bounds and max_ctx < int(context_lens.max()):
        raise ValueError(
            f"max_context_len {max_ctx} < the longest context {int(context_lens.max())}"
        )
    visible = max_ctx if window is None else min(max_ctx, window)
    if num_splits is None:
        num_splits = default_num_splits(B * Hkv, visible, q.device)
    per_split = -(-visible // num_splits)
    split_len = -(-per_split // SPLIT_ALIGN) * SPLIT_ALIGN
    num_splits = -(-visible // split_len)  # no split left empty for the longest sequence
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} with a contiguous last dim")
    split = num_splits > 1
    o_part = (
        torch.empty(B, H, num_splits, D, dtype=torch.float32, device=q.device) if split else out
    )
    lse_part = torch.empty(B, H, num_splits, dtype=torch.float32, device=q.device) if split else out
    bucket = 1 << max(8, (visible - 1).bit_length())
    qk_scale = (D**-0.5 if scale is None else scale) * 1.4426950408889634  # log2(e) folded in
    args = (q, k_cache, v_cache, block_tables, context_lens, out, o_part, lse_part,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            block_tables.stride(0), out.stride(0), out.stride(1),
            o_part.stride(0) // D if split else 0, o_part.stride(1) // D if split else 0,
            1 if split else 0, G, window or 0, qk_scale, split_len, bucket)  # fmt: skip
    flags = dict(HEAD_DIM=D, PAGE_SIZE=page, BLOCK_G=max(16, triton.next_power_of_2(G)),
                 HAS_WINDOW=window is not None, SPLIT=split,
                 DOT_FP32=interpreting() and q.dtype == torch.bfloat16,
                 DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")  # fmt: skip
    grid = (B, Hkv, num_splits)
    if paged_decode_kernel_tuned is not None and block_n is None:
        paged_decode_kernel_tuned[grid](*args, **flags)
    else:
        paged_decode_kernel[grid](*args, **flags, BLOCK_N=block_n or 64)
    if split:
        merge_splits_kernel[(B, H)](
            o_part, lse_part, out, lse_part.stride(0), lse_part.stride(1),
            out.stride(0), out.stride(1), num_splits, H,
            HEAD_DIM=D, BLOCK_S=triton.next_power_of_2(num_splits),
        )  # fmt: skip
    return out
