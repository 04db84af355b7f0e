"""Tensor-parallel decoding: one decode step of a Llama-2-7B-shaped model on 1 GPU vs TP=2.

A decode step of one sequence is memory-bound: it reads every weight once (2 Psi bytes in
bf16, 13.5 GB at 7B) to produce one token, so TP=2, which halves the bytes each GPU reads,
can approach 2x; what it costs is two all-reduces per layer (64 for 32 layers), small
messages whose latency adds up. Two kinds of step are measured:

  - "cache S=512": one new token with a KV cache holding 512 positions (minillm.cache; on
    a sharded model each rank caches its own kv heads): the real decode step;
  - "T=...": without a cache, a forward over T tokens whose last position gives the next
    token (a short T keeps it memory-bound; a long one turns it into compute).

In eager mode the CPU's kernel launches (~1300 per forward) would hide all of this, so each
step is also captured in a CUDA graph (NCCL collectives are capturable), and for the
headline step compiled first (torch.compile fuses the norms' and rotary embeddings' small
kernels). Rank 0 alone times the full model (the other rank waits), then both ranks shard
it (`apply_tensor_parallel`) and time the TP step; TP logits are checked against 1 GPU's.

    torchrun --standalone --nproc_per_node=2 -m benchmarks.tp_decode      # 2 GPUs, NCCL
    python -m benchmarks.tp_decode --smoke                               # CPU, 2 gloo ranks
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from minillm.bench import measure_copy_bandwidth, save_result, time_fn
from minillm.config import ModelConfig
from minillm.model import CausalLM
from minillm.parallel import comm, init_distributed, spawn
from minillm.parallel.tensor_model import apply_tensor_parallel, per_rank_config
from minillm.parallel.testing import tiny_config

try:  # the KV cache (minillm.cache); without it, only cache-free steps are measured
    from minillm.cache import StaticKVCache
except ImportError:  # pragma: no cover - depends on the checkout
    StaticKVCache = None


class Workload:
    """One kind of decode step: a forward over `tokens` new tokens after `cached` cached
    ones (cached = 0: no cache). `call(model, cache)` runs it; the cache is cropped back
    first, so every call is the same step (also when replayed from a CUDA graph)."""

    def __init__(self, label: str, tokens: int, cached: int, vocab_size: int, device: str):
        self.label, self.tokens, self.cached = label, tokens, cached
        g = torch.Generator(device="cpu").manual_seed(1)
        ids = torch.randint(0, vocab_size, (1, cached + tokens), generator=g).to(device)
        self.context, self.new = ids[:, :cached], ids[:, cached:]

    def make_cache(self, model, config, dtype, device):
        """A cache filled with the context (None without one)."""
        if not self.cached:
            return None
        cache = StaticKVCache(config, 1, self.cached + self.tokens, dtype=dtype, device=device)
        model(self.context, None, cache)
        return cache

    def call(self, model, cache, check_inputs: bool = False):
        if cache is None:
            return model(self.new, check_inputs=check_inputs)
        cache.crop(self.cached)
        return model(self.new, None, cache, check_inputs=check_inputs)


def _workloads(settings: dict, vocab_size: int, device: str) -> list[Workload]:
    out = [Workload(f"T={T}", T, 0, vocab_size, device) for T in settings["contexts"]]
    if StaticKVCache is not None:
        out += [
            Workload(f"cache S={S}", 1, S, vocab_size, device) for S in settings["cache_contexts"]
        ]
    return out


def _step_fn(model, workload: Workload, cache, mode: str):
    """A callable running one decode step.

    mode: "eager"; "graph" (the step captured in a CUDA graph: no CPU launch cost);
    "compile+graph" (torch.compile fuses the small elementwise kernels of the norms and
    rotary embeddings first: fewer, larger kernels, then the CUDA graph)."""
    if mode == "eager":
        return lambda: workload.call(model, cache)
    fn = torch.compile(model, dynamic=False) if mode == "compile+graph" else model
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up: compilation, kernel choice, NCCL communicators
            workload.call(fn, cache)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        workload.call(fn, cache)
    return graph.replay


def _time(model, workload, cache, mode, repeat, device, agree=None) -> float | str:
    """Median seconds of a step, or why it could not be measured. With `agree` (a gloo
    group), every rank must have built its step before any times it: a rank whose
    capture failed must not leave the others waiting in a replayed collective forever."""
    error = None
    try:
        fn = _step_fn(model, workload, cache, mode)
    except Exception as e:  # capture or compilation can fail: report it, keep the others
        error = f"{mode} failed: {type(e).__name__}: {str(e)[:300]}"
    if agree is not None:
        ok = torch.tensor([0 if error else 1])
        comm.all_reduce(ok, agree, op=dist.ReduceOp.MIN)
        if not ok.item() and error is None:
            error = f"{mode} failed on another rank"
    if error:
        return error
    return time_fn(fn, warmup=3, repeat=repeat, device=device)


def _modes(workload: Workload, settings: dict, on_gpu: bool) -> list[str]:
    if not on_gpu:
        return ["eager"]
    modes = ["eager", "graph"]
    if workload.label in settings["compile"]:
        modes.append("compile+graph")
    return modes


def _build(config, dtype, device):
    torch.manual_seed(0)  # the same random weights on every rank, and for both models
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = CausalLM(config, attn_backend="sdpa").eval()
    torch.set_default_dtype(default_dtype)
    return model


def _measure(model, cfg, workloads, modes, settings, device, dtype, agree=None) -> dict:
    """{(workload, mode): seconds or error} and {workload: last-position logits}."""
    times, logits = {}, {}
    for w in workloads:
        wanted = [m for m in modes if m in _modes(w, settings, device != "cpu")]
        if not wanted:
            continue
        cache = w.make_cache(model, cfg, dtype, device)
        logits[w.label] = w.call(model, cache, check_inputs=True)[0, -1].float()
        for mode in wanted:
            times[(w.label, mode)] = _time(model, w, cache, mode, settings["repeat"], device, agree)
        del cache
    return times, logits


@torch.inference_mode()
def run(group, settings: dict) -> dict | None:
    """Phase 1 (eager, CUDA graph): rank 0 times the full model while the others wait, then
    every rank times the sharded one. Phase 2 (compile + graph) comes last, so that a
    compiler or capture failure cannot cost the measurements already taken."""
    p, rank = dist.get_world_size(group), dist.get_rank(group)
    on_gpu = dist.get_backend(group) == "nccl"
    device = f"cuda:{torch.cuda.current_device()}" if on_gpu else "cpu"
    cpu_group = dist.new_group(backend="gloo") if on_gpu else group  # waiting room
    if settings["smoke"]:
        config, dtype = tiny_config(), torch.float32
    else:
        config, dtype = ModelConfig.from_name(settings["model"]), torch.bfloat16
    single = _build(config, dtype, device) if rank == 0 else None
    sharded = apply_tensor_parallel(_build(config, dtype, device), group)
    weight_bytes = config.num_parameters() * torch.finfo(dtype).bits // 8
    rank_config = per_rank_config(config, p)  # a rank caches only its own kv heads
    workloads = _workloads(settings, config.vocab_size, device)
    times, reference, logits = {}, {}, {}
    bandwidth = None
    for phase in (["eager", "graph"], ["compile+graph"]):
        if rank == 0:
            t, ref = _measure(single, config, workloads, phase, settings, device, dtype)
            times.update({(lab, 1, m): v for (lab, m), v in t.items()})
            reference.update(ref)
        comm.barrier(cpu_group)
        torch._dynamo.reset()  # the unsharded model's compiled code: not needed any more
        t, out = _measure(
            sharded, rank_config, workloads, phase, settings, device, dtype, cpu_group
        )
        times.update({(lab, p, m): v for (lab, m), v in t.items()})
        logits.update(out)
        if on_gpu and bandwidth is None and rank == 0:
            bandwidth = measure_copy_bandwidth(device=device)  # before anything can fail
        comm.barrier(cpu_group)
    if rank != 0:
        return None
    rows = []
    for (label, ranks, mode), seconds in times.items():
        row = {"workload": label, "ranks": ranks, "mode": mode, "seconds": seconds}
        if ranks > 1:
            row["max_logit_diff"] = (logits[label] - reference[label]).abs().max().item()
            row["same_greedy_token"] = bool(logits[label].argmax() == reference[label].argmax())
        rows.append(row)
    return _summarize(rows, weight_bytes, p, bandwidth, config, dtype, settings)


def _summarize(rows, weight_bytes, p, bandwidth, config, dtype, settings) -> dict:
    by_key = {(r["workload"], r["ranks"], r["mode"]): r for r in rows}
    for r in rows:
        if not isinstance(r["seconds"], float):
            continue
        r["tokens_per_s"] = 1.0 / r["seconds"]
        per_gpu_bytes = weight_bytes / r["ranks"]  # weights each GPU reads per step
        r["weight_read_gb_per_s_per_gpu"] = per_gpu_bytes / r["seconds"] / 1e9
        if bandwidth:
            r["fraction_of_copy_bandwidth"] = per_gpu_bytes / r["seconds"] / bandwidth
        base = by_key.get((r["workload"], 1, r["mode"]))
        if r["ranks"] > 1 and base and isinstance(base["seconds"], float):
            r["speedup_vs_1_gpu"] = base["seconds"] / r["seconds"]
    # The headline: the fastest TP=p setup of the main workload, against one GPU in the
    # same mode (a speedup always compares like with like).
    labels = [r["workload"] for r in rows]
    main = next((lab for lab in settings["headline"] if lab in labels), labels[0])
    candidates = [r for r in rows if r["workload"] == main and "speedup_vs_1_gpu" in r]
    best = min(candidates, key=lambda r: r["seconds"], default=None)
    return {
        "model": {
            "num_parameters": config.num_parameters(),
            "dtype": str(dtype),
            "weight_bytes": weight_bytes,
            "shape": config.to_hf_dict(),
        },
        "tensor_parallel_size": p,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "headline": None
        if best is None
        else {
            "workload": main,
            "mode": best["mode"],
            "speedup_vs_1_gpu": best["speedup_vs_1_gpu"],
            "target": 1.5,
            "met": best["speedup_vs_1_gpu"] >= 1.5,
        },
        "rows": rows,
    }


def _plot(result: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if isinstance(r["seconds"], float)]
    labels = list(dict.fromkeys((r["workload"], r["mode"]) for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(labels)), 3.5))
    width = 0.38
    for k, ranks in enumerate(sorted({r["ranks"] for r in rows})):
        ms = []
        for lab in labels:
            match = [r for r in rows if (r["workload"], r["mode"]) == lab and r["ranks"] == ranks]
            ms.append(match[0]["seconds"] * 1e3 if match else 0.0)
        xs = [i + k * width for i in range(len(labels))]
        ax.bar(xs, ms, width, label=f"{ranks} GPU(s)" if ranks == 1 else f"TP={ranks}")
    ax.set_xticks([i + width / 2 for i in range(len(labels))])
    ax.set_xticklabels([f"{w}\n{mode}" for w, mode in labels], fontsize=8)
    ax.set_ylabel("ms per decode step")
    ax.set_title("One decode step, lower is better")
    ax.legend()
    return fig


def _print(result: dict) -> None:
    print(f"{'step':>12} {'ranks':>5} {'mode':>14} {'ms/step':>9} {'speedup':>8} {'BW':>6}")
    for r in result["rows"]:
        head = f"{r['workload']:>12} {r['ranks']:>5} {r['mode']:>14}"
        if not isinstance(r["seconds"], float):
            print(f"{head} {r['seconds']}")
            continue
        sp, bw = r.get("speedup_vs_1_gpu"), r.get("fraction_of_copy_bandwidth")
        print(
            f"{head} {r['seconds'] * 1e3:>9.3f} {f'{sp:.2f}x' if sp else '':>8} "
            f"{f'{bw:.0%}' if bw else '':>6}"
        )
    if result["headline"]:
        h = result["headline"]
        print(
            f"headline: {h['workload']} {h['mode']}: {h['speedup_vs_1_gpu']:.2f}x "
            f"(target >= {h['target']}x: {'met' if h['met'] else 'NOT met'})"
        )


def _finish(result: dict, settings: dict) -> None:
    _print(result)
    out_dir = Path(settings["out"]) if settings["out"] else None
    path = save_result("tp_decode", {"settings": settings, **result}, _plot(result), out_dir)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, CPU, seconds")
    parser.add_argument("--model", default="llama-2-7b", help="a ModelConfig preset")
    parser.add_argument(
        "--contexts", type=int, nargs="+", default=None, help="token counts of cache-free steps"
    )
    parser.add_argument(
        "--cache-contexts",
        type=int,
        nargs="*",
        default=None,
        help="cached positions of decode steps with a KV cache",
    )
    parser.add_argument(
        "--compile",
        nargs="*",
        default=None,
        help='steps to also compile, e.g. "cache S=512" "T=16"',
    )
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    cache_contexts = args.cache_contexts
    if cache_contexts is None:
        cache_contexts = [8] if args.smoke else [512]
    headline = [f"cache S={S}" for S in cache_contexts] + ["T=16"]
    settings = {
        "smoke": args.smoke,
        "model": args.model,
        "contexts": args.contexts or ([1, 8] if args.smoke else [1, 16, 128]),
        "cache_contexts": cache_contexts,
        "kv_cache_available": StaticKVCache is not None,
        "compile": ([] if args.smoke else headline[:1]) if args.compile is None else args.compile,
        "headline": headline,
        "repeat": args.repeat or (3 if args.smoke else 30),
        "out": args.out,
    }
    if "RANK" not in os.environ:  # not under torchrun: two local gloo processes
        result = spawn(run, 2, (settings,), timeout_s=600)[0]
        _finish(result, settings)
        return
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    group = init_distributed()
    result = run(group, settings)
    if result is not None:
        _finish(result, settings)
    sys.stdout.flush()
    comm.barrier(dist.new_group(backend="gloo"))
    # No destroy_process_group: after NCCL calls were captured in CUDA graphs it can hang.
    os._exit(0)


if __name__ == "__main__":
    main()
