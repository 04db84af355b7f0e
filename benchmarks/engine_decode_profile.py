"""Where a batch-1 decoded token's time goes: the engine's kernels, per token, by name.

`benchmarks.engine_decode` says how far batch-1 decoding is from the bandwidth roofline;
this says which kernels make up the rest. It runs the engine's fastest batch-1 variant
(fused layers, CUDA graphs, multi-step decoding) under torch.profiler and lists each
kernel's device time per decoded token, with its launches per token and, beside the total,
the wall time per token: their difference is time the GPU spends between kernels.

    kernel time per token = sum over kernels (device time) / decoded tokens
    idle per token        = wall time per token - kernel time per token

(The profiled run includes the prompt's prefill: for the 1B shape, 2 x 1.2G x 128 = 0.3
TFLOP, under a millisecond, beside 128 decode steps of over a millisecond each.)

A kernel that reads a weight matrix should run near the copy bandwidth (a 1B model's
gate_up_proj, 67 MB, in ~20 us on an H100); one that takes microseconds per layer for a
few KB (a norm, a rotary, a cache write) is launch-bound, and a fusion removes it.

    python -m benchmarks.engine_decode_profile                      # GPU, the 1B shape
    python -m benchmarks.engine_decode_profile --shape llama-2-7b
    python -m benchmarks.engine_decode_profile --smoke              # seconds, CPU (aten ops)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.engine_common import build_model, decode_rate, free_memory
from minillm.bench import save_result
from minillm.engine import LLM, SamplingParams

SETTINGS = {
    "cuda": dict(shape="llama-3.2-1b", prompt=128, new=128, steps=8, dtype=torch.bfloat16),
    "smoke": dict(shape="smoke", prompt=16, new=12, steps=1, dtype=torch.float32),
}
TOP = 25  # kernels listed and plotted


def kernel_rows(prof, new_tokens: int, cuda: bool) -> list[dict]:
    """Per-name device time (CUDA) or self CPU time (CPU: aten ops) per decoded token."""
    rows = []
    for e in prof.key_averages():
        if cuda:
            if e.device_type.name != "CUDA":
                continue
            t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        else:
            t = e.self_cpu_time_total
        if t > 0:
            rows.append(dict(kernel=e.key, us_per_token=t / new_tokens,
                             launches_per_token=e.count / new_tokens))  # fmt: skip
    rows.sort(key=lambda r: -r["us_per_token"])
    return rows


def profile_decode(s: dict, device: str) -> dict:
    if s["new"] < 2:
        raise ValueError(f"new must be >= 2 (a decode rate needs two token times), got {s['new']}")
    model = build_model(s["shape"], device, s["dtype"])
    prompt = list(range(1, s["prompt"] + 1))
    llm = LLM(model, None, fuse=True, max_num_seqs=1, max_model_len=s["prompt"] + s["new"] + 16,
              kv_cache_memory=2**28, num_scheduler_steps=s["steps"])  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=s["new"], ignore_eos=True)
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))  # warm
    (out,) = llm.generate([prompt], params)  # unprofiled: the wall rate
    rate = decode_rate(out)
    cuda = device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        (profiled,) = llm.generate([prompt], params)
        if cuda:
            torch.cuda.synchronize()
    profiled_s = time.perf_counter() - t0
    if profiled.outputs[0].token_ids != out.outputs[0].token_ids:
        raise RuntimeError("the profiled run decoded other tokens than the unprofiled one")
    rows = kernel_rows(prof, s["new"], cuda)
    graphs = "CUDA graphs, " if llm.engine.runner.graphs is not None else ""
    kernel_us = sum(r["us_per_token"] for r in rows)
    wall_us = 1e6 / rate
    result = dict(
        shape=s["shape"], variant=f"engine, {graphs}fused, multi-step {s['steps']}",
        tokens_per_s=rate, wall_us_per_token=wall_us, kernel_us_per_token=kernel_us,
        idle_us_per_token=wall_us - kernel_us if cuda else None,
        profiled_run_s=profiled_s, rows=rows,
    )  # fmt: skip
    del llm, model
    free_memory()
    return result


def plot(result: dict, device_name: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"][:TOP][::-1]
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(rows) + 1.4))
    labels = [r["kernel"][:60] for r in rows]
    ax.barh(labels, [r["us_per_token"] for r in rows])
    for i, r in enumerate(rows):
        ax.text(r["us_per_token"], i, f" {r['launches_per_token']:.0f}x", va="center", fontsize=7)
    unit = "device" if device_name != "CPU" else "self CPU"
    kernel_us, wall_us = result["kernel_us_per_token"], result["wall_us_per_token"]
    title = f"{result['shape']}, batch 1 ({device_name}): {kernel_us:.0f} us of kernels"
    ax.set(xlabel=f"{unit} us per decoded token (launches per token at the bar's end)",
           title=f"{title}, {wall_us:.0f} us wall per token")  # fmt: skip
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a seconds-long CPU run")
    parser.add_argument("--shape", default=None, help="a model preset (default llama-3.2-1b)")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("this benchmark needs a CUDA GPU (or --smoke)")
    device = "cpu" if args.smoke else "cuda"
    s = dict(SETTINGS["smoke" if args.smoke else "cuda"])
    if args.shape:
        s["shape"] = args.shape
    if args.smoke:
        torch.set_num_threads(1)
    result = profile_decode(s, device)
    print(f"{s['shape']}: {result['tokens_per_s']:.1f} tok/s, {result['wall_us_per_token']:.1f} us"
          f" wall, {result['kernel_us_per_token']:.1f} us of kernels per token")  # fmt: skip
    for r in result["rows"][:TOP]:
        print(f"{r['us_per_token']:9.2f} us {r['launches_per_token']:6.1f}x  {r['kernel'][:100]}")
    device_name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    settings = {k: str(v) for k, v in s.items()}
    name = "engine_decode_profile" + ("_smoke" if args.smoke else f"_{s['shape']}")
    return save_result(name, dict(settings=settings, **result), plot(result, device_name), args.out)


if __name__ == "__main__":
    main()
