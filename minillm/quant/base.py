"""The one interface every quantization scheme implements, and what they share.

    model --quantize(calibration)--> quantized state --convert--> runtime model

`quantize` reads the model's weights (and, for calibrated schemes such as GPTQ and
AWQ, the activations that calibration tokens produce) and returns a state dict in the
scheme's own layout: the tensors a quantized checkpoint stores. `convert` swaps each
quantized `nn.Linear` for the scheme's runtime module, loaded from that state. Splitting
the two (as gpt-fast does) lets the same state be saved, loaded and run.

The embedding and the output head (`lm_head`) stay in full precision by default, as in
most published quantized checkpoints: they are a small part of a large model and the
most sensitive to error.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from minillm.model import CausalLM

DEFAULT_SKIP = ("lm_head",)


def linear_layers(model: nn.Module, skip: tuple[str, ...] = DEFAULT_SKIP) -> dict[str, nn.Linear]:
    """The `nn.Linear` modules a scheme quantizes, by qualified name, in forward order."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not any(name == s or name.endswith("." + s) for s in skip)
    }


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path `name` (e.g. "model.layers.0.mlp.up_proj")."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


class Quantizer(ABC):
    """A quantization scheme. Subclasses are small dataclasses holding its settings
    (bits, group size, ...), validated in `__post_init__`."""

    name: str = "base"
    needs_calibration: bool = False

    @abstractmethod
    def quantize(
        self, model: CausalLM, calibration: torch.Tensor | None = None, progress: bool = True
    ) -> dict[str, Any]:
        """The quantized state of `model` (the model itself is not changed)."""

    @abstractmethod
    def convert(self, model: CausalLM, state: dict[str, Any]) -> CausalLM:
        """Swap `model`'s linear layers for runtime modules holding `state`; in place."""

    def apply(
        self, model: CausalLM, calibration: torch.Tensor | None = None, progress: bool = True
    ) -> CausalLM:
        """quantize then convert: the usual one-call path."""
        if self.needs_calibration and calibration is None:
            raise ValueError(f"{self.name} needs calibration tokens (see calibration_tokens)")
        return self.convert(model, self.quantize(model, calibration, progress))


def calibration_tokens(
    tokenizer, n_samples: int = 64, seq_len: int = 512, seed: int = 0
) -> torch.Tensor:
    """(n_samples, seq_len) token windows for calibration, from the Python standard
    library's training-split files (never the held-out split that perplexity uses).

    Every machine has these files offline; windows are drawn at seeded random offsets."""
    from minillm.data import split_of, stdlib_documents, tokenize_documents

    docs = [text for path, text in stdlib_documents() if split_of(path) == "train"]
    if not docs:
        raise RuntimeError("no standard-library source files found for calibration")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(docs))
    need = n_samples * seq_len * 4  # tokenize only what a draw of windows can use
    picked, total = [], 0
    for i in order:
        picked.append(docs[i])
        total += len(docs[i]) // 3  # ~3 characters per token
        if total >= need:
            break
    tokens = tokenize_documents(tokenizer, picked).astype(np.int64)
    if len(tokens) <= seq_len:
        raise RuntimeError(f"only {len(tokens)} calibration tokens, need more than {seq_len}")
    starts = rng.integers(0, len(tokens) - seq_len, size=n_samples)
    return torch.as_tensor(np.stack([tokens[s : s + seq_len] for s in starts]))


@dataclass
class Footprint:
    """Memory of a model's parameters and buffers, by kind."""

    total_bytes: int
    linear_weight_bytes: int  # the quantized part (or what would be)
    linear_weights: int  # number of weights in the quantized linear layers
    other_bytes: int

    @property
    def bits_per_linear_weight(self) -> float:
        return 8 * self.linear_weight_bytes / max(1, self.linear_weights)

    def __str__(self) -> str:
        return (
            f"{self.total_bytes / 2**20:.2f} MiB in all; linear layers "
            f"{self.linear_weight_bytes / 2**20:.2f} MiB "
            f"({self.bits_per_linear_weight:.2f} bits per weight), "
            f"other {self.other_bytes / 2**20:.2f} MiB"
        )


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t.data_ptr() in seen:  # tied weights count once
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def footprint(model: nn.Module, skip: tuple[str, ...] = DEFAULT_SKIP) -> Footprint:
    """Bytes of the model, split into the (quantizable) linear layers and the rest.

    A runtime module of a scheme counts as a linear layer when it exposes `in_features`
    and `out_features` (as `nn.Linear` does)."""
    total = _tensor_bytes([*model.parameters(), *model.buffers()])
    linear_bytes, n_weights = 0, 0
    for name, m in model.named_modules():
        if not (hasattr(m, "in_features") and hasattr(m, "out_features")):
            continue
        if any(name == s or name.endswith("." + s) for s in skip):
            continue
        linear_bytes += _tensor_bytes([*m.parameters(), *m.buffers()])
        n_weights += m.in_features * m.out_features
    return Footprint(total, linear_bytes, n_weights, total - linear_bytes)
