"""GPTQ: quantize a weight column by column, compensating each column's error on the rest.

Frantar, Ashkboos, Hoefler, Alistarh, 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers" (Optimal Brain Quantization made fast). For a linear
layer with weight W (N, K) and calibration inputs X (n, K), GPTQ minimizes the layer's
output error ||X W^T - X Q^T||^2, whose Hessian in each row of W is H = 2 X^T X / n.
Columns are quantized one at a time; the error of column i is spread over the columns
not yet quantized, weighted by the inverse Hessian:

    err_i = (w_i - q_i) / [H^-1]_ii          W[:, i:] -= err_i [H^-1]_{i, i:}

with [H^-1] taken as the upper Cholesky factor of H^-1 (the numerically stable form of
the sequential inverse updates). Details of the reference implementation, all here:
- dampening: H += damp * mean(diag H) * I, so the inverse exists;
- dead inputs (diag H = 0, never active) get weight 0;
- lazy batches: updates inside a block of `block_size` columns are applied at once to
  the columns after it (W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]), a rank-B update;
- groups: scale and zero of a group come from its (already error-updated) weights when
  the first column of the group is reached;
- act-order (`desc_act`): columns go in decreasing diag(H) (most active inputs first);
  groups are then groups in *that* order, so column k's group is g_idx[k], not k // G.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from minillm.model import CausalLM
from minillm.quant.base import DEFAULT_SKIP, Quantizer
from minillm.quant.rtn import (
    PER_TENSOR,
    QuantParams,
    check_bits,
    check_group_size,
    find_params,
    find_params_mse,
    grouped_linear_layers,
    quantize_codes,
    state_from_params,
)
from minillm.quant.sequential import LayerRunner, layer_groups


def hessian(x: torch.Tensor) -> torch.Tensor:
    """H = 2 X^T X / n for inputs x (n, K): the Hessian of the layer's squared output error."""
    x = x.reshape(-1, x.shape[-1]).float()
    return 2 * x.t() @ x / x.shape[0]


def gptq_quantize(
    w: torch.Tensor,
    H: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    mse: bool = False,
) -> QuantParams:
    """GPTQ-quantize a weight w (N, K) given the Hessian H (K, K) of its inputs."""
    check_bits(bits)
    N, K = w.shape
    G = check_group_size(group_size, K)
    if H.shape != (K, K):
        raise ValueError(
            f"H must be ({K}, {K}) for a weight of shape {tuple(w.shape)}, got {tuple(H.shape)}"
        )
    if not 0 <= damp < 1:
        raise ValueError(f"damp must lie in [0, 1), got {damp}")
    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32  # fp64 for tests
    W = w.detach().clone().to(dtype)
    H = H.detach().clone().to(dtype)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(K, device=H.device, dtype=dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    codes = torch.zeros(N, K, device=W.device, dtype=dtype)
    scales = torch.zeros(N, K // G, device=W.device)
    zeros = torch.zeros(N, K // G, device=W.device)
    if group_size == PER_TENSOR:
        s_t, z_t = (find_params_mse if mse else find_params)(W.reshape(1, -1), bits, sym)
        s, z = s_t.expand(N), z_t.expand(N)
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()  # (N, B): this block, updated column by column
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % G == 0 and group_size != PER_TENSOR:  # a new group starts: its params
                group = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :G]  # (N, G)
                s, z = (find_params_mse if mse else find_params)(group, bits, sym)
            if col % G == 0:
                scales[:, col // G], zeros[:, col // G] = s, z
            w_col = W1[:, i]
            q = quantize_codes(w_col, s, z, bits)
            codes[:, col] = q
            err = (w_col - s * (q - z)) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]  # spread over this block
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # the lazy update of all later columns

    g_idx = torch.arange(K, device=W.device) // G  # group of each (permuted) column
    if perm is not None:  # back to the original input order
        inv = torch.argsort(perm)
        codes, g_idx = codes[:, inv], g_idx[inv]
    return QuantParams(codes.to(torch.int32), scales, zeros, g_idx.to(torch.int32), bits, G)


@dataclass
class GPTQQuantizer(Quantizer):
    """GPTQ over a whole model, layer by layer (`minillm.quant.sequential`).

    bits in {2, 3, 4, 8}; group_size divides every in_features (or -1 per channel);
    desc_act: act-order; damp_percent: dampening as a fraction of mean(diag H); mse:
    each group's range shrunk by `find_params_mse`. The defaults are the reference
    code's (damp_percent 0.01, no act-order, no mse).

    The quality table (`benchmarks.quant_quality`) runs act-order, mse, damp_percent 0.1
    and 64 x 512 calibration tokens: the best of this grid on the validation split of
    the training corpus (`minillm.quant.report.validation_tokens`, 65k tokens; never the
    held-out text), minillm-tiny, 4-bit, group 128 (`benchmarks.gptq_validation`).
    Fraction of RTN's validation perplexity increase removed (fp32 4.365, RTN 4.524):

        calibration tokens     damp 0.01   damp 0.1   damp 0.3
        32 x 1024                 0.40        0.39       0.36
        64 x 512                  0.40        0.44       0.38
        128 x 512                 0.42        0.41       0.41

    (One measurement each; the RTN increase is small, so differences of a few hundredths
    are within the noise of the selection.)
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = False
    desc_act: bool = False
    mse: bool = False
    damp_percent: float = 0.01
    block_size: int = 128
    true_sequential: bool = True
    batch_size: int = 8
    skip: tuple[str, ...] = DEFAULT_SKIP
    name = "gptq"
    needs_calibration = True

    def __post_init__(self):
        check_bits(self.bits)
        if self.group_size < -1:
            raise ValueError(
                f"group_size must be positive, -1 (per channel) or 0, got {self.group_size}"
            )
        if not 0 <= self.damp_percent < 1:
            raise ValueError(f"damp_percent must lie in [0, 1), got {self.damp_percent}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")

    @torch.no_grad()
    def quantize(
        self, model: CausalLM, calibration: torch.Tensor | None = None, progress: bool = True
    ) -> dict[str, Any]:
        if calibration is None:
            raise ValueError("gptq needs calibration tokens (see calibration_tokens)")
        layers = grouped_linear_layers(model, self.skip, self.group_size)
        original = {name: m.weight.detach().clone() for name, m in layers.items()}
        runner = LayerRunner(model, calibration, self.batch_size)
        params: dict[str, QuantParams] = {}
        try:
            for i, layer in enumerate(tqdm(model.model.layers, disable=not progress, desc="gptq")):
                prefix = f"model.layers.{i}"
                groups = layer_groups(prefix, layers)
                if not self.true_sequential:
                    groups = [[n for g in groups for n in g]]
                for group in groups:
                    inputs = runner.capture(layer, group)
                    for n in group:
                        linear = layer.get_submodule(n)
                        p = gptq_quantize(
                            linear.weight, hessian(inputs[n]), self.bits, self.group_size,
                            self.sym, self.damp_percent, self.block_size, self.desc_act, self.mse,
                        )  # fmt: skip
                        params[f"{prefix}.{n}"] = p
                        with torch.no_grad():  # later sublayers see the quantized outputs
                            linear.weight.copy_(p.dequantize().to(linear.weight.dtype))
                runner.advance(layer)
        finally:
            with torch.no_grad():
                for name, w in original.items():
                    layers[name].weight.copy_(w)
        config = dict(bits=self.bits, group_size=self.group_size, sym=self.sym)
        return state_from_params(
            model, params, {**config, "desc_act": self.desc_act, "method": "gptq"}
        )

    def convert(self, model: CausalLM, state: dict[str, Any]) -> CausalLM:
        from minillm.quant.linear import convert_model

        return convert_model(model, state)


@torch.no_grad()
def gptq_error_trace(
    w: torch.Tensor,
    x: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    every: int = 8,
    damp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer's output error mean((x W_j^T - x W^T)^2) as columns are quantized, for
    GPTQ (quantized columns + error-compensated float columns) and RTN (quantized columns
    + the original float ones), after every `every` columns: (columns, gptq, rtn).

    The unblocked loop, for teaching; the error is read off the Hessian,
    mean((x D^T)^2) = sum(D (X^T X / n) * D) / N for the weight change D."""
    W0 = w.detach().float()
    N, K = W0.shape
    G = check_group_size(group_size, K)
    C = hessian(x) / 2  # X^T X / n
    H = 2 * C + damp * torch.mean(2 * torch.diag(C)) * torch.eye(K)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    W, R = W0.clone(), W0.clone()  # GPTQ's running weights, RTN's
    cols, gptq_err, rtn_err = [], [], []
    for i in range(K):
        if i % G == 0:
            s, z = find_params(W[:, i : i + G], bits)
            s_r, z_r = find_params(W0[:, i : i + G], bits)
        q = s * (quantize_codes(W[:, i], s, z, bits) - z)
        err = (W[:, i] - q) / Hinv[i, i]
        W[:, i:] -= err[:, None] * Hinv[i, i:][None, :]  # column i becomes q, later ones compensate
        R[:, i] = s_r * (quantize_codes(W0[:, i], s_r, z_r, bits) - z_r)
        if (i + 1) % every == 0 or i == K - 1:
            cols.append(i + 1)
            for D, out in ((W - W0, gptq_err), (R - W0, rtn_err)):
                out.append(float(((D @ C) * D).sum() / N))
    return torch.tensor(cols), torch.tensor(gptq_err), torch.tensor(rtn_err)
