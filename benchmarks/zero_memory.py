"""ZeRO memory per rank: stages 0-3 and offload, measured next to the paper's formulas.

For each setup, a ~1.4B-parameter Llama-shaped model (bf16 parameters, fp32 AdamW: the
paper's 2 + 2 + 12 bytes per parameter) trains two steps on every rank. After the second
backward (gradients and optimizer states all exist) we read, on rank 0:

  - the bytes of the tensors the rank holds (parameters, gradients, optimizer states),
  - on a GPU, torch.cuda.memory_allocated() (the model states at rest: activations are
    freed after the backward) and max_memory_allocated() over the step (adds the
    activations, the gathered ZeRO-3 units and the transient full gradients),

next to (2 + 2 + K) Psi, 2 Psi + 2 Psi + K Psi / N, 2 Psi + (2 + K) Psi / N,
(2 + 2 + K) Psi / N. Offload moves the optimizer states and fp32 gradient shards to CPU.

    torchrun --standalone --nproc_per_node=2 -m benchmarks.zero_memory      # GPUs, NCCL
    python -m benchmarks.zero_memory --smoke                               # CPU, 2 gloo ranks
"""

from __future__ import annotations

import argparse
import gc
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from minillm.bench import save_result
from minillm.config import ModelConfig
from minillm.model import CausalLM
from minillm.parallel import ZeroDataParallel, comm, init_distributed, spawn
from minillm.parallel.testing import tiny_config
from minillm.parallel.zero_memory import formula_for, measure_model_states

SETUPS = [(0, False), (1, False), (2, False), (3, False), (2, True), (3, True)]


def bench_config() -> ModelConfig:
    """~1.37B parameters, Llama-shaped; a 32K vocabulary keeps the embeddings (which
    ZeRO-3 gathers for the whole step) a small part of the model."""
    return ModelConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=2048,
    )


def _one_setup(group, stage: int, offload: bool, settings: dict, device: str) -> dict:
    on_gpu = device.startswith("cuda")
    config = tiny_config() if settings["smoke"] else bench_config()
    if on_gpu:
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = CausalLM(config, attn_backend="sdpa")
    torch.set_default_dtype(default_dtype)
    zero = ZeroDataParallel(model, group, stage, lr=1e-4, offload=offload)
    ids = torch.randint(0, config.vocab_size, (1, settings["seq_len"] + 1), device=device)
    out = {"stage": stage, "offload": offload}
    for step in range(2):
        if on_gpu and step == 1:
            torch.cuda.reset_peak_memory_stats()
        logits = zero(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        del logits
        loss.backward()
        del loss
        if step == 1:  # every model state exists now: measure before the step changes it
            out["tensor_bytes"] = measure_model_states(zero).as_dict()
            out["formula"] = formula_for(zero).as_dict()
            if on_gpu:
                torch.cuda.synchronize()
                out["cuda_allocated_at_rest"] = torch.cuda.memory_allocated() - base
        zero.step()
        zero.zero_grad()
    if on_gpu:
        torch.cuda.synchronize()
        out["cuda_peak_over_step"] = torch.cuda.max_memory_allocated() - base
    out["num_parameters"] = sum(p.numel() for p in model.parameters())
    comm.barrier(group)
    del zero, model
    gc.collect()
    return out


def run(group, settings: dict) -> list[dict] | None:
    on_gpu = dist.get_backend(group) == "nccl"
    device = f"cuda:{torch.cuda.current_device()}" if on_gpu else "cpu"
    rows = [_one_setup(group, s, o, settings, device) for s, o in SETUPS]
    return rows if dist.get_rank(group) == 0 else None


def _ratios(rows: list[dict], world_size: int) -> dict:
    for r in rows:
        f, m = r["formula"], r["tensor_bytes"]
        r["tensor_bytes_over_formula"] = m["total"] / f["total"]
        r["device_tensor_bytes_over_formula"] = m["device"] / f["device"]
        if "cuda_allocated_at_rest" in r:
            r["cuda_at_rest_over_formula"] = r["cuda_allocated_at_rest"] / f["device"]
            r["cuda_peak_over_formula"] = r["cuda_peak_over_step"] / f["device"]
    key = "cuda_at_rest_over_formula" if "cuda_allocated_at_rest" in rows[0] else None
    key = key or "device_tensor_bytes_over_formula"
    worst = max(abs(r[key] - 1) for r in rows)
    return {
        "world_size": world_size,
        "checked": key,
        "worst_relative_error": worst,
        "target": 0.10,
        "met": worst <= 0.10,
    }


def _plot(rows: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"stage {r['stage']}" + (" +offload" if r["offload"] else "") for r in rows]
    gb = 1e9
    series = {"formula (device)": [r["formula"]["device"] / gb for r in rows]}
    series["measured tensors (device)"] = [r["tensor_bytes"]["device"] / gb for r in rows]
    if "cuda_allocated_at_rest" in rows[0]:
        series["cuda allocated at rest"] = [r["cuda_allocated_at_rest"] / gb for r in rows]
        series["cuda peak over step"] = [r["cuda_peak_over_step"] / gb for r in rows]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / len(series)
    for k, (name, values) in enumerate(series.items()):
        ax.bar([i + k * width for i in range(len(rows))], values, width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("GB per rank")
    ax.set_title("ZeRO: model-state memory per rank (bf16 params, fp32 Adam)")
    ax.legend(fontsize=8)
    return fig


def _finish(rows: list[dict], settings: dict, world_size: int) -> None:
    summary = _ratios(rows, world_size)
    print(f"{'setup':>16} {'formula GB':>11} {'tensors GB':>11} {'at rest GB':>11} {'peak GB':>9}")
    for r in rows:
        name = f"stage {r['stage']}" + (" +offload" if r["offload"] else "")
        rest = r.get("cuda_allocated_at_rest")
        peak = r.get("cuda_peak_over_step")
        print(
            f"{name:>16} {r['formula']['device'] / 1e9:>11.3f} "
            f"{r['tensor_bytes']['device'] / 1e9:>11.3f} "
            f"{'' if rest is None else f'{rest / 1e9:.3f}':>11} "
            f"{'' if peak is None else f'{peak / 1e9:.3f}':>9}"
        )
    print(
        f"worst |{summary['checked']} - 1| = {summary['worst_relative_error']:.1%} "
        f"(target <= 10%: {'met' if summary['met'] else 'NOT met'})"
    )
    out_dir = Path(settings["out"]) if settings["out"] else None
    data = {"settings": settings, "summary": summary, "rows": rows}
    print(f"wrote {save_result('zero_memory', data, _plot(rows), out_dir)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, CPU, seconds")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    settings = {
        "smoke": args.smoke,
        "seq_len": args.seq_len or (8 if args.smoke else 128),
        "out": args.out,
    }
    if "RANK" not in os.environ:  # not under torchrun: two local gloo processes
        rows = spawn(run, 2, (settings,), timeout_s=600)[0]
        _finish(rows, settings, 2)
        return
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    group = init_distributed()
    rows = run(group, settings)
    if rows is not None:
        _finish(rows, settings, dist.get_world_size(group))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
