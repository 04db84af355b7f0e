"""Quantization: store weights in fewer bits, keep the model's outputs.

Every scheme implements `minillm.quant.base.Quantizer`: `quantize` turns a model's
linear weights into the scheme's own tensors (what a checkpoint stores), `convert` swaps
the model's `nn.Linear` modules for runtime modules that compute with those tensors.
"""

from minillm.quant.base import (
    Footprint,
    Quantizer,
    calibration_tokens,
    footprint,
    linear_layers,
    set_module,
)

__all__ = [
    "Footprint",
    "Quantizer",
    "calibration_tokens",
    "footprint",
    "linear_layers",
    "set_module",
]
