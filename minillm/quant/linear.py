"""The runtime module of weight-only quantization: `QuantLinear`, a drop-in `nn.Linear`.

It holds the packed integer weights (GPTQ's layout, `minillm.quant.packing`) and computes

    y = x W_hat^T + b,   W_hat[n, k] = scales[g(k), n] * (code[k, n] - zero[g(k), n])

on CUDA with 4-bit codes through the fused Triton W4A16 kernel (`minillm.kernels.w4a16`,
dequantization inside the matmul: the weights cross the memory bus as 4 bits), else by
the naive twin (dequantize W_hat, then matmul).

Buffers (the runtime state; `minillm.quant.formats` converts to and from checkpoints):
    qweight (K * bits / 32, N) int32   codes packed along K, rows in *group order*
    qzeros  (G, N * bits / 32) int32   true zero points (GPTQModel's "v2" convention)
    scales  (G, N) fp16
    perm    (K,) int32                 storage row i holds input feature perm[i]
    bias    (N,) fp32 (optional)

Act-order (GPTQ `desc_act`) gives each input feature k a group g_idx[k] that is not
k // group_size. As exllama does, the rows are stored sorted by group, so every kernel
sees contiguous groups, and the input is gathered instead: y = x[..., perm] @ W_sorted.
Without act-order `perm` is the identity and the gather is skipped.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from minillm.quant.base import set_module
from minillm.quant.packing import pack_cols, pack_rows, unpack_cols, unpack_rows
from minillm.quant.rtn import QuantParams, check_bits


class QuantLinear(nn.Module):
    """y = x @ dequant(qweight) + bias, for x (..., in_features)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool = False,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        check_bits(bits)
        if group_size <= 0 or in_features % group_size:
            raise ValueError(
                f"group_size={group_size} must be positive and divide in_features={in_features}"
            )
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        G = in_features // group_size
        kw = dict(dtype=torch.int32, device=device)
        self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features, **kw))
        self.register_buffer("qzeros", torch.zeros(G, out_features * bits // 32, **kw))
        self.register_buffer(
            "scales", torch.ones(G, out_features, dtype=torch.float16, device=device)
        )
        self.register_buffer("perm", torch.arange(in_features, **kw))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, device=device))
        else:
            self.bias = None
        self.use_kernel = True  # set False to force the naive path (tests, benchmarks)
        self.act_order = False  # perm is not the identity (kept in sync by refresh())
        self.register_load_state_dict_post_hook(lambda module, _keys: module.refresh())

    @classmethod
    def from_params(cls, p: QuantParams, bias: torch.Tensor | None = None) -> QuantLinear:
        """Pack `QuantParams` (codes (N, K), scales/zeros (N, G), g_idx (K,))."""
        N, K = p.qweight.shape
        m = cls(K, N, p.bits, p.group_size, bias is not None, device=p.qweight.device)
        perm = torch.sort(p.g_idx.long(), stable=True).indices  # (K,): features in group order
        expected = torch.arange(K, device=perm.device) // p.group_size
        if not torch.equal(p.g_idx.long()[perm], expected):
            raise ValueError(
                f"g_idx must give every group exactly group_size={p.group_size} input features"
            )
        m.qweight.copy_(pack_rows(p.qweight[:, perm].t(), p.bits))  # (K*bits/32, N)
        m.qzeros.copy_(pack_cols(p.zeros.round().to(torch.int32).t(), p.bits))  # (G, N*bits/32)
        m.scales.copy_(p.scales.t().half())  # (G, N)
        m.perm.copy_(perm.to(torch.int32))
        if bias is not None:
            m.bias.copy_(bias.float())
        m.refresh()
        return m

    def params(self) -> QuantParams:
        """The unpacked codes, scales, zeros and g_idx, in the original feature order."""
        perm = self.perm.long()
        codes_sorted = unpack_rows(self.qweight, self.bits).t()  # (N, K), columns in group order
        codes = torch.empty_like(codes_sorted)
        codes[:, perm] = codes_sorted
        g_idx = torch.empty(self.in_features, dtype=torch.int32, device=perm.device)
        g_idx[perm] = (torch.arange(self.in_features, device=perm.device) // self.group_size).to(
            torch.int32
        )
        zeros = unpack_cols(self.qzeros, self.bits).t().float()  # (N, G)
        return QuantParams(codes, self.scales.t().float(), zeros, g_idx, self.bits, self.group_size)

    def dequantize_sorted(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W_hat^T with rows in storage (group) order: (K, N). The naive path's weight."""
        codes = unpack_rows(self.qweight, self.bits)  # (K, N)
        zeros = unpack_cols(self.qzeros, self.bits)  # (G, N)
        g = torch.arange(self.in_features, device=codes.device) // self.group_size
        w = (codes - zeros[g]).float() * self.scales[g].float()  # (K, N)
        return w.to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (N, K) fp32, as `nn.Linear.weight` would hold it."""
        w_sorted = self.dequantize_sorted().t()  # (N, K) columns in group order
        w = torch.empty_like(w_sorted)
        w[:, self.perm.long()] = w_sorted
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input (..., {self.in_features}), got {tuple(x.shape)}")
        if self.act_order:
            x = x[..., self.perm.long()]
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if self.use_kernel and x.is_cuda and self.bits == 4:
            from minillm.kernels.w4a16 import kernel_supports, w4a16_matmul

            if kernel_supports(x2, self.group_size):
                y = w4a16_matmul(x2, self.qweight, self.scales, self.qzeros, self.group_size)
            else:
                y = x2 @ self.dequantize_sorted(x.dtype)
        else:
            y = x2 @ self.dequantize_sorted(x.dtype)  # (M, N)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def refresh(self) -> None:
        """Recompute what is derived from the buffers (after loading them)."""
        identity = torch.arange(self.in_features, device=self.perm.device)
        self.act_order = bool((self.perm.long() != identity).any())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, act_order={self.act_order}, "
            f"bias={self.bias is not None}"
        )


def convert_model(model: nn.Module, state: dict[str, Any]) -> nn.Module:
    """Swap each linear layer named in `state` for a `QuantLinear` holding its tensors, and
    copy the full-precision tensors `state` also holds (e.g. AWQ's rescaled norms); in place.

    `state` maps "<layer>.qweight" / ".qzeros" / ".scales" / ".perm" / ".bias" to tensors,
    other state-dict names to replacement tensors, and "quantization_config" to
    {"bits", "group_size", ...}."""
    config = state.get("quantization_config")
    if not isinstance(config, dict) or "bits" not in config or "group_size" not in config:
        raise ValueError("state has no quantization_config with bits and group_size")
    bits = config["bits"]
    layers = sorted({k.rsplit(".", 1)[0] for k in state if k.endswith(".qweight")})
    for name in layers:
        linear = model.get_submodule(name)
        K, N = linear.in_features, linear.out_features
        group_size = K if config["group_size"] in (-1, 0) else config["group_size"]
        m = QuantLinear(
            K, N, bits, group_size, linear.bias is not None, device=linear.weight.device
        )
        m.load_state_dict({k: state[f"{name}.{k}"] for k in m.state_dict()}, strict=True)
        set_module(model, name, m)
    own = model.state_dict()
    with torch.no_grad():
        for k, v in state.items():
            if k == "quantization_config" or k.rsplit(".", 1)[0] in layers:
                continue
            if k not in own:
                raise ValueError(f"state holds {k!r}, which the model does not have")
            own[k].copy_(v)
    model.quantization_config = dict(config)
    return model
