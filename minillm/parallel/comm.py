"""The collectives every parallelism uses, with clear timeout errors and a byte counter.

Thin wrappers over `torch.distributed` (gloo on CPU, NCCL on GPUs): each takes the process
group explicitly, turns a peer that died or hung into a `CollectiveTimeoutError` that says
so, and can record how many bytes the call sends in a `CommStats`.

Bytes are the textbook per-rank volumes of the ring algorithms (what one rank sends), for
a tensor of n bytes on p ranks:

    all_reduce      2 (p-1)/p * n        (reduce-scatter then all-gather)
    all_gather      (p-1)   * n_in      (every rank receives the other p-1 shards)
    reduce_scatter  (p-1)/p * n_in
    all_to_all      (p-1)/p * n         (keeps its own 1/p, sends the rest)
    send            n
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

ProcessGroup = dist.ProcessGroup

# torch >= 2.13 renamed the flat-tensor collectives; older versions (the GPU machine's
# 2.11) only have the old names. Same signature and semantics.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

# Substrings of the errors gloo and NCCL raise when a peer is gone or late.
_PEER_FAILURE_MARKERS = (
    "timed out",
    "timeout",
    "connection reset",
    "connection closed",
    "connection refused",
    "pair closure",
    "broken pipe",
    "socket closed",
    "end of file",
)


class CollectiveTimeoutError(TimeoutError):
    """A collective or point-to-point call could not complete: a peer rank died, hung, or
    never called the matching operation (a schedule bug)."""


@dataclass
class CommStats:
    """Bytes sent and number of calls per operation name (per rank, ring-algorithm volume)."""

    bytes_sent: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def record(self, op: str, nbytes: float) -> None:
        self.bytes_sent[op] += round(nbytes)
        self.calls[op] += 1

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_sent.values())

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {"bytes_sent": dict(self.bytes_sent), "calls": dict(self.calls)}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _Guard:
    """Context manager that turns a peer failure inside a c10d call into a clear error."""

    def __init__(self, op: str, group: ProcessGroup | None):
        self.op, self.group = op, group

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or not isinstance(exc, RuntimeError):
            return False
        message = str(exc)
        if not any(m in message.lower() for m in _PEER_FAILURE_MARKERS):
            return False
        group = self.group
        rank = dist.get_rank(group) if group is not None else dist.get_rank()
        size = dist.get_world_size(group) if group is not None else dist.get_world_size()
        raise CollectiveTimeoutError(
            f"rank {rank} of {size}: {self.op} did not complete: a peer rank died, hung past "
            f"the process group's timeout, or never called the matching {self.op}. "
            f"Backend said: {message.splitlines()[0][:300]}"
        ) from exc


def guard(op: str, group: ProcessGroup | None = None) -> _Guard:
    """`with guard("all_reduce", group): ...` around any c10d call (also `Work.wait()`)."""
    return _Guard(op, group)


def wait(work: dist.Work | None, op: str = "async collective", group=None) -> None:
    """Wait for an async handle, with the same clear error as the blocking calls."""
    if work is not None:
        with guard(op, group):
            work.wait()


def all_reduce(
    t: torch.Tensor,
    group: ProcessGroup,
    stats: CommStats | None = None,
    op: dist.ReduceOp = dist.ReduceOp.SUM,
    async_op: bool = False,
) -> dist.Work | None:
    """In place: every rank ends with the reduction (default sum) of all ranks' `t`."""
    p = dist.get_world_size(group)
    if stats is not None:
        stats.record("all_reduce", 2 * (p - 1) / p * _nbytes(t))
    with guard("all_reduce", group):
        return dist.all_reduce(t, op=op, group=group, async_op=async_op)


def all_gather(
    out: torch.Tensor,
    t: torch.Tensor,
    group: ProcessGroup,
    stats: CommStats | None = None,
    async_op: bool = False,
) -> dist.Work | None:
    """`out` (p * n,) <- the concatenation over ranks of `t` (n,), in rank order (dim 0)."""
    p = dist.get_world_size(group)
    if out.numel() != p * t.numel():
        raise ValueError(f"all_gather: out has {out.numel()} elements, need {p} x {t.numel()}")
    if stats is not None:
        stats.record("all_gather", (p - 1) * _nbytes(t))
    with guard("all_gather", group):
        return _all_gather_flat(out, t, group=group, async_op=async_op)


def reduce_scatter(
    out: torch.Tensor,
    t: torch.Tensor,
    group: ProcessGroup,
    stats: CommStats | None = None,
    async_op: bool = False,
) -> dist.Work | None:
    """`out` (n,) <- the sum over ranks of chunk `rank` of `t` (p * n,)."""
    p = dist.get_world_size(group)
    if t.numel() != p * out.numel():
        raise ValueError(
            f"reduce_scatter: input has {t.numel()} elements, need {p} x {out.numel()}"
        )
    if stats is not None:
        stats.record("reduce_scatter", (p - 1) / p * _nbytes(t))
    with guard("reduce_scatter", group):
        return _reduce_scatter_flat(out, t, group=group, async_op=async_op)


def all_to_all(
    out: torch.Tensor, t: torch.Tensor, group: ProcessGroup, stats: CommStats | None = None
) -> None:
    """Chunk j of `t` (split on dim 0 into p equal chunks) goes to rank j; `out` chunk i
    comes from rank i."""
    p = dist.get_world_size(group)
    if stats is not None:
        stats.record("all_to_all", (p - 1) / p * _nbytes(t))
    with guard("all_to_all", group):
        dist.all_to_all_single(out, t, group=group)


def broadcast(t: torch.Tensor, src: int, group: ProcessGroup) -> None:
    """In place: every rank gets `t` of group rank `src`."""
    with guard("broadcast", group):
        dist.broadcast(t, src=dist.get_global_rank(group, src), group=group)


def barrier(group: ProcessGroup) -> None:
    with guard("barrier", group):
        dist.barrier(group=group)


def send_recv(
    send: list[tuple[torch.Tensor, int]],
    recv: list[tuple[torch.Tensor, int]],
    group: ProcessGroup,
    stats: CommStats | None = None,
    op: str | None = None,
) -> list[dist.Work]:
    """Post point-to-point sends and receives at once (group ranks); returns the handles.

    `op` names the call in the byte counter and in errors (default: "send", "recv" or
    "send/recv", by what is posted).

    Posting both sides before waiting is what keeps a ring or a pipeline from deadlocking:
    no rank blocks in `send` while its neighbour blocks in its own `send`."""
    if op is None:
        op = "send/recv" if send and recv else "send" if send else "recv"
    ops = []
    for t, peer in send:
        if stats is not None:
            stats.record(op, _nbytes(t))
        ops.append(dist.P2POp(dist.isend, t, dist.get_global_rank(group, peer), group))
    for t, peer in recv:
        ops.append(dist.P2POp(dist.irecv, t, dist.get_global_rank(group, peer), group))
    if not ops:
        return []
    with guard(op, group):
        return dist.batch_isend_irecv(ops)


def wait_all(works: list[dist.Work], op: str = "send/recv", group=None) -> None:
    for w in works:
        wait(w, op, group)
