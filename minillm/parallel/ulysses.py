"""DeepSpeed-Ulysses (Jacobs et al., 2023): sequence parallelism by trading sequence for heads.

Rank i holds all H heads of its sequence chunk (B, H, T/N, D). Attention needs the whole
sequence but treats heads independently, so one all-to-all re-partitions the tensor: rank
i sends head group g to rank g and receives, from every rank, its chunk of head group i,

    (B, H, T/N, D)  --all-to-all-->  (B, H/N, T, D)

then runs ordinary (causal, windowed, any backend) attention over the full sequence for
its H/N heads, and a second all-to-all brings the output back to (B, H, T/N, D). Four
all-to-alls per layer (q, k, v, out), each moving (N-1)/N of a chunk: the volume per rank
stays constant when N and T grow together, unlike ring attention's N-1 key/value blocks.
It needs N to divide the number of heads (and of kv heads).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from minillm.layers.attention import attention
from minillm.parallel import comm
from minillm.parallel.comm import CommStats, ProcessGroup


def _seq_to_heads(x: torch.Tensor, group, stats) -> torch.Tensor:
    """(B, H, Tc, D) chunk of the sequence -> (B, H/N, N*Tc, D) heads of the whole sequence."""
    N = dist.get_world_size(group)
    B, H, Tc, D = x.shape
    send = x.reshape(B, N, H // N, Tc, D).transpose(0, 1).contiguous()  # (N, B, H/N, Tc, D)
    recv = torch.empty_like(send)  # recv[i]: rank i's chunk of my heads
    comm.all_to_all(recv, send, group, stats)
    return recv.permute(1, 2, 0, 3, 4).reshape(B, H // N, N * Tc, D)  # (B, H/N, T, D)


def _heads_to_seq(x: torch.Tensor, group, stats) -> torch.Tensor:
    """(B, H/N, T, D) -> (B, H, T/N, D): the inverse re-partition."""
    N = dist.get_world_size(group)
    B, Hn, T, D = x.shape
    send = x.reshape(B, Hn, N, T // N, D).permute(2, 0, 1, 3, 4).contiguous()  # (N, B, H/N, Tc, D)
    recv = torch.empty_like(send)  # recv[g]: my chunk of head group g
    comm.all_to_all(recv, send, group, stats)
    return recv.transpose(0, 1).reshape(B, N * Hn, T // N, D)  # (B, H, Tc, D)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, stats):
        ctx.group, ctx.stats = group, stats
        return _seq_to_heads(x, group, stats)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_seq(grad.contiguous(), ctx.group, ctx.stats), None, None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, stats):
        ctx.group, ctx.stats = group, stats
        return _heads_to_seq(x, group, stats)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_heads(grad.contiguous(), ctx.group, ctx.stats), None, None


def check_ulysses(num_heads: int, num_kv_heads: int, world_size: int) -> None:
    bad = [
        f"{n}={v}" for n, v in (("heads", num_heads), ("kv heads", num_kv_heads)) if v % world_size
    ]
    if bad:
        raise ValueError(
            f"Ulysses re-partitions the sequence into head groups, so the world size must "
            f"divide the number of heads and kv heads; {world_size} does not divide "
            f"{', '.join(bad)}"
        )


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: ProcessGroup,
    window: int | None = None,
    backend: str = "sdpa",
    stats: CommStats | None = None,
) -> torch.Tensor:
    """Causal attention of this rank's chunk: q (B, H, Tc, D), k/v (B, Hkv, Tc, D) ->
    (B, H, Tc, D), equal to rows [r Tc, (r+1) Tc) of full attention over all N chunks."""
    check_ulysses(q.shape[1], k.shape[1], dist.get_world_size(group))
    q, k, v = (_SeqToHeads.apply(t, group, stats) for t in (q, k, v))  # (B, H/N, T, D)
    y = attention(q, k, v, window=window, backend=backend)  # (B, H/N, T, D)
    return _HeadsToSeq.apply(y, group, stats)  # (B, H, Tc, D)
