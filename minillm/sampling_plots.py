"""Pictures of the sampling pipeline: which tokens each filter keeps, and how sure the result is.

`filtered_distribution` runs one row of logits through `minillm.sampling` and returns the
distribution before the filters (after penalties and temperature), after them, the kept
tokens and both entropies, H(p) = -sum_i p_i log2 p_i in bits (2^H is the number of
equally likely tokens the model hesitates between). `plot_distribution` draws it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from minillm.sampling import SamplingMetadata, apply_penalties, process_logits
from minillm.sampling_params import SamplingParams


def entropy_bits(probs: torch.Tensor) -> float:
    """H(p) in bits of one distribution (V,); zero-probability tokens contribute nothing."""
    p = probs.double()
    return float(-(p * p.clamp_min(1e-300).log2()).sum())


@dataclass
class FilteredDistribution:
    before: torch.Tensor  # (V,) softmax after penalties and temperature, before the filters
    after: torch.Tensor  # (V,) the distribution tokens are drawn from
    kept: torch.Tensor  # (V,) bool
    entropy_before: float  # bits
    entropy_after: float


def filtered_distribution(
    logits: torch.Tensor, params: SamplingParams, prompt_ids: Sequence[int] = ()
) -> FilteredDistribution:
    """Run logits (V,) through the pipeline of `params` (greedy: all mass on the argmax)."""
    V = logits.shape[-1]
    md = SamplingMetadata.from_params([params], V, [list(prompt_ids)])
    z = logits.float()[None]  # (1, V)
    if not md.no_penalties:
        z = apply_penalties(
            z,
            md.prompt_mask,
            md.output_counts,
            md.repetition_penalty,
            md.presence_penalty,
            md.frequency_penalty,
        )
    if params.greedy:
        before = z[0].softmax(-1)
        after = torch.zeros(V).index_fill_(0, z[0].argmax(), 1.0)
    else:
        before = (z[0] / params.temperature).softmax(-1)
        after = process_logits(logits.float()[None], md)[0].softmax(-1)
    return FilteredDistribution(before, after, after > 0, entropy_bits(before), entropy_bits(after))


def plot_distribution(
    logits: torch.Tensor,
    params: SamplingParams,
    tokenizer=None,
    k: int = 25,
    ax=None,
    title: str | None = None,
    prompt_ids: Sequence[int] = (),
):
    """Bars of the k most likely tokens: kept ones in color at their final probability,
    removed ones in grey at the probability they had before the filters."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    d = filtered_distribution(logits, params, prompt_ids)
    top = torch.topk(d.before, min(k, d.before.numel())).indices
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 3))
    kept = d.kept[top]
    x = torch.arange(len(top))
    ax.bar(x[~kept], d.before[top][~kept], color="0.8")
    ax.bar(x[kept], d.after[top][kept], color="C0")
    if tokenizer is not None:
        labels = [repr(tokenizer.decode([int(i)])) for i in top]
        ax.set_xticks(x, labels, rotation=60, fontsize=7, fontfamily="monospace")
    ax.set_ylabel("probability")
    ax.set_title(
        (title or "") + f"  kept {int(d.kept.sum())} tokens, entropy {d.entropy_before:.2f} -> "
        f"{d.entropy_after:.2f} bits",
        fontsize=9,
    )
    handles = [
        Patch(color="C0", label="kept (p after)"),
        Patch(color="0.8", label="removed (p before)"),
    ]
    ax.legend(handles=handles, fontsize=8)
    return ax
