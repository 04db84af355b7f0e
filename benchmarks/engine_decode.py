"""Batch-1 decode speed of the engine against the memory-bandwidth roofline, and HF generate.

Decoding one sequence reads every weight (and the sequence's cached K/V) once per token,
so its speed limit is the memory bandwidth:

    roofline tokens/s = copy bandwidth / (weight bytes + KV bytes of the context)

(the embedding table, of which a step reads one row, is not counted unless it is tied to
the LM head). The engine decodes one request of `new` tokens after a 128-token prompt;
its decode rate is the tokens after the first over their time span. Variants: eager
steps; CUDA graphs without and with fused layers; multi-step decoding (8 greedy steps
per engine step, vLLM's `num_scheduler_steps`). The baseline is transformers' `generate`
on a twin with the same weights (decode rate from two runs of different lengths).

    python -m benchmarks.engine_decode            # GPU: Llama-3.2-1B and Llama-2-7B shapes
    python -m benchmarks.engine_decode --smoke    # seconds, CPU, tiny random model
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.engine_common import build_model, decode_rate, free_memory, hf_generate, hf_twin
from minillm.bench import measure_copy_bandwidth, save_result
from minillm.engine import LLM, SamplingParams
from minillm.memory import kv_cache_bytes_per_token, weight_bytes

SETTINGS = {
    "cuda": dict(shapes=["llama-3.2-1b", "llama-2-7b"], new=256, hf_new=24, eager_new=32,
                 prompt=128, dtype=torch.bfloat16, copy=2**30),
    "smoke": dict(shapes=["smoke"], new=24, hf_new=6, eager_new=8, prompt=16,
                  dtype=torch.float32, copy=2**22),
}  # fmt: skip
VARIANTS = [  # (label, LLM keyword arguments, fused?)
    ("engine, eager steps", dict(cuda_graphs=False), True),
    ("engine, CUDA graphs, unfused", dict(), False),
    ("engine, CUDA graphs, fused", dict(), True),
    ("engine, CUDA graphs, fused, multi-step 8", dict(num_scheduler_steps=8), True),
]


def bytes_per_token(model, context: int) -> int:
    c = model.config
    w = weight_bytes(c, model.dtype)
    if not c.tie_word_embeddings:  # a step reads one row of the input embedding
        w -= c.vocab_size * c.hidden_size * model.dtype.itemsize
    return w + context * kv_cache_bytes_per_token(c, model.dtype)


def measure_shape(shape: str, s: dict, device: str, copy_bw: float, progress) -> list[dict]:
    model = build_model(shape, device, s["dtype"])
    prompt = list(range(1, s["prompt"] + 1))
    rows = []
    roofline = copy_bw / bytes_per_token(model, s["prompt"] + s["new"] // 2)

    def row(label, tok_s, **extra):
        rows.append(dict(shape=shape, variant=label, tokens_per_s=tok_s,
                         fraction_of_roofline=tok_s / roofline, roofline_tokens_per_s=roofline,
                         **extra))  # fmt: skip
        progress(f"{shape:14} {label:42} {tok_s:9.1f} tok/s  {tok_s / roofline:6.1%} of roofline")

    hf = hf_twin(model)  # before fusion rewrites the model's modules
    hf_generate(hf, [prompt], 2)  # warm-up
    short, long = hf_generate(hf, [prompt], 1), hf_generate(hf, [prompt], 1 + s["hf_new"])
    row("HF transformers generate", s["hf_new"] / (long - short))
    del hf
    free_memory()
    for label, kwargs, fused in VARIANTS:
        new = s["eager_new"] if kwargs.get("cuda_graphs") is False else s["new"]
        try:
            llm = LLM(model, None, fuse=fused, max_num_seqs=1, max_model_len=s["prompt"] + new + 16,
                      kv_cache_memory=2**28, **kwargs)  # fmt: skip
            params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
            llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
            (out,) = llm.generate([prompt], params)
            row(
                label, decode_rate(out), new_tokens=new, graphs=llm.engine.runner.graphs is not None
            )
        except Exception as e:  # a failing variant is reported, the others still run
            rows.append(dict(shape=shape, variant=label, error=f"{type(e).__name__}: {e}"[:300]))
            progress(f"{shape:14} {label:42} failed: {e}")
        finally:
            llm = None
            free_memory()
    del model
    free_memory()
    return rows


def plot(rows: list[dict], device_name: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 3.8), squeeze=False)
    for ax, shape in zip(axes[0], shapes, strict=True):
        ok = [r for r in rows if r["shape"] == shape and "error" not in r]
        ax.barh([r["variant"] for r in ok], [100 * r["fraction_of_roofline"] for r in ok])
        ax.axvline(60, color="C3", ls="--", label="target 60%")
        for i, r in enumerate(ok):
            ax.text(100 * r["fraction_of_roofline"], i, f" {r['tokens_per_s']:.0f} tok/s",
                    va="center", fontsize=8)  # fmt: skip
        ax.set(xlabel="% of the bandwidth roofline", title=f"{shape}, batch 1 ({device_name})")
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a seconds-long CPU run")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("this benchmark needs a CUDA GPU (or --smoke)")
    device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        torch.set_num_threads(1)  # tiny ops: one thread is fastest
    s = SETTINGS["smoke" if args.smoke else "cuda"]
    copy_bw = measure_copy_bandwidth(s["copy"], device=device)
    rows = []
    for shape in s["shapes"]:
        rows += measure_shape(shape, s, device, copy_bw, print)
    best = {}
    for r in rows:
        if "error" not in r and r["variant"].startswith("engine"):
            b = best.get(r["shape"])
            if b is None or r["tokens_per_s"] > b["tokens_per_s"]:
                best[r["shape"]] = r
    hf = {r["shape"]: r for r in rows if r["variant"].startswith("HF")}
    headline = {
        shape: dict(variant=r["variant"], tokens_per_s=r["tokens_per_s"],
                    fraction_of_roofline=r["fraction_of_roofline"],
                    speedup_vs_hf=r["tokens_per_s"] / hf[shape]["tokens_per_s"],
                    target_fraction=0.6, met=r["fraction_of_roofline"] >= 0.6)
        for shape, r in best.items()
    }  # fmt: skip
    data = dict(settings={k: str(v) for k, v in s.items()}, copy_bandwidth_gb_per_s=copy_bw / 1e9,
                headline=headline, rows=rows)  # fmt: skip
    name = "engine_decode" + ("_smoke" if args.smoke else "")
    device_name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    return save_result(name, data, plot(rows, device_name), args.out)


if __name__ == "__main__":
    main()
