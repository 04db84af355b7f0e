"""Tensor parallelism (Megatron-LM; Shoeybi et al., 2019): one layer's matrices split over ranks.

A linear layer y = x A^T can be split two ways over p ranks:

- ColumnParallelLinear: A split by output rows, A = [A_1; ...; A_p]. Rank i computes
  y_i = x A_i^T, a slice of the output features; no communication in the forward.
- RowParallelLinear: A split by input columns, A = [A_1, ..., A_p]. Rank i holds the
  slice x_i of the input features and computes the partial sum x_i A_i^T; the output is
  the all-reduce of the partials: y = sum_i x_i A_i^T.

Chaining a column-parallel layer into a row-parallel one needs no communication in
between (the slice y_i is exactly the x_i the next layer wants), so an MLP or an attention
block costs one all-reduce forward and one backward. Megatron names the two conjugate
operators that sit at the edges of such a block:

    f = copy_to_tensor_parallel_region:     forward identity,   backward all-reduce
    g = reduce_from_tensor_parallel_region: forward all-reduce, backward identity

Attention is split by heads (q/k/v are column-parallel, o_proj row-parallel), the SwiGLU
MLP by its intermediate dimension F (gate/up column, down row): see `tensor_model`. The
vocabulary-parallel embedding and loss are in `minillm.parallel.vocab`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from minillm.parallel import comm
from minillm.parallel.comm import CommStats, ProcessGroup


class _CopyToRegion(torch.autograd.Function):
    """f: identity forward, all-reduce backward."""

    @staticmethod
    def forward(ctx, x, group, stats):
        ctx.group, ctx.stats = group, stats
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        comm.all_reduce(grad, ctx.group, ctx.stats)
        return grad, None, None


class _ReduceFromRegion(torch.autograd.Function):
    """g: all-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx, x, group, stats):
        x = x.contiguous()
        comm.all_reduce(x, group, stats)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def _gather_last_dim(x: torch.Tensor, group: ProcessGroup, stats: CommStats | None):
    p = dist.get_world_size(group)
    out = torch.empty((p, *x.shape), dtype=x.dtype, device=x.device)  # (p, ..., n)
    comm.all_gather(out.view(-1), x.contiguous().view(-1), group, stats)
    return torch.movedim(out, 0, -2).reshape(*x.shape[:-1], p * x.shape[-1])  # (..., p*n)


def _split_last_dim(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    p, r = dist.get_world_size(group), dist.get_rank(group)
    return x.chunk(p, dim=-1)[r].contiguous()


class _GatherFromRegion(torch.autograd.Function):
    """All-gather the last dimension forward; keep this rank's slice of the gradient."""

    @staticmethod
    def forward(ctx, x, group, stats):
        ctx.group = group
        return _gather_last_dim(x, group, stats)

    @staticmethod
    def backward(ctx, grad):
        return _split_last_dim(grad, ctx.group), None, None


def copy_to_tensor_parallel_region(x, group: ProcessGroup, stats: CommStats | None = None):
    """Megatron's `f`: identity in the forward, all-reduce of the gradient in the backward."""
    return _CopyToRegion.apply(x, group, stats)


def reduce_from_tensor_parallel_region(x, group: ProcessGroup, stats: CommStats | None = None):
    """Megatron's `g`: all-reduce in the forward, identity in the backward."""
    return _ReduceFromRegion.apply(x, group, stats)


def gather_from_tensor_parallel_region(x, group: ProcessGroup, stats: CommStats | None = None):
    """(..., n) slices on p ranks -> (..., p*n) on every rank; the backward keeps the slice."""
    return _GatherFromRegion.apply(x, group, stats)


def divide(n: int, p: int, what: str) -> int:
    if n % p:
        raise ValueError(
            f"tensor parallelism over {p} ranks needs {what} divisible by {p}, got {n}; "
            f"use a world size that divides {n}"
        )
    return n // p


def mark_partition(param: nn.Parameter, partition_dim: int) -> nn.Parameter:
    """Megatron's convention: a sharded parameter says along which dimension it is split."""
    param.partition_dim = partition_dim
    return param


class ColumnParallelLinear(nn.Module):
    """y = x A^T + b with A (out, in) split by output rows: rank i holds A_i (out/p, in).

    Forward: f(x) -> x A_i^T + b_i, a (..., out/p) slice; with `gather_output` the slices
    are all-gathered into the full (..., out) output (used for logits at inference)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group: ProcessGroup,
        bias: bool = True,
        gather_output: bool = False,
        stats: CommStats | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.group, self.stats, self.gather_output = group, stats, gather_output
        self.in_features, self.out_features = in_features, out_features
        self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.out_per_rank = divide(out_features, self.world_size, "the output features")
        kw = {"device": device, "dtype": dtype}
        self.weight = mark_partition(
            nn.Parameter(torch.empty(self.out_per_rank, in_features, **kw)), 0
        )
        self.bias = (
            mark_partition(nn.Parameter(torch.zeros(self.out_per_rank, **kw)), 0) if bias else None
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: ProcessGroup, **kwargs) -> ColumnParallelLinear:
        """This rank's shard of a full `nn.Linear` (same values as the unsharded layer)."""
        w = linear.weight
        layer = cls(
            w.shape[1],
            w.shape[0],
            group,
            linear.bias is not None,
            **kwargs,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            layer.weight.copy_(layer.shard(w))
            if linear.bias is not None:
                layer.bias.copy_(layer.shard(linear.bias))
        return layer

    def shard(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a full (out, ...) weight, bias or gradient."""
        return full.chunk(self.world_size, dim=0)[self.rank]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = copy_to_tensor_parallel_region(x, self.group, self.stats)
        y = F.linear(x, self.weight, self.bias)  # (..., out/p)
        if self.gather_output:
            y = gather_from_tensor_parallel_region(y, self.group, self.stats)  # (..., out)
        return y

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features} ({self.out_per_rank} on this "
            f"rank), bias={self.bias is not None}, gather_output={self.gather_output}"
        )


class RowParallelLinear(nn.Module):
    """y = x A^T + b with A (out, in) split by input columns: rank i holds A_i (out, in/p).

    Forward: the input is already this rank's slice x_i (..., in/p) (the output of a
    column-parallel layer); g(x_i A_i^T) sums the partials, then the (replicated) bias."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group: ProcessGroup,
        bias: bool = True,
        stats: CommStats | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.group, self.stats = group, stats
        self.in_features, self.out_features = in_features, out_features
        self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.in_per_rank = divide(in_features, self.world_size, "the input features")
        kw = {"device": device, "dtype": dtype}
        self.weight = mark_partition(
            nn.Parameter(torch.empty(out_features, self.in_per_rank, **kw)), 1
        )
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: ProcessGroup, **kwargs) -> RowParallelLinear:
        w = linear.weight
        layer = cls(
            w.shape[1],
            w.shape[0],
            group,
            linear.bias is not None,
            **kwargs,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            layer.weight.copy_(layer.shard(w))
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def shard(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's columns of a full (out, in) weight or gradient."""
        return full.chunk(self.world_size, dim=1)[self.rank]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = F.linear(x, self.weight)  # (..., out): this rank's term of the sum
        y = reduce_from_tensor_parallel_region(partial, self.group, self.stats)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features} ({self.in_per_rank} on this rank), "
            f"out={self.out_features}, bias={self.bias is not None}"
        )
