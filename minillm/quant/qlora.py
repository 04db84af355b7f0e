"""QLoRA: train small low-rank adapters on top of a frozen 4-bit (NF4) base model.

LoRA (Hu et al., 2021) freezes a linear layer W (out x in) and learns a low-rank update:

    y = x W^T + (alpha / r) * x A^T B^T          A (r x in), B (out x r), r << in, out

B starts at zero, so training starts from the base model exactly. QLoRA (Dettmers et
al., 2023) stores the frozen W in NF4 with double quantization (`minillm.quant.nf4`) and
dequantizes it on the fly; gradients flow through the dequantized W into x, but only
A and B are updated. Merging folds the adapter back: W' = W + (alpha / r) B A.

`finetune_memory` is the arithmetic of the paper's headline, "finetuning a 65B model on
a single 48 GB GPU": 16-bit full fine-tuning with Adam needs ~12-16 bytes per parameter
(> 780 GB for 65B), LoRA keeps the 16-bit base (130 GB), QLoRA a 4.127-bit base (~34 GB)
plus the adapters, their gradients and optimizer states, and checkpointed activations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from minillm.model import CausalLM
from minillm.quant.base import set_module
from minillm.quant.nf4 import NF4Linear, constant_bits_per_parameter

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """A frozen base layer (nn.Linear or NF4Linear) plus a trainable low-rank update."""

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {r}")
        self.base, self.r, self.alpha = base, r, alpha
        self.in_features, self.out_features = base.in_features, base.out_features
        for p in base.parameters():
            p.requires_grad_(False)
        device = next(base.buffers(), None)
        device = device.device if device is not None else base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and peft) do
        self.dropout = nn.Dropout(dropout)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        update = self.dropout(x) @ self.lora_A.t().to(x.dtype) @ self.lora_B.t().to(x.dtype)
        return self.base(x) + self.scaling * update

    def base_weight(self) -> torch.Tensor:
        if isinstance(self.base, NF4Linear):
            return self.base.dequantized_weight()
        return self.base.weight.detach().float()

    def merged(self) -> nn.Linear:
        """An nn.Linear with W + (alpha / r) B A: the adapter folded into the (dequantized) base."""
        bias = getattr(self.base, "bias", None)
        out = nn.Linear(self.in_features, self.out_features, bias=bias is not None)
        out = out.to(self.lora_A.device)
        with torch.no_grad():
            out.weight.copy_(self.base_weight() + self.scaling * (self.lora_B @ self.lora_A))
            if bias is not None:
                out.bias.copy_(bias)
        return out.requires_grad_(False)


def add_lora(
    model: CausalLM, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
    targets: tuple[str, ...] = LORA_TARGETS,
) -> list[nn.Parameter]:  # fmt: skip
    """Freeze the whole model and wrap every target layer in a LoRALinear; in place.

    Returns the trainable parameters (the adapters)."""
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in targets]
    if not names:
        raise ValueError(f"no layers named {targets} in the model")
    for name in names:
        set_module(model, name, LoRALinear(model.get_submodule(name), r, alpha, dropout))
    return [p for n, p in model.named_parameters() if "lora_" in n]


def merge_lora(model: CausalLM) -> CausalLM:
    """Replace every LoRALinear by its merged nn.Linear; in place."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            set_module(model, name, m.merged())
    return model


# ----------------------------------------------------------------------------- memory
@dataclass
class LlamaShape:
    """The shapes that decide fine-tuning memory. Defaults: LLaMA-65B."""

    hidden: int = 8192
    intermediate: int = 22016
    layers: int = 80
    vocab: int = 32000
    heads: int = 64
    kv_heads: int = 64

    @property
    def linear_params(self) -> int:
        C, F, D = self.hidden, self.intermediate, self.hidden // self.heads
        attn = 2 * C * C + 2 * C * self.kv_heads * D
        return self.layers * (attn + 3 * C * F)

    @property
    def params(self) -> int:
        return (
            self.linear_params + 2 * self.vocab * self.hidden + (2 * self.layers + 1) * self.hidden
        )

    def lora_params(self, r: int) -> int:
        """A and B of every attention and MLP projection: r * (in + out) each."""
        C, F, D = self.hidden, self.intermediate, self.hidden // self.heads
        kv = self.kv_heads * D
        per_layer = r * ((C + C) * 2 + (C + kv) * 2 + (C + F) * 3)
        return self.layers * per_layer


@dataclass
class MemoryEstimate:
    method: str
    gb: dict[str, float] = field(default_factory=dict)

    @property
    def total_gb(self) -> float:
        return sum(self.gb.values())


def finetune_memory(
    method: str, shape: LlamaShape | None = None, r: int = 64, batch_size: int = 1,
    seq_len: int = 512, activation_bytes_per_token_per_layer: int | None = None,
) -> MemoryEstimate:  # fmt: skip
    """GPU memory (GB = 1e9 bytes) to fine-tune with 'full', 'lora' or 'qlora'.

    full: 16-bit weights (2 B) + 16-bit gradients (2 B) + Adam's two fp32 moments (8 B)
    = 12 bytes per parameter. lora: 16-bit frozen base + adapters. qlora: NF4 base with
    double-quantized constants (4.127 bits) + adapters. Adapters (16-bit weights) carry
    gradients (2 B) and fp32 Adam moments (8 B). Activations assume gradient
    checkpointing: one 16-bit hidden state per token per layer is kept (2 * hidden
    bytes), unless given."""
    shape = shape or LlamaShape()
    if method not in ("full", "lora", "qlora"):
        raise ValueError(f"method must be 'full', 'lora' or 'qlora', got {method!r}")
    n, gb = shape.params, 1e9
    per_tok = activation_bytes_per_token_per_layer or 2 * shape.hidden
    est = MemoryEstimate(method)
    est.gb["activations"] = batch_size * seq_len * shape.layers * per_tok / gb
    if method == "full":
        est.gb["weights (16-bit)"] = 2 * n / gb
        est.gb["gradients (16-bit)"] = 2 * n / gb
        est.gb["Adam states (fp32 m, v)"] = 8 * n / gb
        return est
    lora = shape.lora_params(r)
    other = n - shape.linear_params  # embeddings and norms stay 16-bit
    if method == "lora":
        est.gb["base weights (16-bit)"] = 2 * n / gb
    else:
        bits = 4 + constant_bits_per_parameter(True)
        est.gb["base weights (NF4 + DQ)"] = (shape.linear_params * bits / 8 + 2 * other) / gb
    est.gb["adapters (16-bit)"] = 2 * lora / gb
    est.gb["adapter gradients"] = 2 * lora / gb
    est.gb["adapter Adam states"] = 8 * lora / gb
    return est
