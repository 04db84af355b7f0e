"""Chunked prefill: time between tokens of running decodes when long prompts arrive.

64 requests are decoding (prompts of 128 tokens, 256 new tokens each) when 8 prompts of
4096 tokens arrive, one every 24 engine steps (GPU: Llama-3.2-1B shape, random bf16).
Without chunking, the step that prefills a long prompt computes all 4096 of its tokens
while every decode waits for it: a spike in the time between tokens (TBT); its budget
holds a whole prompt beside every decode (max_model_len + the decodes), so a long prompt
joins the next step whole. With chunked prefill (Sarathi-Serve; vLLM's default) a step
carries at most `max_num_batched_tokens` tokens, decodes first, so the long prompt is
spread over several steps and the decodes keep their pace; a smaller budget gives smoother
decodes but more steps that re-read the weights. Reported for whole prompts and for each
budget: P50/P99 TBT of the decoding requests and throughput (all output tokens per
second); the headline is the budget with the largest P99 reduction among those that cost
at most 10% of the throughput.

    python -m benchmarks.engine_chunked            # GPU
    python -m benchmarks.engine_chunked --smoke    # seconds, CPU, tiny random model
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch

from benchmarks.engine_common import build_model, free_memory, sync
from minillm.bench import save_result
from minillm.engine import LLM, SamplingParams
from minillm.engine.inject import inject_fused_modules

SETTINGS = {
    "cuda": dict(model="llama-3.2-1b", dtype=torch.bfloat16, streams=64, stream_prompt=128,
                 stream_output=256, long=8, long_prompt=4096, long_output=16, first=16,
                 every=24, budgets=[256, 512, 1024, 2048], kv=2**32),
    "smoke": dict(model="smoke", dtype=torch.float32, streams=6, stream_prompt=8,
                  stream_output=40, long=3, long_prompt=150, long_output=4, first=4, every=8,
                  budgets=[16, 32], kv=2**24),
}  # fmt: skip


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000, method="inclusive")[int(q * 10) - 1]


def run_one(model, s: dict, budget: int | None, progress, unified: bool = False) -> dict:
    """One run: chunked prefill with this token budget, or (None) whole prompts."""
    chunked = budget is not None
    rng = random.Random(0)
    V = model.config.vocab_size
    max_len = s["long_prompt"] + s["long_output"] + 16
    llm = LLM(model, None, max_num_seqs=s["streams"] + s["long"], max_model_len=max_len,
              kv_cache_memory=s["kv"], enable_chunked_prefill=chunked,
              max_num_batched_tokens=budget if chunked else max_len + s["streams"],
              enable_prefix_caching=False, unified_attention=unified)  # fmt: skip
    # Warm-up (compilation, autotuning, first allocations): a small copy of the workload,
    # decodes with a long prompt arriving among them.
    warm = [[rng.randrange(1, V) for _ in range(n)] for n in [8] * 8 + [s["long_prompt"]]]
    llm.generate(warm, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    engine = llm.engine
    stream = SamplingParams(temperature=0, max_tokens=s["stream_output"], ignore_eos=True)
    long = SamplingParams(temperature=0, max_tokens=s["long_output"], ignore_eos=True)
    streams = [
        engine.add_request([rng.randrange(1, V) for _ in range(s["stream_prompt"])], stream)
        for _ in range(s["streams"])
    ]
    arrivals = {s["first"] + i * s["every"]: i for i in range(s["long"])}
    # Made before the clock starts: drawing 4096 random ids in Python takes milliseconds,
    # which would land in the time between tokens of the step after each arrival.
    long_prompts = [[rng.randrange(1, V) for _ in range(s["long_prompt"])] for _ in arrivals]
    done, step, timeline = {}, 0, []
    sync()
    t0 = time.perf_counter()
    while engine.has_unfinished_requests() or step <= max(arrivals):
        if step in arrivals:
            engine.add_request(long_prompts[arrivals[step]], long)
        t = time.perf_counter()
        for out in engine.step(only_finished=True):
            done[out.request_id] = out
        timeline.append(time.perf_counter() - t)
        step += 1
    sync()
    seconds = time.perf_counter() - t0
    tbt = [x for rid in streams for x in done[rid].metrics.time_between_tokens]
    tokens = sum(len(o.outputs[0].token_ids) for o in done.values())
    row = dict(chunked_prefill=chunked, max_num_batched_tokens=engine.config.max_num_batched_tokens,
               seconds=seconds, output_tokens=tokens, tokens_per_s=tokens / seconds,
               tbt_p50_ms=1e3 * percentile(tbt, 50), tbt_p99_ms=1e3 * percentile(tbt, 99),
               tbt_max_ms=1e3 * max(tbt), steps=step,
               step_ms=[1e3 * x for x in timeline])  # fmt: skip
    progress(f"budget={budget!s:5}  TBT P50 {row['tbt_p50_ms']:7.2f} ms  P99 "
             f"{row['tbt_p99_ms']:7.2f} ms  max {row['tbt_max_ms']:7.2f} ms  "
             f"{row['tokens_per_s']:8.0f} tok/s  ({step} steps)")  # fmt: skip
    llm = None
    free_memory()
    return row


def name_of(row: dict) -> str:
    return f"chunks of {row['max_num_batched_tokens']}" if row["chunked_prefill"] else "whole"


def plot(rows: list[dict], label: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    for r in rows:
        ax1.plot(r["step_ms"], lw=0.8, label=name_of(r))
    ax1.set(xlabel="engine step", ylabel="step time (ms)", yscale="log",
            title=f"long prompts arriving during decodes ({label})")  # fmt: skip
    ax1.legend(fontsize=8)
    x = range(len(rows))
    ax2.bar([i - 0.2 for i in x], [r["tbt_p50_ms"] for r in rows], 0.4, label="P50 TBT")
    ax2.bar([i + 0.2 for i in x], [r["tbt_p99_ms"] for r in rows], 0.4, label="P99 TBT")
    ax2.set_xticks(list(x), [f"{name_of(r)}\n{r['tokens_per_s']:.0f} tok/s" for r in rows],
                   fontsize=7)  # fmt: skip
    ax2.set(ylabel="time between tokens (ms)", title="decoding requests")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return fig


def headline_of(rows: list[dict]) -> dict:
    """P99 reduction and throughput cost of each budget against whole prompts; the best
    budget: the largest reduction at a cost of at most 10%."""
    whole, chunked = rows[0], rows[1:]
    per_budget = {
        r["max_num_batched_tokens"]: dict(
            p99_tbt_reduction=whole["tbt_p99_ms"] / r["tbt_p99_ms"],
            throughput_cost=1 - r["tokens_per_s"] / whole["tokens_per_s"],
        )
        for r in chunked
    }
    ok = {b: h for b, h in per_budget.items() if h["throughput_cost"] <= 0.10}
    best = max(ok or per_budget, key=lambda b: (ok or per_budget)[b]["p99_tbt_reduction"])
    h = per_budget[best]
    return dict(best_budget=best, **h, per_budget=per_budget, target_p99_reduction=3.0,
                target_max_throughput_cost=0.10,
                met=h["p99_tbt_reduction"] >= 3 and h["throughput_cost"] <= 0.10)  # fmt: skip


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a seconds-long CPU run")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results")
    parser.add_argument("--budgets", type=int, nargs="+", default=None,
                        help="budgets of the chunked runs (default: 256 ... 2048)")  # fmt: skip
    parser.add_argument("--unified-attention", action="store_true",
                        help="one attention kernel per layer (unified_attention)")  # fmt: skip
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("this benchmark needs a CUDA GPU (or --smoke)")
    device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        torch.set_num_threads(1)
    s = SETTINGS["smoke" if args.smoke else "cuda"]
    model = build_model(s["model"], device, s["dtype"])
    inject_fused_modules(model)
    if args.budgets:
        s = {**s, "budgets": args.budgets}
    u = args.unified_attention
    rows = [run_one(model, s, budget, print, u) for budget in [None, *s["budgets"]]]
    settings = {**{k: str(v) for k, v in s.items()}, "unified_attention": u}
    name = "engine_chunked" + ("_unified" if u else "") + ("_smoke" if args.smoke else "")
    label = f"{s['model']}, {torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}"
    data = dict(settings=settings, headline=headline_of(rows), rows=rows)
    return save_result(name, data, plot(rows, label), args.out)


if __name__ == "__main__":
    main()
