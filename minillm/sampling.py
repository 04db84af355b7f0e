"""Choosing the next token from the logits: greedy, temperature, top-k and top-p.

    p = softmax(logits / temperature)        temperature -> 0 is greedy (argmax)
    top-k keeps the k most likely tokens; top-p (nucleus; Holtzman et al., 2019) keeps the
    smallest set of most likely tokens whose probability reaches p.

Filters set removed logits to -inf; the survivors are renormalized by the softmax.
The semantics follow the `transformers` logits warpers (tokens tied with the k-th
logit are kept; top-p always keeps at least one token).
"""

from __future__ import annotations

import torch


def check_sampling_args(temperature: float, top_k: int, top_p: float) -> None:
    if not temperature >= 0:  # also rejects NaN
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {top_k!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {top_p}")


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (..., V) and those tied with the k-th."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the most likely tokens whose cumulative probability first reaches p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)  # ascending
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cum <= 1 - p  # the low tail whose total mass is <= 1 - p
    remove_sorted[..., -1] = False  # always keep the most likely token
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Logits (V,) or (B, V) -> token ids () or (B,)."""
    check_sampling_args(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    logits = top_p_filter(top_k_filter(logits, top_k), top_p)
    probs = logits.softmax(dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])  # (B, V)
    tokens = torch.multinomial(flat, num_samples=1, generator=generator)  # (B, 1)
    return tokens.reshape(probs.shape[:-1])
