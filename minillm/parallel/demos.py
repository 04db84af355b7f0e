"""Worked examples the notebooks run on gloo processes (`spawn(tensor_parallel_demo, 2)`).

Each function runs on every rank of `group`, compares the parallel model with the same
tiny model on one process (each rank computes the reference itself) and returns plain
numbers for the notebook to print and plot. They live in the package because `spawn`
can only start functions that a fresh process can import.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from minillm.parallel.comm import CommStats, ProcessGroup
from minillm.parallel.pipeline import (
    PipelineStage,
    Recorder,
    gather_timeline,
    measured_bubble,
    run_pipeline,
)
from minillm.parallel.schedule import theoretical_bubble
from minillm.parallel.sequence import (
    apply_sequence_parallel,
    shard_sequence,
)
from minillm.parallel.tensor_model import apply_tensor_parallel
from minillm.parallel.testing import (
    lm_loss,
    max_abs_diff,
    random_batches,
    reference_losses,
    tiny_model,
)
from minillm.parallel.zero import ZeroDataParallel
from minillm.parallel.zero_memory import formula_for, measure_model_states


def tensor_parallel_demo(group: ProcessGroup) -> dict:
    """The tiny model sharded over the group: same logits, fewer parameters per rank,
    two all-reduces per layer."""
    ref = tiny_model()
    stats = CommStats()
    tp = apply_tensor_parallel(copy.deepcopy(ref), group, stats)
    ((ids, _),) = random_batches(1, 1, 16, ref.config.vocab_size)
    with torch.no_grad():
        diff = max_abs_diff(tp(ids), ref(ids))
    return {
        "rank": dist.get_rank(group),
        "max_logit_diff": diff,
        "params_full": sum(p.numel() for p in ref.parameters()),
        "params_this_rank": sum(p.numel() for p in tp.parameters()),
        "comm_calls": dict(stats.calls),
        "comm_bytes": dict(stats.bytes_sent),
        "q_proj_weight_shape": tuple(tp.model.layers[0].self_attn.q_proj.weight.shape),
        "o_proj_weight_shape": tuple(tp.model.layers[0].self_attn.o_proj.weight.shape),
    }


def pipeline_demo(
    group: ProcessGroup,
    schedule: str,
    num_microbatches: int,
    op_floor_s: tuple[float, float] | None = (0.05, 0.1),
) -> dict:
    """One training step of the tiny model as a pipeline: its measured timeline, bubble
    and loss next to the single-process ones."""
    p, s = dist.get_world_size(group), dist.get_rank(group)
    m = num_microbatches
    ref = tiny_model()
    stage = PipelineStage(ref, s, p)
    ((ids, targets),) = random_batches(1, 2 * m, 8, ref.config.vocab_size)
    micro = list(zip(ids.chunk(m), targets.chunk(m), strict=True))
    run_pipeline(stage, micro, group, schedule)  # warm-up (first-call costs)
    stage.zero_grad()
    recorder = Recorder(s, op_floor_s=op_floor_s)
    losses = run_pipeline(stage, micro, group, schedule, recorder=recorder)
    events = gather_timeline(recorder, group)
    out = {
        "events": [(e.stage, e.kind, e.microbatch, e.start, e.end) for e in events],
        "measured_bubble": measured_bubble(events),
        "formula_bubble": theoretical_bubble(p, m),
    }
    if stage.is_last:
        with torch.no_grad():
            out["loss"], out["single_process_loss"] = (
                sum(losses) / m,
                lm_loss(ref(ids), targets).item(),
            )
    return out


def zero_demo(group: ProcessGroup, stage: int, offload: bool = False, steps: int = 3) -> dict:
    """Train the tiny model (bf16 parameters, fp32 Adam) with ZeRO; return per-rank bytes
    (measured and formula) and the losses next to the single-process fp32 run."""
    p, r = dist.get_world_size(group), dist.get_rank(group)
    ref = tiny_model()
    model = copy.deepcopy(ref).to(torch.bfloat16)
    zero = ZeroDataParallel(model, group, stage, lr=1e-2, offload=offload)
    batches = random_batches(steps, 2 * p, 8, ref.config.vocab_size)
    losses = []
    for step, (ids, targets) in enumerate(batches):
        loss = lm_loss(zero(ids.chunk(p)[r]), targets.chunk(p)[r])
        loss.backward()
        if step == 1:
            measured, formula = measure_model_states(zero), formula_for(zero)
        zero.step()
        zero.zero_grad()
        total = loss.detach().float()
        dist.all_reduce(total, group=group)
        losses.append(total.item() / p)
    return {
        "measured": measured.as_dict(),
        "formula": formula.as_dict(),
        "losses": losses,
        "single_process_fp32_losses": reference_losses(ref, batches),
    }


def sequence_demo(group: ProcessGroup, method: str, seq_len: int = 32) -> dict:
    """The tiny model with ring or Ulysses attention on this rank's chunk of the tokens:
    its logits next to the single-process ones, and the bytes each rank sent."""
    ref = tiny_model()
    stats = CommStats()
    sp = apply_sequence_parallel(copy.deepcopy(ref), group, method, stats)
    ((ids, _),) = random_batches(1, 1, seq_len, ref.config.vocab_size)
    local_ids, positions = shard_sequence(ids, group)
    with torch.no_grad():
        diff = max_abs_diff(sp(local_ids, positions=positions), ref(ids)[:, positions])
    return {"max_logit_diff": diff, "bytes_sent": dict(stats.bytes_sent)}
