"""Layer-by-layer calibration: run the decoder one layer at a time over calibration tokens.

GPTQ and AWQ quantize a model one decoder layer at a time (Frantar et al., 2022, sec. 4):
the calibration tokens are embedded once, then for layer l = 0, 1, ...:

    inputs of l's linear layers  <- forward hooks while running layer l on the hidden states
    quantize l's linear layers   (they see the real inputs of *this* model)
    hidden states                <- layer l (now quantized) applied to the hidden states

so every layer is calibrated on the outputs of the already-quantized layers before it,
and only one layer's activations are ever held. Within a layer, "true sequential" order
quantizes q/k/v, then o, then gate/up, then down, each on inputs that already went
through the quantized sublayers before it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from minillm.layers.rotary import rope_cos_sin, rope_inv_freq
from minillm.model import CausalLM

# Sublayers that share an input, in the order a layer's forward uses them.
SEQUENTIAL_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


class LayerRunner:
    """Hidden states of the calibration tokens, advanced through the decoder layer by layer."""

    def __init__(self, model: CausalLM, calibration: torch.Tensor, batch_size: int = 8):
        if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2:
            raise ValueError("calibration must be a (n_samples, seq_len) tensor of token ids")
        model.check_input_ids(calibration)
        self.model = model
        device = model.device
        T = calibration.shape[1]
        with torch.no_grad():
            self.hidden = [
                model.model.embed_tokens(calibration[i : i + batch_size].to(device))  # (B, T, C)
                for i in range(0, len(calibration), batch_size)
            ]
        inv_freq = rope_inv_freq(model.config, device=device)
        self.cos, self.sin = rope_cos_sin(torch.arange(T, device=device), inv_freq, model.dtype)

    @property
    def n_tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)

    @torch.no_grad()
    def run(self, layer: nn.Module) -> list[torch.Tensor]:
        """The outputs of `layer` on the current hidden states (which are not changed)."""
        backend = self.model.attn_backend
        return [layer(h, self.cos, self.sin, backend) for h in self.hidden]

    def advance(self, layer: nn.Module) -> None:
        """Replace the hidden states by `layer`'s outputs: move on to the next layer."""
        self.hidden = self.run(layer)

    @torch.no_grad()
    def capture(self, layer: nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Inputs of `layer`'s submodules `names` (relative), as (n_tokens, in_features) fp32."""
        names = list(names)
        seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        hooks = [
            layer.get_submodule(n).register_forward_hook(
                lambda _m, args, _out, n=n: seen[n].append(
                    args[0].reshape(-1, args[0].shape[-1]).float()
                )
            )
            for n in names
        ]
        try:
            self.run(layer)
        finally:
            for h in hooks:
                h.remove()
        return {n: torch.cat(xs) for n, xs in seen.items()}  # (n_tokens, in_features)


def layer_groups(layer_prefix: str, quantized: Iterable[str]) -> list[list[str]]:
    """SEQUENTIAL_GROUPS of one layer, restricted to the sublayers being quantized."""
    quantized = set(quantized)
    groups = []
    for group in SEQUENTIAL_GROUPS:
        present = [n for n in group if f"{layer_prefix}.{n}" in quantized]
        if present:
            groups.append(present)
    missing = {q for q in quantized if q.startswith(layer_prefix + ".")} - {
        f"{layer_prefix}.{n}" for g in groups for n in g
    }
    if missing:
        raise ValueError(f"no sequential group knows the linear layers {sorted(missing)}")
    return groups
