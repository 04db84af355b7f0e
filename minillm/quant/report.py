"""Quality and memory of a quantized model: held-out perplexity and footprint, side by side.

    increase = ppl(quantized) - ppl(fp32)          cut = 1 - increase(scheme) / increase(RTN)

The held-out text is the one the bundled models were never trained on
(`minillm.data.shipped_heldout_documents`); calibration tokens come from the training
split (`minillm.quant.calibration_tokens`), so the two never overlap. A scheme's settings
are chosen on a third text, the validation split (`validation_tokens`), so the held-out
number stays an unbiased estimate of the chosen settings' quality.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from minillm.evaluate import perplexity
from minillm.model import CausalLM
from minillm.quant.base import Quantizer, footprint


def heldout_tokens(tokenizer) -> np.ndarray:
    """The bundled held-out documents as one token stream."""
    from minillm.data import shipped_heldout_documents, tokenize_documents

    return tokenize_documents(tokenizer, shipped_heldout_documents())


def validation_documents(root: Path | None = None) -> list[str]:
    """Texts of the standard library's validation-split files (`split_of(path) == "val"`),
    sorted by path, without any text that is also a shipped held-out document (a file
    copied under another path), so choosing settings on them never sees held-out text."""
    from minillm.data import shipped_heldout_documents, split_of, stdlib_documents

    heldout = set(shipped_heldout_documents())
    docs = [t for p, t in stdlib_documents(root) if split_of(p) == "val" and t not in heldout]
    if not docs:
        raise RuntimeError(f"no validation-split source files found under {root or 'the stdlib'}")
    return docs


def validation_tokens(
    tokenizer, max_tokens: int | None = 65536, root: Path | None = None
) -> np.ndarray:
    """The first `max_tokens` tokens (None: all) of the validation documents as one stream
    `EOT doc EOT doc ...`: the text a quantizer's settings are chosen on."""
    from minillm.data import tokenize_documents

    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")
    parts, total = [], 0
    for doc in validation_documents(root):  # tokenize only the documents needed
        parts.append(tokenize_documents(tokenizer, [doc]))
        total += len(parts[-1])
        if max_tokens is not None and total >= max_tokens:
            break
    return np.concatenate(parts)[:max_tokens]


@dataclass
class QualityRow:
    name: str
    perplexity: float
    increase_pct: float  # vs the float model
    linear_bits: float  # bits per weight of the quantized linear layers (incl. scales, zeros)
    model_mib: float
    seconds: float  # time to quantize


def evaluate_scheme(
    name: str,
    base: CausalLM,
    quantizer: Quantizer | None,
    tokens: np.ndarray,
    calibration: torch.Tensor | None = None,
    fp_ppl: float | None = None,
    seq_len: int | None = None,
    max_tokens: int | None = None,
    progress: bool = False,
) -> QualityRow:
    """Quantize a copy of `base` with `quantizer` (None: the float model) and measure it."""
    t0 = time.perf_counter()
    model = (
        base if quantizer is None else quantizer.apply(copy.deepcopy(base), calibration, progress)
    )
    seconds = time.perf_counter() - t0
    ppl = perplexity(model, tokens, seq_len=seq_len, max_tokens=max_tokens, progress=progress)
    fp = footprint(model)
    ref = ppl if fp_ppl is None else fp_ppl
    return QualityRow(
        name, ppl, 100 * (ppl / ref - 1), fp.bits_per_linear_weight, fp.total_bytes / 2**20, seconds
    )


def rtn_cut(rows: dict[str, QualityRow], scheme: str, rtn: str, fp: str = "fp32") -> float:
    """How much of RTN's perplexity increase `scheme` removes (1.0: all of it)."""
    base = rows[fp].perplexity
    return 1 - (rows[scheme].perplexity - base) / (rows[rtn].perplexity - base)


def as_dict(rows: dict[str, QualityRow]) -> dict[str, dict]:
    return {k: asdict(v) for k, v in rows.items()}
