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

Tests: tests/test_paged.py (against `reshape_and_cache_ref`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from minillm.kernels import interpreting
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
