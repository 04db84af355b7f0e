"""Paged decode benchmark: minillm's Triton paged-attention kernel (one pass and split-K)
against the naive path (gather the pages into a contiguous copy, then SDPA), in GB/s.

A decode step must read every cached key and value once, so the bytes of K and V over the
measured time is the kernel's bandwidth; its ceiling is the device copy bandwidth measured
in the same run. Shapes: Llama-3-8B's attention (H=32, Hkv=8, D=128), bf16, pages of 16
tokens scattered at random over the pool, batch 1..128, context 512..32k.

    python -m benchmarks.attention_paged            # GPU: ~1-2 minutes on an H200
    python -m benchmarks.attention_paged --smoke    # seconds on a CPU (checks the script)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from minillm.bench import measure_copy_bandwidth, save_result, time_fn
from minillm.cache.paged import gather_kv

TARGETS = {"fraction_of_copy_bandwidth": 0.7, "speedup_vs_naive": 5.0}  # B >= 32, ctx >= 4k


def naive_decode(q, k_cache, v_cache, block_tables, context_lens):
    """Gather the pages into (B, Hkv, S, D) copies, then dense SDPA (GQA-aware; a padding mask
    only when the lengths differ, so that SDPA may pick its fastest kernel)."""
    k = gather_kv(k_cache, block_tables, context_lens)
    v = gather_kv(v_cache, block_tables, context_lens)
    mask = None
    if not bool((context_lens == k.shape[2]).all()):
        mask = torch.arange(k.shape[2], device=q.device)[None, :] < context_lens[:, None]
        mask = mask[:, None, None]  # (B, 1, 1, S)
    out = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask, enable_gqa=True)
    return out[:, :, 0]  # (B, H, D)


def make_case(B, ctx, H, Hkv, D, page, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    blocks = -(-ctx // page)
    num_blocks = B * blocks
    k_cache = torch.randn(num_blocks, page, Hkv, D, generator=g, device=device, dtype=dtype)
    v_cache = torch.randn(num_blocks, page, Hkv, D, generator=g, device=device, dtype=dtype)
    perm = torch.randperm(num_blocks, generator=g, device=device)
    block_tables = perm.view(B, blocks).to(torch.int32)  # pages scattered over the pool
    context_lens = torch.full((B,), ctx, dtype=torch.int32, device=device)
    q = torch.randn(B, H, D, generator=g, device=device, dtype=dtype)
    return q, k_cache, v_cache, block_tables, context_lens


def measure_case(B, ctx, H, Hkv, D, page, dtype, device, repeat, copy_bw) -> dict:
    """Time the kernel (split-K and one pass) and the naive path on one shape. Each timing
    covers `inner` back-to-back calls, so that the GPU, not the Python launch, sets the pace
    even for the shortest kernels (a decode step of 8 sequences of 512 tokens is ~10 us)."""
    from minillm.kernels.paged_attention import default_num_splits, paged_attention

    q, kc, vc, bt, cl = make_case(B, ctx, H, Hkv, D, page, dtype, device)
    elem = q.element_size()
    kv_bytes = 2 * B * ctx * Hkv * D * elem
    moved = kv_bytes + 2 * q.numel() * elem + bt.numel() * 4  # + q, out, block tables
    fast = dict(max_context_len=ctx, check_bounds=False)
    fns = {
        "paged_split": lambda: paged_attention(q, kc, vc, bt, cl, **fast),
        "paged_one_pass": lambda: paged_attention(q, kc, vc, bt, cl, num_splits=1, **fast),
        "naive_gather_sdpa": lambda: naive_decode(q, kc, vc, bt, cl),
    }
    inner = 1 if device == "cpu" else 20
    ref = fns["paged_one_pass"]().float()
    splits = default_num_splits(B * Hkv, ctx, q.device)
    row = dict(B=B, context=ctx, kv_bytes=kv_bytes, num_splits=splits, seconds={}, gb_per_s={})
    for name, fn in fns.items():
        try:
            row[f"max_abs_diff_{name}"] = (fn().float() - ref).abs().max().item()
            s = time_fn(lambda fn=fn: [fn() for _ in range(inner)], warmup=min(2, repeat),
                        repeat=repeat, device=device) / inner  # fmt: skip
        except torch.OutOfMemoryError:  # the naive copies of the largest cases
            print(f"    {name}: out of memory")
            continue
        row["seconds"][name], row["gb_per_s"][name] = s, moved / s / 1e9
    best = min(row["seconds"]["paged_split"], row["seconds"]["paged_one_pass"])
    row["fraction_of_copy_bandwidth"] = moved / best / copy_bw
    naive = row["seconds"].get("naive_gather_sdpa")
    row["speedup_vs_naive"] = naive / best if naive else None
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, any device")
    parser.add_argument("--out", type=Path, default=None, help="results folder")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        batches, contexts, (H, Hkv, D), repeat = [1, 2], [300], (4, 2, 32), 1
    else:
        batches, contexts, (H, Hkv, D), repeat = (
            [1, 8, 32, 128],
            [512, 4096, 32768],
            (32, 8, 128),
            5,
        )
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    page = 16
    copy_bw = measure_copy_bandwidth(2**30 if device == "cuda" else 2**24, device=device)
    print(f"device {device}, copy bandwidth {copy_bw / 1e9:.0f} GB/s")
    rows = []
    for B in batches:
        for ctx in contexts:
            row = measure_case(B, ctx, H, Hkv, D, page, dtype, device, repeat, copy_bw)
            rows.append(row)
            cells = "  ".join(f"{n} {v:7.0f} GB/s" for n, v in row["gb_per_s"].items())
            print(f"B={B:4} ctx={ctx:6}  {cells}  -> {row['fraction_of_copy_bandwidth']:.0%} "
                  f"of copy, {row['speedup_vs_naive'] or 0:.1f}x naive")  # fmt: skip
    checks = [r for r in rows if r["B"] >= 32 and r["context"] >= 4096]
    summary = {
        key: {
            "target": target,
            "worst": min((r[key] or 0.0) for r in checks),
            "met": all((r[key] or 0.0) >= target for r in checks),
            "not_measured": [(r["B"], r["context"]) for r in checks if r[key] is None],
        }
        for key, target in TARGETS.items()
    } if checks else {}  # fmt: skip
    print("targets:", summary)
    result = {"copy_bandwidth_bytes_per_s": copy_bw, "dtype": str(dtype), "page_size": page,
              "shape": dict(H=H, Hkv=Hkv, D=D), "rows": rows, "targets": summary}  # fmt: skip
    save_result("attention_paged", result, plot(rows, copy_bw), out_dir=args.out)
    return result


def plot(rows: list[dict], copy_bw: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for B in sorted({r["B"] for r in rows}):
        sel = [r for r in rows if r["B"] == B]
        ctx = [r["context"] for r in sel]
        best = [max(r["gb_per_s"]["paged_split"], r["gb_per_s"]["paged_one_pass"]) for r in sel]
        ax1.plot(ctx, best, marker="o", label=f"paged, B={B}")
        naive = [(r["context"], r["gb_per_s"].get("naive_gather_sdpa")) for r in sel]
        naive = [p for p in naive if p[1]]
        if naive:
            ax1.plot(*zip(*naive, strict=True), ls="--", marker="x", label=f"naive, B={B}")
        speed = [(r["context"], r["speedup_vs_naive"]) for r in sel if r["speedup_vs_naive"]]
        if speed:
            ax2.plot(*zip(*speed, strict=True), marker="o", label=f"B={B}")
    ax1.axhline(copy_bw / 1e9, color="gray", ls=":", label="copy bandwidth")
    ax1.set(xscale="log", xlabel="context length", ylabel="GB/s (K+V bytes / time)",
            title="paged decode bandwidth")  # fmt: skip
    ax2.set(xscale="log", xlabel="context length", ylabel="x faster than gather + SDPA",
            title="speedup over the naive path")  # fmt: skip
    ax1.legend(fontsize=6, ncol=2)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
