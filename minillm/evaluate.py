"""Perplexity, and the unigram baseline it must beat.

    perplexity = exp( mean over predicted tokens of -log p(token | previous tokens) )

The text is cut into non-overlapping windows of the model's context; inside a window
every token after the first is predicted. A unigram model (each token's training-set
frequency, add-one smoothed, no context at all) is the floor: a language model that
does not beat it by far has learned nothing about context.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from minillm.model import CausalLM


@torch.no_grad()
def perplexity(
    model: CausalLM,
    tokens: np.ndarray | torch.Tensor,
    seq_len: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    progress: bool = False,
) -> float:
    """Perplexity of `model` on a token stream, in windows of `seq_len` (default: context)."""
    seq_len = seq_len or model.config.max_position_embeddings
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    tokens = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    n_windows = len(tokens) // seq_len
    if n_windows == 0:
        raise ValueError(f"need at least {seq_len} tokens, got {len(tokens)}")
    windows = tokens[: n_windows * seq_len].view(n_windows, seq_len)  # (N, T)
    total_nll, count = 0.0, 0
    for start in tqdm(range(0, n_windows, batch_size), disable=not progress, desc="perplexity"):
        batch = windows[start : start + batch_size].to(model.device)  # (B, T)
        logits = model(batch[:, :-1]).float()  # (B, T-1, V)
        nll = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += float(nll)
        count += batch[:, 1:].numel()
    return math.exp(total_nll / count)


def unigram_perplexity(
    train_tokens: np.ndarray, eval_tokens: np.ndarray, vocab_size: int, seq_len: int
) -> float:
    """Perplexity of the add-one-smoothed unigram model, on the same predicted positions
    as `perplexity` (windows of `seq_len`, first token of each window not predicted)."""
    counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=vocab_size) + 1.0
    logp = np.log(counts / counts.sum())
    n_windows = len(eval_tokens) // seq_len
    windows = np.asarray(eval_tokens[: n_windows * seq_len], dtype=np.int64)
    targets = windows.reshape(n_windows, seq_len)[:, 1:]
    return float(np.exp(-logp[targets].mean()))
