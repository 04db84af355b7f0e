"""What the scheduler did, step by step: records and plots for the engine notebook.

`run_recorded(engine)` steps an engine until its requests are done and keeps, per step,
which sequences decoded, which computed a prefill chunk (and whether it was the prompt's
last), and which were preempted. `plot_timeline` draws that as a sequences x steps grid;
`plot_batch_sizes` compares how many sequences run per step under two schedules (static
batching leaves slots idle as its sequences finish; continuous batching refills them).
`scheduler_cases` replays a run as (state, decision) pairs for the scheduling exercise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from minillm.engine.engine import LLMEngine

DECODE, CHUNK, LAST_CHUNK, PREEMPTED = 1, 2, 3, 4
KIND_NAMES = {DECODE: "decode", CHUNK: "prefill chunk", LAST_CHUNK: "last prefill chunk",
              PREEMPTED: "preempted"}  # fmt: skip


@dataclass
class StepRecord:
    step: int
    kinds: dict[int, int] = field(default_factory=dict)  # seq_id -> DECODE / CHUNK / ...
    tokens: dict[int, int] = field(default_factory=dict)  # seq_id -> tokens computed

    @property
    def num_tokens(self) -> int:
        return sum(self.tokens.values())

    @property
    def num_running(self) -> int:
        return sum(k != PREEMPTED for k in self.kinds.values())


def run_recorded(engine: LLMEngine, max_steps: int = 100_000) -> list[StepRecord]:
    """Step `engine` until it has no unfinished request; one record per step."""
    records = []
    while engine.has_unfinished_requests() and len(records) < max_steps:
        engine.step()
        batch, rec = engine.last_batch, StepRecord(len(records))
        if batch is not None:
            for it in batch.decodes:
                rec.kinds[it.seq.seq_id], rec.tokens[it.seq.seq_id] = DECODE, it.num_tokens
            for it in batch.prefills:
                rec.kinds[it.seq.seq_id] = LAST_CHUNK if it.samples else CHUNK
                rec.tokens[it.seq.seq_id] = it.num_tokens
            for seq in batch.preempted:
                rec.kinds[seq.seq_id] = PREEMPTED
        records.append(rec)
    return records


def plot_timeline(records: list[StepRecord], ax, title: str = "") -> None:
    """Sequences (rows, in order of first appearance) x steps, colored by what they did."""
    import numpy as np
    from matplotlib.colors import ListedColormap

    order = list(dict.fromkeys(sid for r in records for sid in r.kinds))
    grid = np.zeros((len(order), len(records)))
    row = {sid: i for i, sid in enumerate(order)}
    for r in records:
        for sid, kind in r.kinds.items():
            grid[row[sid], r.step] = kind
    colors = ["white", "tab:blue", "tab:orange", "tab:red", "black"]
    ax.imshow(grid, aspect="auto", interpolation="nearest", cmap=ListedColormap(colors),
              vmin=0, vmax=4)  # fmt: skip
    ax.set(xlabel="engine step", ylabel="sequence", title=title)
    from matplotlib.patches import Patch

    handles = [Patch(color=colors[k], label=name) for k, name in KIND_NAMES.items()]
    ax.legend(handles=handles, fontsize=7, loc="upper right")


def plot_batch_sizes(runs: dict[str, list[StepRecord]], ax, max_num_seqs: int) -> None:
    """Sequences computed per step, for each labelled run."""
    for label, records in runs.items():
        ax.plot([r.num_running for r in records], lw=1, label=f"{label} ({len(records)} steps)")
    ax.axhline(max_num_seqs, color="gray", ls=":", label="max_num_seqs")
    ax.set(xlabel="engine step", ylabel="sequences in the step")
    ax.legend(fontsize=8)


def scheduler_cases(engine: LLMEngine, max_steps: int = 10_000) -> list[tuple[dict, list]]:
    """Run `engine` (no preemption assumed) and return, for every step, the scheduler's
    input state and its decision, in the plain-list form of the scheduling exercise:

        state = dict(decoding=[id, ...], prefilling=[(id, tokens left), ...],
                     waiting=[(id, prompt tokens), ...], budget=..., max_num_seqs=...)
        decision = [("decode" | "prefill", id, tokens), ...]
    """
    cfg, cases = engine.config, []
    if cfg.enable_prefix_caching or cfg.num_speculative_tokens or not cfg.enable_chunked_prefill:
        raise ValueError("scheduler_cases needs chunked prefill, no prefix caching, no drafts")
    while engine.has_unfinished_requests() and len(cases) < max_steps:
        sched = engine.scheduler
        running = sched.running
        state = dict(
            decoding=[s.seq_id for s in running if s.is_decode],
            prefilling=[(s.seq_id, s.num_tokens - s.num_computed_tokens)
                        for s in running if not s.is_decode],
            waiting=[(s.seq_id, s.num_tokens) for s in sched.waiting],
            budget=cfg.max_num_batched_tokens, max_num_seqs=cfg.max_num_seqs,
        )  # fmt: skip
        engine.step()
        batch = engine.last_batch
        if batch is None:
            break
        if batch.preempted:
            raise ValueError("a preemption happened: give the engine more KV blocks")
        decision = [("decode", it.seq.seq_id, it.num_tokens) for it in batch.decodes]
        decision += [("prefill", it.seq.seq_id, it.num_tokens) for it in batch.prefills]
        cases.append((state, decision))
    return cases
