"""Per-sequence sampling for a batch: every row of the logits has its own `SamplingParams`.

The rows go through `minillm.sampling` (penalties -> temperature -> top-k -> top-p -> min-p
-> sample), the same pipeline `generate_cached` uses, with each row's parameters as a (B,)
column. A seeded request draws from its own `torch.Generator`, so its samples do not
depend on which other requests share the batch. Two shortcuts keep a step cheap: a batch
of greedy rows without penalties is one argmax, and the (B, V) penalty tables are built
only when a row has a penalty.
"""

from __future__ import annotations

import torch

from minillm.engine.sequence import Sequence
from minillm.sampling import SamplingMetadata, greedy_argmax, process_logits, sample


def sampling_metadata(
    seqs: list[Sequence], vocab_size: int, device: torch.device
) -> SamplingMetadata:
    """The `SamplingMetadata` of rows `seqs` (one row each), with each sequence's generator
    and token history."""
    return SamplingMetadata.from_params(
        [s.params for s in seqs],
        vocab_size,
        [s.prompt_token_ids for s in seqs],
        [s.generator for s in seqs],
        device,
        output_token_ids=[s.output_token_ids for s in seqs],
    )


def sample_tokens(
    logits: torch.Tensor, seqs: list[Sequence], argmax: torch.Tensor | None = None
) -> torch.Tensor:
    """One token per row of logits (B, V), row i with seqs[i]'s parameters -> (B,).
    `argmax`: the rows' greedy tokens when already known (a decode graph computes them)."""
    if all(s.params.greedy and not s.params.has_penalties for s in seqs):
        return greedy_argmax(logits) if argmax is None else argmax
    return sample(logits, sampling_metadata(seqs, logits.shape[-1], logits.device))


def token_probs(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """The distribution each row samples from, (B, V) float32: softmax of the processed
    logits. Greedy rows get a one-hot on their argmax (temperature 0)."""
    md = sampling_metadata(seqs, logits.shape[-1], logits.device)
    processed = process_logits(logits, md)  # (B, V); greedy rows: penalties only
    probs = processed.softmax(dim=-1)
    if any(md.greedy):
        onehot = torch.zeros_like(probs).scatter_(-1, processed.argmax(-1, keepdim=True), 1.0)
        greedy = torch.tensor(md.greedy, device=logits.device)
        probs = torch.where(greedy[:, None], onehot, probs)
    return probs
