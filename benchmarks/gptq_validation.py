"""GPTQ's dampening and calibration windows, chosen on the validation split (runs on CPU).

    python -m benchmarks.gptq_validation            # minillm-tiny, 4-bit g128, the grid
    python -m benchmarks.gptq_validation --smoke    # the draft model, two settings, seconds

Every setting is scored on the validation split of the training corpus
(`minillm.quant.report.validation_tokens`), never on the held-out text that
`benchmarks.quant_quality` reports, so the held-out number of the chosen setting is not
biased by the choice. Score: the fraction of RTN's validation perplexity increase that
GPTQ removes,

    cut = 1 - (ppl(GPTQ) - ppl(fp32)) / (ppl(RTN) - ppl(fp32))

GPTQ runs as in the quality table: act-order and the `mse` group range. Grid: dampening
(`damp_percent`) x calibration windows (samples x tokens, from the training split).
`OMP_NUM_THREADS=1` is faster on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import minillm
from minillm.bench import save_result
from minillm.quant import calibration_tokens
from minillm.quant.gptq import GPTQQuantizer
from minillm.quant.report import as_dict, evaluate_scheme, rtn_cut, validation_tokens
from minillm.quant.rtn import RTNQuantizer

DAMPS = (0.01, 0.1, 0.3)
WINDOWS = ((32, 1024), (64, 512), (128, 512))  # (samples, tokens per sample)


def _windows(text: str) -> tuple[int, int]:
    try:
        n, t = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"windows look like 32x1024, got {text!r}") from None
    return n, t


def plot(cuts: dict[tuple[float, tuple[int, int]], float], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    damps = sorted({d for d, _ in cuts})
    windows = list(dict.fromkeys(w for _, w in cuts))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(windows)
    for j, w in enumerate(windows):
        xs = [i + (j - (len(windows) - 1) / 2) * width for i in range(len(damps))]
        ax.bar(xs, [cuts[d, w] for d in damps], width, label=f"{w[0]} x {w[1]} tokens")
    ax.set_xticks(range(len(damps)), [f"damp {d}" for d in damps])
    ax.axhline(0, color="k", lw=0.8)
    ax.set_ylim(min(0, *cuts.values()), 1.3 * max(0, *cuts.values()) + 1e-9)  # room for the legend
    ax.set_ylabel("fraction of RTN's increase removed")
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=len(windows), loc="upper center")
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--smoke", action="store_true", help="draft model, two settings, seconds")
    ap.add_argument("--model", default=None)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--damps", type=float, nargs="+", default=list(DAMPS))
    ap.add_argument("--windows", type=_windows, nargs="+", default=list(WINDOWS))
    ap.add_argument("--max-tokens", type=int, default=65536, help="validation tokens evaluated")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    tok = minillm.load_tokenizer()
    if args.smoke:
        name, group_size, seq_len, max_tokens = args.model or "minillm-tiny-draft", 64, 128, 1024
        damps, windows = [0.01, 0.1], [(2, 64)]
    else:
        name, group_size, seq_len = args.model or "minillm-tiny", 128, None
        damps, windows, max_tokens = args.damps, args.windows, args.max_tokens
    base = minillm.load_model(name)
    tokens = validation_tokens(tok, max_tokens)
    kw = dict(seq_len=seq_len, max_tokens=max_tokens)
    rows = {"fp32": evaluate_scheme("fp32", base, None, tokens, **kw)}
    fp = rows["fp32"].perplexity
    rtn = f"RTN {args.bits}-bit"
    rows[rtn] = evaluate_scheme(
        rtn, base, RTNQuantizer(args.bits, group_size), tokens, None, fp, **kw
    )
    cuts = {}
    for n_cal, cal_len in windows:
        cal = calibration_tokens(tok, n_cal, cal_len)
        for damp in damps:
            label = f"GPTQ {args.bits}-bit damp {damp} cal {n_cal}x{cal_len}"
            q = GPTQQuantizer(args.bits, group_size, desc_act=True, damp_percent=damp, mse=True)
            rows[label] = evaluate_scheme(label, base, q, tokens, cal, fp, **kw)
            cut = cuts[damp, (n_cal, cal_len)] = rtn_cut(rows, label, rtn)
            print(f"{label:40s} ppl {rows[label].perplexity:.4f} cut {cut:.3f}", flush=True)
    best_damp, best_windows = max(cuts, key=cuts.get)
    print(f"fp32 {fp:.4f}, {rtn} {rows[rtn].perplexity:.4f} (validation perplexity)")
    print(f"best on validation: damp {best_damp}, {best_windows[0]} x {best_windows[1]} tokens")
    data = {
        "model": name, "bits": args.bits, "group_size": group_size, "split": "val",
        "eval_tokens": len(tokens), "seq_len": seq_len or base.config.max_position_embeddings,
        "threads": torch.get_num_threads(), "rows": as_dict(rows),
        "rtn_increase_cut": [
            {"damp_percent": d, "calibration": list(w), "cut": c} for (d, w), c in cuts.items()
        ],
        "best": {"damp_percent": best_damp, "calibration": list(best_windows)},
    }  # fmt: skip
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp()) if args.smoke else None)
    fig = plot(cuts, f"{name}: GPTQ {args.bits}-bit g{group_size}, validation split")
    path = save_result("gptq_validation", data, fig, out)
    print(f"wrote {path}")
    return data


if __name__ == "__main__":
    main()
