"""ZeRO (Rajbhandari et al., 2020): data parallelism without replicating the model states.

Plain data parallelism keeps, on every one of N ranks, the parameters (2 bytes each in
bf16), their gradients (2) and the optimizer states (K = 12 for mixed-precision Adam: an
fp32 master copy, momentum and variance): (2 + 2 + K) Psi bytes for Psi parameters. ZeRO
shards them instead; rank r owns 1/N of every flat parameter unit and updates only that:

    stage 1  optimizer states sharded    2 Psi + 2 Psi + K Psi / N
    stage 2  + gradients (reduce-scatter) 2 Psi + (2 + K) Psi / N
    stage 3  + parameters (all-gathered  (2 + 2 + K) Psi / N
             on demand, with prefetch)
    offload  (ZeRO-Offload, Ren et al. 2021) optimizer states, fp32 gradients and the
             Adam step on the CPU; the device keeps the bf16 parameters only.

Parameters are grouped into units (each decoder layer; the rest of the model is the root
unit). A unit's parameters live in one flat buffer, padded to a multiple of N; each
`nn.Parameter` keeps its name and shape, its `.data` a view into the buffer. During the
backward, as soon as all gradients of a unit are ready they are all-reduced (stages 0-1)
or reduce-scattered (stages 2-3, the full gradients then freed), overlapping with the rest
of the backward. `step()` runs AdamW on this rank's shard (fp32), then all-gathers the
updated parameters (stages 1-2). In stage 3 a unit's buffer is all-gathered just before
its forward or backward (the next unit's gather is started in advance: prefetch) and its
storage freed right after; the parameters' shapes stay, only the bytes go.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from minillm.parallel import comm
from minillm.parallel.comm import CommStats, ProcessGroup

ZERO_STAGES = (0, 1, 2, 3)


@dataclass(eq=False)
class FlatUnit:
    """Parameters stored as one flat (N * shard_size,) buffer; this rank owns one shard."""

    params: list[nn.Parameter]
    full: torch.Tensor  # the gathered buffer (stage 3: storage freed between uses)
    shard: torch.Tensor  # this rank's (shard_size,) slice (a view of `full` below stage 3)
    rank: int
    master: nn.Parameter | None = None  # fp32 optimizer copy of the shard
    optimizer: torch.optim.Optimizer | None = None  # AdamW over `master`
    grad_shard: torch.Tensor | None = None  # mean gradient of the shard (device or host)
    ready: int = 0
    gathered: bool = True
    gather_work: dist.Work | None = None
    reduce_work: list = field(default_factory=list)  # (work, output, input) in flight

    @property
    def shard_range(self) -> tuple[int, int]:
        n = self.shard.numel()
        return self.rank * n, (self.rank + 1) * n


class ZeroDataParallel(nn.Module):
    """Data parallelism with ZeRO stage 0 (plain, the baseline), 1, 2 or 3, optional offload.

    Owns the optimizer (AdamW over this rank's shards): call `loss.backward()`, then
    `step()` and `zero_grad()`. `unit_modules` become units (default: a CausalLM's
    decoder layers); every other parameter joins the root unit, gathered for the whole
    forward and backward."""

    def __init__(
        self,
        module: nn.Module,
        group: ProcessGroup,
        stage: int,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        offload: bool = False,
        unit_modules: list[nn.Module] | None = None,
        prefetch: bool = True,
        stats: CommStats | None = None,
    ):
        super().__init__()
        if stage not in ZERO_STAGES:
            raise ValueError(f"ZeRO stage must be one of {ZERO_STAGES}, got {stage!r}")
        if offload and stage < 2:
            raise ValueError(
                "offload needs stage 2 or 3: ZeRO-Offload moves the gradient shards to the CPU, "
                f"so gradients must be partitioned first; got stage {stage}"
            )
        self.module, self.group, self.stage, self.offload = module, group, stage, offload
        self.stats, self.prefetch = stats, prefetch
        self.prefetched = 0  # units found already in flight when needed (stage 3)
        self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        if unit_modules is None:
            layers = getattr(getattr(module, "model", None), "layers", None)
            unit_modules = list(layers) if layers is not None else []
        self.unit_modules = unit_modules
        seen: set[int] = set()
        self.units = [self._make_unit(m.parameters(), seen) for m in unit_modules]
        self.root = self._make_unit(module.parameters(), seen)
        self._unit_of = {id(p): u for u in [*self.units, self.root] for p in u.params}
        self._callback_queued = False
        for p in self._unit_of_params():
            p.register_post_accumulate_grad_hook(self._on_grad_ready)
        for i, m in enumerate(unit_modules):
            m.register_forward_pre_hook(lambda mod, args, i=i: self._pre_forward(i))
            m.register_forward_hook(lambda mod, args, out, i=i: self._post_forward(i, out))
        for u in [*self.units, self.root]:
            master_device = torch.device("cpu") if offload else u.shard.device
            if u.shard.dtype == torch.float32 and not offload:
                u.master = nn.Parameter(u.shard)  # fp32 already: the shard is its own master
            else:
                u.master = nn.Parameter(u.shard.detach().to(master_device, torch.float32))
            # One AdamW per unit (Adam is elementwise: the same result as one for all), so
            # the step needs fp32 gradient copies of one unit at a time, not of the model.
            u.optimizer = torch.optim.AdamW(
                [u.master],
                lr=lr,
                betas=betas,
                eps=eps,
                weight_decay=weight_decay,
                fused=True if u.master.is_cuda else None,
            )
        if stage == 3:
            for u in [*self.units, self.root]:
                self._free(u)

    def _unit_of_params(self) -> list[nn.Parameter]:
        return [p for u in [*self.units, self.root] for p in u.params]

    @torch.no_grad()
    def _make_unit(self, params, seen: set[int]) -> FlatUnit:
        params = [p for p in params if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in params)
        N = self.world_size
        numel = sum(p.numel() for p in params)
        shard_size = max(1, -(-numel // N))  # ceil: pad to a multiple of N
        ref = params[0] if params else next(self.module.parameters())  # dtype and device
        full = torch.zeros(N * shard_size, dtype=ref.dtype, device=ref.device)
        offset = 0
        for p in params:
            comm.broadcast(p.data, 0, self.group)  # every rank starts from rank 0's weights
            full[offset : offset + p.numel()].copy_(p.data.reshape(-1))
            p.data = full[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        if self.stage == 0:  # plain data parallelism: every rank updates everything
            return FlatUnit(params, full, full, rank=0)
        shard = full[self.rank * shard_size : (self.rank + 1) * shard_size]
        if self.stage == 3:
            shard = shard.clone()  # owned copy: `full` is freed between uses
        return FlatUnit(params, full, shard, self.rank)

    # ------------------------------------------------------------- stage 3: gather, free
    def _gather(self, unit: FlatUnit, async_op: bool = False) -> None:
        if unit.gathered or unit.gather_work is not None:
            return
        unit.full.untyped_storage().resize_(unit.full.numel() * unit.full.element_size())
        unit.gather_work = comm.all_gather(unit.full, unit.shard, self.group, self.stats, async_op)
        if not async_op:
            unit.gather_work = None
            unit.gathered = True

    def _wait_gathered(self, unit: FlatUnit) -> None:
        if unit.gather_work is not None:
            self.prefetched += 1  # its all-gather was started in advance
        self._gather(unit)
        if unit.gather_work is not None:
            comm.wait(unit.gather_work, "ZeRO-3 parameter all_gather", self.group)
            unit.gather_work, unit.gathered = None, True

    def _free(self, unit: FlatUnit) -> None:
        if unit.gather_work is not None:
            comm.wait(unit.gather_work, "ZeRO-3 parameter all_gather", self.group)
            unit.gather_work = None
        unit.full.untyped_storage().resize_(0)  # the parameters keep their shapes, not bytes
        unit.gathered = False

    def _pre_forward(self, i: int) -> None:
        if self.stage < 3:
            return
        self._wait_gathered(self.units[i])
        if self.prefetch and i + 1 < len(self.units):
            self._gather(self.units[i + 1], async_op=True)

    def _post_forward(self, i: int, out):
        if self.stage < 3:
            return out
        self._free(self.units[i])
        if torch.is_grad_enabled():
            tensors = out if isinstance(out, tuple) else (out,)
            for t in tensors:
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.register_hook(lambda grad, i=i: self._pre_backward(i, grad))
        return out

    def _pre_backward(self, i: int, grad: torch.Tensor) -> torch.Tensor:
        self._wait_gathered(self.units[i])
        if self.prefetch and i > 0:
            self._gather(self.units[i - 1], async_op=True)
        return grad

    def forward(self, *args, **kwargs):
        self._wait_gathered(self.root)
        out = self.module(*args, **kwargs)
        if self.stage == 3 and not torch.is_grad_enabled():
            self._free(self.root)
        return out

    # ------------------------------------------------------------- gradients
    def _on_grad_ready(self, param: nn.Parameter) -> None:
        if not self._callback_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)
            self._callback_queued = True
        unit = self._unit_of[id(param)]
        unit.ready += 1
        if unit.ready == len(unit.params):
            self._reduce(unit)

    def _reduce(self, unit: FlatUnit) -> None:
        """Launch the unit's gradient reduction; free its full gradients (stage >= 2)."""
        unit.ready = -1  # reduced in this backward
        flat = torch.zeros_like(unit.full) if unit.full.numel() else unit.full.new_zeros(0)
        offset = 0
        for p in unit.params:
            if p.grad is not None:
                flat[offset : offset + p.numel()].copy_(p.grad.reshape(-1))
            offset += p.numel()
        if self.stage <= 1:  # keep full gradients: all-reduce in place, views back into .grad
            work = comm.all_reduce(flat, self.group, self.stats, async_op=True)
            unit.reduce_work.append((work, flat, flat))
            return
        for p in unit.params:
            p.grad = None  # stage 2-3: only the shard of the gradient is kept
        out = torch.empty_like(unit.shard)
        work = comm.reduce_scatter(out, flat, self.group, self.stats, async_op=True)
        unit.reduce_work.append((work, out, flat))  # `flat` stays alive until the wait
        if self.stage == 3 and unit is not self.root:
            self._free(unit)
        for other in [*self.units, self.root]:  # bound memory: finish older reductions
            if other is not unit:
                self._drain(other)

    def _drain(self, unit: FlatUnit) -> None:
        for work, buf, _ in unit.reduce_work:
            comm.wait(work, "ZeRO gradient reduction", self.group)
            buf /= self.world_size
            if self.stage <= 1:
                offset = 0
                for p in unit.params:
                    p.grad = buf[offset : offset + p.numel()].view_as(p)
                    offset += p.numel()
                lo, hi = unit.shard_range
                buf = buf[lo:hi]
            if self.offload:
                buf = buf.to("cpu", torch.float32)
            if unit.grad_shard is None or self.stage <= 1:  # stage <= 1: .grad accumulated
                unit.grad_shard = buf
            else:
                unit.grad_shard += buf
        unit.reduce_work = []

    def _finish_backward(self) -> None:
        for unit in [*self.units, self.root]:
            if unit.ready != -1:  # some parameters got no gradient: reduce what there is
                self._reduce(unit)
        for unit in [*self.units, self.root]:
            self._drain(unit)
            unit.ready = 0
        if self.stage == 3:
            self._free(self.root)
        self._callback_queued = False

    # ------------------------------------------------------------- optimizer
    @torch.no_grad()
    def step(self) -> None:
        """AdamW on this rank's shard of every unit, then share the updated parameters."""
        units = [*self.units, self.root]
        if any(u.grad_shard is None for u in units):
            raise RuntimeError("step() needs gradients: call backward first")
        for u in units:
            u.master.grad = u.grad_shard.to(u.master.device, u.master.dtype)
            u.optimizer.step()
            u.master.grad = None
            if u.master.data_ptr() != u.shard.data_ptr():  # not aliased: copy (and cast) back
                u.shard.copy_(u.master.detach())
            if self.stage in (1, 2):  # everyone gets everyone's updated shard
                sent = u.shard.clone()  # the input of all_gather must not alias its output
                comm.all_gather(u.full, sent, self.group, self.stats)

    def zero_grad(self) -> None:
        for u in [*self.units, self.root]:
            u.grad_shard = None
            for p in u.params:
                p.grad = None
