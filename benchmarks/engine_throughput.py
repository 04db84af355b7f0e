"""Offline throughput: continuous batching against static batching and HF generate.

256 requests (GPU: Llama-3.2-1B shape, random bf16 weights) with prompts of 32-1024 and
outputs of 16-512 tokens, all submitted at once. Every system gets the same KV memory: what
transformers' static cache would hold for its batch of 64 at the longest length.

  - engine: continuous batching (a finished sequence's slot is refilled at the next step),
    paged KV, chunked prefill, packed batches without padding, CUDA graphs; with and
    without the fused layers (`fuse=True`); int8 weights when `minillm.quant.rtn` exists;
  - static batching in the same engine: a batch of 64 is admitted only when the previous
    one has finished (the GPU idles as its sequences end), optionally sorted by prompt
    length (CTranslate2's batch reordering);
  - HF `generate` with static batches of 64, left-padded, each batch running to its longest
    output (measured on 64 of the requests: the same length distribution).

Throughput counts each request's own output tokens per second of wall time.
On a CPU (`--device cpu`) the same comparison runs with the bundled minillm-tiny model and
a smaller workload (issue item e: engine vs HF generate on the bundled model).

    python -m benchmarks.engine_throughput                  # GPU
    python -m benchmarks.engine_throughput --device cpu     # CPU, bundled model
    python -m benchmarks.engine_throughput --smoke          # seconds
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.engine_common import (
    build_model,
    free_memory,
    hf_generate,
    hf_twin,
    random_requests,
    sync,
)
from minillm.bench import save_result
from minillm.engine import LLM, SamplingParams
from minillm.memory import kv_cache_bytes

SETTINGS = {
    "cuda": dict(model="llama-3.2-1b", n=256, prompts=(32, 1024), outputs=(16, 512),
                 hf_batch=64, static_batch=64, dtype=torch.bfloat16, budget=8192),
    "cpu": dict(model="minillm-tiny", n=48, prompts=(16, 256), outputs=(8, 96),
                hf_batch=16, static_batch=16, dtype=torch.float32, budget=1024),
    "smoke": dict(model="smoke", n=12, prompts=(4, 40), outputs=(2, 16), hf_batch=4,
                  static_batch=4, dtype=torch.float32, budget=256),
}  # fmt: skip


def load(s: dict, device: str):
    if s["model"] == "minillm-tiny":
        import minillm

        return minillm.load_model("minillm-tiny", dtype=s["dtype"], device=device)
    return build_model(s["model"], device, s["dtype"])


def run_engine(model, reqs, kv_bytes, s, progress, label, **kwargs) -> dict:
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in reqs]
    try:
        llm = LLM(
            model,
            None,
            kv_cache_memory=kv_bytes,
            max_model_len=s["prompts"][1] + s["outputs"][1] + 16,
            max_num_batched_tokens=s["budget"],
            enable_prefix_caching=False,
            **kwargs,
        )  # fmt: skip (the warm-up's prompts)
        # Warm-up: compile and autotune the kernels for a spread of prefill lengths first.
        warm = sorted((p for p, _ in reqs[:16]), key=len)[::2]
        llm.generate(warm, SamplingParams(temperature=0, max_tokens=4))
        sync()
        t0 = time.perf_counter()
        outs = llm.generate([p for p, _ in reqs], params)
        sync()
        seconds = time.perf_counter() - t0
    except Exception as e:  # report, keep measuring the others
        progress(f"{label:44} failed: {type(e).__name__}: {e}")
        return dict(system=label, error=f"{type(e).__name__}: {e}"[:300])
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    eng = llm.engine
    row = dict(system=label, seconds=seconds, output_tokens=tokens,
               tokens_per_s=tokens / seconds, steps=eng.num_steps,
               preemptions=eng.scheduler.num_preemptions,
               kv_blocks=eng.bm.num_blocks)  # fmt: skip
    progress(
        f"{label:44} {row['tokens_per_s']:9.0f} tok/s  ({seconds:.2f} s, {eng.num_steps} steps)"
    )
    llm = None
    free_memory()
    return row


def run(device: str, smoke: bool, out_dir: Path | None, progress=print) -> Path:
    s = SETTINGS["smoke" if smoke else device]
    model = load(s, device)
    config = model.config
    reqs = random_requests(s["n"], s["prompts"], s["outputs"], config.vocab_size, seed=0)
    longest = s["prompts"][1] + s["outputs"][1]
    kv_bytes = kv_cache_bytes(config, longest, s["hf_batch"], model.dtype)  # HF's static cache
    rows = []
    # HF generate, static batches of hf_batch: one batch of hf_batch requests, timed.
    hf = hf_twin(model)
    batch = reqs[: s["hf_batch"]]
    hf_generate(hf, [p for p, _ in batch[:2]], 2)  # warm-up
    seconds = hf_generate(hf, [p for p, _ in batch], max(n for _, n in batch))
    useful = sum(n for _, n in batch)
    rows.append(dict(system="HF generate, static batches", seconds=seconds, output_tokens=useful,
                     tokens_per_s=useful / seconds, requests=len(batch)))  # fmt: skip
    progress(f"{'HF generate, static batches':44} {useful / seconds:9.0f} tok/s  ({seconds:.2f} s)")
    del hf
    free_memory()
    B = s["static_batch"]
    rows.append(run_engine(model, reqs, kv_bytes, s, progress, "engine, unfused", max_num_seqs=256))
    rows.append(run_engine(model, reqs, kv_bytes, s, progress, "static batching (same engine)",
                           max_num_seqs=B, scheduling="static", fuse=True))  # fmt: skip
    rows.append(run_engine(model, reqs, kv_bytes, s, progress, "static batching, sorted by length",
                           max_num_seqs=B, scheduling="static", sort_by_length=True))  # fmt: skip
    rows.append(run_engine(model, reqs, kv_bytes, s, progress, "engine (continuous batching)",
                           max_num_seqs=256))  # fmt: skip
    try:
        import minillm.quant.rtn  # noqa: F401

        rows.append(run_engine(model, reqs, kv_bytes, s, progress, "engine, int8 weights (RTN)",
                               max_num_seqs=256, quantization="int8"))  # fmt: skip
    except ImportError:
        pass
    by = {r["system"]: r for r in rows if "error" not in r}
    hf_tps = by["HF generate, static batches"]["tokens_per_s"]
    best = by.get("engine (continuous batching)")
    headline = None
    if best is not None:
        static = by.get("static batching (same engine)")
        headline = dict(engine_tokens_per_s=best["tokens_per_s"],
                        speedup_vs_hf=best["tokens_per_s"] / hf_tps,
                        speedup_vs_static=best["tokens_per_s"] / static["tokens_per_s"]
                        if static else None)  # fmt: skip
        if device == "cuda":  # the target is the GPU's (on a CPU: a comparison only)
            headline.update(target_vs_hf=10.0, met=best["tokens_per_s"] / hf_tps >= 10)
    data = dict(model=s["model"], device_kind=device,
                workload=dict(requests=s["n"], prompt_range=s["prompts"],
                              output_range=s["outputs"], hf_measured_requests=s["hf_batch"]),
                kv_cache_bytes=kv_bytes, headline=headline, rows=rows)  # fmt: skip
    name = f"engine_throughput_{device}" + ("_smoke" if smoke else "")
    return save_result(name, data, plot(rows, s, device), out_dir)


def plot(rows: list[dict], s: dict, device: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.barh([r["system"] for r in ok], [r["tokens_per_s"] for r in ok], color="C0")
    for i, r in enumerate(ok):
        ax.text(r["tokens_per_s"], i, f" {r['tokens_per_s']:.0f}", va="center", fontsize=8)
    ax.set(xscale="log", xlabel="output tokens/s (log)",
           title=f"{s['n']} requests, prompts {s['prompts']}, outputs {s['outputs']} "
                 f"({s['model']}, {device})")  # fmt: skip
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=None, choices=["cpu", "cuda"])
    parser.add_argument("--smoke", action="store_true", help="a seconds-long CPU run")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: tiny "
                        "ops run fastest on one)")  # fmt: skip
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device == "cpu":
        torch.set_num_threads(args.threads)
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU")
    return run(device, args.smoke, args.out)


if __name__ == "__main__":
    main()
