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
from minillm.sampling import SamplingMetadata, process_logits, sample


def _has_penalties(seq: Sequence) -> bool:
    p = seq.params
    return p.repetition_penalty != 1 or p.presence_penalty != 0 or p.frequency_penalty != 0


def sampling_metadata(
    seqs: list[Sequence], vocab_size: int, device: torch.device
) -> SamplingMetadata:
    """The `SamplingMetadata` of rows `seqs` (one row each), with each sequence's generator
    and, only if some row needs them, its prompt mask and output counts."""
    B = len(seqs)

    def column(name: str, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor([getattr(s.params, name) for s in seqs], dtype=dtype, device=device)

    penalties = any(_has_penalties(s) for s in seqs)
    width = vocab_size if penalties else 0  # no penalty: the tables are never read
    prompt_mask = torch.zeros(B, width, dtype=torch.bool, device=device)
    output_counts = torch.zeros(B, width, dtype=torch.long, device=device)
    if penalties:
        for i, s in enumerate(seqs):
            prompt = torch.tensor(s.prompt_token_ids, dtype=torch.long, device=device)
            prompt_mask[i, prompt] = True
            out = torch.tensor(s.output_token_ids, dtype=torch.long, device=device)
            output_counts[i].index_add_(0, out, torch.ones_like(out))
    return SamplingMetadata(
        temperature=column("temperature", torch.float32),
        top_k=column("top_k", torch.long),
        top_p=column("top_p", torch.float64),
        min_p=column("min_p", torch.float32),
        repetition_penalty=column("repetition_penalty", torch.float32),
        presence_penalty=column("presence_penalty", torch.float32),
        frequency_penalty=column("frequency_penalty", torch.float32),
        generators=[s.generator for s in seqs],
        prompt_mask=prompt_mask,
        output_counts=output_counts,
        greedy=[s.params.greedy for s in seqs],
        no_penalties=not penalties,
    )


def sample_tokens(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """One token per row of logits (B, V), row i with seqs[i]'s parameters -> (B,)."""
    if all(s.params.greedy and not _has_penalties(s) for s in seqs):
        return logits.argmax(dim=-1)
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
