"""Rotary position embeddings (RoPE; Su et al., 2021, "RoFormer").

Each pair of channels (i, i + D/2) of a query or key head is rotated by the angle
`position * inv_freq[i]`, with `inv_freq[i] = theta ** (-2i / D)`. The dot product of a
rotated query and key then depends only on their distance, not on where they are.
Long-context models rescale `inv_freq` (see `minillm.config.RopeScaling`).

We use the "rotate half" layout of Hugging Face Llama checkpoints: the two channels of
a pair are i and i + D/2, not 2i and 2i + 1.
"""

import math

import torch

from minillm.config import ModelConfig


def rope_inv_freq(config: ModelConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """The D/2 rotation frequencies, rescaled as `config.rope_scaling` says. fp32, (D/2,)."""
    D = config.head_dim
    inv_freq = 1.0 / (
        config.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64, device=device).float() / D)
    )
    rs = config.rope_scaling
    if rs.rope_type == "linear":
        inv_freq = inv_freq / rs.factor
    elif rs.rope_type == "llama3":
        # Wavelength = the number of positions of one full turn.
        wavelen = 2 * math.pi / inv_freq
        low_freq_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
        high_freq_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
        # Long wavelengths (low frequencies) are stretched by `factor`; short ones are kept.
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rs.factor, inv_freq)
        # In between, blend the two linearly in 1/wavelength.
        smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
            rs.high_freq_factor - rs.low_freq_factor
        )
        blended = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        inv_freq = torch.where(medium, blended, scaled)
    return inv_freq


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every rotation angle: positions (..., T) -> two (..., T, D) tensors.

    Angles are computed in fp32 (positions reach 1e5+; bf16 angles would be useless), then
    cast to the activations' dtype.
    """
    angles = positions.float()[..., None] * inv_freq  # (..., T, D/2)
    angles = torch.cat((angles, angles), dim=-1)  # (..., T, D): pair i and i + D/2 share
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate heads `x` (B, H, T, D) by cos/sin of shape (B, T, D) or (T, D)."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D): broadcast over heads
    return x * cos + rotate_half(x) * sin
