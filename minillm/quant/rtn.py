"""Round-to-nearest (RTN) integer quantization of weights: the baseline every scheme beats.

A weight matrix W (N out, K in) is cut into groups of `group_size` consecutive input
columns (per-group; `PER_CHANNEL` = one group per row; `PER_TENSOR` = one group for all).
Each group gets a scale s and an integer zero point z, and each weight becomes a code

    q = clamp(round(w / s) + z, 0, 2^bits - 1)         w_hat = s * (q - z)

Asymmetric (the GPTQ convention): the group's range [min(w, 0), max(w, 0)] is spread over
the 2^bits codes, s = (max - min) / (2^bits - 1), z = round(-min / s). Symmetric:
s = 2 max|w| / (2^bits - 1) and z = 2^(bits-1), so 0 is exact and the range is centred.

Error bound (what the tests check): every w of a group lies within s/2 of the grid
{s (q - z)}, because rounding z moves the grid ends by at most s/2; so |w - w_hat| <= s/2.

Codes are unsigned (0 .. 2^bits - 1) with an explicit zero point: the layout the published
GPTQ and AWQ checkpoints store (`minillm.quant.packing`). Scales are rounded to fp16
before the codes are computed, so saving them as fp16 changes nothing; they are rounded *up*, so the
grid still spans the group's range and the bound holds for the stored scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from minillm.model import CausalLM
from minillm.quant.base import Quantizer, linear_layers

SUPPORTED_BITS = (2, 3, 4, 8)
PER_CHANNEL = -1  # one group spanning the whole input dimension of each output row
PER_TENSOR = 0  # one scale (and zero) for the whole matrix


def check_bits(bits: int, allowed: tuple[int, ...] = SUPPORTED_BITS) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"bits must be an int, got {type(bits).__name__}")
    if bits not in allowed:
        raise ValueError(f"bits={bits} is not supported; choose one of {allowed}")


def grouped_linear_layers(
    model: nn.Module, skip: tuple[str, ...], group_size: int
) -> dict[str, nn.Linear]:
    """`linear_layers`, after checking that `group_size` divides every layer's inputs (a
    clear error naming the layer, before any work)."""
    layers = linear_layers(model, skip)
    for name, m in layers.items():
        try:
            check_group_size(group_size, m.in_features)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    return layers


def check_group_size(group_size: int, in_features: int) -> int:
    """The effective group size (PER_CHANNEL -> in_features); clear error if it does not divide."""
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    if group_size in (PER_CHANNEL, PER_TENSOR):
        return in_features
    if group_size < 0:
        raise ValueError(
            f"group_size={group_size}: use a positive size, {PER_CHANNEL} (per channel) "
            f"or {PER_TENSOR} (per tensor)"
        )
    if in_features % group_size:
        raise ValueError(
            f"group_size={group_size} does not divide in_features={in_features}; "
            f"use a divisor of {in_features}, {PER_CHANNEL} (per channel) "
            f"or {PER_TENSOR} (per tensor)"
        )
    return group_size


@dataclass
class QuantParams:
    """Integer codes and the per-group affine map back to real numbers.

    qweight (N, K) int32 codes in [0, 2^bits); scales, zeros (N, K // group_size): scales
    fp32 holding fp16-representable values, zeros integer-valued; g_idx (K,) int32: the
    group of each input column (column k -> group k // group_size unless act-order
    reordered them, see `minillm.quant.gptq`)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    group_size: int

    def dequantize(self) -> torch.Tensor:
        """w_hat (N, K) float32."""
        g = self.g_idx.long()
        return self.scales[:, g] * (self.qweight.float() - self.zeros[:, g])


def round_up_fp16(x: torch.Tensor) -> torch.Tensor:
    """The smallest fp16 value >= x (as float32): a scale rounded up still spans the range."""
    h = x.half()
    up = torch.nextafter(h, torch.full_like(h, float("inf")))
    return torch.where(h.float() < x, up, h).float()


def find_params(w: torch.Tensor, bits: int, sym: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero of each row of `w` (rows are the groups): (R, n) -> (R,), (R,)."""
    maxq = 2**bits - 1
    w = w.float()
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    span = xmax - xmin
    scale = torch.where(span > 0, span / maxq, torch.ones_like(span))  # all-zero group: s = 1
    scale = round_up_fp16(scale)  # what a checkpoint stores, used from here on
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def find_params_mse(
    w: torch.Tensor,
    bits: int,
    sym: bool = False,
    grid: int = 100,
    max_shrink: float = 0.8,
    norm: float = 2.4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like `find_params`, but shrink each row's range to the factor p in (1 - max_shrink, 1]
    that minimizes sum |w - w_hat|^norm (the `mse` option of the GPTQ reference code):
    clipping a few outliers buys a finer grid for all the other weights."""
    w = w.float()
    best_s, best_z = find_params(w, bits, sym)
    best_err = torch.full_like(best_s, float("inf"))
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    for i in range(int(max_shrink * grid)):
        p = 1 - i / grid
        s, z = find_params(torch.stack([p * xmin, p * xmax], dim=1), bits, sym)
        w_hat = s[:, None] * (quantize_codes(w, s[:, None], z[:, None], bits) - z[:, None])
        err = (w_hat - w).abs().pow(norm).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s, best_z


def quantize_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
) -> torch.Tensor:
    """q = clamp(round(w / s) + z, 0, 2^bits - 1), scale/zero broadcast against w."""
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, 2**bits - 1)


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, sym: bool = False) -> torch.Tensor:
    """Quantize then dequantize `w` (N, K): the error RTN makes, as a float tensor."""
    return quantize_rtn(w, bits, group_size, sym).dequantize().to(w.dtype)


def quantize_rtn(
    w: torch.Tensor, bits: int, group_size: int, sym: bool = False, mse: bool = False
) -> QuantParams:
    """Round-to-nearest quantization of a weight matrix (N, K); `mse`: shrink each group's
    range to the best clip (`find_params_mse`) instead of using min and max."""
    check_bits(bits)
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight (out_features, in_features), got {tuple(w.shape)}")
    N, K = w.shape
    G = check_group_size(group_size, K)
    g_idx = torch.arange(K, dtype=torch.int32, device=w.device) // G
    if group_size == PER_TENSOR:
        s, z = (find_params_mse if mse else find_params)(w.reshape(1, -1), bits, sym)  # (1,)
        scales, zeros = s.expand(N, 1).contiguous(), z.expand(N, 1).contiguous()
    else:
        groups = w.reshape(N * (K // G), G)  # (N * groups, G)
        s, z = (find_params_mse if mse else find_params)(groups, bits, sym)
        scales, zeros = s.view(N, K // G), z.view(N, K // G)
    q = quantize_codes(w, scales[:, g_idx.long()], zeros[:, g_idx.long()], bits)
    return QuantParams(q.to(torch.int32), scales, zeros, g_idx, bits, G)


@dataclass
class RTNQuantizer(Quantizer):
    """Round-to-nearest weight-only quantization (no calibration).

    bits in {2, 3, 4, 8}; group_size: a divisor of every quantized layer's in_features,
    PER_CHANNEL (-1) or PER_TENSOR (0); sym: symmetric (zero point fixed at 2^(bits-1))."""

    bits: int = 4
    group_size: int = 128
    sym: bool = False
    mse: bool = False
    skip: tuple[str, ...] = ("lm_head",)
    name = "rtn"

    def __post_init__(self):
        check_bits(self.bits)
        if self.group_size < PER_CHANNEL:
            raise ValueError(
                f"group_size must be positive, {PER_CHANNEL} (per channel) or {PER_TENSOR} "
                f"(per tensor), got {self.group_size}"
            )

    def quantize(
        self, model: CausalLM, calibration: torch.Tensor | None = None, progress: bool = True
    ) -> dict[str, Any]:
        layers = grouped_linear_layers(model, self.skip, self.group_size)
        params = {}
        for name, m in tqdm(layers.items(), disable=not progress, desc="rtn"):
            params[name] = quantize_rtn(
                m.weight.detach(), self.bits, self.group_size, self.sym, self.mse
            )
        config = dict(bits=self.bits, group_size=self.group_size, sym=self.sym, desc_act=False)
        return state_from_params(model, params, {**config, "method": self.name})

    def convert(self, model: CausalLM, state: dict[str, Any]) -> CausalLM:
        from minillm.quant.linear import convert_model

        return convert_model(model, state)


def state_from_params(
    model: nn.Module,
    params: dict[str, QuantParams],
    config: dict[str, Any],
    extra: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """The runtime state of `model` quantized with `params`: each layer's `QuantLinear`
    buffers ("<layer>.qweight", ...), "quantization_config" (bits, group_size, sym,
    desc_act, method), and `extra`: changed full-precision tensors by state-dict name
    (e.g. AWQ's rescaled norm weights; "<layer>.bias" replaces a layer's bias)."""
    from minillm.quant.linear import QuantLinear

    state: dict[str, Any] = {"quantization_config": dict(config)}
    extra = dict(extra or {})
    for name, p in params.items():
        bias = extra.pop(f"{name}.bias", model.get_submodule(name).bias)  # extra may rescale it
        q = QuantLinear.from_params(p, None if bias is None else bias.detach())
        state.update({f"{name}.{k}": v for k, v in q.state_dict().items()})
    state.update(extra)
    return state
