"""Perplexity table of the quantization schemes on the bundled model (runs on CPU).

    python -m benchmarks.quant_quality            # minillm-tiny, the full table
    python -m benchmarks.quant_quality --smoke    # the draft model, a few schemes, seconds

Rows: fp32; RTN 8/4/3-bit; W8A8 with min-max, percentile and MSE activation calibration
(and SmoothQuant); GPTQ and AWQ at 4 and 3 bits; all weight-only schemes group size 128,
asymmetric. GPTQ runs with act-order and the reference code's `mse` option (each
group's range shrunk to the clip that minimizes its error); the "RTN mse-clip" rows
apply the same clip search without GPTQ, to show what the clipping alone gives.
Calibration: windows from the training split; 32 x 1024 tokens (the model's full
context) for AWQ and W8A8, 64 x 512 for GPTQ. GPTQ's windows and dampening (0.1) and
AWQ's settings were chosen on the validation split of the training corpus
(`benchmarks.gptq_validation`, `benchmarks.awq_validation`, the docstrings of
`GPTQQuantizer` and `AWQQuantizer`), never on this held-out text; "AWQ 4-bit ref" runs
the reference code's settings.
Targets (issue 6): 4-bit GPTQ and AWQ each cut RTN's perplexity increase by >= 40%;
W8A8 within 1% of fp32. On a shared 2-core machine `OMP_NUM_THREADS=1` can be much
faster than 2 threads.
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
from minillm.quant.calibrate import W8A8Quantizer
from minillm.quant.gptq import GPTQQuantizer
from minillm.quant.report import as_dict, evaluate_scheme, heldout_tokens, rtn_cut
from minillm.quant.rtn import RTNQuantizer

# the llm-awq / AutoAWQ settings; the AWQQuantizer defaults were chosen on the validation
# split (see its docstring)
AWQ_REFERENCE = dict(
    n_tokens=8192, clip_tokens=512, gqa_o=False, mse=False, asym_clip=False, joint=False
)


def schemes(group_size: int, smoke: bool, damp: float = 0.1) -> dict:
    if smoke:
        return {
            "RTN 4-bit": RTNQuantizer(4, group_size),
            "W8A8 percentile": W8A8Quantizer("percentile"),
            "GPTQ 4-bit": GPTQQuantizer(4, group_size, desc_act=True),
            "AWQ 4-bit": AWQQuantizer(4, group_size, n_grid=4),
        }
    return {
        "RTN 8-bit": RTNQuantizer(8, group_size),
        "RTN 4-bit": RTNQuantizer(4, group_size),
        "RTN 3-bit": RTNQuantizer(3, group_size),
        "RTN 4-bit mse-clip": RTNQuantizer(4, group_size, mse=True),
        "RTN 3-bit mse-clip": RTNQuantizer(3, group_size, mse=True),
        "W8A8 minmax": W8A8Quantizer("minmax"),
        "W8A8 percentile": W8A8Quantizer("percentile"),
        "W8A8 mse": W8A8Quantizer("mse"),
        "W8A8 smooth+minmax": W8A8Quantizer("minmax", smooth_alpha=0.5),
        "GPTQ 4-bit": GPTQQuantizer(4, group_size, desc_act=True, damp_percent=damp, mse=True),
        "GPTQ 3-bit": GPTQQuantizer(3, group_size, desc_act=True, damp_percent=damp, mse=True),
        "AWQ 4-bit": AWQQuantizer(4, group_size),
        "AWQ 3-bit": AWQQuantizer(3, group_size),
        "AWQ 4-bit ref": AWQQuantizer(4, group_size, **AWQ_REFERENCE),
    }


def plot(rows: dict, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    ppl = [rows[n].perplexity for n in names]
    fig, ax = plt.subplots(figsize=(9, 4))
    colors = [
        "grey" if n == "fp32" else "C0" if "RTN" in n else "C1" if "W8A8" in n else "C2"
        for n in names
    ]
    ax.bar(range(len(names)), ppl, color=colors)
    ax.axhline(rows["fp32"].perplexity, color="k", lw=0.8, ls="--", label="fp32")
    ax.set_xticks(range(len(names)), names, rotation=40, ha="right")
    ax.set_ylim(min(ppl) * 0.95, max(ppl) * 1.02)
    ax.set_ylabel("held-out perplexity")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--smoke", action="store_true", help="draft model, few schemes, seconds")
    ap.add_argument("--model", default=None)
    ap.add_argument("--calibration-samples", type=int, default=32)
    ap.add_argument("--calibration-len", type=int, default=1024, help="the model's context")
    ap.add_argument("--gptq-calibration-samples", type=int, default=64)
    ap.add_argument("--gptq-calibration-len", type=int, default=512)
    ap.add_argument("--damp", type=float, default=0.1, help="GPTQ dampening (damp_percent)")
    ap.add_argument("--max-tokens", type=int, default=65536, help="held-out tokens evaluated")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    tok = minillm.load_tokenizer()
    if args.smoke:
        name, group_size, seq_len = args.model or "minillm-tiny-draft", 64, 128
        n_cal, cal_len, max_tokens = 2, 64, 1024
        gptq_cal = (n_cal, cal_len)
    else:
        name, group_size, seq_len = args.model or "minillm-tiny", 128, None
        n_cal, cal_len, max_tokens = args.calibration_samples, args.calibration_len, args.max_tokens
        gptq_cal = (args.gptq_calibration_samples, args.gptq_calibration_len)
    base = minillm.load_model(name)
    tokens = heldout_tokens(tok)
    cal = calibration_tokens(tok, n_cal, cal_len)
    cal_gptq = calibration_tokens(tok, *gptq_cal)
    kw = dict(seq_len=seq_len, max_tokens=max_tokens)
    rows = {"fp32": evaluate_scheme("fp32", base, None, tokens, **kw)}
    fp = rows["fp32"].perplexity
    print(f"{'scheme':22s} {'ppl':>8s} {'+%':>7s} {'bits/w':>7s} {'MiB':>6s} {'quantize s':>10s}")
    for label, q in schemes(group_size, args.smoke, args.damp).items():
        c = cal_gptq if isinstance(q, GPTQQuantizer) else cal
        rows[label] = evaluate_scheme(label, base, q, tokens, c, fp_ppl=fp, **kw)
    for r in rows.values():
        print(
            f"{r.name:22s} {r.perplexity:8.4f} {r.increase_pct:7.2f} {r.linear_bits:7.2f} "
            f"{r.model_mib:6.2f} {r.seconds:10.1f}"
        )
    cuts = {
        f"{s} {b}-bit": rtn_cut(rows, f"{s} {b}-bit", f"RTN {b}-bit")
        for s in ("GPTQ", "AWQ")
        for b in (4, 3)
        if f"{s} {b}-bit" in rows and f"RTN {b}-bit" in rows
    }
    if "AWQ 4-bit ref" in rows:
        cuts["AWQ 4-bit ref"] = rtn_cut(rows, "AWQ 4-bit ref", "RTN 4-bit")
    w8a8 = {k: r.increase_pct for k, r in rows.items() if k.startswith("W8A8")}
    targets = {
        "gptq_4bit_cut_ge_40pct": cuts.get("GPTQ 4-bit", 0) >= 0.4,
        "awq_4bit_cut_ge_40pct": cuts.get("AWQ 4-bit", 0) >= 0.4,
        "w8a8_within_1pct (best calibration)": min(w8a8.values()) <= 1.0 if w8a8 else False,
    }
    for k, v in cuts.items():
        print(f"{k}: removes {100 * v:.0f}% of RTN's perplexity increase")
    print("targets:", targets)
    data = {
        "model": name, "group_size": group_size, "calibration": [n_cal, cal_len],
        "gptq_calibration": list(gptq_cal),
        "gptq_damp_percent": args.damp, "threads": torch.get_num_threads(),
        "eval_tokens": max_tokens, "seq_len": seq_len or base.config.max_position_embeddings,
        "rows": as_dict(rows), "rtn_increase_cut": cuts, "targets_met": targets,
    }  # fmt: skip
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp()) if args.smoke else None)
    path = save_result("quant_quality", data, plot(rows, f"{name}: held-out perplexity"), out)
    print(f"wrote {path}")
    return data


if __name__ == "__main__":
    main()
