"""W8A8: int8 weights *and* int8 activations, with activation scales from calibration data.

Weights are quantized per output channel, symmetric: s_w[n] = max_k |W[n, k]| / 127.
Activations change with every input, so their scale is fixed in advance (static, per
tensor) from the inputs that calibration tokens produce at each linear layer:

    x_q = clamp(round(x / s_x), -127, 127)      y = s_x s_w[n] * sum_k x_q[k] W_q[n, k]

which an int8 GEMM (int32 accumulation) computes; here it is simulated in float32 on
integer values. How s_x is chosen is the whole game (compared in the notebook):
  - "minmax": s_x = max|x| / 127: nothing clips, but one outlier coarsens the grid;
  - "percentile": s_x = quantile(|x|, p) / 127: the top 1 - p of values clip;
  - "mse": s_x = c / 127 with the clip c that minimizes E[(x - x_hat)^2] on the samples.
SmoothQuant (Xiao et al., 2023) optionally moves activation outliers into the weights
first: s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), X / s folded into the previous
norm, W * s into the layer (the same fold as AWQ, `minillm.quant.awq`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from minillm.model import CausalLM
from minillm.quant.awq import _fold, _scale_groups
from minillm.quant.base import DEFAULT_SKIP, Quantizer, linear_layers, set_module

CALIBRATION_METHODS = ("minmax", "percentile", "mse")
QMAX = 127
MAX_SAMPLES = 1 << 20  # activation values kept per layer for percentile / mse


def int8_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 codes of x (as float): clamp(round(x / scale), -127, 127)."""
    return torch.clamp(torch.round(x / scale), -QMAX, QMAX)


def activation_scale(
    samples: torch.Tensor, method: str = "minmax", percentile: float = 99.99
) -> float:
    """s_x for activation values `samples` (any shape) by `method`."""
    if method not in CALIBRATION_METHODS:
        raise ValueError(
            f"unknown calibration method {method!r}; choose one of {CALIBRATION_METHODS}"
        )
    a = samples.detach().float().abs().flatten()
    amax = float(a.max()) if a.numel() else 0.0
    if amax == 0:
        return 1.0
    if method == "minmax":
        return amax / QMAX
    if method == "percentile":
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must lie in (0, 100], got {percentile}")
        return max(float(torch.quantile(a, percentile / 100)), amax * 1e-4) / QMAX
    best_c, best_err = amax, float("inf")
    for c in torch.linspace(amax / 64, amax, 128).tolist():  # mse: search the clip value
        err = float(((int8_quantize(a, c / QMAX) * (c / QMAX) - a) ** 2).mean())
        if err < best_err:
            best_c, best_err = c, err
    return best_c / QMAX


class W8A8Linear(nn.Module):
    """y = s_x s_w * (int8(x / s_x) @ W_q^T) + bias, with a static activation scale s_x."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer(
            "weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer("weight_scale", torch.ones(out_features, device=device))
        self.register_buffer("input_scale", torch.ones((), device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, input_scale: float) -> W8A8Linear:
        m = cls(
            linear.in_features, linear.out_features, linear.bias is not None, linear.weight.device
        )
        w = linear.weight.detach().float()
        s_w = (w.abs().amax(dim=1) / QMAX).clamp(min=1e-12)  # (N,)
        m.weight.copy_(int8_quantize(w, s_w[:, None]).to(torch.int8))
        m.weight_scale.copy_(s_w)
        m.input_scale.fill_(input_scale)
        if linear.bias is not None:
            m.bias.data.copy_(linear.bias.detach())
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_q = int8_quantize(x.float(), self.input_scale)  # (..., K) integer-valued
        acc = x_q @ self.weight.float().t()  # (..., N): the int32 accumulator, simulated
        y = acc * (self.input_scale * self.weight_scale)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)


@torch.no_grad()
def collect_activations(
    model: CausalLM, calibration: torch.Tensor, names: list[str], batch_size: int = 8, seed: int = 0
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(a random sample of at most MAX_SAMPLES values, every channel's max |x| (K,)) of the
    inputs of each linear layer `names`, from the float model run on the calibration tokens."""
    g = torch.Generator().manual_seed(seed)
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    chan_max: dict[str, torch.Tensor] = {}
    per_batch = MAX_SAMPLES // max(1, -(-len(calibration) // batch_size))

    def hook(name):
        def fn(_m, args, _out):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])  # (tokens, K)
            idx = torch.randint(0, x.numel(), (min(per_batch, x.numel()),), generator=g)
            seen[name].append(x.flatten()[idx.to(x.device)].cpu())
            m = x.abs().amax(dim=0).cpu()
            chan_max[name] = m if name not in chan_max else torch.maximum(chan_max[name], m)

        return fn

    hooks = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        for i in range(0, len(calibration), batch_size):
            model(calibration[i : i + batch_size].to(model.device))
    finally:
        for h in hooks:
            h.remove()
    return {n: (torch.cat(seen[n]), chan_max[n]) for n in names}


@dataclass
class W8A8Quantizer(Quantizer):
    """Static W8A8: per-channel int8 weights, per-tensor int8 activations from calibration."""

    method: str = "minmax"
    percentile: float = 99.99
    smooth_alpha: float | None = None
    batch_size: int = 8
    skip: tuple[str, ...] = DEFAULT_SKIP
    name = "w8a8"
    needs_calibration = True

    def __post_init__(self):
        if self.method not in CALIBRATION_METHODS:
            raise ValueError(
                f"unknown calibration method {self.method!r}; choose one of {CALIBRATION_METHODS}"
            )
        if self.smooth_alpha is not None and not 0 <= self.smooth_alpha <= 1:
            raise ValueError(f"smooth_alpha must lie in [0, 1] or be None, got {self.smooth_alpha}")

    @torch.no_grad()
    def smooth(self, model: CausalLM, calibration: torch.Tensor) -> dict[str, torch.Tensor]:
        """SmoothQuant: fold per-channel scales into norms and weights (in place); return the
        changed norm/linear tensors by state-dict name."""
        names = list(linear_layers(model, self.skip))
        stats = collect_activations(model, calibration, names, self.batch_size)
        for i, layer in enumerate(model.model.layers):
            prefix = f"model.layers.{i}"
            for prev, group in _scale_groups(layer):
                if not all(f"{prefix}.{n}" in stats for n in group):
                    continue
                x_max = stats[f"{prefix}.{group[0]}"][1]  # (K,) max |x| per input channel
                w_max = torch.cat([layer.get_submodule(n).weight.abs() for n in group]).amax(dim=0)
                a = self.smooth_alpha
                s = (x_max.clamp(min=1e-5).pow(a) / w_max.clamp(min=1e-5).pow(1 - a)).clamp(
                    min=1e-5
                )
                _fold(
                    layer.get_submodule(prev),
                    [layer.get_submodule(n) for n in group],
                    s.to(w_max.device),
                )
        return {k: v.clone() for k, v in model.state_dict().items() if "norm" in k}

    @torch.no_grad()
    def quantize(
        self, model: CausalLM, calibration: torch.Tensor | None = None, progress: bool = True
    ) -> dict[str, Any]:
        if calibration is None:
            raise ValueError("w8a8 needs calibration tokens (see calibration_tokens)")
        original = {k: v.clone() for k, v in model.state_dict().items()}
        try:
            extra = self.smooth(model, calibration) if self.smooth_alpha is not None else {}
            layers = linear_layers(model, self.skip)
            samples = collect_activations(model, calibration, list(layers), self.batch_size)
            state: dict[str, Any] = {
                "quantization_config": {"method": "w8a8", "bits": 8, "activation": self.method}
            }
            for name, lin in tqdm(layers.items(), disable=not progress, desc="w8a8"):
                s_x = activation_scale(samples[name][0], self.method, self.percentile)
                q = W8A8Linear.from_linear(lin, s_x)
                state.update({f"{name}.{k}": v for k, v in q.state_dict().items()})
            state.update(extra)
        finally:
            model.load_state_dict(original)
        return state

    def convert(self, model: CausalLM, state: dict[str, Any]) -> CausalLM:
        names = sorted({k.rsplit(".", 1)[0] for k in state if k.endswith(".input_scale")})
        for name in names:
            lin = model.get_submodule(name)
            m = W8A8Linear(
                lin.in_features, lin.out_features, lin.bias is not None, lin.weight.device
            )
            m.load_state_dict({k: state[f"{name}.{k}"] for k in m.state_dict()})
            set_module(model, name, m)
        own = model.state_dict()
        with torch.no_grad():
            for k, v in state.items():
                if k != "quantization_config" and k.rsplit(".", 1)[0] not in names:
                    own[k].copy_(v)
        model.quantization_config = dict(state["quantization_config"])
        return model
