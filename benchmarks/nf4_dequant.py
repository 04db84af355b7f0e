"""NF4 dequantization bandwidth: the Triton kernel vs its naive PyTorch twin (GPU).

Bytes moved per weight: 0.5 (codes) + 1/64 (int8 absmax) + output (2 in bf16). The
result reports GB/s of both, their ratio, and the fraction of the device's measured
copy bandwidth (`minillm.bench.measure_copy_bandwidth`, same run). A Q4_K GGUF
dequantization (PyTorch ops) is measured beside them for reference.

    python -m benchmarks.nf4_dequant            # CUDA GPU
    python -m benchmarks.nf4_dequant --smoke    # CPU, Triton interpreter, seconds
"""

from __future__ import annotations

import argparse
import os

import torch


def run(sizes: list[tuple[int, int]], device: str, repeat: int) -> dict:
    from minillm.kernels.nf4 import dequantize_nf4_naive, dequantize_nf4_triton

    from minillm.bench import measure_copy_bandwidth, time_fn
    from minillm.quant.gguf import dequantize_tensor
    from minillm.quant.nf4 import NF4Tensor

    copy_bw = measure_copy_bandwidth(2**28, device) if device == "cuda" else None
    rows = []
    for out_f, in_f in sizes:
        torch.manual_seed(0)
        t = NF4Tensor.from_weight(torch.randn(out_f, in_f, device=device))
        args = (t.packed, t.absmax_q, t.absmax_scale, t.absmax_mean, t.codebook, t.numel)
        n = t.numel
        moved = n * (0.5 + 1 / 64 + 2)  # bytes read + written, bf16 output
        triton_s = time_fn(lambda a=args: dequantize_nf4_triton(*a, dtype=torch.bfloat16),
                           warmup=2, repeat=repeat, device=device)  # fmt: skip
        naive_s = time_fn(lambda a=args: dequantize_nf4_naive(*a, dtype=torch.bfloat16),
                          warmup=2, repeat=repeat, device=device)  # fmt: skip
        # decoding speed does not depend on the bytes: random Q4_K blocks (144 B / 256 weights)
        raw = torch.randint(0, 256, (out_f, in_f // 256 * 144), dtype=torch.uint8, device=device)
        q4k_s = time_fn(lambda r=raw: dequantize_tensor(r, "Q4_K"), warmup=2, repeat=repeat,
                        device=device)  # fmt: skip
        row = {"shape": [out_f, in_f], "triton_gbps": moved / triton_s / 1e9,
               "naive_gbps": moved / naive_s / 1e9, "speedup": naive_s / triton_s,
               "q4_k_torch_gbps": n * (4.5 / 8 + 4) / q4k_s / 1e9}  # fmt: skip
        if copy_bw:
            row["triton_fraction_of_copy_bw"] = row["triton_gbps"] * 1e9 / copy_bw
        rows.append(row)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return {"device": device, "copy_bandwidth_gbps": copy_bw and copy_bw / 1e9, "rows": rows}


def plot(result: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    labels = ["x".join(map(str, r["shape"])) for r in result["rows"]]
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], [r["triton_gbps"] for r in result["rows"]], 0.4, label="Triton")
    ax.bar([i + 0.2 for i in x], [r["naive_gbps"] for r in result["rows"]], 0.4, label="PyTorch")
    if result["copy_bandwidth_gbps"]:
        ax.axhline(result["copy_bandwidth_gbps"], color="k", ls="--", lw=1, label="copy bandwidth")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("GB/s")
    ax.set_title(f"NF4 dequantization ({result['device']})")
    ax.legend()
    return fig


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny sizes")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        result = run([(64, 256)], "cpu", repeat=1)
        name = "nf4_dequant_smoke"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("the full benchmark needs a CUDA GPU (or use --smoke)")
        result = run([(4096, 4096), (8192, 8192), (14336, 4096)], "cuda", repeat=20)
        name = "nf4_dequant"
    from minillm.bench import save_result

    print("->", save_result(name, result, plot(result), out_dir=args.out_dir))


if __name__ == "__main__":
    main()
