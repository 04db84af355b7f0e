"""Attention over a packed batch and a paged KV pool: what one engine step hands the model.

A serving engine runs many sequences in one forward pass, each at its own stage: some
decode one token, others prefill a chunk of their prompt. Padding them to one length
wastes compute, so the batch is *packed* (vLLM, FlashAttention's varlen API; CTranslate2
calls it padding removal): the N new tokens of all sequences sit in one row (N,), and
`AttentionMetadata` says which tokens belong to which sequence and where their keys and
values live in the paged pool (`minillm.cache.paged`):

    slot_mapping (N,)           pool slot of each new token's K/V (-1: do not store)
    decode rows  [0, num_decodes)       one query each, at position context_lens[b] - 1:
        block_tables (num_decodes, max_blocks), context_lens (num_decodes,)
    prefill rows [num_decodes, N)       sequence b brings T_b queries, the last T_b of its
        S_b keys (chunked prefill, or speculative verification): cu_seqlens_q / cu_seqlens_k
        are the prefix sums of T_b / S_b, and kv_slots lists the pool slots of every
        sequence's S_b keys in position order.
    logits_indices (R,)         rows whose logits the engine samples from (None: all)

Each layer first writes the new K/V into the pool (`reshape_and_cache`), then attends:
decode rows with paged decode attention, prefill rows with variable-length causal
attention over keys gathered from the pool. On CUDA both run as Triton kernels
(`minillm.kernels`); elsewhere the PyTorch references do (`minillm.cache.paged` and the
model's dense attention backend, one sequence at a time; the decode rows gather their
pages for torch's fused attention, tested against `paged_attention_ref`). The engine builds
the metadata
(`minillm.engine.model_runner`); the layers only call `attend`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from minillm.cache.paged import PagedKVCache, reshape_and_cache_ref
from minillm.layers.attention import attention


@dataclass
class AttentionMetadata:
    """The layout of one packed batch over a paged pool (shapes in the module docstring)."""

    kv_cache: PagedKVCache
    slot_mapping: torch.Tensor  # (N,) int64
    num_decodes: int = 0
    block_tables: torch.Tensor | None = None  # (num_decodes, max_blocks) int32
    context_lens: torch.Tensor | None = None  # (num_decodes,) int32
    max_decode_context: int = 0  # host copy of max(context_lens), or the graph's bound
    cu_seqlens_q: torch.Tensor | None = None  # (P + 1,) int32, over the prefill rows
    cu_seqlens_k: torch.Tensor | None = None  # (P + 1,) int32
    kv_slots: torch.Tensor | None = None  # (sum S_b,) int64
    query_lens: list[int] = field(default_factory=list)  # host copies: T_b of the prefills
    key_lens: list[int] = field(default_factory=list)  # S_b
    logits_indices: torch.Tensor | None = None  # (R,) int64
    use_triton: bool = False  # CUDA kernels; False: the PyTorch references
    backend: str = "sdpa"  # dense backend of the PyTorch prefill path
    decode_num_splits: int | None = None  # split-K of the Triton decode (None: its choice)
    # One kernel for every row (`minillm.kernels.unified_attention`): (block_tables (B, W),
    # cu_seqlens_q (B + 1,), context_lens (B,), host query lengths, program table).
    unified: tuple | None = None
    # `attend` stores k, v in `kv_cache` at `slot_mapping`; a layer that has already stored
    # them (RoPE fused with the write, `minillm.kernels.reshape_and_cache.rotary_and_cache`)
    # says so with attend(..., kv_stored=True). Stand-ins for the metadata (the piecewise
    # graphs' capture) lack the flag: their layers keep RoPE, then attend.
    stores_kv_at_slots: ClassVar[bool] = True

    @property
    def num_prefills(self) -> int:
        return len(self.query_lens)

    def attend(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        window: int | None = None,
        out: torch.Tensor | None = None,
        kv_stored: bool = False,
    ) -> torch.Tensor:
        """Store k, v (N, Hkv, D) of layer `layer_idx` in the pool, then attend: q (N, H, D)
        -> (N, H, D), every query over its own sequence's keys (causal, `window`); written
        into `out` (N, H, D) when given. `kv_stored`: the caller has stored them already."""
        k_cache, v_cache = self.kv_cache.layer(layer_idx)
        if not kv_stored:
            if self.use_triton:
                from minillm.kernels.reshape_and_cache import reshape_and_cache

                reshape_and_cache(k, v, k_cache, v_cache, self.slot_mapping, check_bounds=False)
            else:
                reshape_and_cache_ref(k, v, k_cache, v_cache, self.slot_mapping)
        out = torch.empty_like(q) if out is None else out
        if self.unified is not None:
            from minillm.kernels.unified_attention import unified_attention

            tables, cu, lens, query_lens, programs = self.unified
            return unified_attention(q, k_cache, v_cache, tables, cu, lens, query_lens, window,
                                     out=out, programs=programs)  # fmt: skip
        nd = self.num_decodes
        if nd:
            self._decode(q[:nd], k_cache, v_cache, window, out[:nd])
        if self.num_prefills:
            self._prefill(q[nd:], k_cache, v_cache, window, out[nd:])
        return out

    def _decode(self, q, k_cache, v_cache, window, out):
        if self.use_triton:
            from minillm.kernels.paged_attention import paged_attention

            paged_attention(
                q, k_cache, v_cache, self.block_tables, self.context_lens, window=window,
                num_splits=self.decode_num_splits, max_context_len=self.max_decode_context,
                check_bounds=False, out=out,
            )  # fmt: skip
            return
        out.copy_(paged_decode_sdpa(q, k_cache, v_cache, self.block_tables, self.context_lens,
                                    window, self.max_decode_context or None))  # fmt: skip

    def _prefill(self, q, k_cache, v_cache, window, out):
        Hkv, D = k_cache.shape[2:]
        k = k_cache.view(-1, Hkv, D)[self.kv_slots]  # (sum S_b, Hkv, D): each sequence's keys
        v = v_cache.view(-1, Hkv, D)[self.kv_slots]
        if self.use_triton:
            # The kernel's launcher, not `flash_attn_varlen_func`: the engine built these
            # tensors, and that function's checks read cu_seqlens back to the host (a sync
            # per layer); inference needs no autograd node either.
            from minillm.kernels.flash_attn import flash_attn_forward

            lens = (max(self.query_lens), max(self.key_lens))
            cu = (self.cu_seqlens_q, self.cu_seqlens_k)
            flash_attn_forward(q, k, v, True, window, q.shape[-1] ** -0.5, cu, lens, out=out)
            return
        qs, ks = 0, 0
        for T, S in zip(self.query_lens, self.key_lens, strict=True):
            qb = q[qs : qs + T].transpose(0, 1)[None]  # (1, H, T, D)
            kb = k[ks : ks + S].transpose(0, 1)[None]  # (1, Hkv, S, D)
            vb = v[ks : ks + S].transpose(0, 1)[None]
            out[qs : qs + T] = attention(qb, kb, vb, window, self.backend)[0].transpose(0, 1)
            qs, ks = qs + T, ks + S


def paged_decode_sdpa(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    window: int | None = None,
    max_context: int | None = None,
) -> torch.Tensor:
    """`paged_attention_ref`'s contract (q (B, H, D), one query per sequence at position
    context_lens[b] - 1 -> (B, H, D)) through torch's fused attention: gather the pages
    (up to `max_context` positions, else the longest context), mask each row past its
    length (and outside its window). A kv head's group of G query heads attends as G
    queries of one (B, Hkv) "sequence", so the keys are never repeated per query head."""
    B, H, D = q.shape
    block_size, Hkv = k_cache.shape[1:3]
    S = int(context_lens.max()) if max_context is None else max_context
    pos = torch.arange(S, device=q.device)  # (S,)
    slots = block_tables[:, pos // block_size].long() * block_size + pos % block_size  # (B, S)
    k = k_cache.view(-1, Hkv, D)[slots].transpose(1, 2)  # (B, Hkv, S, D)
    v = v_cache.view(-1, Hkv, D)[slots].transpose(1, 2)
    last = context_lens.to(q.device).long()[:, None] - 1  # (B, 1): the query's position
    visible = pos[None, :] <= last  # (B, S)
    if window is not None:
        visible &= pos[None, :] > last - window
    qg = q.view(B, Hkv, H // Hkv, D)  # (B, Hkv, G, D)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=visible[:, None, None, :])
    return out.reshape(B, H, D)
