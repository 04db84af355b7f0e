"""A Llama-family decoder-only transformer (Llama 2/3, Mistral, Qwen2, Qwen3).

    x = embed_tokens(ids)
    for each layer:  x = x + attn(norm(x));  x = x + mlp(norm(x))      (pre-norm residual)
    logits = lm_head(norm(x))

Module names equal the tensor names of Hugging Face checkpoints
(`model.layers.3.self_attn.q_proj.weight`...), so loading a checkpoint is a plain copy.
The forward pass is the obviously-correct one: every call recomputes attention over all
the tokens it is given. Given a KV cache (`minillm.cache`), the same forward continues a
cached sequence instead: `model(input_ids, positions, cache)` appends the new tokens' keys
and values to the cache and attends over all of them, which is one decode step when T = 1.
Both paths give the same logits (tested token for token). A serving engine calls
`model(input_ids, positions, attn_metadata=...)` with a packed batch of many sequences,
ids and positions (N,), over a paged pool (`minillm.layers.attention_metadata`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from minillm.config import ModelConfig
from minillm.layers.attention import ATTENTION_BACKENDS, Attention
from minillm.layers.mlp import SwiGLUMLP
from minillm.layers.norm import RMSNorm
from minillm.layers.rotary import rope_cos_sin, rope_inv_freq

if TYPE_CHECKING:
    from minillm.cache import KVCache
    from minillm.layers.attention_metadata import AttentionMetadata


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size, config.mlp_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        backend: str,
        cache: KVCache | None = None,
        attn_metadata: AttentionMetadata | None = None,
    ) -> torch.Tensor:
        h = self.input_layernorm(x)
        if attn_metadata is None:
            x = x + self.self_attn(h, cos, sin, backend, cache)
        else:
            x = x + self.self_attn(h, cos, sin, backend, cache, attn_metadata)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    """Embeddings, the stack of layers and the final norm: ids (B, T) -> hidden (B, T, C)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class CausalLM(nn.Module):
    """The decoder with its language-model head: token ids (B, T) -> logits (B, T, V)."""

    def __init__(self, config: ModelConfig, attn_backend: str = "sdpa"):
        super().__init__()
        self.config = config
        self.attn_backend = attn_backend
        self.model = DecoderModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.reset_parameters()

    @property
    def attn_backend(self) -> str:
        return self._attn_backend

    @attn_backend.setter
    def attn_backend(self, name: str) -> None:
        if name not in ATTENTION_BACKENDS:
            raise ValueError(
                f"unknown attention backend {name!r}; available: {', '.join(ATTENTION_BACKENDS)}"
            )
        self._attn_backend = name

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def reset_parameters(self, std: float = 0.02) -> None:
        """Random init as in GPT-2/Llama: N(0, std) weights, with the residual projections
        (o_proj, down_proj) scaled by 1/sqrt(2L) so the residual stream does not grow with
        depth; zero biases; unit norm weights."""
        if self.model.embed_tokens.weight.is_meta:
            return
        residual_std = std / (2 * self.config.num_hidden_layers) ** 0.5
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_residual = name.endswith(("o_proj", "down_proj"))
                nn.init.normal_(module.weight, mean=0.0, std=residual_std if is_residual else std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def check_input_ids(self, input_ids: torch.Tensor, past_len: int = 0) -> None:
        """Clear errors for what the embedding table or the context cannot take
        (`past_len`: tokens already in a KV cache before these)."""
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be 2-D (B, T), got shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
        T = input_ids.shape[1]
        if T == 0:
            raise ValueError("input_ids is empty: give at least one token")
        if self.config.max_position_embeddings < past_len + T:
            cached = f" (after {past_len} cached ones)" if past_len else ""
            raise ValueError(
                f"{T} tokens{cached} exceed the model's context of "
                f"{self.config.max_position_embeddings} tokens"
            )
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(
                f"token ids must lie in [0, {self.config.vocab_size}), got values in [{lo}, {hi}]"
            )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        check_inputs: bool = True,
        attn_metadata: AttentionMetadata | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V). `positions` (T,) or (B, T) default 0..T-1.

        With a `cache` holding P positions, the T tokens are positions P .. P + T - 1 (the
        default; given positions must equal them); their keys and values join the cache.
        With `attn_metadata`: a packed batch, input_ids and positions (N,) -> logits (R, V)
        of the rows `attn_metadata.logits_indices` (all N rows when None)."""
        if attn_metadata is not None:
            return self.forward_packed(input_ids, positions, attn_metadata, check_inputs)
        past = 0 if cache is None else cache.seq_len
        if check_inputs:
            self.check_input_ids(input_ids, past)
        B, T = input_ids.shape
        if cache is not None:
            cache.check_append(B, T)
        if positions is None:
            positions = torch.arange(past, past + T, device=input_ids.device)  # (T,)
        elif cache is not None and check_inputs:
            self._check_cache_positions(positions, past, T)
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        inv_freq = rope_inv_freq(self.config, device=x.device)
        cos, sin = rope_cos_sin(positions, inv_freq, x.dtype)  # (T, D) or (B, T, D)
        x, residual = self._layers(x, cos, sin, cache)
        return self.lm_head(self._final_norm(x, residual))  # (B, T, V)

    def _layers(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        attn_metadata: AttentionMetadata | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The decoder layers: x -> (x, residual), the hidden states being x + residual
        (x alone when residual is None). Fused layers (`minillm.engine.fusion`) leave their
        last residual add to the next norm, which does it in the same kernel."""
        residual = None
        for layer in self.model.layers:
            carry = getattr(layer, "forward_carry", None)
            if carry is not None:
                x, residual = carry(x, residual, cos, sin, self.attn_backend, cache, attn_metadata)
                continue
            if residual is not None:
                x, residual = x + residual, None
            x = layer(x, cos, sin, self.attn_backend, cache, attn_metadata)
        return x, residual

    def _final_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """The final norm of x + residual; a norm that takes `residual` (the fused one)
        does the add."""
        if residual is None:
            return self.model.norm(x)
        if isinstance(self.model.norm, RMSNorm):  # the plain norm: no fused add
            return self.model.norm(x + residual)
        return self.model.norm(x, residual=residual)[0]

    def forward_packed(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn_metadata: AttentionMetadata,
        check_inputs: bool = True,
    ) -> torch.Tensor:
        """The packed path of `forward`: ids and positions (N,) -> logits (R, V)."""
        if check_inputs:
            self._check_packed(input_ids, positions)
        x, residual = self._packed_layers(input_ids, positions, attn_metadata)
        return self.compute_logits(x, attn_metadata.logits_indices, residual)

    def packed_hidden_states(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: AttentionMetadata
    ) -> torch.Tensor:
        """The decoder layers over a packed batch: ids and positions (N,) -> (N, C), before
        the final norm. Rows are independent except inside `attn_metadata.attend`."""
        x, residual = self._packed_layers(input_ids, positions, attn_metadata)
        return x if residual is None else x + residual

    def _packed_layers(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.model.embed_tokens(input_ids)  # (N, C)
        inv_freq = rope_inv_freq(self.config, device=x.device)
        cos, sin = rope_cos_sin(positions, inv_freq, x.dtype)  # (N, D)
        return self._layers(x, cos, sin, None, attn_metadata)

    def compute_logits(
        self,
        hidden: torch.Tensor,
        logits_indices: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final norm and LM head on the rows `logits_indices` of hidden (N, C) (all rows
        when None) -> (R, V); with `residual` (N, C), of hidden + residual."""
        if logits_indices is not None:
            hidden = hidden[logits_indices]  # (R, C): only the rows that are sampled
            residual = None if residual is None else residual[logits_indices]
        return self.lm_head(self._final_norm(hidden, residual))  # (R, V)

    def _check_packed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> None:
        for name, t in (("input_ids", input_ids), ("positions", positions)):
            if not isinstance(t, torch.Tensor) or t.dim() != 1:
                raise ValueError(f"a packed batch needs 1-D (N,) {name}, got {t!r:.60}")
        if input_ids.shape != positions.shape or input_ids.numel() == 0:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} and positions {tuple(positions.shape)} "
                "must have the same non-zero length"
            )
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(
                f"token ids must lie in [0, {self.config.vocab_size}), got values in [{lo}, {hi}]"
            )
        if int(positions.min()) < 0 or int(positions.max()) >= self.config.max_position_embeddings:
            raise ValueError(
                f"positions must lie in [0, {self.config.max_position_embeddings}), got "
                f"[{int(positions.min())}, {int(positions.max())}]"
            )

    @staticmethod
    def _check_cache_positions(positions: torch.Tensor, past: int, T: int) -> None:
        expected = torch.arange(past, past + T, device=positions.device)
        if positions.shape[-1] != T or not bool((positions == expected).all()):
            raise ValueError(
                f"with a KV cache holding {past} positions the next {T} tokens are positions "
                f"{past}..{past + T - 1}, got positions {positions.flatten()[:8].tolist()}"
                + ("..." if positions.numel() > 8 else "")
            )

    def num_parameters(self) -> int:
        """Unique parameters (a tied embedding counts once)."""
        return sum(p.numel() for p in self.parameters())
