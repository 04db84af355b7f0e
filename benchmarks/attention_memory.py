"""KV memory waste: contiguous max-length preallocation against paged allocation (CPU).

A simulated continuous-batching run (32 requests at a time) over 1000 requests whose
lengths follow a ShareGPT-like distribution (`minillm.cache.allocation`); the paged scheme
is minillm's own BlockManager. Waste = 1 - slots holding a token / slots allocated, summed
over every decode step. The vLLM paper measured 60-80% waste for contiguous preallocation.

    python -m benchmarks.attention_memory            # ~10 s on a laptop CPU
    python -m benchmarks.attention_memory --smoke    # a second (checks the script)
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from minillm.bench import save_result
from minillm.cache.allocation import sample_request_lengths, simulate_kv_waste

SCHEMES = ("contiguous_max_len", "contiguous_exact", "paged")
TARGETS = {"paged_block16_waste_below": 0.04, "contiguous_max_len_waste_in": (0.6, 0.8)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="few requests")
    parser.add_argument("--out", type=Path, default=None, help="results folder")
    args = parser.parse_args(argv)
    n, max_model_len, max_batch = (60 if args.smoke else 1000), 2048, 32
    requests = sample_request_lengths(n, max_model_len, seed=0)
    rows, reports = [], {}
    for block_size in (8, 16, 32):
        report = simulate_kv_waste(requests, max_model_len, block_size, max_batch)
        reports[block_size] = report
        row = {"block_size": block_size, "steps": report.steps}
        row.update({f"waste_{s}": report.waste(s) for s in SCHEMES})
        rows.append(row)
        print(
            f"block {block_size:2}: " + "  ".join(f"{s} {row[f'waste_{s}']:.1%}" for s in SCHEMES)
        )
    b16 = next(r for r in rows if r["block_size"] == 16)
    lo, hi = TARGETS["contiguous_max_len_waste_in"]
    limit = TARGETS["paged_block16_waste_below"]
    targets = {
        "paged_block16_waste": {"value": b16["waste_paged"], "target": f"< {limit}",
                                "met": b16["waste_paged"] < limit},
        "contiguous_max_len_waste": {"value": b16["waste_contiguous_max_len"],
                                     "target": f"in [{lo}, {hi}] (vLLM paper)",
                                     "met": lo <= b16["waste_contiguous_max_len"] <= hi},
    }  # fmt: skip
    print("targets:", targets)
    result = {
        "requests": n,
        "max_model_len": max_model_len,
        "max_batch": max_batch,
        "mean_prompt_len": statistics.mean(p for p, _ in requests),
        "mean_output_len": statistics.mean(o for _, o in requests),
        "rows": rows,
        "targets": targets,
    }
    save_result("attention_memory", result, plot(requests, reports[16], rows), out_dir=args.out)
    return result


def plot(requests, report, rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(13, 3.6))
    ax1.hist([p + o for p, o in requests], bins=40, color="tab:blue")
    ax1.set(title="request length (prompt + output)", xlabel="tokens", ylabel="requests")
    steps = range(len(report.per_step))
    for i, label in enumerate(["tokens held", "contiguous (max len)", "contiguous (exact)",
                               "paged (block 16)"]):  # fmt: skip
        ax2.plot(steps, [s[i] / 1e3 for s in report.per_step], label=label, lw=1)
    ax2.set(title="KV slots over the run", xlabel="decode step", ylabel="thousand token slots")
    ax2.legend(fontsize=7)
    width = 0.25
    for i, scheme in enumerate(SCHEMES):
        xs = [j + (i - 1) * width for j in range(len(rows))]
        ax3.bar(xs, [100 * r[f"waste_{scheme}"] for r in rows], width, label=scheme)
    ax3.set_xticks(range(len(rows)), [f"block {r['block_size']}" for r in rows])
    ax3.set(title="wasted KV memory", ylabel="% of allocated slots")
    ax3.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
