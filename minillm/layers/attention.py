"""Causal self-attention with grouped-query heads (GQA; Ainslie et al., 2023).

    attn(q, k, v) = softmax(q k^T / sqrt(D) + mask) v

H query heads share Hkv key/value heads: query head h reads kv head h // (H / Hkv).
The mask hides future keys (causal) and, with a sliding window W, keys more than W - 1
positions back. Queries are the last T positions of the S keys, so the same function
serves a whole prompt (T == S) and a decode step against a KV cache (T < S; `minillm.cache`).

Backends (one signature, `attention(q, k, v, window=..., backend=...)`):
  - "naive": the formula above with the (B, H, T, S) score matrix materialized; the
    reference every faster backend is tested against.
  - "sdpa": torch's fused `scaled_dot_product_attention` (FlashAttention / memory-
    efficient kernels where the device has them).
  - "tiled": FlashAttention's tiled online softmax in plain PyTorch (`minillm.layers.flash`).
  - "triton": minillm's Triton FlashAttention kernel (`minillm.kernels.flash_attn_interface`;
    CUDA, or the CPU under TRITON_INTERPRET=1).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from minillm.config import ModelConfig
from minillm.layers.norm import RMSNorm
from minillm.layers.rotary import apply_rotary

if TYPE_CHECKING:
    from minillm.cache import KVCache
    from minillm.layers.attention_metadata import AttentionMetadata


def causal_mask(
    T: int, S: int, window: int | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """Boolean (T, S) mask, True where query t may attend to key s.

    Query t sits at position S - T + t. It sees keys at positions <= its own and, with a
    window W, only the W most recent of them (itself included).
    """
    q_pos = torch.arange(S - T, S, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    return allowed


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, S, D) -> (B, Hkv * n_rep, S, D): each kv head repeated for its query group."""
    if n_rep == 1:
        return x
    B, Hkv, S, D = x.shape
    return x[:, :, None].expand(B, Hkv, n_rep, S, D).reshape(B, Hkv * n_rep, S, D)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention expects 4-D (B, H, T, D) tensors, got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    (B, H, T, D), (Bk, Hkv, S, Dk) = q.shape, k.shape
    if Bk != B or Dk != D:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or D")
    if H % Hkv:
        raise ValueError(f"{H} query heads cannot be grouped over {Hkv} kv heads")
    if T > S:
        raise ValueError(f"more queries ({T}) than keys ({S})")


def naive_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None
) -> torch.Tensor:
    """q (B, H, T, D), k/v (B, Hkv, S, D) -> (B, H, T, D). Scores and softmax in fp32."""
    _check(q, k, v)
    H, Hkv, T, S = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    k, v = repeat_kv(k, H // Hkv), repeat_kv(v, H // Hkv)  # (B, H, S, D)
    scores = (q.float() @ k.float().transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, T, S)
    mask = causal_mask(T, S, window, device=q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1).to(q.dtype)
    return probs @ v  # (B, H, T, D)


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None
) -> torch.Tensor:
    """The same contract as `naive_attention`, through torch's fused kernel."""
    _check(q, k, v)
    H, Hkv, T, S = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    k, v = repeat_kv(k, H // Hkv), repeat_kv(v, H // Hkv)
    if window is None and T == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if window is None and T == 1:  # one query at the last position sees every key: no mask
        return F.scaled_dot_product_attention(q, k, v)
    mask = causal_mask(T, S, window, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def tiled_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None
) -> torch.Tensor:
    """The same contract, tile by tile with an online softmax (`minillm.layers.flash`)."""
    from minillm.layers.flash import flash_attention  # imported on first use

    return flash_attention(q, k, v, window=window)


def triton_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None
) -> torch.Tensor:
    """The same contract through the Triton FlashAttention kernel (forward and backward)."""
    from minillm.kernels.flash_attn_interface import flash_attn_func  # imports Triton

    return flash_attn_func(q, k, v, causal=True, window=window)


AttentionFn = Callable[..., torch.Tensor]
ATTENTION_BACKENDS: dict[str, AttentionFn] = {"naive": naive_attention, "sdpa": sdpa_attention}
ATTENTION_BACKENDS.update(tiled=tiled_attention, triton=triton_attention)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | None = None,
    backend: str = "sdpa",
) -> torch.Tensor:
    """Causal attention through one of `ATTENTION_BACKENDS`."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(
            f"unknown attention backend {backend!r}; available: {', '.join(ATTENTION_BACKENDS)}"
        )
    return ATTENTION_BACKENDS[backend](q, k, v, window=window)


class Attention(nn.Module):
    """The attention block of one decoder layer: project, normalize (Qwen3), rotate, attend.

    With a KV cache, the rotated keys and the values of the new tokens are appended to the
    layer's cache, and the queries attend over every cached position. With attention
    metadata instead, x is a packed batch (N, C) of many sequences over a paged pool
    (`minillm.layers.attention_metadata`)."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        C, D = config.hidden_size, config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = D
        self.window = config.window_for_layer(layer_idx)
        self.q_proj = nn.Linear(C, self.num_heads * D, bias=config.qkv_bias)
        self.k_proj = nn.Linear(C, self.num_kv_heads * D, bias=config.qkv_bias)
        self.v_proj = nn.Linear(C, self.num_kv_heads * D, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * D, C, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(D, config.rms_norm_eps)
            self.k_norm = RMSNorm(D, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        backend: str = "sdpa",
        cache: KVCache | None = None,
        attn_metadata: AttentionMetadata | None = None,
    ) -> torch.Tensor:
        if attn_metadata is not None:
            return self.forward_packed(x, cos, sin, attn_metadata)
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)  # (B, T, H, D)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)  # (B, T, Hkv, D)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|Hkv, T, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:  # the cached keys/values, then the new ones: (B, Hkv, S, D)
            k, v = cache.update(self.layer_idx, k, v)
        y = attention(q, k, v, window=self.window, backend=backend)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)  # (B, T, H*D)
        return self.o_proj(y)

    def forward_packed(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, md: AttentionMetadata
    ) -> torch.Tensor:
        """x (N, C): the new tokens of a packed batch; cos/sin (N, D) at their positions."""
        N = x.shape[0]
        q = self.q_proj(x).view(N, self.num_heads, self.head_dim)  # (N, H, D)
        k = self.k_proj(x).view(N, self.num_kv_heads, self.head_dim)  # (N, Hkv, D)
        v = self.v_proj(x).view(N, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotate_packed(q, cos, sin), rotate_packed(k, cos, sin)
        y = md.attend(self.layer_idx, q, k, v, self.window)  # (N, H, D)
        return self.o_proj(y.reshape(N, self.num_heads * self.head_dim))  # (N, C)


def rotate_packed(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on packed heads x (N, H, D) with cos/sin (N, D): rotated as (H, N, D)."""
    return apply_rotary(x.transpose(0, 1), cos, sin).transpose(0, 1)
