"""Quality and memory of a quantized model: held-out perplexity and footprint, side by side.

    increase = ppl(quantized) - ppl(fp32)          cut = 1 - increase(scheme) / increase(RTN)

The held-out text is the one the bundled models were never trained on
(`minillm.data.shipped_heldout_documents`); calibration tokens come from the training
split (`minillm.quant.calibration_tokens`), so the two never overlap.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from minillm.evaluate import perplexity
from minillm.model import CausalLM
from minillm.quant.base import Quantizer, footprint


def heldout_tokens(tokenizer) -> np.ndarray:
    """The bundled held-out documents as one token stream."""
    from minillm.data import shipped_heldout_documents, tokenize_documents

    return tokenize_documents(tokenizer, shipped_heldout_documents())


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
