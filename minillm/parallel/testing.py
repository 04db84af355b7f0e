"""Small helpers for checking a parallel model against the same model on one process.

Every check in the tests, notebooks and benchmarks follows one pattern: each rank builds
the same tiny model from the same seed, runs the parallel version on its share of the
work and the single-process reference on the whole batch, and compares. The reference is
cheap (tiny shapes), so each rank can compute it itself: no gathering needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minillm.config import ModelConfig
from minillm.model import CausalLM

# Tolerances for fp32 comparisons with the single-process model (naive attention).
# Outputs and gradients: a sharded or reduced computation sums the same products in another
# order; the results agree to a few ulps of their magnitude (~1e-6 on these tiny models).
GRAD_TOL = 1e-5
# Losses after a few AdamW steps: Adam divides each gradient entry by its running RMS, so
# entries close to zero (whose relative rounding error is large in any summation order)
# move some weights differently by up to ~lr. After 3 steps at lr 1e-2 the losses
# (about ln V = 5.5) agree to ~5e-6 relative; 2e-5 relative leaves a 4x margin and still
# fails for any real bug (a wrong shard, a missing reduction: differences of 1e-3 or more).
LOSS_RTOL = 2e-5


def tiny_config(**overrides) -> ModelConfig:
    """A Llama-shaped config small enough for 4 ranks on 2 CPU cores, and divisible
    everywhere by 2 and 4: heads 8, kv heads 4 (GQA), F 128, V 256, 4 layers."""
    base = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    base.update(overrides)
    return ModelConfig(**base)


def tiny_model(config: ModelConfig | None = None, seed: int = 0, **overrides) -> CausalLM:
    """The same random fp32 model on every rank (naive attention: the fp32 reference)."""
    torch.manual_seed(seed)
    model = CausalLM(config or tiny_config(**overrides), attn_backend="naive")
    with torch.no_grad():  # non-trivial biases and norm weights, so that they matter
        for name, p in model.named_parameters():
            if "bias" in name or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def random_batches(
    steps: int, batch: int, seq_len: int, vocab_size: int, seed: int = 1
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`steps` (ids, targets) pairs of shape (batch, seq_len), identical on every rank."""
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randint(0, vocab_size, (batch, seq_len), generator=g),
            torch.randint(0, vocab_size, (batch, seq_len), generator=g),
        )
        for _ in range(steps)
    ]


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def reference_losses(
    model: nn.Module, batches, lr: float = 1e-2, weight_decay: float = 0.0
) -> list[float]:
    """Train `model` in place with AdamW on one process; return the loss of every step."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    losses = []
    for ids, targets in batches:
        loss = lm_loss(model(ids), targets)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def named_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """name -> gradient, including every alias of a tied parameter (e.g. lm_head.weight)."""
    out = {}
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            if p.grad is not None:
                out[f"{mod_name}.{p_name}" if mod_name else p_name] = p.grad
    return out


def max_rel_diff(a: list[float], b: list[float]) -> float:
    """Largest |a_i - b_i| / |b_i| over two lists of losses."""
    if len(a) != len(b):
        raise ValueError(f"different lengths: {len(a)} and {len(b)}")
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


def max_abs_diff(a, b) -> float:
    """Largest |a - b| over tensors, or over matching lists / dicts of tensors or floats."""
    if isinstance(a, dict):
        if a.keys() != b.keys():
            raise ValueError(f"different keys: {sorted(a.keys() ^ b.keys())}")
        return max(max_abs_diff(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            raise ValueError(f"different lengths: {len(a)} and {len(b)}")
        return max(max_abs_diff(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return (a.detach().double() - b.detach().double()).abs().max().item()
    return abs(float(a) - float(b))
