"""NF4: 4-bit NormalFloat with blockwise absmax and double quantization (QLoRA).

Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs" (2023). Trained weights
are close to normally distributed, so the 16 code values are quantiles of N(0, 1)
rescaled to [-1, 1]: equal probability mass per code ("information-theoretically
optimal" for normal data). To get an exact zero, 8 quantiles come from the positive half
and 7 from the negative half (plus 0), with the outermost probability `offset` =
1 - (1/32 + 1/30) / 2 = 0.9677 (the midpoint of the 16- and 15-quantile tails).

Each block of 64 weights stores its absmax c1 (weights / c1 lie in [-1, 1]); the codes are
the nearest codebook values. Storing c1 in fp32 costs 32 / 64 = 0.5 bits per weight;
double quantization stores c1 - mean in 8 bits per block with one fp32 scale per 256
blocks:

    bits / weight = 4 + 8 / 64 + 32 / (64 * 256) = 4 + 0.125 + 0.002 = 4.127

(QLoRA uses an 8-bit float code for c1; minillm uses symmetric int8, same cost.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from minillm.kernels.nf4 import QBLOCK, QBLOCK2, dequantize_nf4_naive, dequantize_nf4_triton
from minillm.model import CausalLM
from minillm.quant.base import Quantizer, linear_layers, set_module

NF4_OFFSET = 1 - (1 / 32 + 1 / 30) / 2  # 0.96770833...


def nf4_codebook(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The 16 NF4 values, built as in the QLoRA paper: normal quantiles, 8 positive,
    7 negative, and an exact zero, normalized to [-1, 1]."""
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    return (values / values.max()).float()


def fp4_codebook() -> torch.Tensor:
    """FP4 (E2M1: 1 sign, 2 exponent, 1 mantissa bit) values {0, .5, 1, 1.5, 2, 3, 4, 6} / 6,
    both signs (two zeros)."""
    mags = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=torch.float32) / 6
    return torch.cat([mags, -mags])


def int4_codebook() -> torch.Tensor:
    """Symmetric int4 with absmax scaling: k / 7, k = -7..7 (15 levels; -8 is never used)."""
    return torch.arange(-7, 8, dtype=torch.float32) / 7


def constant_bits_per_parameter(
    double_quant: bool, block: int = QBLOCK, block2: int = QBLOCK2
) -> float:
    """Bits per weight spent on the absmax constants: 32 / 64 = 0.5 in fp32;
    8 / 64 + 32 / (64 * 256) = 0.127 double-quantized (large tensors: the mean's 32 bits
    and the padding of the last blocks vanish)."""
    return 8 / block + 32 / (block * block2) if double_quant else 32 / block


def quantize_to_codebook(w: torch.Tensor, codebook: torch.Tensor, block: int = QBLOCK):
    """Blockwise absmax + nearest codebook value: (codes (n_pad,) uint8, absmax (n_pad/block,)).

    The flat weight is zero-padded to whole blocks."""
    flat = w.detach().float().reshape(-1)
    pad = (-flat.numel()) % block
    blocks = F.pad(flat, (0, pad)).reshape(-1, block)  # (n_blocks, block)
    absmax = blocks.abs().amax(dim=1)
    normed = blocks / torch.where(absmax > 0, absmax, 1)[:, None]
    order = codebook.float().sort()
    mids = (order.values[1:] + order.values[:-1]) / 2  # nearest value = bucket between midpoints
    codes = order.indices[torch.bucketize(normed, mids)]
    return codes.reshape(-1).to(torch.uint8), absmax


def codebook_error(w: torch.Tensor, codebook: torch.Tensor, block: int = QBLOCK) -> float:
    """Mean squared error of blockwise-absmax quantization of w with a 16-value codebook."""
    codes, absmax = quantize_to_codebook(w, codebook, block)
    back = (codebook[codes.long()].reshape(-1, block) * absmax[:, None]).reshape(-1)
    return float(((back[: w.numel()] - w.reshape(-1).float()) ** 2).mean())


@dataclass
class NF4Tensor:
    """A weight in NF4 with double-quantized absmax: what a QLoRA checkpoint stores."""

    packed: torch.Tensor  # (n_pad / 2,) uint8, two codes per byte, first in the high nibble
    absmax_q: torch.Tensor  # (n_pad / 64,) int8: round((absmax - mean) / scale * 127)
    absmax_scale: torch.Tensor  # (ceil(n_pad / 64 / 256),) fp32
    absmax_mean: torch.Tensor  # () fp32
    codebook: torch.Tensor  # (16,) fp32
    shape: tuple[int, ...]

    @classmethod
    def from_weight(cls, w: torch.Tensor) -> NF4Tensor:
        codebook = nf4_codebook().to(w.device)
        codes, absmax = quantize_to_codebook(w, codebook)
        packed = (codes[0::2] << 4) | codes[1::2]
        mean = absmax.mean()
        centered = F.pad(absmax - mean, (0, (-absmax.numel()) % QBLOCK2)).reshape(-1, QBLOCK2)
        scale = centered.abs().amax(dim=1)  # (n_blocks2,)
        safe = torch.where(scale > 0, scale, 1)[:, None]
        q = torch.round(centered / safe * 127).to(torch.int8).reshape(-1)[: absmax.numel()]
        return cls(packed, q, scale.float(), mean.float(), codebook, tuple(w.shape))

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    def dequantize(self, dtype: torch.dtype = torch.float32, use_triton: bool | None = None):
        """The weight in `dtype`; the Triton kernel on CUDA (or when asked), else PyTorch."""
        if use_triton is None:
            use_triton = self.packed.is_cuda
        fn = dequantize_nf4_triton if use_triton else dequantize_nf4_naive
        args = (self.packed, self.absmax_q, self.absmax_scale, self.absmax_mean, self.codebook)
        return fn(*args, self.numel, dtype).reshape(self.shape)

    def storage_bits(self) -> dict[str, int]:
        """Exact bits stored, by part (the codebook is shared by all tensors: not counted)."""
        return {
            "codes": 8 * self.packed.numel(),
            "absmax": 8 * self.absmax_q.numel(),
            "absmax_scales": 32 * self.absmax_scale.numel(),
            "absmax_mean": 32,
        }

    def bits_per_parameter(self) -> float:
        return sum(self.storage_bits().values()) / self.numel

    def to(self, device) -> NF4Tensor:
        move = {k: getattr(self, k).to(device) for k in ("packed", "absmax_q", "absmax_scale")}
        return NF4Tensor(**move, absmax_mean=self.absmax_mean.to(device),
                         codebook=self.codebook.to(device), shape=self.shape)  # fmt: skip


class NF4Linear(nn.Module):
    """A frozen linear layer stored in NF4: y = x @ dequant(W)^T + b, dequantized on the fly
    (Triton kernel on CUDA, PyTorch elsewhere)."""

    def __init__(self, weight: NF4Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.shape = weight.shape
        for name in ("packed", "absmax_q", "absmax_scale", "absmax_mean", "codebook"):
            self.register_buffer(name, getattr(weight, name))
        self.bias = (
            None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        )

    @property
    def weight_nf4(self) -> NF4Tensor:
        return NF4Tensor(self.packed, self.absmax_q, self.absmax_scale, self.absmax_mean,
                         self.codebook, self.shape)  # fmt: skip

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight_nf4.dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, nf4+double-quant"


def dequantized_copy(model: nn.Module) -> nn.Module:
    """A copy with every NF4Linear replaced by an nn.Linear holding its dequantized weight.

    Same outputs (the same weights, the same matmuls), without re-dequantizing at every
    forward: what generation loops want. Adapters (LoRA) on top are kept."""
    import copy

    out = copy.deepcopy(model)
    for name, m in list(out.named_modules()):
        if isinstance(m, NF4Linear):
            linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            linear = linear.to(m.packed.device).requires_grad_(False)
            with torch.no_grad():
                linear.weight.copy_(m.dequantized_weight())
                if m.bias is not None:
                    linear.bias.copy_(m.bias)
            set_module(out, name, linear)
    return out


@dataclass
class NF4Quantizer(Quantizer):
    """NF4 with double quantization on every linear layer but the head."""

    name = "nf4"

    def quantize(
        self, model: CausalLM, calibration: torch.Tensor | None = None, progress: bool = True
    ) -> dict[str, Any]:
        layers = linear_layers(model)
        return {
            name: {"weight": NF4Tensor.from_weight(m.weight), "bias": m.bias}
            for name, m in tqdm(layers.items(), disable=not progress, desc="NF4")
        }

    def convert(self, model: CausalLM, state: dict[str, Any]) -> CausalLM:
        for name, s in state.items():
            set_module(model, name, NF4Linear(s["weight"], s["bias"]))
        return model
