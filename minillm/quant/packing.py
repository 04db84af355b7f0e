"""Bit packing of integer codes into int32 words, as published GPTQ and AWQ checkpoints do.

GPTQ (AutoGPTQ / GPTQModel, `quant_method: "gptq"`): the codes are a little-endian bit
stream along one dimension. Value i of a run lies at bits [bits*i, bits*(i+1)) of the
stream, and word w holds stream bits [32w, 32w + 32):

    qweight (K * bits / 32, N) int32    codes packed along the input dim K (rows)
    qzeros  (G, N * bits / 32) int32    zero points packed along the output dim N
    for bits in {2, 4, 8}:  word = sum_j code[j] << (bits * j),  j < 32 / bits
    for bits == 3: 32 codes fill 3 words and code 10 and code 21 straddle two words

AWQ (AutoAWQ "GEMM" kernels, `quant_method: "awq"`, 4 bits only): both qweight (K, N / 8)
and qzeros (G, N / 8) pack 8 consecutive *output* columns into one word, in the
interleaved order AWQ_ORDER: nibble j of a word holds column AWQ_ORDER[j] of its eight
(AutoAWQ's `awq/utils/packing_utils.py`).

Words are stored as int32 (a code in the top bits makes the word negative); the
arithmetic here runs in int64 so that shifting never overflows.
"""

from __future__ import annotations

import math

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble j of an AWQ word holds column AWQ_ORDER[j]
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # column c is in nibble AWQ_REVERSE_ORDER[c]


def pack_unit(bits: int) -> int:
    """How many codes fill a whole number of 32-bit words (4 bits: 8; 3 bits: 32 in 3 words)."""
    return math.lcm(bits, 32) // bits


def _check_codes(codes: torch.Tensor, bits: int, dim: int) -> None:
    if codes.dim() != 2:
        raise ValueError(f"expected 2-D codes, got shape {tuple(codes.shape)}")
    unit = pack_unit(bits)
    if codes.shape[dim] % unit:
        raise ValueError(
            f"cannot pack {codes.shape[dim]} {bits}-bit codes along dim {dim}: "
            f"the count must be a multiple of {unit}"
        )
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**bits):
        raise ValueError(
            f"{bits}-bit codes must lie in [0, {2**bits}), got [{codes.min()}, {codes.max()}]"
        )


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 -> the int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(K, N) codes -> (K * bits / 32, N) int32, packed along K (GPTQ qweight)."""
    _check_codes(codes, bits, 0)
    K, N = codes.shape
    n_words = K * bits // 32
    unit = pack_unit(bits)
    words_per_unit = unit * bits // 32
    c = codes.to(torch.int64).view(K // unit, unit, N)  # (units, codes per unit, N)
    words = torch.zeros(K // unit, words_per_unit, N, dtype=torch.int64, device=codes.device)
    for j in range(unit):  # code j of a unit starts at stream bit bits * j
        start = bits * j
        w, off = divmod(start, 32)
        words[:, w] |= (c[:, j] << off) & 0xFFFFFFFF
        if off + bits > 32:  # it straddles into the next word (3 bits only)
            words[:, w + 1] |= c[:, j] >> (32 - off)
    return _to_int32(words.view(n_words, N))


def unpack_rows(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """(K * bits / 32, N) int32 -> (K, N) int32 codes: the inverse of `pack_rows`."""
    n_words, N = qweight.shape
    unit = pack_unit(bits)
    words_per_unit = unit * bits // 32
    if n_words % words_per_unit:
        raise ValueError(
            f"{n_words} rows of {bits}-bit words are not whole units of {words_per_unit}"
        )
    w = qweight.to(torch.int64) & 0xFFFFFFFF  # unsigned view of the words
    w = w.view(n_words // words_per_unit, words_per_unit, N)
    mask = 2**bits - 1
    codes = []
    for j in range(unit):
        word, off = divmod(bits * j, 32)
        v = w[:, word] >> off
        if off + bits > 32:
            v = v | (w[:, word + 1] << (32 - off))
        codes.append(v & mask)
    return torch.stack(codes, dim=1).view(-1, N).to(torch.int32)  # (K, N)


def pack_cols(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(G, N) codes -> (G, N * bits / 32) int32, packed along N (GPTQ qzeros)."""
    _check_codes(codes, bits, 1)
    return pack_rows(codes.t(), bits).t().contiguous()


def unpack_cols(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """(G, N * bits / 32) int32 -> (G, N) codes: the inverse of `pack_cols`."""
    return unpack_rows(qzeros.t(), bits).t().contiguous()


def pack_awq(codes: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """(R, N) 4-bit codes -> (R, N / 8) int32 in AWQ's interleaved nibble order."""
    if bits != 4:
        raise ValueError(f"the AWQ GEMM layout packs 4-bit codes only, got bits={bits}")
    _check_codes(codes, bits, 1)
    R, N = codes.shape
    c = codes.to(torch.int64).view(R, N // 8, 8)  # (R, words, 8 columns)
    words = torch.zeros(R, N // 8, dtype=torch.int64, device=codes.device)
    for j, col in enumerate(AWQ_ORDER):
        words |= c[:, :, col] << (4 * j)
    return _to_int32(words)


def unpack_awq(qweight: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """(R, N / 8) int32 in AWQ order -> (R, N) codes: the inverse of `pack_awq`."""
    if bits != 4:
        raise ValueError(f"the AWQ GEMM layout packs 4-bit codes only, got bits={bits}")
    w = qweight.to(torch.int64) & 0xFFFFFFFF
    nibbles = torch.stack([(w >> (4 * j)) & 0xF for j in range(8)], dim=-1)  # (R, words, 8)
    cols = nibbles[:, :, list(AWQ_REVERSE_ORDER)]  # column c from nibble AWQ_REVERSE_ORDER[c]
    return cols.reshape(qweight.shape[0], -1).to(torch.int32)
