"""Figures for the parallelism notebooks: timelines, shards, memory bars, ring steps.

Each function draws on a matplotlib Axes (a new figure if none is given) and returns it.
"""

from __future__ import annotations

from collections.abc import Sequence

from minillm.parallel.schedule import Event, bubble_fraction, theoretical_bubble
from minillm.parallel.zero_memory import ModelStateBytes

RANK_COLORS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3")


def _axes(ax, figsize):
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=figsize)
    return ax


def plot_timeline(events: Sequence[Event], ax=None, title: str = ""):
    """A Gantt chart: one row per stage, forwards light and backwards dark, each labelled
    with its micro-batch; the title gives the bubble next to (p-1)/(m+p-1)."""
    ax = _axes(ax, (9, 2.6))
    stages = sorted({e.stage for e in events})
    m = len({e.microbatch for e in events})
    for e in events:
        color = RANK_COLORS[e.microbatch % len(RANK_COLORS)]
        alpha = 0.45 if e.kind == "F" else 0.95
        ax.barh(
            e.stage,
            e.end - e.start,
            left=e.start,
            color=color,
            alpha=alpha,
            edgecolor="black",
            linewidth=0.5,
        )
        ax.text(
            (e.start + e.end) / 2,
            e.stage,
            f"{e.kind}{e.microbatch}",
            ha="center",
            va="center",
            fontsize=7,
        )
    ax.set_yticks(stages, [f"stage {s}" for s in stages])
    ax.invert_yaxis()
    ax.set_xlabel("time")
    bubble = bubble_fraction(events)
    formula = theoretical_bubble(len(stages), m)
    ax.set_title(f"{title}  bubble {bubble:.3f} (formula (p-1)/(m+p-1) = {formula:.3f})")
    return ax


def plot_shards(shapes: dict[str, tuple], world_size: int, ax=None):
    """Each weight matrix of a layer as a rectangle cut into its per-rank shards."""
    from matplotlib.patches import Rectangle

    ax = _axes(ax, (9, 2.8))
    x = 0.0
    names = [n for n, (full, _, _) in shapes.items() if len(full) == 2 and n.endswith("proj")]
    scale = max(max(shapes[n][0]) for n in names)
    for name in names:
        (rows, cols), _, dim = shapes[name]
        h, w = rows / scale * 2, cols / scale * 2
        for r in range(world_size):
            if dim == 0:
                xy, size = (x, h * (1 - (r + 1) / world_size)), (w, h / world_size)
            else:
                xy, size = (x + w * r / world_size, 0), (w / world_size, h)
            ax.add_patch(
                Rectangle(
                    xy,
                    *size,
                    facecolor=RANK_COLORS[r % len(RANK_COLORS)],
                    edgecolor="black",
                    linewidth=0.5,
                    alpha=0.8,
                )
            )
        ax.text(
            x + w / 2,
            -0.15,
            f"{name}\n{'rows' if dim == 0 else 'columns'}",
            ha="center",
            va="top",
            fontsize=7,
        )
        x += w + 0.3
    ax.set_xlim(-0.1, x)
    ax.set_ylim(-0.6, 2.1)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(f"one decoder layer's weights over {world_size} ranks (colour = rank)")
    return ax


def plot_memory(breakdowns: Sequence[ModelStateBytes], labels: Sequence[str], ax=None):
    """Stacked bars of parameters, gradients and optimizer states per rank, in GB; what
    offload moves to CPU memory is hatched."""
    ax = _axes(ax, (8, 3.2))
    bottoms = [0.0] * len(breakdowns)
    colors = {"params": "#4C72B0", "grads": "#DD8452", "optimizer": "#55A868"}
    for part, color in colors.items():
        values = [getattr(b, part) / 1e9 for b in breakdowns]
        hatches = ["//" if b.offload and part != "params" else "" for b in breakdowns]
        for i, (v, hatch) in enumerate(zip(values, hatches, strict=True)):
            ax.bar(
                i,
                v,
                bottom=bottoms[i],
                color=color,
                hatch=hatch,
                edgecolor="white",
                label=part if i == 0 else None,
            )
            bottoms[i] += v
    for i, b in enumerate(breakdowns):
        ax.text(
            i,
            bottoms[i],
            f"{b.device / 1e9:.1f} GB\non device",
            ha="center",
            va="bottom",
            fontsize=7,
        )
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("GB per rank")
    ax.set_ylim(0, max(bottoms) * 1.25)
    ax.legend(fontsize=8, title="hatched: in CPU memory", title_fontsize=7)
    return ax


def plot_ring_steps(world_size: int, ax=None):
    """Which key/value block each rank holds at each ring step, and whether it computes
    with it (causal: only blocks of its own chunk or earlier)."""
    from matplotlib.patches import Rectangle

    ax = _axes(ax, (1.2 + 0.9 * world_size, 0.6 + 0.6 * world_size))
    for step in range(world_size):
        for rank in range(world_size):
            block = (rank - step) % world_size
            used = block <= rank
            ax.add_patch(
                Rectangle(
                    (step, rank),
                    1,
                    1,
                    facecolor=RANK_COLORS[block % len(RANK_COLORS)],
                    alpha=0.85 if used else 0.15,
                    edgecolor="black",
                )
            )
            ax.text(
                step + 0.5,
                rank + 0.5,
                f"kv{block}" + ("" if used else "\nskip"),
                ha="center",
                va="center",
                fontsize=7,
            )
    ax.set_xlim(0, world_size)
    ax.set_ylim(world_size, 0)
    ax.set_xticks([s + 0.5 for s in range(world_size)], [f"step {s}" for s in range(world_size)])
    ax.set_yticks([r + 0.5 for r in range(world_size)], [f"rank {r}" for r in range(world_size)])
    ax.set_title("ring attention: the block each rank holds (faded: masked, skipped)", fontsize=9)
    return ax
