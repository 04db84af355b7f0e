"""Tokens/s without and with a KV cache as the sequence grows; cache memory vs the calculator.

Without a cache, the next token at length S costs a forward over all S tokens
(~2 x params x S FLOPs); with one, a decode step costs ~2 x params FLOPs and reads the
weights plus the cached keys/values once, so it is memory-bound. For each S we time
  - the baseline: the reference loop's step, `model(ids[:, :S])`, full recompute;
  - the cached step: `model(token, position S, cache)` on a cache holding S positions;
and report tokens/s, their ratio, the cached step's achieved bandwidth
((weight bytes + KV bytes) / step time) as a fraction of the measured copy bandwidth, and
the cache's bytes next to `minillm.memory.kv_cache_bytes` (plus, on CUDA, what the
allocator saw). An end-to-end run generates the same tokens both ways.

    python -m benchmarks.kv_cache                 # CPU: the bundled minillm-tiny, fp32
    python -m benchmarks.kv_cache --device cuda   # GPU: Llama-3.2-1B shape, random bf16
    python -m benchmarks.kv_cache --smoke         # seconds, on a tiny random model
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import minillm
from minillm.bench import measure_copy_bandwidth, save_result, time_fn
from minillm.cache import StaticKVCache
from minillm.memory import kv_cache_bytes, weight_bytes

SETTINGS = {
    "cpu": dict(lengths=[32, 64, 128, 256, 512, 1000], new_tokens=256, repeat=10, copy=2**27),
    "cuda": dict(lengths=[128, 512, 1024, 2048, 4096, 8192], new_tokens=512, repeat=20, copy=2**30),
    "smoke": dict(lengths=[8, 16, 32], new_tokens=8, repeat=2, copy=2**20),
}


def build_model(device: str, smoke: bool) -> tuple[minillm.CausalLM, str]:
    if smoke:
        config = minillm.ModelConfig(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        torch.manual_seed(0)
        return minillm.CausalLM(config).to(device).eval(), "tiny random (smoke)"
    if device == "cpu":
        return minillm.load_model("minillm-tiny"), "minillm-tiny (fp32)"
    config = minillm.ModelConfig.from_name("llama-3.2-1b")
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):  # built on the GPU directly: 1.2B parameters
            model = minillm.CausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    return model, "Llama-3.2-1B shape, random weights (bf16)"


@torch.no_grad()
def run(device: str, smoke: bool, out_dir: Path | None, batch_size: int = 1) -> Path:
    s = SETTINGS["smoke" if smoke else device]
    model, label = build_model(device, smoke)
    config, dtype = model.config, model.dtype
    lengths = [n for n in s["lengths"] if n < config.max_position_embeddings]
    S_max = max(lengths) + 1
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch_size, S_max), generator=g).to(device)
    copy_bw = measure_copy_bandwidth(s["copy"], device=device)
    w_bytes = weight_bytes(config, dtype)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    sync()
    if device == "cuda":
        torch.cuda.empty_cache()  # no cached free block to serve (and round) the allocation
    allocated_before = torch.cuda.memory_allocated() if device == "cuda" else None
    cache = StaticKVCache(config, batch_size, S_max, dtype, device)
    sync()
    allocated = torch.cuda.memory_allocated() - allocated_before if device == "cuda" else None
    memory = {
        "max_seq_len": S_max,
        "batch_size": batch_size,
        "cache_nbytes": cache.nbytes,
        "calculator_bytes": kv_cache_bytes(config, S_max, batch_size, dtype),
        "cuda_allocated_bytes": allocated,
    }
    model(ids, None, cache, check_inputs=False)  # fill every position once

    rows = []
    # Longest first: crop(S) can only shorten the cache, so each length starts from a cache
    # holding at least S positions, and every timed step appends position S to exactly S.
    for S in sorted(lengths, reverse=True):
        no_cache = time_fn(
            lambda S=S: model(ids[:, :S], check_inputs=False), 2, s["repeat"], device
        )
        token, position = ids[:, S : S + 1], torch.tensor([S], device=device)

        def step(S=S, token=token, position=position):
            cache.crop(S)  # the cache holds S positions; the step appends position S
            model(token, position, cache, check_inputs=False)

        cached = time_fn(step, 2, s["repeat"], device)
        if cache.seq_len != S + 1:
            raise RuntimeError(f"the cache holds {cache.seq_len} positions, expected {S + 1}")
        step_bytes = w_bytes + kv_cache_bytes(config, S + 1, batch_size, dtype)
        rows.append(
            {
                "seq_len": S,
                "no_cache_tokens_per_s": batch_size / no_cache,
                "cache_tokens_per_s": batch_size / cached,
                "speedup": no_cache / cached,
                "cache_step_bytes": step_bytes,
                "cache_step_gb_per_s": step_bytes / cached / 1e9,
                "fraction_of_copy_bandwidth": step_bytes / cached / copy_bw,
            }
        )
        r = rows[-1]
        print(
            f"S={S:6d}  no cache {r['no_cache_tokens_per_s']:9.1f} tok/s   cache "
            f"{r['cache_tokens_per_s']:9.1f} tok/s   x{r['speedup']:7.1f}   "
            f"{r['cache_step_gb_per_s']:7.1f} GB/s ({r['fraction_of_copy_bandwidth']:.1%} of copy)"
        )

    rows.sort(key=lambda r: r["seq_len"])

    # End to end: the same greedy tokens from the reference loop and the cached loop.
    prompt = ids[0, :16].tolist()
    n = min(s["new_tokens"], config.max_position_embeddings - len(prompt))
    params = minillm.SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    out = {}

    def reference():
        out["ref"] = minillm.generate(model, prompt, n, stop_token_ids=[])

    def with_cache():
        out["cached"] = minillm.generate_cached(model, prompt, params)[0].token_ids

    ref_s = time_fn(reference, 0, 1, device)
    cached_s = time_fn(with_cache, 0, 1, device)
    end_to_end = {
        "prompt_tokens": len(prompt),
        "new_tokens": n,
        "reference_tokens_per_s": n / ref_s,
        "cached_tokens_per_s": n / cached_s,
        "speedup": ref_s / cached_s,
        # Leading tokens on which both loops agree. All of them in fp32; in bf16 the two
        # loops round differently, and a random model's near-flat logits let the argmax flip.
        "matching_prefix_tokens": next(
            (i for i, (a, b) in enumerate(zip(out["ref"], out["cached"], strict=True)) if a != b), n
        ),
    }
    print(
        f"end to end, {n} tokens: reference {end_to_end['reference_tokens_per_s']:.1f} tok/s, "
        f"cached {end_to_end['cached_tokens_per_s']:.1f} tok/s (x{end_to_end['speedup']:.1f}), "
        f"same first {end_to_end['matching_prefix_tokens']} tokens"
    )
    print(
        f"cache of {batch_size} x {S_max} positions: {memory['cache_nbytes']:,} bytes; "
        f"calculator {memory['calculator_bytes']:,}; allocator {allocated}"
    )
    data = {
        "model": label,
        "config": config.to_hf_dict(),
        "dtype": str(dtype),
        "device_kind": device,
        "cpu_threads": torch.get_num_threads(),
        "copy_bandwidth_gb_per_s": copy_bw / 1e9,
        "weight_bytes": w_bytes,
        "rows": rows,
        "end_to_end": end_to_end,
        "memory": memory,
    }
    name = f"kv_cache_{device}" + ("_smoke" if smoke else "")
    return save_result(name, data, plot(rows, memory, label, device), out_dir)


def plot(rows: list[dict], memory: dict, label: str, device: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    S = [r["seq_len"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(S, [r["no_cache_tokens_per_s"] for r in rows], "o-", label="no cache (recompute)")
    ax1.plot(S, [r["cache_tokens_per_s"] for r in rows], "s-", label="KV cache")
    ax1.set(xscale="log", yscale="log", xlabel="sequence length S", ylabel="tokens/s")
    ax1.set_title(f"{label} on {device}", fontsize=10)
    ax1.legend()
    ax2.plot(S, [r["speedup"] for r in rows], "o-", color="C2")
    ax2.set(xscale="log", xlabel="sequence length S", ylabel="speed-up (x)")
    mib = memory["cache_nbytes"] / 2**20
    ax2.set_title(
        f"cache of {memory['max_seq_len']} positions: {mib:.1f} MiB "
        f"(calculator {memory['calculator_bytes'] / 2**20:.1f} MiB)",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run, tiny model")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch default)")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU")
    return run(args.device, args.smoke, args.out, args.batch_size)


if __name__ == "__main__":
    main()
