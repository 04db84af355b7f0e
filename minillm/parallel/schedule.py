"""Pipeline schedules: the order in which each stage runs its micro-batches' forwards and backwards.

A model split into p stages processes a batch as m micro-batches. Stage s can run the
forward F_i of micro-batch i once stage s-1 has sent its output, and the backward B_i once
stage s+1 has sent the gradient. The idle time this dependency chain forces is the bubble;
with equal per-stage costs, both schedules below leave the same fraction idle:

    bubble = (p - 1) / (m + p - 1)        (GPipe, Huang et al. 2019; also 1F1B)

- GPipe: every forward, then every backward. Stage s holds the activations of all m
  micro-batches at the turn.
- 1F1B (PipeDream-Flush, Narayanan et al. 2021; Megatron's default): stage s runs
  p - s - 1 warm-up forwards, then alternates one forward and one backward, then drains
  the remaining backwards. Same bubble, but at most p - s micro-batches in flight.

`simulate` replays a schedule under given costs (each op starts as soon as its stage is
free and its input has arrived): the same code draws the notebook's Gantt chart and gives
the ideal timeline that the measured one (`minillm.parallel.pipeline`) is compared with.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Action:
    """One step of a stage's program: "F" (forward) or "B" (backward) of a micro-batch."""

    kind: str
    microbatch: int

    def __repr__(self) -> str:
        return f"{self.kind}{self.microbatch}"


@dataclass(frozen=True)
class Event:
    """One op on the timeline of a stage: [start, end) seconds (or simulated time units)."""

    stage: int
    kind: str
    microbatch: int
    start: float
    end: float


def _check(num_stages: int, num_microbatches: int, stage: int) -> None:
    for name, v in (("num_stages", num_stages), ("num_microbatches", num_microbatches)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage must lie in [0, {num_stages}), got {stage}")


def gpipe_schedule(num_stages: int, num_microbatches: int, stage: int) -> list[Action]:
    """All forwards in order, then all backwards in order."""
    _check(num_stages, num_microbatches, stage)
    m = num_microbatches
    return [Action("F", i) for i in range(m)] + [Action("B", i) for i in range(m)]


def one_f_one_b_schedule(num_stages: int, num_microbatches: int, stage: int) -> list[Action]:
    """Warm-up forwards, then one-forward-one-backward, then the remaining backwards."""
    _check(num_stages, num_microbatches, stage)
    m = num_microbatches
    warmup = min(num_stages - stage - 1, m)
    actions = [Action("F", i) for i in range(warmup)]
    for i in range(m - warmup):  # steady state: F of the newest, B of the oldest
        actions += [Action("F", warmup + i), Action("B", i)]
    actions += [Action("B", i) for i in range(m - warmup, m)]  # cool-down
    return actions


SCHEDULES = {"gpipe": gpipe_schedule, "1f1b": one_f_one_b_schedule}


def get_schedule(name: str):
    if name not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {name!r}; available: {', '.join(SCHEDULES)}")
    return SCHEDULES[name]


def check_schedule(actions: list[Action], num_microbatches: int) -> None:
    """A stage program must run F_i and B_i once each, forwards and backwards in increasing
    micro-batch order (the order neighbours send in), and F_i before B_i."""
    fwd = [a.microbatch for a in actions if a.kind == "F"]
    bwd = [a.microbatch for a in actions if a.kind == "B"]
    if any(a.kind not in ("F", "B") for a in actions):
        raise ValueError(f"actions must be F or B, got {actions}")
    expected = list(range(num_microbatches))
    if fwd != expected or bwd != expected:
        raise ValueError(
            f"each stage must run F0..F{num_microbatches - 1} and B0..B{num_microbatches - 1} "
            f"once each, in increasing order; got {actions}"
        )
    for i in expected:
        if actions.index(Action("B", i)) < actions.index(Action("F", i)):
            raise ValueError(f"B{i} comes before F{i} in {actions}")


def simulate(
    schedule: str | list[list[Action]],
    num_stages: int,
    num_microbatches: int,
    t_forward: float = 1.0,
    t_backward: float = 2.0,
    t_comm: float = 0.0,
) -> list[Event]:
    """The as-soon-as-possible timeline of a schedule with fixed costs per op.

    `schedule`: a name from SCHEDULES, or one action list per stage. F_i on stage s starts
    when the stage is free and F_i of stage s-1 ended t_comm earlier; B_i likewise waits
    for B_i of stage s+1 (and, on the last stage, for its own F_i). Raises ValueError if
    the programs deadlock (a stage waits for something that never comes)."""
    p, m = num_stages, num_microbatches
    if isinstance(schedule, str):
        programs = [get_schedule(schedule)(p, m, s) for s in range(p)]
    else:
        programs = [list(a) for a in schedule]
        if len(programs) != p:
            raise ValueError(f"need one action list per stage ({p}), got {len(programs)}")
    for prog in programs:
        check_schedule(prog, m)
    done: dict[tuple[int, str, int], float] = {}  # (stage, kind, mb) -> end time
    free = [0.0] * p
    pc = [0] * p
    events: list[Event] = []
    while any(pc[s] < len(programs[s]) for s in range(p)):
        progressed = False
        for s in range(p):
            while pc[s] < len(programs[s]):
                a = programs[s][pc[s]]
                if a.kind == "F":
                    dep = (s - 1, "F", a.microbatch) if s > 0 else None
                else:
                    dep = (s + 1, "B", a.microbatch) if s < p - 1 else (s, "F", a.microbatch)
                if dep is not None and dep not in done:
                    break
                ready = 0.0 if dep is None else done[dep] + (t_comm if dep[0] != s else 0.0)
                start = max(free[s], ready)
                end = start + (t_forward if a.kind == "F" else t_backward)
                done[(s, a.kind, a.microbatch)] = free[s] = end
                events.append(Event(s, a.kind, a.microbatch, start, end))
                pc[s] += 1
                progressed = True
        if not progressed:
            waiting = {s: programs[s][pc[s]] for s in range(p) if pc[s] < len(programs[s])}
            raise ValueError(f"the schedule deadlocks: stages wait forever at {waiting}")
    return events


def bubble_fraction(events: list[Event]) -> float:
    """1 - (mean busy time of a stage) / (time from the first op's start to the last's end)."""
    if not events:
        raise ValueError("no events")
    stages = sorted({e.stage for e in events})
    span = max(e.end for e in events) - min(e.start for e in events)
    busy = [sum(e.end - e.start for e in events if e.stage == s) for s in stages]
    return 1.0 - sum(busy) / len(busy) / span


def theoretical_bubble(num_stages: int, num_microbatches: int) -> float:
    """(p - 1) / (m + p - 1): the idle fraction of GPipe and 1F1B with equal stage costs."""
    return (num_stages - 1) / (num_microbatches + num_stages - 1)


def peak_in_flight(actions: list[Action]) -> int:
    """Most micro-batches whose activations a stage holds at once (forward done, backward
    not yet): m for GPipe, p - s for 1F1B."""
    live = peak = 0
    for a in actions:
        live += 1 if a.kind == "F" else -1
        peak = max(peak, live)
    return peak
