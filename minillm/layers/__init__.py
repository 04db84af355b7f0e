"""The parts of a decoder layer: RMSNorm, rotary embeddings, attention, SwiGLU MLP."""

from minillm.layers.attention import ATTENTION_BACKENDS, Attention, attention
from minillm.layers.mlp import SwiGLUMLP
from minillm.layers.norm import RMSNorm
from minillm.layers.rotary import apply_rotary, rope_cos_sin, rope_inv_freq

__all__ = [
    "ATTENTION_BACKENDS",
    "Attention",
    "RMSNorm",
    "SwiGLUMLP",
    "apply_rotary",
    "attention",
    "rope_cos_sin",
    "rope_inv_freq",
]
