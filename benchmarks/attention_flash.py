"""FlashAttention benchmark: minillm's Triton kernel against PyTorch SDPA (FLASH and cuDNN
backends) and naive attention, forward and backward, in TFLOP/s.

Sizes follow the FlashAttention papers: 16k tokens per batch (B = 16384 / N), model width
2048 (H = 32 heads of 64 or 16 of 128), bf16, sequence lengths N = 1k..16k, causal and not.
FLOPs: forward 4 * B * H * N^2 * D (halved when causal), backward 2.5x the forward.
The ceiling is the bf16 matmul throughput measured in the same run.

    python -m benchmarks.attention_flash            # GPU: ~2 minutes on an H200
    python -m benchmarks.attention_flash --smoke    # seconds on a CPU (checks the script)
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from minillm.bench import save_result, time_fn
from minillm.layers.attention import naive_attention

TARGETS = {"fwd_vs_flash": 1.0, "fwd_vs_cudnn": 0.8}  # bf16, D=128, N >= 4096


def sdpa_backends(device: str) -> dict[str, contextlib.AbstractContextManager]:
    """The SDPA kernels to compare with, each pinned (no silent fallback to another one)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device != "cuda":
        return {"sdpa_math": lambda: sdpa_kernel(SDPBackend.MATH)}
    return {
        "sdpa_flash": lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION),
        "sdpa_cudnn": lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION),
    }


def matmul_tflops(device: str, n: int) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    seconds = time_fn(lambda: a @ a, warmup=2, repeat=5, device=device)
    return 2 * n**3 / seconds / 1e12


def attention_fns(causal: bool, device: str) -> dict:
    from minillm.kernels.flash_attn_interface import flash_attn_func

    fns = {"triton": lambda q, k, v: flash_attn_func(q, k, v, causal=causal)}
    for name, ctx in sdpa_backends(device).items():

        def run(q, k, v, ctx=ctx):
            with ctx():
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        fns[name] = run
    if causal:  # minillm's naive backend is causal only
        fns["naive"] = naive_attention
    return fns


def measure(fns: dict, q, k, v, backward: bool, device: str, repeat: int) -> dict:
    """Seconds per call of each function (forward, or backward of a saved forward); None
    for one that cannot run. Each timing covers 3 back-to-back calls (the GPU, not the
    launch, sets the pace). The functions take turns, `repeat` rounds of one timing each,
    and each keeps its median: a drift of the GPU's clock during the row (it heats up)
    falls on all of them alike instead of on whichever ran last."""
    inner = 3 if device == "cuda" else 1
    steps, times = {}, {}
    for name, fn in fns.items():
        try:
            if not backward:
                step = lambda fn=fn: [fn(q, k, v) for _ in range(inner)]  # noqa: E731
            else:
                out = fn(q, k, v)
                do = torch.randn_like(out)
                step = lambda out=out, do=do: [  # noqa: E731
                    torch.autograd.grad(out, (q, k, v), do, retain_graph=True)
                    for _ in range(inner)
                ]  # fmt: skip
            time_fn(step, warmup=min(2, repeat), repeat=1, device=device)  # warm-up, tuning
            steps[name], times[name] = step, []
        except (RuntimeError, torch.OutOfMemoryError) as e:  # e.g. a backend that cannot run
            print(f"    {name} skipped: {type(e).__name__}: {str(e).splitlines()[0][:90]}")
    for _ in range(repeat):
        for name, step in steps.items():
            times[name].append(time_fn(step, warmup=0, repeat=1, device=device) / inner)
    return {name: statistics.median(times[name]) if name in times else None for name in fns}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, any device")
    parser.add_argument("--out", type=Path, default=None, help="results folder")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        tokens, lengths, dims, bwd_lengths, dtype, repeat = (
            128,
            [128],
            [64],
            [128],
            torch.float16,
            1,
        )
    else:
        tokens, lengths, dims, bwd_lengths = (
            16384,
            [1024, 2048, 4096, 8192, 16384],
            [64, 128],
            [4096, 16384],
        )
        dtype, repeat = torch.bfloat16, 15
    if device == "cpu":
        dtype = torch.float32  # CPU SDPA and the interpreter: fp32
    peak = matmul_tflops(device, 256 if args.smoke else 8192)
    print(f"device {device}, bf16 matmul {peak:.0f} TFLOP/s")
    rows = []
    for D in dims:
        H = 2048 // D if not args.smoke else 2
        for causal in (False, True):
            for N in lengths:
                B = max(1, tokens // N)
                passes = ["fwd"] + (["bwd"] if max(dims) == D and N in bwd_lengths else [])
                for pass_ in passes:
                    g = torch.Generator(device=device).manual_seed(0)
                    q, k, v = (torch.randn(B, H, N, D, generator=g, device=device, dtype=dtype)
                               .requires_grad_(pass_ == "bwd") for _ in range(3))  # fmt: skip
                    flops = 4 * B * H * N * N * D * (0.5 if causal else 1.0)
                    flops *= 2.5 if pass_ == "bwd" else 1.0
                    row = dict(direction=pass_, D=D, causal=causal, N=N, B=B, H=H, tflops={})
                    fns = {
                        name: fn for name, fn in attention_fns(causal, device).items()
                        if not (name == "naive" and (pass_ == "bwd" or B * H * N * N * 4 > 2**33))
                    }  # (naive: the (B, H, N, N) fp32 scores would not be worth it)  # fmt: skip
                    seconds = measure(fns, q, k, v, pass_ == "bwd", device, repeat)
                    for name, s in seconds.items():
                        row["tflops"][name] = None if s is None else flops / s / 1e12
                    if pass_ == "fwd":  # the kernel computes what SDPA computes, at this size
                        fns = attention_fns(causal, device)
                        base = next(n for n in fns if n.startswith("sdpa"))
                        with torch.no_grad():
                            diff = fns["triton"](q, k, v).float() - fns[base](q, k, v).float()
                        row[f"max_abs_diff_vs_{base}"] = diff.abs().max().item()
                    ours = row["tflops"]["triton"]
                    for base in ("sdpa_flash", "sdpa_cudnn", "sdpa_math", "naive"):
                        if row["tflops"].get(base):
                            row[f"ratio_vs_{base}"] = ours / row["tflops"][base]
                    row["fraction_of_matmul_peak"] = ours / peak
                    rows.append(row)
                    cells = "  ".join(f"{n} {t:7.3g}" for n, t in row["tflops"].items() if t)
                    print(f"{pass_} D={D} causal={causal!s:5} N={N:6}  {cells}")
    checks = [r for r in rows if r["direction"] == "fwd" and r["D"] == 128 and r["N"] >= 4096]
    summary = {
        name: {
            "target": target,
            "worst": min((r.get(f"ratio_vs_sdpa_{name[7:]}") or 0.0) for r in checks),
            "met": all((r.get(f"ratio_vs_sdpa_{name[7:]}") or 0.0) >= target for r in checks),
        }
        for name, target in TARGETS.items()
    } if checks else {}  # fmt: skip
    print("targets:", summary)
    result = {"matmul_tflops": peak, "dtype": str(dtype), "rows": rows, "targets": summary}
    save_result("attention_flash", result, plot(rows, peak), out_dir=args.out)
    return result


def plot(rows: list[dict], peak: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["direction"], r["D"], r["causal"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False)
    for ax, (pass_, D, causal) in zip(axes[0], panels, strict=True):
        sel = [r for r in rows if (r["direction"], r["D"], r["causal"]) == (pass_, D, causal)]
        for name in sel[0]["tflops"]:
            pts = [(r["N"], r["tflops"].get(name)) for r in sel if r["tflops"].get(name)]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=name)
        ax.axhline(peak, color="gray", ls=":", label="matmul peak")
        ax.set(xscale="log", title=f"{pass_} D={D} {'causal' if causal else 'full'}",
               xlabel="sequence length N", ylabel="TFLOP/s")  # fmt: skip
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
