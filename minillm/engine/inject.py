"""Module injection: swap a loaded model's layers for fused ones, and its weights for int8.

DeepSpeed-Inference calls it kernel injection: walk the model, and replace every module for
which a faster one with the same math exists (`replace_with_kernel_inject`). Here each
`DecoderLayer` becomes a `FusedDecoderLayer` (one qkv and one gate-up matmul, RMSNorm with
the residual add, RoPE and SiLU-and-multiply as single kernels on CUDA), built from the
same weight tensors, so the model's outputs stay the same up to rounding.

Int8 weights go through the quantization interface (`minillm.quant`): any `Quantizer`,
or "int8" for round-to-nearest int8 per channel (`minillm.quant.rtn`), applied before the
injection (quantized projections are kept apart; the norms and activations still fuse).
"""

from __future__ import annotations

import torch

from minillm.engine.fusion import FusedDecoderLayer, FusedRMSNorm
from minillm.model import CausalLM


def inject_fused_modules(model: CausalLM, use_triton: bool | None = None) -> CausalLM:
    """Replace every decoder layer (and the final norm) by its fused version, in place.
    `use_triton` defaults to whether the model is on CUDA."""
    if use_triton is None:
        use_triton = model.device.type == "cuda"
    layers = model.model.layers
    for i, layer in enumerate(layers):
        if not isinstance(layer, FusedDecoderLayer):
            layers[i] = FusedDecoderLayer(layer, use_triton)
    if not isinstance(model.model.norm, FusedRMSNorm):
        model.model.norm = FusedRMSNorm(model.model.norm, use_triton)
    return model


def quantize_weights(model: CausalLM, quantization) -> CausalLM:
    """Quantize the linear weights through a `minillm.quant.Quantizer` (or "int8")."""
    from minillm.quant.base import Quantizer

    if isinstance(quantization, str):
        if quantization != "int8":
            raise ValueError(f"quantization must be 'int8' or a Quantizer, got {quantization!r}")
        try:
            from minillm.quant.rtn import PER_CHANNEL, RTNQuantizer
        except ImportError:
            raise ValueError(
                "quantization='int8' needs minillm.quant.rtn, which this installation lacks; "
                "pass a minillm.quant.Quantizer instead"
            ) from None
        quantization = RTNQuantizer(bits=8, group_size=PER_CHANNEL)
    if not isinstance(quantization, Quantizer):
        raise TypeError(f"quantization must be 'int8' or a Quantizer, got {quantization!r:.60}")
    if quantization.needs_calibration:
        raise ValueError(f"{quantization.name} needs calibration data: quantize the model first")
    with torch.no_grad():
        return quantization.apply(model, progress=False)
