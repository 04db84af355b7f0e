"""Contiguous KV caches: each layer's keys and values, kept so a decode step computes one token.

Without a cache, generating token t reruns the model over all t tokens before it. But the
keys and values of earlier tokens never change (attention is causal), so a cache stores
them once and a decode step only projects the new token and attends over the stored ones
(Pope et al., 2022, "Efficiently Scaling Transformer Inference"; every inference engine).
The price is memory:

    KV bytes per token = 2 (K and V) x L x Hkv x D x bytes per element

(`minillm.memory` computes it for real models; the caches here report what they hold in
`nbytes`, and the two agree exactly.)

The invariant: after a forward over T tokens at positions seq_len .. seq_len + T - 1, each
layer holds the keys and values of all seq_len + T tokens in position order, so attention's
queries are the last T of the S keys, the contract of every attention backend.

Two contiguous layouts, one interface (`KVCache`; a paged cache implements the same):
  - `StaticKVCache` preallocates (B, Hkv, max_seq_len, D) per layer and writes in place;
  - `DynamicKVCache` grows by concatenation: no size to choose, one copy per step.
Sliding-window layers (Mistral) keep every position too; their mask hides the old ones.
"""

from __future__ import annotations

import torch

from minillm.config import ModelConfig


class KVCache:
    """What the model's forward needs from a cache: `model(input_ids, positions, cache)`.

    The model calls `check_append` once per forward, then each layer calls `update` with the
    keys and values of the new tokens and attends over what it returns."""

    num_layers: int

    @property
    def seq_len(self) -> int:
        """Positions cached in every layer: where the next token goes."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache's tensors."""
        raise NotImplementedError

    def check_append(self, batch_size: int, num_tokens: int) -> None:
        """Raise ValueError if `num_tokens` more tokens of `batch_size` rows cannot be stored."""
        raise NotImplementedError

    def update(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens' k, v (B, Hkv, T, D) of one layer; return that layer's keys and
        values of all cached tokens (B, Hkv, S, D), the new ones last."""
        raise NotImplementedError

    def crop(self, seq_len: int) -> None:
        """Forget every position >= seq_len (e.g. rejected speculative tokens)."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget everything (the memory stays allocated where the layout preallocates)."""
        self.crop(0)

    def _check_update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if not 0 <= layer_idx < self.num_layers:
            raise ValueError(f"layer_idx {layer_idx} is outside [0, {self.num_layers})")
        if k.dim() != 4 or k.shape != v.shape:
            raise ValueError(
                f"k and v must have the same 4-D shape (B, Hkv, T, D), got {tuple(k.shape)} "
                f"and {tuple(v.shape)}"
            )

    def _check_crop(self, seq_len: int) -> None:
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 0:
            raise ValueError(f"seq_len must be an integer >= 0, got {seq_len!r}")


class StaticKVCache(KVCache):
    """Keys and values preallocated to `max_seq_len` positions: (B, Hkv, max_seq_len, D) per
    layer. A step writes its T new positions in place and returns views of the filled part,
    so memory is reserved once, up front (what `nbytes` reports from the start)."""

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_seq_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        for name, value in (("batch_size", batch_size), ("max_seq_len", max_seq_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if max_seq_len > config.max_position_embeddings:
            raise ValueError(
                f"max_seq_len {max_seq_len} exceeds the model's context of "
                f"{config.max_position_embeddings} tokens"
            )
        self.num_layers = config.num_hidden_layers
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        self.dtype = dtype
        shape = (batch_size, config.num_key_value_heads, max_seq_len, config.head_dim)
        # (B, Hkv, max_seq_len, D) per layer
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.num_layers)]
        self.lengths = [0] * self.num_layers  # positions filled, per layer

    @property
    def seq_len(self) -> int:
        return min(self.lengths)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def check_append(self, batch_size: int, num_tokens: int) -> None:
        if batch_size != self.batch_size:
            raise ValueError(
                f"the cache holds {self.batch_size} sequences, the input has {batch_size} rows"
            )
        if self.seq_len + num_tokens > self.max_seq_len:
            raise ValueError(
                f"the cache holds {self.seq_len} of at most {self.max_seq_len} positions: "
                f"{num_tokens} more do not fit; allocate a larger max_seq_len"
            )

    def update(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_update(layer_idx, k, v)
        if k.dtype != self.dtype:
            raise TypeError(f"the cache stores {self.dtype}, got keys of {k.dtype}")
        start = self.lengths[layer_idx]
        end = start + k.shape[2]
        if end > self.max_seq_len:
            raise ValueError(f"{end} positions exceed the cache's max_seq_len {self.max_seq_len}")
        self.k[layer_idx][:, :, start:end] = k  # (B, Hkv, T, D) into positions start..end-1
        self.v[layer_idx][:, :, start:end] = v
        self.lengths[layer_idx] = end
        return self.k[layer_idx][:, :, :end], self.v[layer_idx][:, :, :end]  # (B, Hkv, S, D)

    def crop(self, seq_len: int) -> None:
        self._check_crop(seq_len)
        self.lengths = [min(n, seq_len) for n in self.lengths]


class DynamicKVCache(KVCache):
    """Keys and values that grow with the sequence: each step concatenates its new positions.

    Nothing is reserved ahead, so memory is exactly what the tokens need, but every step
    copies the whole layer cache (O(S) per step, O(S^2) per sequence), which the
    preallocated `StaticKVCache` avoids."""

    def __init__(self, config: ModelConfig):
        self.num_layers = config.num_hidden_layers
        self.max_seq_len = config.max_position_embeddings
        self.k: list[torch.Tensor | None] = [None] * self.num_layers  # (B, Hkv, S, D) each
        self.v: list[torch.Tensor | None] = [None] * self.num_layers

    def _len(self, layer_idx: int) -> int:
        k = self.k[layer_idx]
        return 0 if k is None else k.shape[2]

    @property
    def seq_len(self) -> int:
        return min(self._len(i) for i in range(self.num_layers))

    @property
    def batch_size(self) -> int | None:
        return None if self.k[0] is None else self.k[0].shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)

    def check_append(self, batch_size: int, num_tokens: int) -> None:
        if self.batch_size is not None and batch_size != self.batch_size:
            raise ValueError(
                f"the cache holds {self.batch_size} sequences, the input has {batch_size} rows"
            )
        if self.seq_len + num_tokens > self.max_seq_len:
            raise ValueError(
                f"the cache holds {self.seq_len} positions: {num_tokens} more exceed the "
                f"model's context of {self.max_seq_len} tokens"
            )

    def update(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_update(layer_idx, k, v)
        if self.k[0] is not None and k.dtype != self.k[0].dtype:
            raise TypeError(f"the cache stores {self.k[0].dtype}, got keys of {k.dtype}")
        if self.k[layer_idx] is None:
            self.k[layer_idx], self.v[layer_idx] = k.clone(), v.clone()
        else:
            self.k[layer_idx] = torch.cat([self.k[layer_idx], k], dim=2)  # (B, Hkv, S, D)
            self.v[layer_idx] = torch.cat([self.v[layer_idx], v], dim=2)
        return self.k[layer_idx], self.v[layer_idx]

    def crop(self, seq_len: int) -> None:
        self._check_crop(seq_len)
        for i in range(self.num_layers):
            if self.k[i] is not None:
                if seq_len == 0:
                    self.k[i] = self.v[i] = None
                else:
                    self.k[i] = self.k[i][:, :, :seq_len].clone()
                    self.v[i] = self.v[i][:, :, :seq_len].clone()
