"""Pipeline parallelism: the model's layers split into p stages, micro-batches flowing through.

Rank s of the pipeline group holds stage s: a contiguous block of L/p decoder layers, plus
the embedding (first stage) or the final norm and LM head (last stage). A batch is cut
into m micro-batches; each stage runs the program a schedule gives it
(`minillm.parallel.schedule`: GPipe or 1F1B), receiving activations from stage s-1 and
gradients from stage s+1 with `torch.distributed` point-to-point ops. Sends are posted
without waiting (isend), so a stage only ever blocks waiting for its input; any schedule
whose programs are consistent cannot deadlock.

The loss of micro-batch i is divided by m, so the accumulated gradients equal those of
the full batch on one process. A `Recorder` keeps the timeline of every op on every stage;
its measured bubble is compared with (p - 1) / (m + p - 1).

Tied embeddings (the first stage's embedding is the last stage's LM head) are kept as two
copies whose gradients the two stages exchange and add after the backward, as Megatron does.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from minillm.layers.rotary import rope_cos_sin, rope_inv_freq
from minillm.parallel import comm
from minillm.parallel.comm import CommStats, ProcessGroup
from minillm.parallel.schedule import Action, Event, bubble_fraction, get_schedule


def check_pipeline(num_layers: int, num_stages: int) -> None:
    if num_layers % num_stages:
        allowed = [d for d in range(1, num_layers + 1) if num_layers % d == 0]
        raise ValueError(
            f"pipeline parallelism gives every stage the same number of layers; "
            f"{num_stages} stages do not divide {num_layers} layers. Stage counts that work: "
            f"{allowed}"
        )


class PipelineStage(nn.Module):
    """Stage `stage` of `num_stages` of a CausalLM: ids or hidden (B, T, C) -> hidden or logits.

    Built from the full model (same weights on every rank); keeps deep copies of its own
    modules only, under the full model's names (`model.layers.3...`), so its parameters
    can be compared with the full model's name by name."""

    def __init__(self, model: nn.Module, stage: int, num_stages: int):
        super().__init__()
        L = model.config.num_hidden_layers
        check_pipeline(L, num_stages)
        if not 0 <= stage < num_stages:
            raise ValueError(f"stage must lie in [0, {num_stages}), got {stage}")
        self.config, self.attn_backend = model.config, model.attn_backend
        self.stage, self.num_stages = stage, num_stages
        self.is_first, self.is_last = stage == 0, stage == num_stages - 1
        per = L // num_stages
        self.layer_ids = list(range(stage * per, (stage + 1) * per))
        self.model = nn.Module()
        self.model.layers = nn.ModuleDict(
            {str(i): copy.deepcopy(model.model.layers[i]) for i in self.layer_ids}
        )
        if self.is_first:
            self.model.embed_tokens = copy.deepcopy(model.model.embed_tokens)
        if self.is_last:
            self.model.norm = copy.deepcopy(model.model.norm)
            self.lm_head = copy.deepcopy(model.lm_head)  # a separate copy even when tied
        self.tied = model.lm_head.weight is model.model.embed_tokens.weight and num_stages > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_first:
            x = self.model.embed_tokens(x)  # (B, T) ids -> (B, T, C)
        positions = torch.arange(x.shape[1], device=x.device)  # (T,)
        cos, sin = rope_cos_sin(positions, rope_inv_freq(self.config, x.device), x.dtype)
        for layer in self.model.layers.values():
            x = layer(x, cos, sin, self.attn_backend)
        if self.is_last:
            x = self.lm_head(self.model.norm(x))  # (B, T, V)
        return x

    def sync_tied_embeddings(self, group: ProcessGroup, stats: CommStats | None = None) -> None:
        """Add the first stage's embedding gradient and the last stage's LM-head gradient,
        so both copies take the same step (the gradient of the one tied matrix)."""
        if not self.tied or not (self.is_first or self.is_last):
            return
        w = self.model.embed_tokens.weight if self.is_first else self.lm_head.weight
        peer = self.num_stages - 1 if self.is_first else 0
        grad = w.grad if w.grad is not None else torch.zeros_like(w)
        theirs = torch.empty_like(grad)
        works = comm.send_recv([(grad.contiguous(), peer)], [(theirs, peer)], group, stats, "tied")
        comm.wait_all(works, "tied embedding exchange", group)
        w.grad = grad + theirs


@dataclass
class Recorder:
    """Collects the timeline of one stage: an Event per op (perf_counter seconds).

    `op_floor_s` = (forward, backward) pads each op to at least that long by sleeping: it
    emulates one device per stage when stages share fewer CPU cores than there are stages
    (otherwise the cores, not the schedule, decide the timeline). Leave it None on GPUs."""

    stage: int
    sync_cuda: bool = False
    op_floor_s: tuple[float, float] | None = None
    events: list[Event] = field(default_factory=list)

    def start(self) -> float:
        if self.sync_cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def stop(self, kind: str, microbatch: int, start: float) -> None:
        if self.sync_cuda:
            torch.cuda.synchronize()
        if self.op_floor_s is not None:
            floor = self.op_floor_s[0 if kind == "F" else 1]
            remaining = start + floor - time.perf_counter()
            if remaining > 0:
                time.sleep(remaining)
        end = time.perf_counter()
        self.events.append(Event(self.stage, kind, microbatch, start, end))


def run_pipeline(
    stage: PipelineStage,
    microbatches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    group: ProcessGroup,
    schedule: str | list[Action] = "1f1b",
    recorder: Recorder | None = None,
    stats: CommStats | None = None,
) -> list[float]:
    """Run forward and backward of every micro-batch (ids, targets) (B_mb, T) on this stage.

    Every rank passes the same micro-batches (only the first stage reads the ids, only
    the last the targets). Gradients accumulate in the stage's parameters (call
    `zero_grad` before, `sync_tied_embeddings` and the optimizer after). Returns the
    per-micro-batch losses on the last stage (each the mean over its tokens), [] elsewhere.
    """
    p, s = dist.get_world_size(group), dist.get_rank(group)
    if p != stage.num_stages or s != stage.stage:
        raise ValueError(
            f"rank {s} of a {p}-rank group cannot run stage {stage.stage} of {stage.num_stages}"
        )
    m = len(microbatches)
    actions = get_schedule(schedule)(p, m, s) if isinstance(schedule, str) else schedule
    B, T = microbatches[0][0].shape
    C = stage.config.hidden_size
    param = next(stage.parameters())
    hidden_shape, dtype, device = (B, T, C), param.dtype, param.device
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}
    losses: list[float] = []
    pending: list[tuple[dist.Work, torch.Tensor]] = []  # posted sends and their buffers
    for action in actions:
        pending = [(w, b) for w, b in pending if not w.is_completed()]
        i = action.microbatch
        if action.kind == "F":
            if stage.is_first:
                x = microbatches[i][0].to(device)
            else:
                x = torch.empty(hidden_shape, dtype=dtype, device=device)
                comm.wait_all(
                    comm.send_recv([], [(x, s - 1)], group, op="pipeline recv"),
                    "pipeline recv",
                    group,
                )
                x.requires_grad_(True)
            t = recorder.start() if recorder else 0.0
            y = stage(x)
            if stage.is_last:
                targets = microbatches[i][1].to(device)
                y = F.cross_entropy(y.flatten(0, 1).float(), targets.flatten()) / m
                losses.append(y.item() * m)
            if recorder:
                recorder.stop("F", i, t)
            if not stage.is_last:
                out = y.detach()
                (work,) = comm.send_recv([(out, s + 1)], [], group, stats, "pipeline_send")
                pending.append((work, out))
            inputs[i], outputs[i] = x, y
        else:
            y = outputs.pop(i)
            if stage.is_last:
                grad = None
            else:
                grad = torch.empty(hidden_shape, dtype=dtype, device=device)
                comm.wait_all(
                    comm.send_recv([], [(grad, s + 1)], group, op="pipeline recv"),
                    "pipeline recv",
                    group,
                )
            t = recorder.start() if recorder else 0.0
            torch.autograd.backward(y, grad)
            if recorder:
                recorder.stop("B", i, t)
            x = inputs.pop(i)
            if not stage.is_first:
                (work,) = comm.send_recv([(x.grad, s - 1)], [], group, stats, "pipeline_send")
                pending.append((work, x.grad))
    comm.wait_all([w for w, _ in pending], "pipeline send", group)
    return losses


def gather_timeline(recorder: Recorder, group: ProcessGroup) -> list[Event]:
    """Every stage's events on every rank (an all-gather of Python objects), in seconds
    since the earliest start (ranks on one host share the monotonic clock)."""
    out: list[list[Event] | None] = [None] * dist.get_world_size(group)
    with comm.guard("all_gather_object", group):
        dist.all_gather_object(out, recorder.events, group=group)
    events = [e for stage_events in out for e in stage_events]
    t0 = min(e.start for e in events)
    return [Event(e.stage, e.kind, e.microbatch, e.start - t0, e.end - t0) for e in events]


def measured_bubble(events: list[Event]) -> float:
    """The idle fraction of a measured timeline (see `schedule.bubble_fraction`)."""
    return bubble_fraction(events)
