"""AWQ: activation-aware weight quantization (scale the salient input channels, then clip).

Lin, Tang, Tang, Yang, Dang, Gan, Han, 2023, "AWQ: Activation-aware Weight Quantization for
LLM Compression and Acceleration"; the procedure of the AutoAWQ implementation. A few
input channels carry much larger activations than the rest; their weights matter most.
Scaling input channel k of the weights up by s_k (and its activation down by s_k, folded
into the previous operation, so the float model is unchanged) makes the rounding error of
those weights relatively smaller:

    y = x W^T = (x / s) (W diag(s))^T      ->   y_hat = (x / s) Q(W diag(s))^T

The scales come from a grid search over an exponent alpha in [0, 1):

    s = mean|x|^alpha / mean|W_normalized|^(1 - alpha),  normalized so max(s) min(s) = 1
    alpha* = argmin || x W^T - (x / s) Q(W diag(s))^T ||^2      (on calibration inputs)

then, per output row and group, a clipping search shrinks the range max|w| to the factor
in (0.5, 1] that minimizes the group's output error, and the weights are quantized to
int4 per group, round to nearest. Every linear layer that reads the same input gets one
shared s (q/k/v after input_layernorm, gate/up after post_attention_layernorm, down
after up_proj, o after v_proj when their shapes allow); the previous operation's
weights are divided by s. As in AutoAWQ, q and k are not clipped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from minillm.model import CausalLM
from minillm.quant.base import DEFAULT_SKIP, Quantizer, linear_layers
from minillm.quant.rtn import (
    QuantParams,
    check_bits,
    check_group_size,
    quantize_rtn,
    state_from_params,
)
from minillm.quant.sequential import LayerRunner

NO_CLIP = ("self_attn.q_proj", "self_attn.k_proj")


def _fake_quant(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    return quantize_rtn(w, bits, group_size, sym=False).dequantize()


def awq_scale_search(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    bits: int = 4,
    group_size: int = 128,
    n_grid: int = 20,
    duo_scaling: bool = True,
    n_tokens: int = 4096,
    forward: Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, float, list[float]]:
    """Best per-channel scales s (K,) for the weights (N_i, K) that all read x (n, K); the
    loss is measured on at most `n_tokens` evenly spaced tokens of x, at the output of
    `forward(x, weights)` (default: the linear layers' outputs, concatenated; AutoAWQ
    measures the MLP's output for gate/up).

    Returns (s, the best alpha, the output error of every alpha on the grid)."""
    x = x.float()
    W = torch.cat([w.float() for w in weights])  # (sum N_i, K)
    G = check_group_size(group_size, W.shape[1])
    x_mean = x.abs().mean(dim=0)  # (K,) activation magnitude per input channel
    w_groups = W.abs().view(-1, G)  # (rows * groups, G)
    w_norm = (w_groups / (w_groups.amax(dim=1, keepdim=True) + 1e-6)).view_as(W)
    w_mean = w_norm.mean(dim=0)  # (K,) weight magnitude, relative to its group's max
    x = x[:: max(1, len(x) // n_tokens)][:n_tokens]  # the tokens the loss is measured on
    rows = [w.shape[0] for w in weights]
    forward = forward or (lambda x, ws: x @ torch.cat(ws).t())
    ref = forward(x, list(W.split(rows)))  # (n, outputs)
    losses, best, best_s, best_alpha = [], float("inf"), None, 0.0
    for i in range(n_grid):
        alpha = i / n_grid
        if duo_scaling:
            s = x_mean.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4)
        else:
            s = x_mean.pow(alpha).clamp(min=1e-4)
        s = (s / (s.max() * s.min()).sqrt()).clamp(min=1e-4)  # centre the scales around 1
        W_hat = _fake_quant(W * s, bits, group_size) / s  # (sum N_i, K)
        loss = float(((forward(x, list(W_hat.split(rows))) - ref) ** 2).mean())
        losses.append(loss)
        if loss < best:
            best, best_s, best_alpha = loss, s, alpha
    return best_s, best_alpha, losses


def awq_clip_search(
    x: torch.Tensor,
    w: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    n_tokens: int = 512,
) -> torch.Tensor:
    """Best clipping threshold per (output row, group) of w (N, K): (N, K // G)."""
    N, K = w.shape
    G = check_group_size(group_size, K)
    x = x.float()[:: max(1, len(x) // n_tokens)][:n_tokens].view(-1, K // G, G)  # (t, groups, G)
    wg = w.float().view(N, K // G, G)
    ref = torch.einsum("tgk,ogk->otg", x, wg)  # (N, t, groups): each group's share of y
    org_max = wg.abs().amax(dim=-1)  # (N, groups)
    best_max, best_err = org_max.clone(), torch.full_like(org_max, float("inf"))
    for i in range(int(max_shrink * n_grid)):
        max_val = org_max * (1 - i / n_grid)
        clipped = torch.maximum(torch.minimum(wg, max_val[..., None]), -max_val[..., None])
        q = _fake_quant(clipped.view(N, K), bits, group_size).view(N, K // G, G)
        err = (torch.einsum("tgk,ogk->otg", x, q) - ref).pow(2).mean(dim=1)  # (N, groups)
        better = err < best_err
        best_err, best_max = (
            torch.where(better, err, best_err),
            torch.where(better, max_val, best_max),
        )
    return best_max


def _scale_groups(layer: nn.Module) -> list[tuple[str, list[str]]]:
    """(previous op, linears reading its output) pairs whose scales can be folded."""
    groups = [("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"])]
    attn = layer.self_attn
    if attn.v_proj.out_features == attn.o_proj.in_features:  # no GQA: o reads v's channels
        groups.append(("self_attn.v_proj", ["self_attn.o_proj"]))
    groups.append(("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"]))
    groups.append(("mlp.up_proj", ["mlp.down_proj"]))
    return groups


def _inspect(layer: nn.Module, group: list[str]) -> Callable | None:
    """The output AWQ's loss is measured at: the MLP's output for gate/up (the down
    projection of silu(gate) * up, as AutoAWQ), else the linear layers' own outputs."""
    if group != ["mlp.gate_proj", "mlp.up_proj"]:
        return None
    down = layer.mlp.down_proj.weight.detach().float()
    return lambda x, ws: F.linear(F.silu(x @ ws[0].t()) * (x @ ws[1].t()), down)


@torch.no_grad()
def _fold(prev: nn.Module, linears: list[nn.Module], s: torch.Tensor) -> None:
    """prev's outputs / s, linears' inputs * s: the float function is unchanged."""
    if isinstance(prev, nn.Linear):
        prev.weight.div_(s[:, None])
        if prev.bias is not None:
            prev.bias.div_(s)
    else:  # RMSNorm: y = weight * x / rms(x)
        prev.weight.div_(s)
    for lin in linears:
        lin.weight.mul_(s[None, :])


@dataclass
class AWQQuantizer(Quantizer):
    """AWQ, int4 (or 3/2/8-bit) per group, asymmetric, layer by layer.

    clip: AutoAWQ's output-error clipping search; mse: also shrink each group's range by
    the weight-error search of `find_params_mse` in the final rounding (not in AutoAWQ)."""

    bits: int = 4
    group_size: int = 128
    n_grid: int = 20
    duo_scaling: bool = True
    clip: bool = True
    mse: bool = False  # final rounding with each group's range shrunk (`find_params_mse`)
    batch_size: int = 8
    skip: tuple[str, ...] = DEFAULT_SKIP
    name = "awq"
    needs_calibration = True

    def __post_init__(self):
        check_bits(self.bits)
        if self.group_size < -1:
            raise ValueError(
                f"group_size must be positive, -1 (per channel) or 0, got {self.group_size}"
            )
        if self.n_grid < 1:
            raise ValueError(f"n_grid must be >= 1, got {self.n_grid}")

    @torch.no_grad()
    def quantize(
        self, model: CausalLM, calibration: torch.Tensor | None = None, progress: bool = True
    ) -> dict[str, Any]:
        if calibration is None:
            raise ValueError("awq needs calibration tokens (see calibration_tokens)")
        layers = linear_layers(model, self.skip)
        for name, m in layers.items():
            try:
                check_group_size(self.group_size, m.in_features)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        runner = LayerRunner(model, calibration, self.batch_size)
        params: dict[str, QuantParams] = {}
        extra: dict[str, torch.Tensor] = {}
        self.alphas: dict[str, float] = {}  # the chosen exponent of each scaled group
        for i, layer in enumerate(tqdm(model.model.layers, disable=not progress, desc="awq")):
            prefix = f"model.layers.{i}"
            names = [n for n, _ in layer.named_modules() if f"{prefix}.{n}" in layers]
            inputs = runner.capture(layer, names)
            runner.advance(layer)  # next layer's inputs: this layer's float outputs (AutoAWQ)
            original = {k: v.clone() for k, v in layer.state_dict().items()}
            try:
                for prev_name, group in _scale_groups(layer):
                    group = [n for n in group if n in inputs]
                    if not group:
                        continue
                    ws = [layer.get_submodule(n).weight for n in group]
                    s, alpha, _ = awq_scale_search(
                        inputs[group[0]],
                        ws,
                        self.bits,
                        self.group_size,
                        self.n_grid,
                        self.duo_scaling,
                        forward=_inspect(layer, group),
                    )
                    self.alphas[f"{prefix}.{prev_name}"] = alpha
                    _fold(
                        layer.get_submodule(prev_name), [layer.get_submodule(n) for n in group], s
                    )
                    for n in group:
                        inputs[n] = inputs[n] / s
                for n in names:
                    lin = layer.get_submodule(n)
                    if self.clip and n not in NO_CLIP:
                        max_val = awq_clip_search(inputs[n], lin.weight, self.bits, self.group_size)
                        G = lin.in_features // max_val.shape[1]
                        bound = max_val.repeat_interleave(G, dim=1)  # (N, K)
                        with torch.no_grad():
                            lin.weight.copy_(
                                torch.maximum(torch.minimum(lin.weight, bound), -bound)
                            )
                    params[f"{prefix}.{n}"] = quantize_rtn(
                        lin.weight.detach(), self.bits, self.group_size, mse=self.mse
                    )
                    if lin.bias is not None:
                        extra[f"{prefix}.{n}.bias"] = lin.bias.detach().clone()
                for norm in ("input_layernorm", "post_attention_layernorm"):
                    extra[f"{prefix}.{norm}.weight"] = (
                        layer.get_submodule(norm).weight.detach().clone()
                    )
            finally:
                layer.load_state_dict(original)
        config = dict(bits=self.bits, group_size=self.group_size, sym=False, desc_act=False)
        return state_from_params(model, params, {**config, "method": "awq"}, extra)

    def convert(self, model: CausalLM, state: dict[str, Any]) -> CausalLM:
        from minillm.quant.linear import convert_model

        return convert_model(model, state)
