"""QLoRA on the bundled model: the `__repr__` task before and after, loss curve, merging.

The base is quantized to NF4 (double quantization) and frozen; LoRA adapters on every
attention and MLP projection are trained on the task of `minillm.quant.qlora_task`.
The baseline, measured in the same run, is the base model's held-out exact match.

    python -m benchmarks.qlora_finetune             # CPU: a few minutes
    python -m benchmarks.qlora_finetune --smoke     # seconds: checks the script
"""

from __future__ import annotations

import argparse
import time

import torch

import minillm
from minillm.bench import save_result
from minillm.quant.nf4 import NF4Quantizer, dequantized_copy
from minillm.quant.qlora import add_lora, finetune_memory, merge_lora
from minillm.quant.qlora_task import make_split, repr_accuracy, train_adapters


def run(
    model_name: str,
    steps: int,
    batch_size: int,
    n_eval: int,
    r: int,
    device: str,
    max_new: int = 64,
) -> dict:
    torch.manual_seed(0)
    tok = minillm.load_tokenizer(model_name)
    model = NF4Quantizer().apply(minillm.load_model(model_name, device=device), progress=False)
    heldout = make_split("heldout", n_eval)
    # generation dequantizes once (dequantized_copy): same weights, same outputs, faster
    before = repr_accuracy(dequantized_copy(model), tok, heldout, max_new)
    params = add_lora(model, r=r, alpha=2 * r)
    t0 = time.perf_counter()
    losses = train_adapters(model, tok, params, steps=steps, batch_size=batch_size)
    train_seconds = time.perf_counter() - t0
    evaluated = dequantized_copy(model)
    after = repr_accuracy(evaluated, tok, heldout, max_new)
    example = heldout[0]
    completion = tok.decode(minillm.generate(evaluated, tok.encode(example.prompt), max_new))
    merged = repr_accuracy(merge_lora(model), tok, heldout, max_new)
    print(f"held-out exact match: {before:.2f} -> {after:.2f} (merged {merged:.2f})")
    return {
        "model": model_name, "steps": steps, "batch_size": batch_size, "lora_rank": r,
        "trainable_params": sum(p.numel() for p in params),
        "base_params": model.config.num_parameters(), "losses": losses,
        "heldout_examples": n_eval, "exact_match_before": before, "exact_match_after": after,
        "exact_match_merged": merged, "ratio_after_to_before": after / max(before, 1e-9),
        "train_seconds": train_seconds, "example_prompt": example.prompt,
        "example_completion": completion.split("\n")[0],
        "memory_65b_gb": {m: finetune_memory(m).total_gb for m in ("full", "lora", "qlora")},
    }  # fmt: skip


def plot(result: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    ax.plot(result["losses"], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("completion loss")
    ax.set_title(
        f"QLoRA r={result['lora_rank']} on NF4 {result['model']}: held-out exact match "
        f"{result['exact_match_before']:.0%} -> {result['exact_match_after']:.0%}",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    return fig


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny run that checks the script")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        result = run("minillm-tiny-draft", 2, 2, 1, 4, args.device, max_new=4)
    else:
        result = run("minillm-tiny", args.steps, 16, 40, 16, args.device)
    name = "qlora_finetune_smoke" if args.smoke else "qlora_finetune"
    print("->", save_result(name, result, plot(result), out_dir=args.out_dir))


if __name__ == "__main__":
    main()
