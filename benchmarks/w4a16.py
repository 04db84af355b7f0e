"""W4A16 matmul: the Triton kernel vs bf16 torch.matmul vs torch's int4 kernel (GPU).

    python -m benchmarks.w4a16            # H100/H200: batch 1, 4, 16 on 4096^2, 8192^2, Llama-7B
    python -m benchmarks.w4a16 --smoke    # CPU, Triton interpreter, tiny shapes: checks the script

Every kernel computes x (M, K) @ W (K, N) with the same 4-bit codes (group size 128):
  - ours: `minillm.kernels.w4a16.w4a16_matmul` (GPTQ layout, split-K for small M);
  - torch int4: `torch.ops.aten._weight_int4pack_mm` on weights packed by
    `_convert_weight_to_int4pack(uint8 (N, K/2), inner_k_tiles=8)` with scales_and_zeros
    (K/G, N, 2) bf16, w = (q - 8) * scale + zero (torch's own tinygemm kernel);
  - naive: dequantize to bf16, then matmul (the twin);
  - bf16: F.linear with a bf16 weight, the baseline every ratio refers to.
Decoding is memory-bound: GB/s counts the bytes each kernel must read (weights, scales,
zeros, x) and write (y), and is compared with the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch

SHAPES = {  # name -> (K, N)
    "4096x4096": (4096, 4096),
    "8192x8192": (8192, 8192),
    "llama7b-gate/up 4096->11008": (4096, 11008),
    "llama7b-down 11008->4096": (11008, 4096),
}
BATCHES = (1, 4, 16)
GROUP = 128


def torch_int4_operands(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor):
    """codes (N, K) in [0, 16), scales/zeros (G, N) -> torch's packed weight and
    scales_and_zeros, for w = (q - 8) * scale + (8 - z) * scale = (q - z) * scale."""
    packed_u8 = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)  # (N, K/2), even k high
    w_packed = torch.ops.aten._convert_weight_to_int4pack(packed_u8.contiguous(), 8)
    zero_f = (8 - zeros.float()) * scales.float()  # (G, N)
    sz = torch.stack([scales.float(), zero_f], dim=-1).to(torch.bfloat16).contiguous()  # (G, N, 2)
    return w_packed, sz


def naive(x, qweight, scales, qzeros, group_size, dtype):
    """The naive twin: dequantize to the activation dtype, then matmul."""
    from minillm.kernels.w4a16 import dequantize_int4

    return x @ dequantize_int4(qweight, scales, qzeros, group_size, dtype)


def run(shapes: dict, batches: tuple, device: str, smoke: bool) -> dict:
    from minillm.kernels.w4a16 import _TUNED, TUNE_TIMES, dequantize_int4, w4a16_matmul

    from minillm.bench import l2_rotation, measure_copy_bandwidth, time_cuda_graph, time_fn
    from minillm.quant.packing import pack_cols, pack_rows

    dtype = torch.float32 if smoke else torch.bfloat16  # the interpreter's bf16 dot is broken
    copy_bw = measure_copy_bandwidth(2**22 if smoke else 2**30, device=device)
    rows = []
    g = torch.Generator(device="cpu").manual_seed(0)
    for name, (K, N) in shapes.items():
        G = K // GROUP
        codes = torch.randint(0, 16, (N, K), generator=g, dtype=torch.int32).to(device)
        zeros = torch.randint(0, 16, (G, N), generator=g, dtype=torch.int32).to(device)
        scales = (torch.rand(G, N, generator=g) * 0.02 + 0.001).half()
        qweight = pack_rows(codes.t().contiguous(), 4).to(device)
        qzeros = pack_cols(zeros, 4).to(device)
        scales_d = scales.to(device)
        w_ref = dequantize_int4(qweight, scales_d, qzeros, GROUP, torch.float32)  # (K, N)
        w_dense = w_ref.to(dtype).t().contiguous()  # (N, K): the bf16 baseline's weight
        int4 = None
        if device == "cuda":
            try:
                int4 = torch_int4_operands(codes, scales_d, zeros)
            except Exception as e:
                print(f"torch int4 packing failed: {e}", file=sys.stderr)
        q_bytes = qweight.numel() * 4 + qzeros.numel() * 4 + scales_d.numel() * 2
        dense_bytes = w_dense.numel() * w_dense.element_size()
        # Copies of every operand, so the timed calls stream weights from memory (not L2).
        n_q = l2_rotation(q_bytes) if device == "cuda" else 1
        n_d = l2_rotation(dense_bytes) if device == "cuda" else 1
        q_copies = [(qweight.clone(), scales_d.clone(), qzeros.clone()) for _ in range(n_q)]
        d_copies = [w_dense.clone() for _ in range(n_d)]
        i4_copies = [(int4[0].clone(), int4[1].clone()) for _ in range(n_q)] if int4 else []
        for M in batches:
            x = torch.randn(M, K, generator=g).to(device, dtype)
            io_bytes = x.numel() * x.element_size() + M * N * x.element_size()
            ref = x.float() @ w_ref
            fns = {
                "bf16": [partial(torch.nn.functional.linear, x, w) for w in d_copies],
                "ours": [partial(w4a16_matmul, x, *q, GROUP) for q in q_copies],
                "naive": [partial(naive, x, *q, GROUP, dtype) for q in q_copies[:2]],
            }
            if int4 is not None:
                fns["torch_int4"] = [
                    partial(torch.ops.aten._weight_int4pack_mm, x, w, GROUP, sz)
                    for w, sz in i4_copies
                ]
            row = {"shape": name, "K": K, "N": N, "M": M, "operand_copies": n_q}
            for label, fn_list in fns.items():
                try:
                    err = float((fn_list[0]().float() - ref).abs().max() / ref.abs().max())
                    if device == "cuda":
                        t = time_cuda_graph(fn_list, calls=8 if label == "naive" else 64)
                    else:
                        t = time_fn(fn_list[0], device=device, warmup=2, repeat=3)
                except Exception as e:
                    row[label] = {"error": str(e)[:200]}
                    continue
                nbytes = io_bytes + (dense_bytes if label == "bf16" else q_bytes)
                row[label] = {"us": t * 1e6, "GBps": nbytes / t / 1e9, "max_rel_err": err}
            t_bf16 = row["bf16"]["us"]
            row["bf16"]["frac_copy_bw"] = row["bf16"]["GBps"] * 1e9 / copy_bw
            for label in ("ours", "torch_int4", "naive"):
                if "us" in row.get(label, {}):
                    row[label]["speedup_vs_bf16"] = t_bf16 / row[label]["us"]
                    row[label]["frac_copy_bw"] = row[label]["GBps"] * 1e9 / copy_bw
            rows.append(row)
            cells = [f"{name:28s} M={M:<3d}"]
            for label in ("bf16", "ours", "torch_int4", "naive"):
                r = row.get(label, {})
                cells.append(
                    f"{label} "
                    + (
                        f"{r['us']:8.1f}us {r.get('speedup_vs_bf16', 1):4.2f}x"
                        f" {r['frac_copy_bw']:4.0%}bw"
                        if "us" in r
                        else "   n/a"
                    )
                )
            print("  ".join(cells), flush=True)
        del q_copies, d_copies, i4_copies
    tuned = {str(k[:4]): vars(v) for k, v in _TUNED.items()}
    candidates = {
        str(k[:4]): sorted(
            ({**vars(c), "ms": ms} for c, ms in times.items()), key=lambda r: r["ms"]
        )[:12]
        for k, times in TUNE_TIMES.items()
    }
    return {
        "timing": (
            "GPU time per call, from a CUDA graph of 64 calls cycling through copies of the "
            "operands that together exceed 3x the L2 cache (as in a decode step's graph)"
            if device == "cuda"
            else "CPU wall time (interpreter smoke run)"
        ),
        "copy_bandwidth_GBps": copy_bw / 1e9,
        "dtype": str(dtype),
        "group_size": GROUP,
        "rows": rows,
        "tuned_configs": tuned,
        "fastest_candidates": candidates,
    }


def plot(result: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [f"{r['shape'].split(' ')[0]}\nM={r['M']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.7), 4))
    width = 0.38
    for i, (key, color) in enumerate([("ours", "C2"), ("torch_int4", "C0")]):
        vals = [r.get(key, {}).get("speedup_vs_bf16", 0) for r in rows]
        ax.bar(
            [j + (i - 0.5) * width for j in range(len(rows))], vals, width, color=color, label=key
        )
    ax.axhline(1, color="k", lw=0.8, ls="--", label="bf16 matmul")
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("speedup over bf16 matmul")
    ax.set_title("W4A16 (group 128) vs bf16 torch.matmul")
    ax.legend()
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny shapes")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined
        shapes, batches, device = {"tiny 256->128": (256, 128)}, (1, 4), "cpu"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("the full benchmark needs a CUDA GPU (use --smoke on CPU)")
        shapes, batches, device = SHAPES, BATCHES, "cuda"
    from minillm.bench import save_result

    result = run(shapes, batches, device, args.smoke)
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp()) if args.smoke else None)
    path = save_result("w4a16", result, plot(result), out)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
