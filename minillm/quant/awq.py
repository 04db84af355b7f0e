"""AWQ: activation-aware weight quantization (scale the salient input channels, then clip).

Lin, Tang, Tang, Yang, Dang, Gan, Han, MLSys 2024, "AWQ: Activation-aware Weight
Quantization for LLM Compression and Acceleration"; the procedure of the llm-awq and
AutoAWQ reference code. A few input channels carry much larger activations than the
rest; their weights matter most. Scaling input channel k of the weights up by s_k (and
its activation down by s_k, folded into the previous operation, so the float model is
unchanged) makes the rounding error of those weights relatively smaller:

    y = x W^T = (x / s) (W diag(s))^T      ->   y_hat = (x / s) Q(W diag(s))^T

Per decoder layer, in order, on the float model's hidden states of calibration tokens:

  1. every group of linears reading one input gets one shared s, searched
     (`minillm.quant.awq_search`) on the error of the module downstream of it:
         q/k/v (after input_layernorm)          -> the attention block's output
         gate/up (after post_attention_layernorm) -> the MLP's output
         o (after v_proj), down (after up_proj)    -> their own output
     and 1 / s is folded into the previous RMSNorm weight / the previous linear's rows;
  2. each linear except q and k gets its clipping range: per (output row, group), the
     group's min and max shrink apart, each by a factor in (0.5, 1], to minimize the
     group's share of the output error, computed on all calibration tokens as
     d^T H_g d with H_g = X_g^T X_g / n and d = w_g - Q(w_g) (`awq_range_search`;
     `asym_clip`; the reference clips +-max|w| symmetrically, on 512 tokens);
  3. the weights are quantized to int4 per group of 128, asymmetric (zero point), the
     grid spanning the range of step 2; q and k (not clipped) take the range of
     `find_params_mse` (`mse`).

Step 1 scores each candidate s with the rounding of steps 2 and 3 applied to W diag(s)
(`joint`: the range search on the moments of x / s), so the scale search judges the
weights that are stored, clipping included.

With grouped-query attention (H query heads, Hkv < H kv heads) the reference code skips
v -> o; here (`gqa_o`) the o input channels of all query heads that read one kv head
share that kv channel's scale, so the fold into v_proj stays exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from minillm.model import CausalLM
from minillm.quant.awq_search import (
    _fake_quant,
    awq_clip_search,
    awq_range_search,
    awq_scale_search,
    clip_weight,
    group_moments,
    quantize_range,
)
from minillm.quant.base import DEFAULT_SKIP, Quantizer
from minillm.quant.rtn import (
    QuantParams,
    check_bits,
    grouped_linear_layers,
    quantize_rtn,
    state_from_params,
)
from minillm.quant.sequential import LayerRunner

__all__ = ["AWQQuantizer", "_fake_quant", "_fold", "awq_clip_search", "awq_scale_search"]

NO_CLIP = ("self_attn.q_proj", "self_attn.k_proj")
INSPECT = ("module", "linear")


def _scale_groups(layer: nn.Module) -> list[tuple[str, list[str]]]:
    """(previous op, linears reading its output) pairs whose scales fold exactly
    (shared with SmoothQuant); v -> o only without GQA (see `_gqa_share` for GQA)."""
    groups = [("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"])]
    attn = layer.self_attn
    if attn.v_proj.out_features == attn.o_proj.in_features:  # no GQA: o reads v's channels
        groups.append(("self_attn.v_proj", ["self_attn.o_proj"]))
    groups.append(("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"]))
    groups.append(("mlp.up_proj", ["mlp.down_proj"]))
    return groups


def _gqa_share(attn: nn.Module) -> torch.Tensor:
    """(H * D,) the v channel each o input channel reads: head h, dim d -> (h // n_rep) D + d."""
    H, Hkv, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    head = torch.arange(H)[:, None] // (H // Hkv)  # (H, 1) the kv head of each query head
    return (head * D + torch.arange(D)[None, :]).reshape(H * D)  # (H * D,)


def _inspect(
    layer: nn.Module, group: list[str], runner: LayerRunner, seq_len: int, mode: str
) -> Callable | None:
    """forward(x, weights) of the module AWQ's loss is measured at (None: the linears)."""
    if mode == "linear" or group[0] not in ("self_attn.q_proj", "mlp.gate_proj"):
        return None
    module_name, _, _ = group[0].rpartition(".")
    module = layer.get_submodule(module_name)
    names = [n.rpartition(".")[2] + ".weight" for n in group]  # e.g. "q_proj.weight"
    if module_name == "mlp":
        return lambda x, ws: functional_call(module, dict(zip(names, ws, strict=True)), (x,))
    backend = runner.model.attn_backend

    def attention(x: torch.Tensor, ws: list[torch.Tensor]) -> torch.Tensor:
        xs = x.view(-1, seq_len, x.shape[-1])  # (B, T, C)
        weights = dict(zip(names, ws, strict=True))
        out = functional_call(module, weights, (xs, runner.cos, runner.sin, backend))
        return out.reshape(-1, out.shape[-1])  # (B * T, C)

    return attention


@torch.no_grad()
def _fold(
    prev: nn.Module, linears: list[nn.Module], s: torch.Tensor, s_prev: torch.Tensor | None = None
) -> None:
    """prev's outputs / s_prev, linears' inputs * s (s_prev = s unless GQA spreads one v
    channel over several o inputs): the float function is unchanged."""
    s_prev = s if s_prev is None else s_prev
    if isinstance(prev, nn.Linear):
        prev.weight.div_(s_prev[:, None])
        if prev.bias is not None:
            prev.bias.div_(s_prev)
    else:  # RMSNorm: y = weight * x / rms(x)
        prev.weight.div_(s_prev)
    for lin in linears:
        lin.weight.mul_(s[None, :])


@dataclass
class AWQQuantizer(Quantizer):
    """AWQ, int4 (or 3/2/8-bit) per group, asymmetric, layer by layer.

    inspect: "module" (the reference: q/k/v scored at the attention output, gate/up at the
    MLP output) or "linear" (each group at its linears' own outputs); n_tokens: tokens
    (whole calibration sequences) the scale loss is measured on; clip: clip the weights
    (q and k only with clip_qk); asym_clip: clip by the asymmetric range search on all
    calibration tokens over `clip_grid` steps per side (`awq_range_search`), else by the
    reference's symmetric +-max|w| search on `clip_tokens` tokens (`awq_clip_search`);
    joint: score the scale candidates with the range search's rounding (else with
    `quantize_rtn`'s); gqa_o: also scale o_proj under GQA; mse: the range of the weights
    not range-searched (q and k; all of them without asym_clip) is shrunk by the
    weight-error search of `find_params_mse`, and the searches score that rounding too (the
    reference rounds min-max); sequential: each layer is calibrated on the outputs of the
    already quantized layers before it (as GPTQ is), not on the float model's.

    The reference code's settings are n_grid = clip_grid = 20, clip_tokens = 512,
    n_tokens = 8192, gqa_o = mse = clip_qk = asym_clip = joint = sequential = False. The
    defaults differ where the validation split of the training corpus
    (`minillm.data.split_of(path) == "val"`; never the held-out text) measured better on
    minillm-tiny, 4-bit, group 128, 32 x 1024 calibration tokens. Fraction of RTN's
    validation perplexity increase removed, on all 208,295 validation tokens
    (`benchmarks.awq_validation`; ppl fp32 7.904, RTN 8.192):

        mse, n_tokens 8192 (the previous defaults, described below)   0.25
          + sequential                                                0.20
        asym_clip                                                     0.28
        asym_clip, joint                                              0.35
          + n_tokens 16384                          (the defaults)    0.36
          + clip_qk                                                   0.29
          + n_grid 40                                                 0.30
          + clip_grid 40 (3x slower)                                  0.34
          + mse = False (q and k rounded min-max)                     0.23
          + inspect = "linear"                                        0.27

    The range search replaces the symmetric clip and the weight-error shrink of the other
    linears by one search on their output error, exact on all 32,768 calibration tokens
    (d^T H_g d) and cheaper than the token loop; with joint the scale search sees it, so
    alpha is chosen for the clipped weights. minillm-tiny on CPU, one thread: about 150 s.

    The previous defaults were chosen the same way on the first 65,536 validation tokens
    (mse*: `find_params_mse` in the final rounding only, both searches scoring min-max
    rounding):

        reference settings, loss at each linear's output         0.10
        reference settings (loss at attention / MLP output)       0.13
        + gqa_o                                                  0.16
        + gqa_o, no clipping                                      0.05
        + gqa_o, scales from mean|x| only (duo_scaling=False)     0.10
        + gqa_o, n_tokens 32768 (3x slower)                       0.16
        + gqa_o, clip_grid 100                                    0.17
        + gqa_o, clip_qk                                          0.18
        + gqa_o, clip_tokens 4096                                 0.18
        + gqa_o, mse*                                             0.19
        + gqa_o, mse*, clip_tokens 4096                           0.20
        + gqa_o, mse*, clip_tokens 4096, clip_qk                  0.18
        + gqa_o, mse, clip_tokens 4096   (the previous defaults)  0.26
        the previous defaults with mse = False (min-max)          0.18
        the previous defaults with mse*, calibration 64 x 512     0.12
        the previous defaults with mse*, 128 x 512 (reference)    0.13

    On a second slice (validation tokens 65,536-131,072) the previous defaults remove
    0.32, mse* 0.21, mse = False 0.20. Quantized one linear at a time by RTN, the layers
    share the perplexity increase evenly (no layer stands out), consistent with AWQ's cut
    being limited by this model's lack of outlier input channels (book/quantization.md).

    (One measurement each; the RTN increase is small, so differences of a few hundredths
    are within the noise of the selection.)
    """

    bits: int = 4
    group_size: int = 128
    n_grid: int = 20
    duo_scaling: bool = True
    inspect: str = "module"
    n_tokens: int = 16384
    clip: bool = True
    clip_grid: int = 20
    clip_tokens: int = 4096
    clip_qk: bool = False
    gqa_o: bool = True
    mse: bool = True
    asym_clip: bool = True
    joint: bool = True
    sequential: bool = False
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
        if self.inspect not in INSPECT:
            raise ValueError(f"inspect must be one of {INSPECT}, got {self.inspect!r}")
        for k in ("n_tokens", "clip_grid", "clip_tokens"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")

    def _ranged(self, name: str) -> bool:
        """Whether linear `name` (relative to its layer) gets the asymmetric range search."""
        return self.clip and self.asym_clip and (self.clip_qk or name not in NO_CLIP)

    def _rounding(self, group: list[str], weights: list[torch.Tensor], x: torch.Tensor) -> Callable:
        """The final rounding of each linear of `group`, as `awq_scale_search`'s
        `rounding(W diag(s), s)`: the range search on the moments of x / s where the linear
        gets one (`_ranged`), else `quantize_rtn`'s (`mse` or min-max)."""
        H = group_moments(x, self.group_size)  # (groups, G, G) of the unscaled inputs
        rows = [w.shape[0] for w in weights]

        def rounding(Ws: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            sg = s.view(H.shape[0], -1)  # (groups, G)
            Hs = H / (sg[:, :, None] * sg[:, None, :])  # moments of x / s
            out = []
            for n, part in zip(group, Ws.split(rows), strict=True):
                if self._ranged(n):
                    lo, hi = awq_range_search(Hs, part, self.bits, self.group_size, self.clip_grid)
                    out.append(
                        quantize_range(part, lo, hi, self.bits, self.group_size).dequantize()
                    )
                else:
                    out.append(_fake_quant(part, self.bits, self.group_size, self.mse))
            return torch.cat(out)

        return rounding

    def _groups(self, layer: nn.Module) -> list[tuple[str, list[str], torch.Tensor | None]]:
        groups = [(p, g, None) for p, g in _scale_groups(layer)]
        attn = layer.self_attn
        if self.gqa_o and attn.v_proj.out_features != attn.o_proj.in_features:
            groups.insert(1, ("self_attn.v_proj", ["self_attn.o_proj"], _gqa_share(attn)))
        return groups

    @torch.no_grad()
    def quantize(
        self, model: CausalLM, calibration: torch.Tensor | None = None, progress: bool = True
    ) -> dict[str, Any]:
        if calibration is None:
            raise ValueError("awq needs calibration tokens (see calibration_tokens)")
        layers = grouped_linear_layers(model, self.skip, self.group_size)
        runner = LayerRunner(model, calibration, self.batch_size)
        T = calibration.shape[1]
        params: dict[str, QuantParams] = {}
        extra: dict[str, torch.Tensor] = {}
        self.alphas: dict[str, float] = {}  # the chosen exponent of each scaled group
        for i, layer in enumerate(tqdm(model.model.layers, disable=not progress, desc="awq")):
            prefix = f"model.layers.{i}"
            names = [n for n, _ in layer.named_modules() if f"{prefix}.{n}" in layers]
            inputs = runner.capture(layer, names)
            if not self.sequential:
                runner.advance(layer)  # next layer's inputs: this layer's float outputs
            original = {k: v.clone() for k, v in layer.state_dict().items()}
            try:
                for prev_name, group, share in self._groups(layer):
                    if not all(n in inputs for n in group):
                        continue
                    weights = [layer.get_submodule(n).weight for n in group]
                    rounding = (
                        self._rounding(group, weights, inputs[group[0]])
                        if self.joint and any(self._ranged(n) for n in group)
                        else None
                    )
                    s, alpha, _ = awq_scale_search(
                        inputs[group[0]],
                        weights,
                        self.bits,
                        self.group_size,
                        self.n_grid,
                        self.duo_scaling,
                        self.n_tokens,
                        forward=_inspect(layer, group, runner, T, self.inspect),
                        seq_len=T,
                        share=share,
                        mse=self.mse,
                        rounding=rounding,
                    )
                    self.alphas[f"{prefix}.{prev_name}"] = alpha
                    s_prev = None
                    if share is not None:  # the one scale of each v channel
                        s_prev = torch.empty(int(share.max()) + 1).index_copy_(0, share, s)
                    prev = layer.get_submodule(prev_name)
                    _fold(prev, [layer.get_submodule(n) for n in group], s, s_prev)
                    for n in group:
                        inputs[n] = inputs[n] / s
                for n in names:
                    lin = layer.get_submodule(n)
                    if self._ranged(n):  # clipping range and rounding in one search
                        H = group_moments(inputs[n], self.group_size)
                        lo, hi = awq_range_search(
                            H, lin.weight, self.bits, self.group_size, self.clip_grid
                        )
                        params[f"{prefix}.{n}"] = quantize_range(
                            lin.weight.detach(), lo, hi, self.bits, self.group_size
                        )
                    else:
                        if self.clip and (self.clip_qk or n not in NO_CLIP):
                            max_val = awq_clip_search(
                                inputs[n],
                                lin.weight,
                                self.bits,
                                self.group_size,
                                self.clip_grid,
                                n_tokens=self.clip_tokens,
                                mse=self.mse,
                            )
                            lin.weight.copy_(clip_weight(lin.weight, max_val))
                        params[f"{prefix}.{n}"] = quantize_rtn(
                            lin.weight.detach(), self.bits, self.group_size, mse=self.mse
                        )
                    if lin.bias is not None:
                        extra[f"{prefix}.{n}.bias"] = lin.bias.detach().clone()
                for norm in ("input_layernorm", "post_attention_layernorm"):
                    extra[f"{prefix}.{norm}.weight"] = (
                        layer.get_submodule(norm).weight.detach().clone()
                    )
                if self.sequential:  # next layer's inputs: this layer's quantized outputs
                    for n in names:
                        layer.get_submodule(n).weight.copy_(params[f"{prefix}.{n}"].dequantize())
                    runner.advance(layer)
            finally:
                layer.load_state_dict(original)
        config = dict(bits=self.bits, group_size=self.group_size, sym=False, desc_act=False)
        return state_from_params(model, params, {**config, "method": "awq"}, extra)

    def convert(self, model: CausalLM, state: dict[str, Any]) -> CausalLM:
        from minillm.quant.linear import convert_model

        return convert_model(model, state)
