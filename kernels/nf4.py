"""NF4 dequantization: a Triton kernel beside its naive PyTorch twin.

Motivation. A QLoRA forward pass turns 4-bit weights back into 16/32-bit floats before
each matmul. The naive PyTorch version runs ~8 separate ops (unpack nibbles, gather the
codebook, rebuild the absmax from its own 8-bit codes, scale, ...), each reading and
writing the whole weight: roughly 8 x (4 + 4) bytes of traffic per weight. The kernel
does it in one pass: it reads 0.5 byte of codes (+ ~1/64 byte of constants) and writes
the output once (2 bytes in bf16, 4 in fp32).

Layout (double-quantized NF4, as in `minillm.quant.nf4`), for weight i of the flat tensor:

    code     = packed[i // 2] >> 4  if i is even  else  packed[i // 2] & 15
    absmax   = absmax_q[i // 64] / 127 * absmax_scale[i // (64 * 256)] + absmax_mean
    w[i]     = codebook[code] * absmax

Pseudo-code of one program: offsets = pid * BLOCK + arange(BLOCK); load the bytes,
pick the nibble, gather the codebook, load the (int8, fp32) constants of the block,
multiply, store. No reduction, no tiling: a pure bandwidth kernel.
"""

from __future__ import annotations

import torch
from minillm.kernels import interpreting

QBLOCK = 64  # weights per absmax
QBLOCK2 = 256  # absmax values per second-level scale


def dequantize_nf4_naive(
    packed: torch.Tensor,
    absmax_q: torch.Tensor,
    absmax_scale: torch.Tensor,
    absmax_mean: torch.Tensor,
    codebook: torch.Tensor,
    n: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(n,) weights from packed codes (n_pad/2,) uint8 and the double-quantized absmax."""
    codes = torch.stack([packed >> 4, packed & 0x0F], dim=-1).reshape(-1).long()  # (n_pad,)
    absmax = absmax_q.float() / 127 * absmax_scale.repeat_interleave(QBLOCK2)[: absmax_q.numel()]
    absmax = absmax + absmax_mean.float()  # (n_pad / 64,)
    values = codebook.float()[codes].reshape(-1, QBLOCK) * absmax[:, None]  # (blocks, 64)
    return values.reshape(-1)[:n].to(dtype)


_KERNELS: dict[bool, object] = {}


def _kernel():
    """The jitted kernel, defined on first use (TRITON_INTERPRET must be set by then)."""
    mode = interpreting()
    if mode not in _KERNELS:
        import triton
        import triton.language as tl

        @triton.jit
        def nf4_dequant_kernel(
            packed_ptr,
            absmax_q_ptr,
            absmax_scale_ptr,
            absmax_mean_ptr,
            codebook_ptr,
            out_ptr,
            n,
            BLOCK: tl.constexpr,
            QBLOCK: tl.constexpr,
            QBLOCK2: tl.constexpr,
        ):
            pid = tl.program_id(0)
            offs = pid * BLOCK + tl.arange(0, BLOCK)
            mask = offs < n
            byte = tl.load(packed_ptr + offs // 2, mask=mask, other=0).to(tl.int32)
            code = tl.where(offs % 2 == 0, byte >> 4, byte & 15)
            value = tl.load(codebook_ptr + code, mask=mask, other=0.0)
            block = offs // QBLOCK
            aq = tl.load(absmax_q_ptr + block, mask=mask, other=0).to(tl.float32)
            scale = tl.load(absmax_scale_ptr + block // QBLOCK2, mask=mask, other=0.0)
            mean = tl.load(absmax_mean_ptr)
            absmax = aq / 127.0 * scale + mean
            tl.store(out_ptr + offs, (value * absmax).to(out_ptr.dtype.element_ty), mask=mask)

        _KERNELS[mode] = nf4_dequant_kernel
    return _KERNELS[mode]


def dequantize_nf4_triton(
    packed: torch.Tensor,
    absmax_q: torch.Tensor,
    absmax_scale: torch.Tensor,
    absmax_mean: torch.Tensor,
    codebook: torch.Tensor,
    n: int,
    dtype: torch.dtype = torch.float32,
    block: int = 1024,
) -> torch.Tensor:
    """The Triton twin of `dequantize_nf4_naive`: check, allocate, launch."""
    if not (packed.is_cuda or interpreting()):
        raise RuntimeError("the Triton NF4 kernel needs a CUDA tensor (or TRITON_INTERPRET=1)")
    if packed.dtype != torch.uint8 or absmax_q.dtype != torch.int8:
        raise TypeError(
            f"expected uint8 codes and int8 absmax, got {packed.dtype}, {absmax_q.dtype}"
        )
    if 2 * packed.numel() < n or absmax_q.numel() * QBLOCK < n:
        raise ValueError(f"{packed.numel()} bytes of codes cannot hold {n} weights")
    out = torch.empty(n, dtype=dtype, device=packed.device)
    grid = (triton_cdiv(n, block),)
    _kernel()[grid](
        packed,
        absmax_q,
        absmax_scale.float().contiguous(),
        absmax_mean.float().reshape(1),
        codebook.float().contiguous(),
        out,
        n,
        BLOCK=block,
        QBLOCK=QBLOCK,
        QBLOCK2=QBLOCK2,
    )
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
