"""Sequence (context) parallelism for a whole `CausalLM`: each rank holds T/N of the tokens.

Everything in a decoder layer except attention acts on each token alone, so it runs on the
local chunk unchanged; attention, which mixes tokens, becomes ring attention
(`minillm.parallel.ring`) or DeepSpeed-Ulysses (`minillm.parallel.ulysses`). Rank r feeds
tokens [r T/N, (r+1) T/N) with their true positions (for RoPE): `shard_sequence` cuts a
batch that way. The parameters are replicated; each rank's gradient covers its tokens
only, so the gradients are summed over the group (`all_reduce_gradients`) when the loss
is a sum over tokens divided by the global token count (`sequence_parallel_loss`).

Both methods give the single-process attention exactly (up to float rounding); they differ
in what they send (`CommStats`): ring attention passes N-1 key/value chunks around the
ring, Ulysses does four all-to-alls of (N-1)/N of a chunk each.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from minillm.layers.rotary import apply_rotary
from minillm.parallel import comm
from minillm.parallel.comm import CommStats, ProcessGroup
from minillm.parallel.ring import ring_attention
from minillm.parallel.ulysses import check_ulysses, ulysses_attention

SEQUENCE_PARALLEL_METHODS = ("ring", "ulysses")


def shard_sequence(
    input_ids: torch.Tensor, group: ProcessGroup
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's contiguous chunk of a (B, T) batch and its positions (T/N,)."""
    N, r = dist.get_world_size(group), dist.get_rank(group)
    T = input_ids.shape[-1]
    if T % N:
        raise ValueError(
            f"sequence parallelism splits the {T} tokens into {N} equal chunks; {N} does not "
            f"divide {T}. Pad the sequence to a multiple of {N}"
        )
    Tc = T // N
    positions = torch.arange(r * Tc, (r + 1) * Tc, device=input_ids.device)  # (Tc,)
    return input_ids[..., r * Tc : (r + 1) * Tc], positions


class SequenceParallelAttention(nn.Module):
    """The model's attention block with its core swapped for ring attention or Ulysses.

    Keeps the original projections (and q/k norms) under the same names, so the
    parameters are still `...self_attn.q_proj.weight` and so on."""

    def __init__(
        self, attn: nn.Module, group: ProcessGroup, method: str, stats: CommStats | None = None
    ):
        super().__init__()
        if method not in SEQUENCE_PARALLEL_METHODS:
            raise ValueError(
                f"unknown sequence-parallel method {method!r}; "
                f"available: {', '.join(SEQUENCE_PARALLEL_METHODS)}"
            )
        if method == "ulysses":
            check_ulysses(attn.num_heads, attn.num_kv_heads, dist.get_world_size(group))
        self.group, self.method, self.stats = group, method, stats
        self.num_heads, self.num_kv_heads = attn.num_heads, attn.num_kv_heads
        self.head_dim, self.window = attn.head_dim, attn.window
        self.q_proj, self.k_proj, self.v_proj = attn.q_proj, attn.k_proj, attn.v_proj
        self.o_proj = attn.o_proj
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm

    def forward(self, x, cos, sin, backend: str = "sdpa", cache=None) -> torch.Tensor:
        if cache is not None:
            raise ValueError(
                "sequence-parallel attention does not use a KV cache: it runs whole sequences "
                "(prefill or training); pass cache=None"
            )
        B, Tc, _ = x.shape
        q = self.q_proj(x).view(B, Tc, self.num_heads, self.head_dim)  # (B, Tc, H, D)
        k = self.k_proj(x).view(B, Tc, self.num_kv_heads, self.head_dim)  # (B, Tc, Hkv, D)
        v = self.v_proj(x).view(B, Tc, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|Hkv, Tc, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # cos/sin of true positions
        if self.method == "ring":
            y = ring_attention(q, k, v, self.group, self.window, self.stats)
        else:
            y = ulysses_attention(q, k, v, self.group, self.window, backend, self.stats)
        y = y.transpose(1, 2).reshape(B, Tc, self.num_heads * self.head_dim)  # (B, Tc, H*D)
        return self.o_proj(y)


def apply_sequence_parallel(
    model: nn.Module, group: ProcessGroup, method: str = "ring", stats: CommStats | None = None
) -> nn.Module:
    """Swap every layer's attention for its sequence-parallel version, in place.

    Then call `model(local_ids, positions=local_positions)` with `shard_sequence`'s
    output on every rank of `group`."""
    for layer in model.model.layers:
        layer.self_attn = SequenceParallelAttention(layer.self_attn, group, method, stats)
    model.sequence_parallel_group = group
    return model


def sequence_parallel_loss(
    logits: torch.Tensor, targets: torch.Tensor, total_tokens: int
) -> torch.Tensor:
    """This rank's share of the mean cross-entropy: sum over local tokens / all tokens.
    Summed over the ranks, it is the single-process mean loss."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum") / (
        total_tokens
    )


def all_reduce_gradients(
    model: nn.Module, group: ProcessGroup, stats: CommStats | None = None
) -> None:
    """Sum every parameter's gradient over the group (each rank saw different tokens)."""
    for p in model.parameters():
        if p.grad is not None:
            comm.all_reduce(p.grad, group, stats)


def sequence_parallel_bytes(
    method: str,
    world_size: int,
    seq_len: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    batch: int = 1,
    dtype_bytes: int = 2,
) -> float:
    """Bytes one rank sends in one attention layer's forward (what `CommStats` counts).

    ring:    N - 1 steps, each passing a key and a value chunk:  2 (N-1) B Hkv (T/N) D
    ulysses: four all-to-alls (q, k, v, out), each keeping 1/N:  (N-1)/N B (2H + 2Hkv) (T/N) D
    (times dtype_bytes). Ring's volume grows with N at fixed T/N; Ulysses' shrinks."""
    if method not in SEQUENCE_PARALLEL_METHODS:
        raise ValueError(f"unknown method {method!r}; available: {SEQUENCE_PARALLEL_METHODS}")
    N, chunk = world_size, batch * (seq_len / world_size) * head_dim * dtype_bytes
    if method == "ring":
        return 2 * (N - 1) * num_kv_heads * chunk
    return (N - 1) / N * (2 * num_heads + 2 * num_kv_heads) * chunk
