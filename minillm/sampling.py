"""Choosing the next token from the logits: penalties, temperature, top-k, top-p, min-p.

    logits -> penalties -> / temperature -> top-k -> top-p -> min-p -> p = softmax -> sample

- repetition penalty (CTRL; Keskar et al., 2019): a seen token's logit is divided by the
  penalty when positive, multiplied when negative; presence/frequency penalties (OpenAI)
  subtract a constant once per output token, or once per occurrence.
- temperature: p = softmax(logits / temperature); temperature 0 is greedy (argmax).
- top-k keeps the k largest logits; top-p (nucleus; Holtzman et al., 2019) keeps the
  smallest set of most likely tokens whose probability reaches p; min-p (Nguyen et al.,
  2024) keeps tokens with p_i >= min_p * max_j p_j.

Filters set removed logits to -inf; the softmax renormalizes the survivors. Semantics and
order follow the `transformers` logits processors (tokens tied with the k-th logit are
kept; top-p and min-p always keep the most likely token), and are tested against them.
Each filter takes one value for every row or a (B,) tensor of per-row values, so a batch
of requests with different `SamplingParams` (`SamplingMetadata`) is filtered at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from minillm.sampling_params import (
    SamplingParams,
    check_min_p,
    check_temperature,
    check_top_k,
    check_top_p,
)

__all__ = [
    "SamplingMetadata",
    "SamplingParams",
    "apply_penalties",
    "apply_temperature",
    "check_sampling_args",
    "min_p_filter",
    "process_logits",
    "random_sample",
    "sample",
    "sample_next_token",
    "top_k_filter",
    "top_p_filter",
]


def check_sampling_args(temperature: float, top_k: int, top_p: float, min_p: float = 0.0) -> None:
    """ValueError naming the parameter and its allowed range (see `SamplingParams`)."""
    check_temperature(temperature)
    check_top_k(top_k)
    check_top_p(top_p)
    check_min_p(min_p)


def _rows(value: float | torch.Tensor, logits: torch.Tensor) -> float | torch.Tensor:
    """A per-row parameter (B,) as a (B, 1) column that broadcasts over the vocabulary."""
    if isinstance(value, torch.Tensor):
        if logits.dim() != 2 or value.shape != logits.shape[:1]:
            raise ValueError(
                f"per-row parameters {tuple(value.shape)} need logits (B, V) with the same B, "
                f"got logits {tuple(logits.shape)}"
            )
        return value.to(logits.device)[:, None]
    return value


def apply_penalties(
    logits: torch.Tensor,
    prompt_mask: torch.Tensor,
    output_counts: torch.Tensor,
    repetition_penalty: torch.Tensor,
    presence_penalty: torch.Tensor,
    frequency_penalty: torch.Tensor,
) -> torch.Tensor:
    """Penalize seen tokens. logits (B, V); prompt_mask (B, V) bool, True for tokens of the
    prompt; output_counts (B, V), occurrences in the output so far; penalties (B,).

    The repetition penalty applies once to any token seen in the prompt or the output;
    presence and frequency penalties only to output tokens (vLLM's semantics)."""
    output_mask = output_counts > 0
    rep = repetition_penalty.to(logits.device, logits.dtype)[:, None]  # (B, 1)
    penalized = torch.where(logits < 0, logits * rep, logits / rep)
    logits = torch.where(prompt_mask | output_mask, penalized, logits)
    logits = logits - frequency_penalty.to(logits)[:, None] * output_counts
    return logits - presence_penalty.to(logits)[:, None] * output_mask


def apply_temperature(logits: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """logits / temperature; rows whose temperature is 0 (greedy) are left unchanged."""
    if isinstance(temperature, torch.Tensor):
        temperature = torch.where(temperature == 0, 1.0, temperature).to(logits.dtype)
    elif temperature == 0:
        return logits
    return logits / _rows(temperature, logits)


def top_k_filter(logits: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """Keep the k largest logits of each row (..., V) and those tied with the k-th.
    k <= 0 (or >= V) keeps everything."""
    V = logits.shape[-1]
    if not isinstance(k, torch.Tensor):
        if k <= 0 or k >= V:
            return logits
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1)
        return logits.masked_fill(logits < kth, float("-inf"))
    k = _rows(k, logits)  # (B, 1)
    k = torch.where((k <= 0) | (k > V), V, k)
    kth = logits.sort(dim=-1, descending=True).values.gather(-1, k - 1)  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float | torch.Tensor) -> torch.Tensor:
    """Keep the most likely tokens whose cumulative probability first reaches p.
    p = 1 keeps everything; the most likely token is always kept."""
    if not isinstance(p, torch.Tensor) and p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)  # ascending
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    if isinstance(p, torch.Tensor):
        # 1 - p in float64, then rounded once, as for a Python float p
        threshold = (1 - _rows(p, logits).double()).to(cum.dtype)  # (B, 1)
        remove_sorted = (cum <= threshold) & (threshold > 0)  # rows with p = 1 keep all
    else:
        remove_sorted = cum <= 1 - p  # the low tail whose total mass is <= 1 - p
    remove_sorted[..., -1] = False  # always keep the most likely token
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float | torch.Tensor) -> torch.Tensor:
    """Keep tokens whose probability is at least min_p times the top probability.
    min_p = 0 keeps everything; the most likely token is always kept."""
    if not isinstance(min_p, torch.Tensor) and min_p <= 0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = _rows(min_p, logits) * probs.amax(dim=-1, keepdim=True)  # (..., 1)
    return logits.masked_fill(probs < threshold, float("-inf"))


def random_sample(
    probs: torch.Tensor, generators: Sequence[torch.Generator | None] | None = None
) -> torch.Tensor:
    """One token per row of probs (B, V) -> (B,). Row i draws from `generators[i]` if given
    (so a seeded row gives the same tokens whatever else is in the batch), the other rows
    from torch's global generator."""
    B = probs.shape[0]
    generators = list(generators) if generators is not None else [None] * B
    if len(generators) != B:
        raise ValueError(f"{len(generators)} generators for {B} rows")
    tokens = torch.empty(B, dtype=torch.long, device=probs.device)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        rows = torch.tensor(unseeded, device=probs.device)
        tokens[rows] = torch.multinomial(probs[rows], num_samples=1)[:, 0]
    for i, g in enumerate(generators):
        if g is not None:
            tokens[i] = torch.multinomial(probs[i], num_samples=1, generator=g)[0]
    return tokens


@dataclass
class SamplingMetadata:
    """The `SamplingParams` of a batch of B rows, as (B,) tensors, plus the token history
    the penalties need. Build it with `from_params`; `append_output` after each step.
    When no row has a penalty, the (B, V) history tables are empty (0 columns): nothing
    reads them, and a batch of an engine step need not build them."""

    temperature: torch.Tensor  # (B,) float32
    top_k: torch.Tensor  # (B,) int64, 0 = off
    top_p: torch.Tensor  # (B,) float64, 1 = off (float64: 1 - p is rounded once, as HF does)
    min_p: torch.Tensor  # (B,) float32, 0 = off
    repetition_penalty: torch.Tensor  # (B,) float32, 1 = off
    presence_penalty: torch.Tensor  # (B,) float32, 0 = off
    frequency_penalty: torch.Tensor  # (B,) float32, 0 = off
    generators: list[torch.Generator | None]
    prompt_mask: torch.Tensor  # (B, V) bool: the token occurs in the prompt
    output_counts: torch.Tensor  # (B, V) int64: occurrences in the output so far
    greedy: list[bool]  # per row; host-side flags, so no step has to ask the device
    no_penalties: bool  # True when every row has all three penalties off

    @classmethod
    def from_params(
        cls,
        params: Sequence[SamplingParams],
        vocab_size: int,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        generators: Sequence[torch.Generator | None] | None = None,
        device: torch.device | str | None = None,
        output_token_ids: Sequence[Sequence[int]] | None = None,
    ) -> SamplingMetadata:
        """One row per params; `generators` default to one per seeded row, seeded with its
        seed (a row's own generator keeps its samples independent of the batch).
        `output_token_ids`: the tokens each row has produced so far (default: none)."""
        B = len(params)
        if generators is None:
            generators = [
                None if p.seed is None else torch.Generator(device=device).manual_seed(p.seed)
                for p in params
            ]
        if len(generators) != B:
            raise ValueError(f"{len(generators)} generators for {B} rows")

        def column(name: str, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor([getattr(p, name) for p in params], dtype=dtype, device=device)

        no_penalties = not any(p.has_penalties for p in params)
        width = 0 if no_penalties else vocab_size  # no penalty: the tables are never read
        prompt_mask = torch.zeros(B, width, dtype=torch.bool, device=device)
        output_counts = torch.zeros(B, width, dtype=torch.long, device=device)
        for name, rows in (("prompts", prompt_token_ids), ("outputs", output_token_ids)):
            if rows is not None and len(rows) != B:
                raise ValueError(f"{len(rows)} {name} for {B} rows")
        if width and prompt_token_ids is not None:
            for i, ids in enumerate(prompt_token_ids):
                prompt_mask[i, torch.as_tensor(ids, dtype=torch.long, device=device)] = True
        if width and output_token_ids is not None:
            for i, ids in enumerate(output_token_ids):
                out = torch.as_tensor(ids, dtype=torch.long, device=device)
                output_counts[i].index_add_(0, out, torch.ones_like(out))
        return cls(
            temperature=column("temperature", torch.float32),
            top_k=column("top_k", torch.long),
            top_p=column("top_p", torch.float64),
            min_p=column("min_p", torch.float32),
            repetition_penalty=column("repetition_penalty", torch.float32),
            presence_penalty=column("presence_penalty", torch.float32),
            frequency_penalty=column("frequency_penalty", torch.float32),
            generators=list(generators),
            prompt_mask=prompt_mask,
            output_counts=output_counts,
            greedy=[p.greedy for p in params],
            no_penalties=no_penalties,
        )

    def append_output(self, tokens: torch.Tensor) -> None:
        """Count the tokens (B,) just sampled, for the presence/frequency penalties."""
        if self.no_penalties:
            return
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        self.output_counts[rows, tokens] += 1


def _penalize(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    logits = logits.float()
    if md.no_penalties:
        return logits
    return apply_penalties(
        logits,
        md.prompt_mask,
        md.output_counts,
        md.repetition_penalty,
        md.presence_penalty,
        md.frequency_penalty,
    )


def _warp(logits: torch.Tensor, md: SamplingMetadata, rows: torch.Tensor) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p with the parameters of `rows` of the batch."""
    logits = apply_temperature(logits, md.temperature[rows])
    logits = top_k_filter(logits, md.top_k[rows])
    logits = top_p_filter(logits, md.top_p[rows])
    return min_p_filter(logits, md.min_p[rows])


def process_logits(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
    """Penalties -> temperature -> top-k -> top-p -> min-p, every row: (B, V) -> (B, V)
    float32, removed tokens at -inf (greedy rows skip the temperature)."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    return _warp(_penalize(logits, metadata), metadata, rows)


ARGMAX_CHUNK = 1024  # columns per block of greedy_argmax's first pass


def greedy_argmax(logits: torch.Tensor, chunk: int = ARGMAX_CHUNK) -> torch.Tensor:
    """logits.argmax(-1) for rows (B, V), the same index (the first of tied maxima).

    On a GPU, torch's argmax of a few rows over a large vocabulary runs as one long
    reduction per row: 36 us for one row of Llama 3's 128,256 logits on an H100, more than
    a 2048 x 2048 projection. Two passes split the work: the maximum of each block of
    `chunk` columns (B x V / chunk parallel reductions), then the argmax over the blocks.
    On a CPU, or for small vocabularies, it is torch's argmax."""
    if logits.device.type != "cuda" or logits.shape[-1] <= 2 * chunk:
        return logits.argmax(dim=-1)
    return argmax_two_pass(logits, chunk)


def block_maxima(logits: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`greedy_argmax`'s first pass: the maximum of each block of `chunk` columns of logits
    (B, V) and its index within the block, (B, ceil(V / chunk)) each."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be (B, V), got shape {tuple(logits.shape)}")
    B, V = logits.shape
    blocks = -(-V // chunk)
    if blocks * chunk != V:  # pad the last block with -inf: never a maximum before a real one
        logits = torch.nn.functional.pad(logits, (0, blocks * chunk - V), value=float("-inf"))
    return logits.reshape(B, blocks, chunk).max(dim=-1)


def argmax_two_pass(logits: torch.Tensor, chunk: int) -> torch.Tensor:
    """`greedy_argmax`'s two passes on any device: (B, V) -> (B,) int64."""
    values, within = block_maxima(logits, chunk)  # (B, blocks)
    block = values.argmax(dim=-1, keepdim=True)  # the first block holding the maximum
    return within.gather(-1, block)[:, 0] + block[:, 0] * chunk


def sample(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
    """The whole pipeline with per-row parameters: logits (B, V) -> token ids (B,).
    Greedy rows take the argmax after the penalties; the others sample."""
    md = metadata
    logits = _penalize(logits, md)
    tokens = greedy_argmax(logits)  # (B,): the answer of the greedy rows
    sampled = [i for i, greedy in enumerate(md.greedy) if not greedy]
    if not sampled:
        return tokens
    rows = torch.tensor(sampled, device=logits.device)
    probs = _warp(logits[rows], md, rows).softmax(dim=-1)
    tokens[rows] = random_sample(probs, [md.generators[i] for i in sampled])
    return tokens


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    min_p: float = 0.0,
) -> torch.Tensor:
    """The same pipeline (without penalties) with one setting for every row, drawing from
    one generator: logits (V,) or (B, V) -> token ids () or (B,)."""
    check_sampling_args(temperature, top_k, top_p, min_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    logits = min_p_filter(top_p_filter(top_k_filter(logits, top_k), top_p), min_p)
    probs = logits.softmax(dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])  # (B, V)
    tokens = torch.multinomial(flat, num_samples=1, generator=generator)  # (B, 1)
    return tokens.reshape(probs.shape[:-1])
