"""Per-rank memory of the model states under ZeRO: the paper's formulas, and the measurement.

For Psi parameters on N ranks, with b_p bytes per parameter, b_g per gradient and K bytes
of optimizer state per parameter (mixed-precision Adam: b_p = b_g = 2, K = 12 = fp32
master + momentum + variance; all-fp32 Adam: b_p = b_g = 4, K = 8, the fp32 parameters
being their own master copy), Rajbhandari et al. (2020) give:

    stage 0 (DDP)   (b_p + b_g + K) Psi
    stage 1         (b_p + b_g) Psi + K Psi / N
    stage 2         b_p Psi + (b_g + K) Psi / N
    stage 3         (b_p + b_g + K) Psi / N
    + offload       optimizer states and fp32 gradient shards (4 Psi / N) live in CPU
                    memory; the device keeps the parameters (ZeRO-Offload, Ren et al. 2021)

`measure_model_states` adds up the bytes of the tensors one rank of a `ZeroDataParallel`
really holds (each storage counted once), to put next to the formula. On a GPU, the
benchmark also reads `torch.cuda.memory_allocated` / `max_memory_allocated`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from minillm.parallel.zero import ZERO_STAGES, ZeroDataParallel


@dataclass
class ModelStateBytes:
    """Bytes of one rank's model states, and which of them live in CPU memory (offload)."""

    params: float
    grads: float
    optimizer: float
    offload: bool = False

    @property
    def device(self) -> float:
        return self.params + (0.0 if self.offload else self.grads + self.optimizer)

    @property
    def host(self) -> float:
        return self.grads + self.optimizer if self.offload else 0.0

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer

    def as_dict(self) -> dict:
        return {**asdict(self), "device": self.device, "host": self.host, "total": self.total}


def zero_model_state_bytes(
    num_params: int,
    world_size: int,
    stage: int,
    param_bytes: int = 2,
    grad_bytes: int = 2,
    optimizer_bytes: int = 12,
    offload: bool = False,
    host_grad_bytes: int = 4,
) -> ModelStateBytes:
    """The ZeRO paper's per-rank bytes of parameters, gradients and optimizer states."""
    if stage not in ZERO_STAGES:
        raise ValueError(f"ZeRO stage must be one of {ZERO_STAGES}, got {stage!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if offload and stage < 2:
        raise ValueError(f"offload needs stage 2 or 3, got stage {stage}")
    psi, n = float(num_params), world_size
    params = param_bytes * psi / (n if stage >= 3 else 1)
    grads = (host_grad_bytes if offload else grad_bytes) * psi / (n if stage >= 2 else 1)
    optimizer = optimizer_bytes * psi / (n if stage >= 1 else 1)
    return ModelStateBytes(params, grads, optimizer, offload)


def _storage_bytes(tensors) -> dict[int, int]:
    out: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        s = t.untyped_storage()
        if s.nbytes() == 0:
            continue
        out[s.data_ptr()] = max(out.get(s.data_ptr(), 0), s.nbytes())
    return out


def measure_model_states(zero: ZeroDataParallel) -> ModelStateBytes:
    """Bytes of the parameter, gradient and optimizer tensors this rank holds right now.

    Each storage is counted once, in the first category it appears in (parameters, then
    gradients, then optimizer): an fp32 shard that is its own master copy is a parameter."""
    units = [*zero.units, zero.root]
    params = _storage_bytes([u.full for u in units] + [u.shard for u in units])
    grads = _storage_bytes(
        [p.grad for u in units for p in u.params] + [u.grad_shard for u in units]
    )
    state_tensors = [u.master for u in units]
    for u in units:
        for state in u.optimizer.state.values():
            state_tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    optim = _storage_bytes(state_tensors)
    grads = {k: v for k, v in grads.items() if k not in params}
    optim = {k: v for k, v in optim.items() if k not in params and k not in grads}
    return ModelStateBytes(
        float(sum(params.values())),
        float(sum(grads.values())),
        float(sum(optim.values())),
        zero.offload,
    )


def formula_for(zero: ZeroDataParallel) -> ModelStateBytes:
    """The formula evaluated for this wrapper's parameter count, dtypes and stage."""
    units = [*zero.units, zero.root]
    num_params = sum(p.numel() for u in units for p in u.params)
    b = units[0].full.element_size()
    # Adam keeps m and v in fp32, plus an fp32 master copy unless the shard is one already.
    master_is_param = all(u.master.data_ptr() == u.shard.data_ptr() for u in units)
    K = 8 if master_is_param else 12
    return zero_model_state_bytes(num_params, zero.world_size, zero.stage, b, b, K, zero.offload)
