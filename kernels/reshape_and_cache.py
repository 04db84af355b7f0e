"""Write new keys and values into their pages: vLLM's `reshape_and_cache`, in Triton.

Motivation (bytes). Each forward pass produces K and V for N new tokens, (N, Hkv, D) each,
and every one of them goes to its own slot of the paged pool. The PyTorch twin
(`minillm.cache.paged.reshape_and_cache_ref`) does it with boolean masking and an indexed
assignment: it reads slot_mapping twice, builds the mask and compacted copies of key, value
and slots, then scatters them. The kernel reads each key/value row once and writes it once:
2 * N * Hkv * D elements in, the same out, the minimum possible.

Pseudo-code, one program per new token n:
    slot = slot_mapping[n];  if slot < 0: return      (padding token)
    k_cache.flat[slot] = key[n]                        (a row of Hkv * D elements)
    v_cache.flat[slot] = value[n]

RoPE fused into the write (`rotary_and_cache`). In a decoder layer the write follows RoPE on
q and k (`minillm.kernels.fused_layers.rotary_`): two launches, and k makes a round trip
through memory between them (rotated, stored, read back). At batch 1 the bytes are nothing
(Llama 3 8B: Hkv * D = 1024 elements a token) and the launches are everything: each costs
~1.5-2 us on an H100 even inside a CUDA graph, against ~40 us of weight reads per layer. One
kernel does both: it reads q, k, v once, writes q (in place) and the pool, one launch:

    one program per new token n:
        q[n] = rope(q[n], cos[n], sin[n])                  (in place: attention reads it)
        slot = slot_mapping[n];  if slot < 0: done         (padding: no K/V stored)
        k_cache.flat[slot] = rope(k[n], cos[n], sin[n])    (k itself is left unrotated)
        v_cache.flat[slot] = v[n]

RoPE rounds exactly as `rotary_` does, so the pool holds the same bits as rotary_ followed by
reshape_and_cache.

Tests: tests/test_paged.py (`reshape_and_cache` against `reshape_and_cache_ref`) and
tests/test_engine_fusion.py (`rotary_and_cache` against rotary_ + reshape_and_cache).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from minillm.kernels import interpreting
from minillm.kernels.fused_layers import rope_halves, rotate_heads
from minillm.kernels.interpreter import use_interpreter_without_gpu

use_interpreter_without_gpu()


@triton.jit
def reshape_and_cache_kernel(
    K, V, KC, VC, slot_mapping, stride_kn, stride_kh, stride_vn, stride_vh,
    stride_cs, stride_ch, num_kv_heads,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0)
    slot = tl.load(slot_mapping + n).to(tl.int64)
    if slot < 0:
        return
    offs = tl.arange(0, BLOCK)  # over the Hkv * D elements of one token
    h, d = offs // HEAD_DIM, offs % HEAD_DIM
    ok = h < num_kv_heads
    n64 = n.to(tl.int64)
    k = tl.load(K + n64 * stride_kn + h * stride_kh + d, mask=ok)
    v = tl.load(V + n64 * stride_vn + h * stride_vh + d, mask=ok)
    dst = slot * stride_cs + h * stride_ch + d
    tl.store(KC + dst, k.to(KC.dtype.element_ty), mask=ok)
    tl.store(VC + dst, v.to(VC.dtype.element_ty), mask=ok)


def _check_write(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    check_bounds: bool,
) -> None:
    """Clear errors for what the pool write cannot take (both wrappers)."""
    if key.dim() != 3 or key.shape != value.shape:
        raise ValueError(
            f"key and value must both be (N, Hkv, D), got {tuple(key.shape)}, {tuple(value.shape)}"
        )
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            "k_cache and v_cache must both be (num_blocks, block_size, Hkv, D), got "
            f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    if key.shape[1:] != k_cache.shape[2:]:
        raise ValueError(
            f"key has (Hkv, D) = {tuple(key.shape[1:])}, the pool {tuple(k_cache.shape[2:])}"
        )
    if slot_mapping.shape != (key.shape[0],) or slot_mapping.dtype not in (
        torch.int32,
        torch.int64,
    ):
        raise ValueError(f"slot_mapping must be ({key.shape[0]},) int32/int64")
    if not k_cache.is_contiguous() or not v_cache.is_contiguous():
        raise ValueError("k_cache and v_cache must be contiguous")
    if key.device.type != "cuda" and not interpreting():
        raise ValueError(f"Triton kernels need CUDA tensors, got {key.device}")
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    if check_bounds and key.shape[0] and int(slot_mapping.max()) >= num_slots:
        raise ValueError(f"slot {int(slot_mapping.max())} is outside the pool of {num_slots} slots")


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    check_bounds: bool = True,
) -> None:
    """Write key/value (N, Hkv, D) into k_cache/v_cache (num_blocks, block_size, Hkv, D) at
    `slot_mapping` (N,), the flat slot block * block_size + offset; negative slots skip.
    `check_bounds` reads the slots on the host and rejects slots outside the pool."""
    _check_write(key, value, k_cache, v_cache, slot_mapping, check_bounds)
    N, Hkv, D = key.shape
    if N == 0:
        return
    key = key if key.stride(-1) == 1 else key.contiguous()
    value = value if value.stride(-1) == 1 else value.contiguous()
    reshape_and_cache_kernel[(N,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(1), k_cache.stride(2), Hkv,
        HEAD_DIM=D, BLOCK=triton.next_power_of_2(Hkv * D),
    )  # fmt: skip


@triton.jit
def rotary_and_cache_kernel(
    Q, K, V, COS, SIN, KC, VC, slot_mapping,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_cn,
    stride_cs, stride_ch, num_heads, num_kv_heads,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)  # over one half of the head dim
    c = tl.load(COS + n * stride_cn + d, mask=d < HALF, other=0.0).to(tl.float32)
    s = tl.load(SIN + n * stride_cn + d, mask=d < HALF, other=0.0).to(tl.float32)
    rotate_heads(Q, n, stride_qn, stride_qh, num_heads, c, s, HALF, BLOCK_H, BLOCK_D)
    slot = tl.load(slot_mapping + n).to(tl.int64)
    h = tl.arange(0, BLOCK_HKV)
    heads = tl.where(slot >= 0, num_kv_heads, 0)  # padding: no K/V read or stored
    ok = (h[:, None] < heads) & (d[None, :] < HALF)
    src_k = K + n * stride_kn + h[:, None] * stride_kh + d[None, :]  # (BLOCK_HKV, BLOCK_D)
    k1, k2 = rope_halves(tl.load(src_k, mask=ok, other=0.0),
                         tl.load(src_k + HALF, mask=ok, other=0.0), c, s)  # fmt: skip
    dst = slot * stride_cs + h[:, None] * stride_ch + d[None, :]  # the same for K and V
    tl.store(KC + dst, k1.to(KC.dtype.element_ty), mask=ok)
    tl.store(KC + dst + HALF, k2.to(KC.dtype.element_ty), mask=ok)
    src_v = V + n * stride_vn + h[:, None] * stride_vh + d[None, :]
    tl.store(VC + dst, tl.load(src_v, mask=ok).to(VC.dtype.element_ty), mask=ok)
    tl.store(VC + dst + HALF, tl.load(src_v + HALF, mask=ok).to(VC.dtype.element_ty), mask=ok)


def rotary_and_cache(
    q: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    check_bounds: bool = True,
) -> None:
    """RoPE on q (N, H, D) in place and on key (N, Hkv, D) into the pool: k_cache/v_cache
    (num_blocks, block_size, Hkv, D) get the rotated key and the value at `slot_mapping`
    (N,) (negative slots skip). cos/sin (N, D) in the "rotate half" layout of
    `minillm.layers.rotary`. `key` itself is not modified. The same result as
    `rotary_(q, key, cos, sin)` then `reshape_and_cache(key, value, ...)`."""
    _check_write(key, value, k_cache, v_cache, slot_mapping, check_bounds)
    N, Hkv, D = key.shape
    if q.dim() != 3 or q.shape[0] != N or q.shape[2] != D:
        raise ValueError(f"q must be (N, H, D) = ({N}, H, {D}), got {tuple(q.shape)}")
    if D % 2:
        raise ValueError(f"RoPE needs an even head dim, got D = {D}")
    if cos.shape != (N, D) or sin.shape != (N, D):
        raise ValueError(
            f"cos and sin must both be (N, D) = ({N}, {D}), got {tuple(cos.shape)}, "
            f"{tuple(sin.shape)}"
        )
    floats = (torch.float32, torch.float16, torch.bfloat16)
    if q.dtype not in floats or q.dtype != key.dtype or q.dtype != value.dtype:
        raise ValueError(
            f"q, key and value must share one float dtype, got {q.dtype}, {key.dtype}, "
            f"{value.dtype}"
        )
    if k_cache.dtype not in floats or k_cache.dtype != v_cache.dtype:
        raise ValueError(
            f"k_cache and v_cache must share one float dtype, got {k_cache.dtype}, {v_cache.dtype}"
        )
    if cos.dtype not in floats or sin.dtype != cos.dtype:
        raise ValueError(f"cos and sin must share one float dtype, got {cos.dtype}, {sin.dtype}")
    if q.stride(-1) != 1 or cos.stride(-1) != 1 or cos.stride() != sin.stride():
        raise ValueError("rotary_and_cache needs q, cos and sin contiguous in their last dim")
    if N == 0:
        return
    key = key if key.stride(-1) == 1 else key.contiguous()
    value = value if value.stride(-1) == 1 else value.contiguous()
    H = q.shape[1]
    rotary_and_cache_kernel[(N,)](
        q, key, value, cos, sin, k_cache, v_cache, slot_mapping,
        q.stride(0), q.stride(1), key.stride(0), key.stride(1), value.stride(0),
        value.stride(1), cos.stride(0), k_cache.stride(1), k_cache.stride(2), H, Hkv,
        HALF=D // 2, BLOCK_H=triton.next_power_of_2(H), BLOCK_HKV=triton.next_power_of_2(Hkv),
        BLOCK_D=triton.next_power_of_2(D // 2),
    )  # fmt: skip
