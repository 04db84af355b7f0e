"""Tensor-parallel decoding: one decode step of a Llama-2-7B-shaped model on 1 GPU vs TP=2.

Without a KV cache, a decode step is a forward over the context whose last position gives
the next token. With a short context that forward is memory-bound: every step reads all
the weights once (2 Psi bytes in bf16, 13.5 GB at 7B), so TP=2, which halves the bytes
each GPU reads, can approach 2x; what it costs is two all-reduces per layer (64 for 32
layers), small messages whose latency adds up. In eager mode the CPU's kernel launches
(~1300 per forward) would hide all of this, so each variant is also captured in a CUDA
graph (NCCL collectives are capturable) and both are reported.

Both are measured in the same run: rank 0 alone times the full model (the other rank
waits), then both ranks shard it (`apply_tensor_parallel`) and time the TP forward; the
TP logits are checked against the single-GPU ones.

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
from minillm.parallel.tensor_model import apply_tensor_parallel
from minillm.parallel.testing import tiny_config


def _step_fn(model, ids: torch.Tensor, mode: str):
    """A callable running one decode step (forward over `ids`).

    mode: "eager"; "graph" (the forward captured in a CUDA graph: no CPU launch cost);
    "compile+graph" (torch.compile fuses the small elementwise kernels of the norms and
    rotary embeddings first: fewer, larger kernels, then the CUDA graph)."""
    if mode == "eager":
        return lambda: model(ids, check_inputs=False)
    fn = torch.compile(model, dynamic=False) if mode == "compile+graph" else model
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up: compilation, kernel choice, NCCL communicators
            fn(ids, check_inputs=False)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(ids, check_inputs=False)
    return graph.replay


def _time(model, ids, mode: str, repeat: int, device: str, agree=None) -> float | str:
    """Median seconds of a step, or why it could not be measured. With `agree` (a gloo
    group), every rank must have built its step before any times it: a rank whose
    capture failed must not leave the others waiting in a replayed collective forever."""
    error = None
    try:
        fn = _step_fn(model, ids, mode)
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


def _modes(T: int, settings: dict, on_gpu: bool) -> list[str]:
    if not on_gpu:
        return ["eager"]
    modes = ["eager", "graph"]
    if T in settings["compile_contexts"]:
        modes.append("compile+graph")
    return modes


@torch.inference_mode()
def run(group, settings: dict) -> dict | None:
    p, rank = dist.get_world_size(group), dist.get_rank(group)
    on_gpu = dist.get_backend(group) == "nccl"
    device = f"cuda:{torch.cuda.current_device()}" if on_gpu else "cpu"
    cpu_group = dist.new_group(backend="gloo") if on_gpu else group  # waiting room
    if settings["smoke"]:
        config, dtype = tiny_config(), torch.float32
    else:
        config, dtype = ModelConfig.from_name(settings["model"]), torch.bfloat16
    torch.manual_seed(0)  # the same random weights on every rank
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = CausalLM(config, attn_backend="sdpa").eval()
    torch.set_default_dtype(default_dtype)
    weight_bytes = sum(q.numel() * q.element_size() for q in model.parameters())
    contexts = settings["contexts"]
    g = torch.Generator(device="cpu").manual_seed(1)
    prompts = {
        T: torch.randint(0, config.vocab_size, (1, T), generator=g).to(device) for T in contexts
    }
    rows, reference = [], {}
    if rank == 0:  # the baseline: the whole model on one device
        for T in contexts:
            reference[T] = model(prompts[T])[0, -1].float()
            for mode in _modes(T, settings, on_gpu):
                t = _time(model, prompts[T], mode, settings["repeat"], device)
                rows.append({"context": T, "ranks": 1, "mode": mode, "seconds": t})
    comm.barrier(cpu_group)
    apply_tensor_parallel(model, group)
    if on_gpu:
        torch._dynamo.reset()  # compiled code of the unsharded model: not needed any more
        torch.cuda.empty_cache()
    for T in contexts:
        logits = model(prompts[T])[0, -1].float()
        for mode in _modes(T, settings, on_gpu):
            t = _time(model, prompts[T], mode, settings["repeat"], device, cpu_group)
            if rank == 0:
                rows.append(
                    {
                        "context": T,
                        "ranks": p,
                        "mode": mode,
                        "seconds": t,
                        "max_logit_diff": (logits - reference[T]).abs().max().item(),
                        "same_greedy_token": bool(logits.argmax() == reference[T].argmax()),
                    }
                )
    comm.barrier(cpu_group)
    if rank != 0:
        return None
    bandwidth = measure_copy_bandwidth(device=device) if on_gpu else None
    return _summarize(rows, weight_bytes, p, bandwidth, config, dtype, settings)


def _summarize(rows, weight_bytes, p, bandwidth, config, dtype, settings) -> dict:
    by_key = {(r["context"], r["ranks"], r["mode"]): r for r in rows}
    for r in rows:
        if not isinstance(r["seconds"], float):
            continue
        r["tokens_per_s"] = 1.0 / r["seconds"]
        per_gpu_bytes = weight_bytes / r["ranks"]  # weights each GPU reads per step
        r["weight_read_gb_per_s_per_gpu"] = per_gpu_bytes / r["seconds"] / 1e9
        if bandwidth:
            r["fraction_of_copy_bandwidth"] = per_gpu_bytes / r["seconds"] / bandwidth
        base = by_key.get((r["context"], 1, r["mode"]))
        if r["ranks"] > 1 and base and isinstance(base["seconds"], float):
            r["speedup_vs_1_gpu"] = base["seconds"] / r["seconds"]
    # The headline: the fastest TP=p setup at the main context, against one GPU in the
    # same mode (a speedup always compares like with like).
    T = settings["headline_context"]
    candidates = [r for r in rows if r["context"] == T and "speedup_vs_1_gpu" in r]
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
            "context": T,
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
    labels = sorted({(r["context"], r["mode"]) for r in rows})
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(labels)), 3.5))
    width = 0.38
    for k, ranks in enumerate(sorted({r["ranks"] for r in rows})):
        ms = []
        for lab in labels:
            match = [r for r in rows if (r["context"], r["mode"]) == lab and r["ranks"] == ranks]
            ms.append(match[0]["seconds"] * 1e3 if match else 0.0)
        xs = [i + k * width for i in range(len(labels))]
        ax.bar(xs, ms, width, label=f"{ranks} GPU(s)" if ranks == 1 else f"TP={ranks}")
    ax.set_xticks([i + width / 2 for i in range(len(labels))])
    ax.set_xticklabels([f"T={t}\n{mode}" for t, mode in labels], fontsize=8)
    ax.set_ylabel("ms per decode step")
    ax.set_title("One decode step (forward over T tokens), lower is better")
    ax.legend()
    return fig


def _print(result: dict) -> None:
    print(f"{'context':>8} {'ranks':>5} {'mode':>14} {'ms/step':>9} {'speedup':>8} {'BW':>6}")
    for r in result["rows"]:
        head = f"{r['context']:>8} {r['ranks']:>5} {r['mode']:>14}"
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
            f"headline: T={h['context']} {h['mode']}: {h['speedup_vs_1_gpu']:.2f}x "
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
    parser.add_argument("--contexts", type=int, nargs="+", default=None)
    parser.add_argument("--compile-contexts", type=int, nargs="*", default=None)
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    contexts = args.contexts or ([1, 8] if args.smoke else [1, 16, 128])
    settings = {
        "smoke": args.smoke,
        "model": args.model,
        "contexts": contexts,
        "compile_contexts": [16] if args.compile_contexts is None else args.compile_contexts,
        "headline_context": 16 if 16 in contexts else contexts[0],
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
