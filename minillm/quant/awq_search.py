"""AWQ's two searches: per-input-channel scales (over an exponent alpha), then weight clipping.

Lin et al., 2024, "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration" (MLSys), sec. 3.2 and the llm-awq / AutoAWQ reference code. Scaling input
channel k of the weights by s_k and the activations by 1 / s_k leaves the float function
unchanged but shrinks the relative rounding error of the scaled channels:

    s(alpha) = mean|x|^alpha / mean|W_normalized|^(1 - alpha),  normalized so max(s) min(s) = 1
    alpha*   = argmin_alpha || f(x, W) - f(x / s, Q(W diag(s))) ||^2

where f is the module whose output the loss is measured at (the attention block for
q/k/v, the MLP for gate/up, the linear itself otherwise) and Q is asymmetric int-b
round-to-nearest per group. Clipping then shrinks each (output row, group) range
max|w| by the factor in (1 - max_shrink, 1] that minimizes that group's share of the
quantized output error on the calibration inputs. With `mse`, Q in both searches is the
rounding the final quantization applies (each group's range shrunk by `find_params_mse`),
so the searches score the weights that will actually be stored.

The asymmetric range search (`awq_range_search`) is the clipping step for the asymmetric
quantizer: each group's min and max shrink apart, and the error of a group's share of the
output is computed exactly on all calibration tokens from the group's input second
moments H_g = X_g^T X_g / n (G, G): with d = w_g - Q(w_g),

    mean_t (x_t,g . d)^2 = d^T H_g d
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from minillm.quant.rtn import (
    QuantParams,
    check_group_size,
    find_params,
    quantize_codes,
    quantize_rtn,
)

Forward = Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor]


def _fake_quant(w: torch.Tensor, bits: int, group_size: int, mse: bool = False) -> torch.Tensor:
    return quantize_rtn(w, bits, group_size, sym=False, mse=mse).dequantize()


def loss_tokens(x: torch.Tensor, n_tokens: int, seq_len: int | None = None) -> torch.Tensor:
    """At most about `n_tokens` evenly spaced rows of x (n, K); with `seq_len`, whole
    sequences (x holds n / seq_len sequences back to back), so attention still sees its context."""
    if seq_len is None:
        return x[:: max(1, len(x) // n_tokens)][:n_tokens]
    if len(x) % seq_len:
        raise ValueError(f"{len(x)} rows are not whole sequences of seq_len={seq_len}")
    seqs = x.view(-1, seq_len, x.shape[-1])  # (n / seq_len, seq_len, K)
    keep = max(1, -(-n_tokens // seq_len))  # sequences needed for n_tokens (at least one)
    return seqs[:: max(1, len(seqs) // keep)][:keep].reshape(-1, x.shape[-1])


def awq_scale_search(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    bits: int = 4,
    group_size: int = 128,
    n_grid: int = 20,
    duo_scaling: bool = True,
    n_tokens: int = 4096,
    forward: Forward | None = None,
    seq_len: int | None = None,
    share: torch.Tensor | None = None,
    mse: bool = False,
    rounding: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, float, list[float]]:
    """Best per-channel scales s (K,) for the weights (N_i, K) that all read x (n, K).

    The loss is the squared error at the output of `forward(x, weights)` (default: the
    linear layers' outputs, concatenated) on about `n_tokens` tokens of x (whole sequences
    of `seq_len` when given); the statistics mean|x| use all of x. `share` (K,) int: input
    channels with the same index get the same scale (e.g. query heads reading one kv head).
    `mse`: score with the rounding of `quantize_rtn(..., mse=True)` (the final one's);
    `rounding(W diag(s), s)`: score with this quantize-dequantize instead (e.g. one that
    searches each group's range, `awq_range_search`, as the final rounding does).

    Returns (s, the best alpha, the output error of every alpha on the grid)."""
    x = x.float()
    W = torch.cat([w.float() for w in weights])  # (sum N_i, K)
    if x.shape[-1] != W.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} channels, the weights {W.shape[1]}")
    G = check_group_size(group_size, W.shape[1])
    x_mean = x.abs().mean(dim=0)  # (K,) activation magnitude per input channel
    w_groups = W.abs().view(-1, G)  # (rows * groups, G)
    w_norm = (w_groups / (w_groups.amax(dim=1, keepdim=True) + 1e-6)).view_as(W)
    w_mean = w_norm.mean(dim=0)  # (K,) weight magnitude, relative to its group's max
    if share is not None:  # average the statistics over the channels that share a scale
        n = int(share.max()) + 1
        count = torch.zeros(n).index_add_(0, share, torch.ones_like(x_mean))
        x_mean = (torch.zeros(n).index_add_(0, share, x_mean) / count)[share]
        w_mean = (torch.zeros(n).index_add_(0, share, w_mean) / count)[share]
    x = loss_tokens(x, n_tokens, seq_len)
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
        if rounding is None:
            W_hat = _fake_quant(W * s, bits, group_size, mse) / s  # (sum N_i, K)
        else:
            W_hat = rounding(W * s, s) / s
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
    mse: bool = False,
) -> torch.Tensor:
    """Best clipping threshold per (output row, group) of w (N, K): (N, K // G).

    Each group's share of the output, sum_{k in group} x_k w_k, is compared before and
    after clipping to +-max_val and quantizing (with `mse`, as `quantize_rtn(..., mse=True)`
    does), on `n_tokens` evenly spaced tokens."""
    N, K = w.shape
    G = check_group_size(group_size, K)
    x = loss_tokens(x.float(), n_tokens).view(-1, K // G, G)  # (t, groups, G)
    wg = w.float().view(N, K // G, G)
    ref = torch.einsum("tgk,ogk->otg", x, wg)  # (N, t, groups): each group's share of y
    org_max = wg.abs().amax(dim=-1)  # (N, groups)
    best_max, best_err = org_max.clone(), torch.full_like(org_max, float("inf"))
    for i in range(int(max_shrink * n_grid)):
        max_val = org_max * (1 - i / n_grid)
        clipped = torch.maximum(torch.minimum(wg, max_val[..., None]), -max_val[..., None])
        q = _fake_quant(clipped.view(N, K), bits, group_size, mse).view(N, K // G, G)
        err = (torch.einsum("tgk,ogk->otg", x, q) - ref).pow(2).mean(dim=1)  # (N, groups)
        better = err < best_err
        best_err, best_max = (
            torch.where(better, err, best_err),
            torch.where(better, max_val, best_max),
        )
    return best_max


def clip_weight(w: torch.Tensor, max_val: torch.Tensor) -> torch.Tensor:
    """w (N, K) clamped to +-max_val (N, K // G) of its group."""
    bound = max_val.repeat_interleave(w.shape[1] // max_val.shape[1], dim=1)  # (N, K)
    return torch.maximum(torch.minimum(w, bound), -bound)


def group_moments(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """H_g = X_g^T X_g / n of each input group of x (n, K): (K // G, G, G), float64 sums."""
    n, K = x.shape
    G = check_group_size(group_size, K)
    H = torch.zeros(K // G, G, G, dtype=torch.float64)
    for i in range(0, n, 8192):  # in chunks: (chunk, groups, G) fp32 products, fp64 sums
        xg = x[i : i + 8192].float().view(-1, K // G, G)
        H += torch.einsum("tgk,tgl->gkl", xg, xg).double()
    return (H / n).float()


def _range_grid(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (shaped like lo) of the asymmetric grid spanning [lo, hi]."""
    s, z = find_params(torch.stack([lo.reshape(-1), hi.reshape(-1)], dim=1), bits)
    return s.view(lo.shape), z.view(lo.shape)


def quantize_range(
    w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, group_size: int
) -> QuantParams:
    """Asymmetric RTN of w (N, K) with the grid of each (row, group) spanning [lo, hi]
    (N, K // G) instead of the group's [min, max]: weights outside are clamped to the ends."""
    K = w.shape[1]
    G = check_group_size(group_size, K)
    scales, zeros = _range_grid(lo, hi, bits)
    g_idx = torch.arange(K, dtype=torch.int32) // G
    q = quantize_codes(w, scales[:, g_idx.long()], zeros[:, g_idx.long()], bits)
    return QuantParams(q.to(torch.int32), scales, zeros, g_idx, bits, G)


def awq_range_search(
    H: torch.Tensor,
    w: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    n_grid: int = 20,
    max_shrink: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best quantization range [lo, hi] per (output row, group) of w (N, K): two (N, K // G).

    lo = a min(w_g, 0) and hi = b max(w_g, 0), a and b each on the grid 1, 1 - 1 / n_grid,
    ... (down to 1 - max_shrink, separately: asymmetric clipping), chosen to minimize the
    group's output error d^T H_g d (H from `group_moments`, d = w_g - Q_[lo, hi](w_g)).
    a = b = 1 is min-max rounding, so no group errs more than unclipped."""
    N, K = w.shape
    G = check_group_size(group_size, K)
    if H.shape != (K // G, G, G):
        raise ValueError(
            f"H must be ({K // G}, {G}, {G}) for w {tuple(w.shape)}, got {tuple(H.shape)}"
        )
    wg = w.float().view(N, K // G, G)
    wmin, wmax = wg.amin(dim=-1).clamp(max=0), wg.amax(dim=-1).clamp(min=0)  # (N, groups)
    best_err = torch.full_like(wmin, float("inf"))
    best_lo, best_hi = wmin.clone(), wmax.clone()
    shrinks = [1 - i / n_grid for i in range(int(max_shrink * n_grid))]
    for a in shrinks:
        for b in shrinks:
            lo, hi = a * wmin, b * wmax
            s, z = (t[..., None] for t in _range_grid(lo, hi, bits))  # (N, groups, 1)
            d = s * (quantize_codes(wg, s, z, bits) - z) - wg  # (N, groups, G)
            err = torch.einsum("ngk,gkl,ngl->ng", d, H, d)  # (N, groups)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, hi, best_hi)
    return best_lo, best_hi
