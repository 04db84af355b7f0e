"""The next-token distribution: what the model believes comes after a prompt.

A causal language model maps a prompt to one vector of logits (V,) for the position after
it; sampling turns them into probabilities with

    p = softmax(logits / temperature)          temperature -> 0 puts all mass on the argmax

(the same rule as `minillm.sampling`). This module returns the most likely candidates with
their probabilities, and draws them as a bar chart, for notebooks and widgets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from minillm.model import CausalLM
from minillm.tokenizer import Tokenizer


@dataclass(frozen=True)
class Candidate:
    """One possible next token: its id, its text alone, and its probability."""

    token_id: int
    text: str
    probability: float


def _check_temperature(temperature: float) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number, got {temperature!r}")
    if not temperature >= 0:  # also rejects NaN
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")


@torch.no_grad()
def next_token_probs(
    model: CausalLM, prompt_ids: Sequence[int] | torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Probabilities (V,) of the token after `prompt_ids`, in float32 on the CPU."""
    _check_temperature(temperature)
    ids = torch.as_tensor(prompt_ids, dtype=torch.long)
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(
            f"prompt_ids must be a non-empty 1-D sequence, got shape {tuple(ids.shape)}"
        )
    model.check_input_ids(ids[None])
    logits = model(ids[None].to(model.device))[0, -1].float().cpu()  # (V,): last position
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(), logits.numel()).float()
    return torch.softmax(logits / temperature, dim=-1)


def top_next_tokens(
    model: CausalLM,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    k: int = 10,
    temperature: float = 1.0,
) -> list[Candidate]:
    """The `k` most likely next tokens after `prompt` (text or token ids), best first."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    probs = next_token_probs(model, ids, temperature)
    top = torch.topk(probs, min(k, probs.numel()))
    return [
        Candidate(int(i), tokenizer.decode([int(i)], skip_special_tokens=False), float(p))
        for p, i in zip(top.values, top.indices, strict=True)
    ]


def plot_next_tokens(candidates: Sequence[Candidate], title: str = "", ax=None):
    """A horizontal bar chart of the candidates (most likely on top); returns the figure.
    Token texts are shown quoted, so spaces and newlines are visible."""
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 0.3 * len(candidates) + 1.2))
    else:
        fig = ax.figure
    labels = [repr(c.text) for c in candidates][::-1]
    probs = [c.probability for c in candidates][::-1]
    ax.barh(range(len(candidates)), probs, color="tab:blue")
    ax.set_yticks(range(len(candidates)), labels, fontfamily="monospace")
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability of the next token")
    for y, p in enumerate(probs):
        ax.text(min(p + 0.01, 0.9), y, f"{p:.2f}", va="center", fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig
