"""GGUF quantization of a whole model: llama.cpp's per-tensor type mixtures, and the layer
that computes with GGUF blocks by dequantizing them on the fly.

A GGUF "file type" such as Q4_K_M is not one format but a recipe (llama.cpp's
`llama_tensor_get_type`): most matrices get the base type (Q4_K), a few sensitive ones
get more bits. For Q4_K_M and Q5_K_M:

    output (or the tied token embedding)     -> Q6_K
    attn_v and ffn_down of layer i            -> Q6_K  when use_more_bits(i, L):
        i < L/8  or  i >= 7L/8  or  (i - L/8) % 3 == 2      (first, last, every third)
    everything else 2-D                       -> the base type;   1-D (norms) -> F32

K-quants need rows that are a multiple of 256 weights. When a row is not, llama.cpp
falls back: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0 (and F16 if even 32 does not
divide the row); so do we. The bundled model (hidden 256, MLP 768) needs no fallback.

`GGUFQuantizer` implements the shared `Quantizer` interface: `quantize` returns each
tensor's GGUF blocks, `convert` swaps the linear layers for `GGUFLinear` (which keeps
the raw blocks and dequantizes them at every forward) and loads the embedding
dequantized. `minillm.quant.gguf_file` writes and reads the same blocks as .gguf files.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from minillm.model import CausalLM
from minillm.quant import gguf_blocks as B
from minillm.quant import gguf_kquants as K
from minillm.quant.base import Quantizer, set_module
from minillm.quant.gguf_blocks import LAYOUTS, GGMLType, ggml_type

QUANTIZE: dict[GGMLType, Callable[..., np.ndarray]] = {
    GGMLType.F32: B.quantize_f32,
    GGMLType.F16: B.quantize_f16,
    GGMLType.BF16: B.quantize_bf16,
    GGMLType.Q8_0: B.quantize_q8_0,
    GGMLType.Q4_0: B.quantize_q4_0,
    GGMLType.Q5_0: B.quantize_q5_0,
    GGMLType.Q5_1: B.quantize_q5_1,
    GGMLType.Q4_K: K.quantize_q4_k,
    GGMLType.Q5_K: K.quantize_q5_k,
    GGMLType.Q6_K: K.quantize_q6_k,
}
DEQUANTIZE: dict[GGMLType, Callable[[torch.Tensor], torch.Tensor]] = {
    GGMLType.F32: B.dequantize_f32,
    GGMLType.F16: B.dequantize_f16,
    GGMLType.BF16: B.dequantize_bf16,
    GGMLType.Q8_0: B.dequantize_q8_0,
    GGMLType.Q4_0: B.dequantize_q4_0,
    GGMLType.Q5_0: B.dequantize_q5_0,
    GGMLType.Q5_1: B.dequantize_q5_1,
    GGMLType.Q4_K: K.dequantize_q4_k,
    GGMLType.Q5_K: K.dequantize_q5_k,
    GGMLType.Q6_K: K.dequantize_q6_k,
}
KQUANTS = (GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K)

# file type name -> (llama.cpp's llama_ftype id, base tensor type)
FTYPES: dict[str, tuple[int, GGMLType]] = {
    "F32": (0, GGMLType.F32),
    "F16": (1, GGMLType.F16),
    "Q4_0": (2, GGMLType.Q4_0),
    "Q8_0": (7, GGMLType.Q8_0),
    "Q5_0": (8, GGMLType.Q5_0),
    "Q5_1": (9, GGMLType.Q5_1),
    "Q4_K_M": (15, GGMLType.Q4_K),
    "Q5_K_M": (17, GGMLType.Q5_K),
    "Q6_K": (18, GGMLType.Q6_K),
    "BF16": (32, GGMLType.BF16),
}
FALLBACK = {
    GGMLType.Q4_K: GGMLType.Q5_0,
    GGMLType.Q5_K: GGMLType.Q5_1,
    GGMLType.Q6_K: GGMLType.Q8_0,
}


# ----------------------------------------------------------------------------- tensors
def row_bytes(qtype: GGMLType, n_cols: int) -> int:
    layout = LAYOUTS[qtype]
    if n_cols % layout.block_size:
        raise ValueError(
            f"{qtype.name} needs rows that are a multiple of {layout.block_size} weights, "
            f"got rows of {n_cols}"
        )
    return n_cols // layout.block_size * layout.type_size


def quantize_tensor(
    weight: np.ndarray | torch.Tensor, qtype: GGMLType | str, search: bool = True
) -> np.ndarray:
    """(rows, cols) floats -> (rows, row_bytes) uint8 GGUF blocks, row by row (also 1-D).

    `search=False` uses plain round-to-nearest for the K-quants (the legacy types have
    no search: ggml's reference rounds to nearest)."""
    qtype = ggml_type(qtype)
    if isinstance(weight, torch.Tensor):
        weight = weight.detach().float().cpu().numpy()
    w = np.ascontiguousarray(weight, dtype=np.float32)
    if w.ndim not in (1, 2):
        raise ValueError(f"GGUF tensors here are 1-D or 2-D, got shape {w.shape}")
    rows = w.reshape(-1, w.shape[-1])  # (rows, cols)
    nbytes = row_bytes(qtype, rows.shape[1])
    blocks = rows.reshape(-1, LAYOUTS[qtype].block_size)  # (rows * blocks_per_row, S)
    kwargs = {"search": search} if qtype in KQUANTS else {}
    out = QUANTIZE[qtype](blocks, **kwargs)
    return out.reshape(*w.shape[:-1], nbytes)


def dequantize_tensor(raw: np.ndarray | torch.Tensor, qtype: GGMLType | str) -> torch.Tensor:
    """(..., row_bytes) uint8 GGUF blocks -> (..., cols) float32, on raw's device."""
    qtype = ggml_type(qtype)
    if isinstance(raw, np.ndarray) and not raw.flags.writeable:
        raw = raw.copy()  # torch wants writable memory (e.g. arrays over a file's bytes)
    raw = torch.as_tensor(raw)
    if raw.dtype != torch.uint8:
        raise TypeError(f"GGUF blocks are raw bytes (uint8), got {raw.dtype}")
    layout = LAYOUTS[qtype]
    if raw.shape[-1] % layout.type_size:
        raise ValueError(
            f"{qtype.name} rows are whole blocks of {layout.type_size} bytes, "
            f"got rows of {raw.shape[-1]} bytes"
        )
    blocks = raw.reshape(-1, layout.type_size)  # (n_blocks, type_size)
    values = DEQUANTIZE[qtype](blocks)  # (n_blocks, block_size)
    n_cols = raw.shape[-1] // layout.type_size * layout.block_size
    return values.reshape(*raw.shape[:-1], n_cols)


# ----------------------------------------------------------------------------- mixtures
GGUF_NAMES = {  # minillm module name (inside model.layers.{i}.) -> llama.cpp tensor name
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_name(name: str) -> str:
    """minillm tensor name -> GGUF name.

    "model.layers.3.mlp.up_proj.weight" -> "blk.3.ffn_up.weight"."""
    module, _, suffix = name.rpartition(".")
    if module in TOP_NAMES:
        return f"{TOP_NAMES[module]}.{suffix}"
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", module)
    if m and m.group(2) in GGUF_NAMES:
        return f"blk.{m.group(1)}.{GGUF_NAMES[m.group(2)]}.{suffix}"
    raise ValueError(f"no GGUF name for tensor {name!r}")


def minillm_name(name: str) -> str:
    """GGUF tensor name -> minillm name (the inverse of `gguf_name`)."""
    module, _, suffix = name.rpartition(".")
    for ours, theirs in TOP_NAMES.items():
        if module == theirs:
            return f"{ours}.{suffix}"
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", module)
    for ours, theirs in GGUF_NAMES.items():
        if m and m.group(2) == theirs:
            return f"model.layers.{m.group(1)}.{ours}.{suffix}"
    raise ValueError(f"unknown GGUF tensor {name!r} (the llama architecture's names are expected)")


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers that get more bits: the first and last eighth, and
    every third layer in between."""
    return (
        i_layer < n_layers // 8
        or i_layer >= 7 * n_layers // 8
        or (i_layer - n_layers // 8) % 3 == 2
    )


def choose_type(
    name: str, shape: tuple[int, ...], ftype: str, n_layers: int, has_output: bool
) -> GGMLType:
    """The GGML type llama.cpp gives tensor `name` (a GGUF name) in a file of `ftype`."""
    if ftype not in FTYPES:
        raise ValueError(f"unknown GGUF file type {ftype!r}; supported: {', '.join(FTYPES)}")
    base = FTYPES[ftype][1]
    if len(shape) == 1:
        return GGMLType.F32
    if base in (GGMLType.F32, GGMLType.F16, GGMLType.BF16):
        return base
    n_cols, qtype = shape[-1], base
    layer = re.match(r"blk\.(\d+)\.", name)
    if name == "output.weight" or (not has_output and name == "token_embd.weight"):
        if n_cols % LAYOUTS[base].block_size:
            qtype = GGMLType.Q8_0
        elif base != GGMLType.Q8_0:
            qtype = GGMLType.Q6_K
    elif (
        layer
        and (".attn_v." in name or ".ffn_down." in name)
        and ftype in ("Q4_K_M", "Q5_K_M")
        and use_more_bits(int(layer.group(1)), n_layers)
    ):
        qtype = GGMLType.Q6_K
    if n_cols % LAYOUTS[qtype].block_size:  # rows that the type's blocks do not tile
        qtype = FALLBACK.get(qtype, GGMLType.F16)
        if n_cols % LAYOUTS[qtype].block_size:
            qtype = GGMLType.F16
    return qtype


# ----------------------------------------------------------------------------- runtime
@dataclass
class GGUFTensor:
    """One tensor as GGUF stores it: type, logical shape (rows, cols), raw blocks."""

    qtype: GGMLType
    shape: tuple[int, ...]
    raw: np.ndarray  # (rows, row_bytes) uint8

    def dequantize(self) -> torch.Tensor:
        return dequantize_tensor(self.raw, self.qtype).reshape(self.shape)


class GGUFLinear(nn.Module):
    """A linear layer whose weight stays in GGUF blocks: y = x @ dequant(blocks)^T + b.

    Dequantizes at every forward (on the fly): the memory holds only the blocks."""

    def __init__(self, qtype: GGMLType, raw: torch.Tensor, in_features: int, bias=None):
        super().__init__()
        self.qtype = ggml_type(qtype)
        self.in_features, self.out_features = in_features, raw.shape[0]
        if row_bytes(self.qtype, in_features) != raw.shape[1]:
            raise ValueError(
                f"{raw.shape[1]} bytes per row do not hold {in_features} {qtype.name} weights"
            )
        self.register_buffer("raw", raw.contiguous())  # (out_features, row_bytes) uint8
        self.bias = (
            None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        )

    def weight(self) -> torch.Tensor:
        return dequantize_tensor(self.raw, self.qtype)  # (out_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, qtype={self.qtype.name}"


@dataclass
class GGUFQuantizer(Quantizer):
    """Quantize a model's matrices to GGUF blocks with one of llama.cpp's file types."""

    ftype: str = "Q4_K_M"
    search: bool = True  # K-quant scale search (False: plain round-to-nearest)
    name = "gguf"

    def __post_init__(self) -> None:
        if self.ftype not in FTYPES:
            raise ValueError(
                f"unknown GGUF file type {self.ftype!r}; supported: {', '.join(FTYPES)}"
            )

    def tensor_types(self, model: CausalLM) -> dict[str, GGMLType]:
        """minillm name -> GGML type, for every weight and bias of the model."""
        tied = model.config.tie_word_embeddings
        out = {}
        for name, p in model.state_dict().items():
            if tied and name == "lm_head.weight":
                continue
            out[name] = choose_type(
                gguf_name(name),
                tuple(p.shape),
                self.ftype,
                model.config.num_hidden_layers,
                not tied,
            )
        return out

    def quantize(
        self, model: CausalLM, calibration: torch.Tensor | None = None, progress: bool = True
    ) -> dict[str, Any]:
        state = model.state_dict()
        types = self.tensor_types(model)
        out: dict[str, GGUFTensor] = {}
        for name, qtype in tqdm(types.items(), disable=not progress, desc=f"GGUF {self.ftype}"):
            w = state[name]
            out[name] = GGUFTensor(qtype, tuple(w.shape), quantize_tensor(w, qtype, self.search))
        return out

    def convert(self, model: CausalLM, state: dict[str, Any]) -> CausalLM:
        for name, t in state.items():
            module_name, _, kind = name.rpartition(".")
            module = model.get_submodule(module_name)
            if kind == "weight" and isinstance(module, nn.Linear):
                bias = getattr(module, "bias", None)
                raw = torch.from_numpy(t.raw).to(module.weight.device)
                set_module(model, module_name, GGUFLinear(t.qtype, raw, module.in_features, bias))
            elif kind == "bias" and isinstance(module, (nn.Linear, GGUFLinear)):
                continue  # kept in full precision by GGUFLinear
            else:  # embedding, norms: dequantize on load
                p = getattr(module, kind)
                with torch.no_grad():
                    p.copy_(t.dequantize().to(p.device, p.dtype))
        return model
