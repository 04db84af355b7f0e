"""Data parallelism (DDP): every rank holds the whole model and a slice of the batch.

After the backward, every rank must hold the same gradient, the mean over ranks:

    g = (1/p) sum_r g_r            (an all-reduce, then divide by p)

so that identical optimizers keep identical weights. Done naively, the all-reduce waits
for the end of the backward. PyTorch DDP (Li et al., 2020, "PyTorch Distributed") instead
groups parameters into buckets of ~25 MB in reverse order of registration (roughly the
order their gradients appear in the backward), and launches a bucket's all-reduce,
asynchronously, as soon as its last gradient is ready: communication overlaps with the
rest of the backward. A final callback of the autograd engine waits for the buckets and
writes the averaged gradients back.

`DataParallel` is that design in ~150 lines; it produces the same gradients as
`torch.nn.parallel.DistributedDataParallel`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from minillm.parallel import comm
from minillm.parallel.comm import CommStats, ProcessGroup


@dataclass(eq=False)
class Bucket:
    index: int
    params: list[nn.Parameter]
    ready: int = 0
    buffer: torch.Tensor | None = None  # the flat gradients, all-reduced in place
    work: dist.Work | None = None
    launched_at_hook: int = -1  # how many gradient hooks had fired when it was launched


@dataclass
class _BackwardState:
    hooks_fired: int = 0
    callback_queued: bool = False
    launch_order: list[int] = field(default_factory=list)  # bucket indices, as launched


class DataParallel(nn.Module):
    """Wrap `module` so that its gradients are averaged over `group` during the backward.

    Rank 0's weights are broadcast at construction. `bucket_cap_mb` bounds a bucket's
    size; `no_sync()` accumulates gradients locally (gradient accumulation)."""

    def __init__(
        self,
        module: nn.Module,
        group: ProcessGroup,
        bucket_cap_mb: float = 25.0,
        stats: CommStats | None = None,
    ):
        super().__init__()
        if bucket_cap_mb <= 0:
            raise ValueError(f"bucket_cap_mb must be > 0, got {bucket_cap_mb}")
        self.module, self.group, self.stats = module, group, stats
        self.world_size = dist.get_world_size(group)
        self.require_sync = True
        params = [p for p in module.parameters() if p.requires_grad]
        with torch.no_grad():
            for p in params:  # start from identical weights
                comm.broadcast(p.data, 0, group)
        self.buckets = self._make_buckets(params, int(bucket_cap_mb * 2**20))
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self._state = _BackwardState()
        for p in params:
            p.register_post_accumulate_grad_hook(self._on_grad_ready)

    @staticmethod
    def _make_buckets(params: list[nn.Parameter], cap_bytes: int) -> list[Bucket]:
        buckets, current, size = [], [], 0
        for p in reversed(params):  # the last layers' gradients are ready first
            current.append(p)
            size += p.numel() * p.element_size()
            if size >= cap_bytes:
                buckets.append(Bucket(len(buckets), current))
                current, size = [], 0
        if current:
            buckets.append(Bucket(len(buckets), current))
        return buckets

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside keep their gradients local (accumulated, not averaged)."""
        self.require_sync = False
        try:
            yield
        finally:
            self.require_sync = True

    # ---------------------------------------------------------------- backward hooks
    def _on_grad_ready(self, param: nn.Parameter) -> None:
        if not self.require_sync:
            return
        state = self._state
        state.hooks_fired += 1
        if not state.callback_queued:  # runs once, when the whole backward has finished
            torch.autograd.Variable._execution_engine.queue_callback(self.finish_gradient_sync)
            state.callback_queued = True
        bucket = self._bucket_of[id(param)]
        bucket.ready += 1
        if bucket.ready == len(bucket.params):
            self._launch(bucket)

    def _launch(self, bucket: Bucket) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket.params]
        bucket.buffer = torch.cat([g.reshape(-1) for g in grads])  # (n,) flat
        bucket.work = comm.all_reduce(bucket.buffer, self.group, self.stats, async_op=True)
        bucket.launched_at_hook = self._state.hooks_fired
        self._state.launch_order.append(bucket.index)

    def finish_gradient_sync(self) -> None:
        """Wait for every bucket and write the mean gradient into each parameter's .grad.
        Called automatically at the end of the backward (buckets whose parameters got no
        gradient are reduced here, as zeros)."""
        for bucket in self.buckets:
            if bucket.work is None and bucket.buffer is None:
                self._launch(bucket)
        for bucket in self.buckets:
            comm.wait(bucket.work, "DDP gradient all_reduce", self.group)
            bucket.buffer /= self.world_size
            offset = 0
            for p in bucket.params:
                n = p.numel()
                mean = bucket.buffer[offset : offset + n].view_as(p)
                if p.grad is None:
                    p.grad = mean.clone()
                else:
                    p.grad.copy_(mean)
                offset += n
            bucket.ready, bucket.buffer, bucket.work = 0, None, None
        self.last_backward = self._state
        self._state = _BackwardState()

    @property
    def overlapped(self) -> bool:
        """True if, in the last backward, some bucket's all-reduce started before the last
        gradient was ready (communication overlapped with computation)."""
        state = getattr(self, "last_backward", None)
        if state is None:
            return False
        total = state.hooks_fired
        return any(b.launched_at_hook < total for b in self.buckets if b.launched_at_hook >= 0)
