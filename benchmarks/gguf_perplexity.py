"""Bits per weight vs held-out perplexity of the bundled model: GGUF file types and NF4.

Every configuration quantizes the same model and is scored on the same held-out tokens
(so the comparisons are paired); F16 is the baseline measured in the same run. The
targets: Q8_0 within 0.2% of F16, Q4_K_M within 3% and better than Q4_0, Q5_K_M between.
"Q4_K_M (no search)" is the same mixture with plain round-to-nearest K-quants.

    python -m benchmarks.gguf_perplexity            # CPU: a few minutes
    python -m benchmarks.gguf_perplexity --smoke    # seconds: checks the script
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import minillm
from minillm.bench import save_result
from minillm.data import shipped_heldout_documents, tokenize_documents
from minillm.evaluate import perplexity
from minillm.quant.gguf import LAYOUTS, GGUFQuantizer
from minillm.quant.nf4 import NF4Quantizer

CONFIGS = ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_K_M (no search)", "Q4_0", "NF4"]


def bits_per_weight(state: dict, kind: str) -> float:
    """Bits per weight over every matrix the scheme stores quantized."""
    if kind == "gguf":
        mats = [t for t in state.values() if len(t.shape) == 2]
        bits = sum(8 * t.raw.size for t in mats)
        return bits / sum(t.shape[0] * t.shape[1] for t in mats)
    bits = sum(sum(s["weight"].storage_bits().values()) for s in state.values())
    return bits / sum(s["weight"].numel for s in state.values())


def run(model_name: str, seq_len: int, n_tokens: int, configs: list[str], device: str) -> dict:
    tok = minillm.load_tokenizer(model_name)
    tokens = tokenize_documents(tok, shipped_heldout_documents())[:n_tokens]
    base = minillm.load_model(model_name, device=device)
    rows = []
    for name in configs:
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        if name == "NF4":
            quantizer, kind = NF4Quantizer(), "nf4"
        else:
            ftype = name.split(" ")[0]
            quantizer, kind = GGUFQuantizer(ftype, search="no search" not in name), "gguf"
        state = quantizer.quantize(model, progress=False)
        model = quantizer.convert(model, state)
        seconds = time.perf_counter() - t0
        ppl = perplexity(model, tokens, seq_len=seq_len, batch_size=4)
        rows.append({"config": name, "bits_per_weight": bits_per_weight(state, kind),
                     "perplexity": ppl, "quantize_seconds": seconds})  # fmt: skip
        print(f"{name:20s} {rows[-1]['bits_per_weight']:6.3f} bits  ppl {ppl:.4f}", flush=True)
    f16 = next(r["perplexity"] for r in rows if r["config"] == "F16")
    for r in rows:
        r["ratio_to_f16"] = r["perplexity"] / f16
    by = {r["config"]: r["ratio_to_f16"] for r in rows}
    targets = {}
    if {"Q8_0", "Q4_K_M", "Q4_0", "Q5_K_M"} <= set(by):
        targets = {
            "q8_0_within_0.2pct": by["Q8_0"] - 1 <= 0.002,
            "q4_k_m_within_3pct": by["Q4_K_M"] - 1 <= 0.03,
            "q4_k_m_better_than_q4_0": by["Q4_K_M"] < by["Q4_0"],
            "q5_k_m_between": by["Q4_K_M"] >= by["Q5_K_M"] >= by["Q8_0"],
        }
    return {"model": model_name, "seq_len": seq_len, "tokens": len(tokens),
            "rows": rows, "targets": targets,
            "k_quant_bits": {t.name: LAYOUTS[t].bits_per_weight for t in LAYOUTS}}  # fmt: skip


def plot(result: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in result["rows"]:
        ax.scatter(
            r["bits_per_weight"], r["perplexity"], color="C3" if r["config"] == "NF4" else "C0"
        )
        ax.annotate(r["config"], (r["bits_per_weight"], r["perplexity"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")  # fmt: skip
    ax.set_xlabel("bits per weight (quantized matrices)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(f"{result['model']}: {result['tokens']} held-out tokens")
    ax.grid(alpha=0.3)
    return fig


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny run that checks the script")
    p.add_argument("--tokens", type=int, default=24 * 1024)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        result = run("minillm-tiny-draft", 128, 256, ["F16", "Q8_0", "NF4"], args.device)
    else:
        result = run("minillm-tiny", 1024, args.tokens, CONFIGS, args.device)
    name = "gguf_perplexity_smoke" if args.smoke else "gguf_perplexity"
    path = save_result(name, result, plot(result), out_dir=args.out_dir)
    print("targets:", result["targets"], "->", path)


if __name__ == "__main__":
    main()
