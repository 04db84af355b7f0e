"""GGUF's K-quant formats Q4_K, Q5_K, Q6_K: super-blocks of 256 weights, two-level scales.

A K-quant (llama.cpp PR #1684, "k-quants") stores a super-block of 256 weights as 8
sub-blocks of 32 (Q4_K, Q5_K) or 16 sub-blocks of 16 (Q6_K). Each sub-block has its own
scale (and, for Q4_K/Q5_K, its own minimum), but those are stored as small integers
(6 bits; 8 bits for Q6_K) times one fp16 super-scale `d` (and `dmin`):

    Q4_K / Q5_K:  w = d * sc_j * q - dmin * m_j     q in [0, 15] / [0, 31], sc_j, m_j 6-bit
    Q6_K:         w = d * sc_j * (q - 32)           q in [0, 63],           sc_j int8

    bits per weight: Q4_K 144 bytes / 256 = 4.5, Q5_K 176 / 256 = 5.5, Q6_K 210 / 256 = 6.5625

The encoder is llama.cpp's reference one, rewritten with numpy over all sub-blocks at
once: for each sub-block, start from the min/max (round-to-nearest) scale, then try a
grid of slightly different scales and keep the one whose weighted least-squares fit of
(scale, min) gives the smallest weighted squared error (Q4_K/Q5_K: `make_qkx2_quants`,
weights |x| + rms(x); Q6_K: `make_qx_quants`, weights x^2). Then the sub-block scales
are themselves quantized to 6 (8) bits against the super-block maximum, and every weight
is re-rounded with the scale it will really be decoded with. `search=False` skips the
search: plain round-to-nearest in the same format, the baseline the search must beat.

Rows must be a multiple of 256 weights long; `minillm.quant.gguf` falls back to other
types (as llama.cpp does) when they are not.
"""

from __future__ import annotations

import numpy as np
import torch

from minillm.quant.gguf_blocks import QK_K, _fp16_from, fp16_bytes

GROUP_MAX_EPS = np.float32(1e-15)


def nearest_int(x: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: round half to even (the float trick it uses does exactly that)."""
    return np.rint(x).astype(np.int32)


# ----------------------------------------------------------------------------- searches
def scale_min_search(
    x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric fit of each row of x (N, S): x ~ scale * L - min_, L in [0, nmax].

    Returns scale (N,), min_ (N,) >= 0 (the stored minimum is subtracted) and L (N, S).
    nstep = 0 gives plain round-to-nearest from the row's min and max."""
    x = x.astype(np.float32)
    lo = np.minimum(x.min(axis=1), 0).astype(np.float32)  # the min is never above 0
    hi = x.max(axis=1)
    flat = hi == lo
    span = np.where(flat, np.float32(1), hi - lo).astype(np.float32)
    iscale = np.float32(nmax) / span
    scale = np.where(flat, np.float32(0), np.float32(1) / iscale).astype(np.float32)
    L = np.clip(nearest_int(iscale[:, None] * (x - lo[:, None])), 0, nmax).astype(np.float32)
    best = (weights * (scale[:, None] * L + lo[:, None] - x) ** 2).sum(axis=1)
    sum_w = weights.sum(axis=1)
    sum_x = (weights * x).sum(axis=1)
    for step in range(nstep + 1 if nstep > 0 else 0):
        # the search widens or narrows the grid around nmax levels (llama.cpp's rmin/rdelta)
        iscale = np.float32(rmin + rdelta * step + nmax) / (hi - lo + flat)
        Laux = np.clip(nearest_int(iscale[:, None] * (x - lo[:, None])), 0, nmax)
        Laux = Laux.astype(np.float32)
        sum_l = (weights * Laux).sum(axis=1)
        sum_l2 = (weights * Laux * Laux).sum(axis=1)
        sum_xl = (weights * Laux * x).sum(axis=1)
        D = sum_w * sum_l2 - sum_l * sum_l
        with np.errstate(divide="ignore", invalid="ignore"):
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D  # weighted least squares
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            positive = this_min > 0  # a positive offset is not representable: refit without
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
        this_min = np.where(positive, np.float32(0), this_min)
        err = (weights * (this_scale[:, None] * Laux + this_min[:, None] - x) ** 2).sum(axis=1)
        better = (D > 0) & (err < best) & ~flat
        L = np.where(better[:, None], Laux, L)
        best = np.where(better, err, best)
        scale = np.where(better, this_scale, scale).astype(np.float32)
        lo = np.where(better, this_min, lo).astype(np.float32)
    return scale, -lo, L


def symmetric_search(x: np.ndarray, nmax: int, search: bool) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric fit of each row of x (N, S): x ~ scale * (L - nmax), L in [0, 2 nmax - 1].

    The code -nmax lands on the value of largest magnitude (its sign picks the scale's).
    With `search`, 18 nearby scales are tried and the best x^2-weighted fit is kept
    (llama.cpp's make_qx_quants, rmse_type 1). Returns scale (N,) and L (N, S)."""
    x = x.astype(np.float32)
    idx = np.abs(x).argmax(axis=1)[:, None]
    xmax = np.take_along_axis(x, idx, axis=1)[:, 0]
    zero = np.abs(xmax) < GROUP_MAX_EPS
    xmax = np.where(zero, np.float32(1), xmax)

    def codes(iscale: np.ndarray) -> np.ndarray:
        return np.clip(nearest_int(iscale[:, None] * x), -nmax, nmax - 1)

    iscale = np.float32(-nmax) / xmax
    lq = codes(iscale)
    if not search:
        scale = np.where(zero, np.float32(0), np.float32(1) / iscale)
        return scale.astype(np.float32), np.where(zero[:, None], 0, lq + nmax)
    w = x * x
    sumlx = (w * x * lq).sum(axis=1)
    suml2 = (w * lq * lq).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 > 0, sumlx / suml2, np.float32(0)).astype(np.float32)
    best = scale * sumlx
    for step in [*range(-9, 0), *range(1, 10)]:
        iscale = np.float32(-(nmax + 0.1 * step)) / xmax
        l_try = codes(iscale)
        sumlx = (w * x * l_try).sum(axis=1)
        suml2 = (w * l_try * l_try).sum(axis=1)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        with np.errstate(divide="ignore", invalid="ignore"):
            new_scale = np.where(better, sumlx / suml2, scale).astype(np.float32)
        lq = np.where(better[:, None], l_try, lq)
        scale, best = new_scale, np.where(better, new_scale * sumlx, best)
    scale = np.where(zero, np.float32(0), scale).astype(np.float32)
    return scale, np.where(zero[:, None], 0, lq + nmax)


# ----------------------------------------------------------------------------- Q4_K / Q5_K
def _pack_scales_mins(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins (N, 8) -> the 12 bytes of a Q4_K/Q5_K super-block:
    bytes 0-3 hold scales 0-3 (+ the top 2 bits of scales 4-7), bytes 4-7 the mins 0-3
    (+ top bits of mins 4-7), bytes 8-11 the low nibbles of scales and mins 4-7."""
    out = np.zeros((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return out


def _unpack_scales_mins(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 12) uint8 -> scales (N, 8), mins (N, 8) as float32."""
    a, b, c = sc[:, 0:4], sc[:, 4:8], sc[:, 8:12]
    scales = torch.cat([a & 0x3F, (c & 0x0F) | ((a >> 6) << 4)], dim=1)
    mins = torch.cat([b & 0x3F, (c >> 4) | ((b >> 6) << 4)], dim=1)
    return scales.float(), mins.float()


def _encode_asymmetric(blocks: np.ndarray, nmax: int, rmin: float, nstep: int, search: bool):
    """(N, 256) -> d, dmin (N,), 12 scale bytes (N, 12), codes L (N, 256) for Q4_K/Q5_K."""
    n = blocks.shape[0]
    x = blocks.reshape(n * 8, 32).astype(np.float32)  # (N * 8 sub-blocks, 32)
    av_x = np.sqrt((x * x).sum(axis=1, keepdims=True) / 32)
    weights = av_x + np.abs(x)  # llama.cpp's importance of each weight without an imatrix
    scales, mins, L = scale_min_search(x, weights, nmax, rmin, 0.1, nstep if search else 0)
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
    max_scale, max_min = scales.max(axis=1), mins.max(axis=1)
    inv_scale = np.where(max_scale > 0, np.float32(63) / np.where(max_scale > 0, max_scale, 1), 0)
    inv_min = np.where(max_min > 0, np.float32(63) / np.where(max_min > 0, max_min, 1), 0)
    ls = np.clip(nearest_int(inv_scale[:, None].astype(np.float32) * scales), 0, 63)
    lm = np.clip(nearest_int(inv_min[:, None].astype(np.float32) * mins), 0, 63)
    d16 = fp16_bytes((max_scale / np.float32(63)).astype(np.float32))
    dmin16 = fp16_bytes((max_min / np.float32(63)).astype(np.float32))
    d = d16.view("<f2")[:, 0].astype(np.float32)
    dmin = dmin16.view("<f2")[:, 0].astype(np.float32)
    # re-round every weight against the scale and min it will be decoded with
    sub_d = (d[:, None] * ls).reshape(-1, 1).astype(np.float32)  # (N * 8, 1)
    sub_m = (dmin[:, None] * lm).reshape(-1, 1).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(nearest_int((x + sub_m) / sub_d), 0, nmax)
    L = np.where(sub_d != 0, requant, L).reshape(n, 256).astype(np.uint8)
    head = np.concatenate(
        [d16, dmin16, _pack_scales_mins(ls.astype(np.uint8), lm.astype(np.uint8))], 1
    )
    return head, L


def _pack_low_nibbles(L: np.ndarray) -> np.ndarray:
    """(N, 256) codes -> (N, 128): per 64 weights, byte l = L[l] | L[l + 32] << 4."""
    chunks = (L & 0x0F).reshape(L.shape[0], 4, 2, 32)  # (N, chunk, low/high, 32)
    return (chunks[:, :, 0] | (chunks[:, :, 1] << 4)).reshape(L.shape[0], 128)


def quantize_q4_k(blocks: np.ndarray, search: bool = True) -> np.ndarray:
    """(N, 256) float32 -> (N, 144) uint8: d, dmin, 12 scale bytes, 128 bytes of nibbles."""
    head, L = _encode_asymmetric(blocks, 15, -1.0, 20, search)
    return np.concatenate([head, _pack_low_nibbles(L)], axis=1)


def quantize_q5_k(blocks: np.ndarray, search: bool = True) -> np.ndarray:
    """(N, 256) -> (N, 176): d, dmin, 12 scale bytes, 32 bytes of 5th bits, 128 of nibbles."""
    head, L = _encode_asymmetric(blocks, 31, -0.5, 15, search)
    high = (L >> 4).reshape(L.shape[0], 8, 32)  # (N, sub-block, 32): bit j of qh[l] = sub j
    qh = (high << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1).astype(np.uint8)
    return np.concatenate([head, qh, _pack_low_nibbles(L)], axis=1)


def _decode_asymmetric(raw: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """w = (d * sc_j) * q - (dmin * m_j), in ggml's float32 order. q (N, 8, 32)."""
    d, dmin = _fp16_from(raw, 0), _fp16_from(raw, 2)  # (N, 1)
    sc, m = _unpack_scales_mins(raw[:, 4:16])  # (N, 8)
    return ((d * sc)[:, :, None] * q.float() - (dmin * m)[:, :, None]).reshape(-1, QK_K)


def _low_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(N, 128) -> (N, 8, 32): chunk c holds sub-block 2c (low nibbles) and 2c+1 (high)."""
    chunks = qs.reshape(-1, 4, 1, 32)
    return torch.cat([chunks & 0x0F, chunks >> 4], dim=2).reshape(-1, 8, 32)


def dequantize_q4_k(raw: torch.Tensor) -> torch.Tensor:
    return _decode_asymmetric(raw, _low_nibbles(raw[:, 16:144]))


def dequantize_q5_k(raw: torch.Tensor) -> torch.Tensor:
    qh = raw[:, 16:48][:, None, :]  # (N, 1, 32)
    shifts = torch.arange(8, dtype=torch.uint8, device=raw.device)[None, :, None]
    high = (qh >> shifts) & 1  # (N, 8, 32)
    return _decode_asymmetric(raw, _low_nibbles(raw[:, 48:176]) | (high << 4))


# ----------------------------------------------------------------------------- Q6_K
def quantize_q6_k(blocks: np.ndarray, search: bool = True) -> np.ndarray:
    """(N, 256) -> (N, 210): 128 bytes low nibbles, 64 bytes high 2 bits, 16 int8 scales, d."""
    n = blocks.shape[0]
    x = blocks.reshape(n * 16, 16).astype(np.float32)  # (N * 16 sub-blocks, 16)
    scales, L = symmetric_search(x, 32, search)
    scales = scales.reshape(n, 16)
    idx = np.abs(scales).argmax(axis=1)[:, None]
    max_scale = np.take_along_axis(scales, idx, axis=1)[:, 0]
    zero = np.abs(max_scale) < GROUP_MAX_EPS
    iscale = np.float32(-128) / np.where(zero, np.float32(1), max_scale)
    d16 = fp16_bytes(np.where(zero, 0, np.float32(1) / iscale).astype(np.float32))
    d = d16.view("<f2")[:, 0].astype(np.float32)
    ls = np.minimum(127, nearest_int(iscale[:, None] * scales)).astype(np.int8)  # (N, 16)
    sub_d = (d[:, None] * ls.astype(np.float32)).reshape(-1, 1)  # (N * 16, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(nearest_int(x / sub_d), -32, 31) + 32
    L = (
        np.where(sub_d != 0, requant, L).reshape(n, 2, 4, 32).astype(np.uint8)
    )  # (N, half, quarter, 32)
    ql = (L[:, :, :2] & 0x0F) | ((L[:, :, 2:] & 0x0F) << 4)  # (N, half, 2, 32)
    qh = (L >> 4) << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]
    qh = qh.sum(axis=2).astype(np.uint8)  # (N, half, 32)
    out = np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), ls.view(np.uint8), d16], axis=1)
    out[zero] = 0
    return out


def dequantize_q6_k(raw: torch.Tensor) -> torch.Tensor:
    n = raw.shape[0]
    ql = raw[:, :128].reshape(n, 2, 1, 64)  # (N, half, 1, 64)
    ql = torch.cat([ql & 0x0F, ql >> 4], dim=2).reshape(n, 2, 4, 32)  # (N, half, quarter, 32)
    qh = raw[:, 128:192].reshape(n, 2, 1, 32)
    shifts = (2 * torch.arange(4, dtype=torch.uint8, device=raw.device))[None, None, :, None]
    q = (ql | (((qh >> shifts) & 3) << 4)).to(torch.int8) - 32  # (N, half, quarter, 32)
    scales = raw[:, 192:208].contiguous().view(torch.int8).float()  # (N, 16)
    d = _fp16_from(raw, 208) * scales  # (N, 16)
    return (d.reshape(n, 16, 1) * q.reshape(n, 16, 16).float()).reshape(n, QK_K)
