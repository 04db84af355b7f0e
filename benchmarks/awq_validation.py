"""AWQ's options compared on the validation split (runs on CPU).

    python -m benchmarks.awq_validation                     # minillm-tiny, 4-bit g128, all settings
    python -m benchmarks.awq_validation --settings defaults asym_clip
    python -m benchmarks.awq_validation --smoke             # the draft model, two settings, seconds

Every setting is scored on the validation split of the training corpus
(`minillm.quant.report.validation_tokens`, all of it by default), never on the held-out
text that `benchmarks.quant_quality` reports, so the held-out number of the chosen
setting is not biased by the choice. Score: the fraction of RTN's validation perplexity
increase that AWQ removes,

    cut = 1 - (ppl(AWQ) - ppl(fp32)) / (ppl(RTN) - ppl(fp32))

Calibration as in the quality table: 32 x 1024 tokens of the training split.
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
from minillm.quant.awq import AWQQuantizer
from minillm.quant.report import as_dict, evaluate_scheme, rtn_cut, validation_tokens
from minillm.quant.rtn import RTNQuantizer

# name -> AWQQuantizer settings (on top of its defaults: asym_clip and joint on)
SETTINGS = {
    "mse (the previous defaults)": dict(n_tokens=8192, asym_clip=False, joint=False),
    "mse, sequential": dict(n_tokens=8192, asym_clip=False, joint=False, sequential=True),
    "asym_clip": dict(n_tokens=8192, joint=False),
    "asym_clip joint": dict(n_tokens=8192),
    "asym_clip joint n_tokens 16384 (the defaults)": {},
    "asym_clip joint clip_qk": dict(n_tokens=8192, clip_qk=True),
    "asym_clip joint n_grid 40": dict(n_tokens=8192, n_grid=40),
    "asym_clip joint clip_grid 40": dict(n_tokens=8192, clip_grid=40),
    "asym_clip joint mse False": dict(n_tokens=8192, mse=False),
    "asym_clip joint inspect linear": dict(n_tokens=8192, inspect="linear"),
}


def plot(cuts: dict[str, float], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.4 * len(cuts) + 1.2))
    names = list(cuts)
    ax.barh(range(len(names)), [cuts[n] for n in names], color="C2")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.8)
    ax.axvline(0.4, color="grey", lw=0.8, ls="--", label="target 0.4 (held-out)")
    ax.set_xlabel("fraction of RTN's validation perplexity increase removed")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--smoke", action="store_true", help="draft model, two settings, seconds")
    ap.add_argument("--model", default=None)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    ap.add_argument("--calibration-samples", type=int, default=32)
    ap.add_argument("--calibration-len", type=int, default=1024, help="the model's context")
    ap.add_argument(
        "--max-tokens", type=int, default=None, help="validation tokens evaluated (default all)"
    )
    ap.add_argument("--name", default="awq_validation", help="the results file's name")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    tok = minillm.load_tokenizer()
    if args.smoke:
        name, group_size, seq_len, max_tokens = args.model or "minillm-tiny-draft", 64, 128, 1024
        settings, n_cal, cal_len = ["mse (the previous defaults)", "asym_clip joint"], 2, 64
        extra = dict(n_grid=4)
    else:
        name, group_size, seq_len, max_tokens = args.model or "minillm-tiny", 128, None, None
        settings, n_cal, cal_len = args.settings, args.calibration_samples, args.calibration_len
        max_tokens, extra = args.max_tokens, {}
    base = minillm.load_model(name)
    tokens = validation_tokens(tok, max_tokens)
    cal = calibration_tokens(tok, n_cal, cal_len)
    kw = dict(seq_len=seq_len)
    rows = {"fp32": evaluate_scheme("fp32", base, None, tokens, **kw)}
    fp = rows["fp32"].perplexity
    rtn = f"RTN {args.bits}-bit"
    rows[rtn] = evaluate_scheme(
        rtn, base, RTNQuantizer(args.bits, group_size), tokens, None, fp, **kw
    )
    print(f"fp32 {fp:.4f}, {rtn} {rows[rtn].perplexity:.4f} (validation perplexity)", flush=True)
    cuts = {}
    for setting in settings:
        label = f"AWQ {args.bits}-bit {setting}"
        q = AWQQuantizer(args.bits, group_size, **SETTINGS[setting], **extra)
        rows[label] = evaluate_scheme(label, base, q, tokens, cal, fp, **kw)
        cut = cuts[setting] = rtn_cut(rows, label, rtn)
        r = rows[label]
        print(
            f"{label:40s} ppl {r.perplexity:.4f} +{r.increase_pct:.3f}% cut {cut:.3f} "
            f"({r.seconds:.0f} s)",
            flush=True,
        )
    best = max(cuts, key=cuts.get)
    print(f"best on validation: {best}")
    data = {
        "model": name, "bits": args.bits, "group_size": group_size, "split": "val",
        "eval_tokens": len(tokens), "seq_len": seq_len or base.config.max_position_embeddings,
        "calibration": [n_cal, cal_len], "threads": torch.get_num_threads(),
        "settings": {k: SETTINGS[k] for k in settings}, "rows": as_dict(rows),
        "rtn_increase_cut": cuts, "best": best,
    }  # fmt: skip
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp()) if args.smoke else None)
    fig = plot(cuts, f"{name}: AWQ {args.bits}-bit g{group_size}, validation split")
    path = save_result(args.name, data, fig, out)
    print(f"wrote {path}")
    return data


if __name__ == "__main__":
    main()
