"""GGUF's legacy block formats: Q8_0, Q4_0, Q5_0, Q5_1, plus F32/F16/BF16, byte for byte.

llama.cpp (ggml) stores a quantized tensor row by row; each row is cut into blocks of 32
weights, and each block is a few bytes: an fp16 scale `d` (and for the `_1` types an
fp16 minimum `m`), then the packed integer codes. A weight comes back as

    Q8_0:  w = d * q,        q int8 in [-127, 127]            34 bytes / 32 weights = 8.5 bits
    Q4_0:  w = d * (q - 8),  q 4-bit in [0, 15]               18 bytes / 32 weights = 4.5 bits
    Q5_0:  w = d * (q - 16), q 5-bit (4 low bits + 1 high bit) 22 bytes / 32 weights = 5.5 bits
    Q5_1:  w = d * q + m,    q 5-bit in [0, 31]               24 bytes / 32 weights = 6.0 bits

Quantization runs once, offline, in numpy, and reproduces ggml's reference code (and so
the `gguf` package) bit for bit: Q8_0 rounds half away from zero with d = amax / 127;
Q4_0 / Q5_0 take d = x_max / -8 (resp. -16), where x_max is the signed value of largest
magnitude, so that value lands exactly on the code 0. Dequantization runs at every
forward pass of a dequantize-on-the-fly layer, so it is written in torch (CPU or GPU)
and does the float32 operations in the same order as ggml, which makes it bit-exact too.

The K-quant formats (Q4_K, Q5_K, Q6_K) live in `gguf_kquants`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import torch

QK = 32  # weights per block of the legacy formats
QK_K = 256  # weights per super-block of the K formats


class GGMLType(IntEnum):
    """ggml's tensor type ids, as stored in a GGUF file (the subset minillm reads/writes)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    BF16 = 30


@dataclass(frozen=True)
class BlockLayout:
    block_size: int  # weights per block
    type_size: int  # bytes per block

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block_size


LAYOUTS: dict[GGMLType, BlockLayout] = {
    GGMLType.F32: BlockLayout(1, 4),
    GGMLType.F16: BlockLayout(1, 2),
    GGMLType.BF16: BlockLayout(1, 2),
    GGMLType.Q4_0: BlockLayout(QK, 2 + QK // 2),
    GGMLType.Q5_0: BlockLayout(QK, 2 + 4 + QK // 2),
    GGMLType.Q5_1: BlockLayout(QK, 2 + 2 + 4 + QK // 2),
    GGMLType.Q8_0: BlockLayout(QK, 2 + QK),
    GGMLType.Q4_K: BlockLayout(QK_K, 2 + 2 + 12 + QK_K // 2),
    GGMLType.Q5_K: BlockLayout(QK_K, 2 + 2 + 12 + QK_K // 8 + QK_K // 2),
    GGMLType.Q6_K: BlockLayout(QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),
}


def ggml_type(t: GGMLType | str | int) -> GGMLType:
    """A type from its name ("Q4_K") or id; a clear error names the supported ones."""
    try:
        if isinstance(t, str):
            return GGMLType[t.upper()]
        return GGMLType(int(t))
    except (KeyError, ValueError):
        supported = ", ".join(f"{x.name} ({int(x)})" for x in GGMLType)
        raise ValueError(f"unsupported GGML tensor type {t!r}; supported: {supported}") from None


# ----------------------------------------------------------------------------- helpers
def round_half_away(x: np.ndarray) -> np.ndarray:
    """C's roundf: halves go away from zero (numpy's rint would go to the even integer)."""
    return np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))


def fp16_bytes(x: np.ndarray) -> np.ndarray:
    """(N,) float32 -> (N, 2) uint8: the little-endian fp16 a block header stores."""
    return x.astype("<f2").reshape(-1, 1).view(np.uint8)


def _fp16_from(raw: torch.Tensor, start: int) -> torch.Tensor:
    """(N, bytes) uint8 -> (N, 1) float32 from the fp16 at byte `start` of each block."""
    return raw[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(N, 16) packed bytes -> (N, 32) codes: low nibbles are weights 0..15, high 16..31."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _high_bits(qh: torch.Tensor) -> torch.Tensor:
    """(N, 4) bytes of a little-endian uint32 -> (N, 32) bits, bit j for weight j."""
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device)
    bits = (qh[:, :, None] >> shifts) & 1  # (N, 4, 8)
    return bits.reshape(qh.shape[0], 32)


def _max_by_magnitude(blocks: np.ndarray) -> np.ndarray:
    """(N, S) -> (N, 1): the signed value of largest magnitude of each block."""
    idx = np.abs(blocks).argmax(axis=-1)[:, None]
    return np.take_along_axis(blocks, idx, axis=-1)


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


# ----------------------------------------------------------------------------- Q8_0
def quantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    """(N, 32) float32 -> (N, 34) uint8: fp16 d, then 32 int8 codes round(x / d)."""
    d = (np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)).astype(np.float32)
    q = round_half_away(blocks * _inverse(d)).astype(np.int8)
    return np.concatenate([fp16_bytes(d), q.view(np.uint8)], axis=-1)


def dequantize_q8_0(raw: torch.Tensor) -> torch.Tensor:
    d = _fp16_from(raw, 0)  # (N, 1)
    q = raw[:, 2:].contiguous().view(torch.int8).float()  # (N, 32)
    return q * d


# ----------------------------------------------------------------------------- Q4_0
def quantize_q4_0(blocks: np.ndarray) -> np.ndarray:
    """(N, 32) -> (N, 18): d = x_max / -8, q = trunc(x / d + 8.5) clipped to [0, 15]."""
    d = (_max_by_magnitude(blocks) / np.float32(-8)).astype(np.float32)
    q = np.trunc(blocks * _inverse(d) + np.float32(8.5)).clip(0, 15).astype(np.uint8)
    packed = q[:, :16] | (q[:, 16:] << 4)
    return np.concatenate([fp16_bytes(d), packed], axis=-1)


def dequantize_q4_0(raw: torch.Tensor) -> torch.Tensor:
    d = _fp16_from(raw, 0)
    q = _nibbles(raw[:, 2:]).to(torch.int8) - 8
    return d * q.float()


# ----------------------------------------------------------------------------- Q5_0 / Q5_1
def _pack_q5(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 32) 5-bit codes -> qh (N, 4) high bits, qs (N, 16) low nibbles."""
    qh = np.packbits((q >> 4).astype(np.uint8), axis=-1, bitorder="little")  # (N, 4)
    qs = (q[:, :16] & 0x0F) | (q[:, 16:] << 4)
    return qh, qs


def _unpack_q5(raw: torch.Tensor, start: int) -> torch.Tensor:
    qh = _high_bits(raw[:, start : start + 4])
    return _nibbles(raw[:, start + 4 :]) | (qh << 4)


def quantize_q5_0(blocks: np.ndarray) -> np.ndarray:
    """(N, 32) -> (N, 22): d = x_max / -16, q = trunc(x / d + 16.5) clipped to [0, 31]."""
    d = (_max_by_magnitude(blocks) / np.float32(-16)).astype(np.float32)
    q = np.trunc(blocks * _inverse(d) + np.float32(16.5)).clip(0, 31).astype(np.uint8)
    qh, qs = _pack_q5(q)
    return np.concatenate([fp16_bytes(d), qh, qs], axis=-1)


def dequantize_q5_0(raw: torch.Tensor) -> torch.Tensor:
    d = _fp16_from(raw, 0)
    q = _unpack_q5(raw, 2).to(torch.int8) - 16
    return d * q.float()


def quantize_q5_1(blocks: np.ndarray) -> np.ndarray:
    """(N, 32) -> (N, 24): d = (max - min) / 31, m = min, q = trunc((x - m) / d + 0.5)."""
    hi = blocks.max(axis=-1, keepdims=True)
    lo = blocks.min(axis=-1, keepdims=True)
    d = ((hi - lo) / np.float32(31)).astype(np.float32)
    q = np.trunc((blocks - lo) * _inverse(d) + np.float32(0.5)).clip(0, 31).astype(np.uint8)
    qh, qs = _pack_q5(q)
    return np.concatenate([fp16_bytes(d), fp16_bytes(lo), qh, qs], axis=-1)


def dequantize_q5_1(raw: torch.Tensor) -> torch.Tensor:
    d, m = _fp16_from(raw, 0), _fp16_from(raw, 2)
    return d * _unpack_q5(raw, 4).float() + m


# ----------------------------------------------------------------------------- floats
def quantize_f32(blocks: np.ndarray) -> np.ndarray:
    return blocks.astype("<f4").view(np.uint8)


def dequantize_f32(raw: torch.Tensor) -> torch.Tensor:
    return raw.contiguous().view(torch.float32)


def quantize_f16(blocks: np.ndarray) -> np.ndarray:
    return blocks.astype("<f2").view(np.uint8)


def dequantize_f16(raw: torch.Tensor) -> torch.Tensor:
    return raw.contiguous().view(torch.float16).float()


def quantize_bf16(blocks: np.ndarray) -> np.ndarray:
    return torch.from_numpy(blocks).to(torch.bfloat16).view(torch.uint8).numpy()


def dequantize_bf16(raw: torch.Tensor) -> torch.Tensor:
    return raw.contiguous().view(torch.bfloat16).float()
