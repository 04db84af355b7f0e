"""Fused versions of a decoder layer's modules: fewer, larger kernels for the same math.

Two ideas from CTranslate2 and DeepSpeed-Inference (and every serving engine since):
  - fuse projections that read the same input: q, k, v become one `qkv_proj` matmul and
    the MLP's gate and up one `gate_up_proj` (one weight read per input, one launch);
  - fuse the elementwise tail: RMSNorm with the residual add before it, RoPE on q and k
    in one pass, SiLU-and-multiply (`minillm.kernels.fused_layers` on CUDA).

    x -> [add + RMSNorm] -> qkv_proj -> [RoPE q,k] -> attention -> o_proj
      -> [add + RMSNorm] -> gate_up_proj -> [SiLU * up] -> down_proj -> + residual

Two more launches per layer come off on CUDA, where a decode step at batch 1 is a chain of
tiny kernels (~1.5-2 us each against ~40 us of weight reads per layer):
  - the residual add after the MLP is not a kernel of its own: a layer hands (mlp output,
    residual) on (`FusedDecoderLayer.forward_carry`), and the next layer's input norm, or
    the model's final norm, adds them in its fused add + RMSNorm (vLLM's layers do the same);
  - over a paged pool, RoPE on k writes straight into the cache and RoPE on q runs in the
    same kernel (`minillm.kernels.reshape_and_cache.rotary_and_cache`), in place of the
    RoPE kernel and the cache write (`reshape_and_cache`) inside `attend`.
Both round where the unfused order rounds: the outputs are the same bits.

At batch 1 (one row of activations) every projection is a GEMV, bound by its weight read:
with Triton on CUDA they run `minillm.kernels.gemv` (one program per few output rows, no
split-K reduce kernel), and down_proj computes SiLU-and-multiply while loading its input,
so the silu_and_mul kernel is gone too (`_gemv_path` says when; fp32 accumulation in
another order than cuBLAS: close to F.linear, not its bits).

Each fused module computes what the modules it replaces compute (tested against them);
without CUDA the bracketed steps run their PyTorch twins. `minillm.engine.inject` swaps
them into a model.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from minillm.kernels import interpreting
from minillm.layers.attention import Attention, attention, rotate_packed
from minillm.layers.mlp import SwiGLUMLP
from minillm.layers.norm import RMSNorm, rms_norm
from minillm.layers.rotary import apply_rotary

if TYPE_CHECKING:
    from minillm.cache import KVCache
    from minillm.layers.attention_metadata import AttentionMetadata


def _concat_linear(*linears: nn.Module) -> nn.Linear | None:
    """One nn.Linear whose output is the concatenation of `linears`' (None unless all are
    plain nn.Linear, e.g. after quantization)."""
    if not all(type(m) is nn.Linear for m in linears):
        return None
    w = torch.cat([m.weight.data for m in linears])
    bias = linears[0].bias is not None
    fused = nn.Linear(w.shape[1], w.shape[0], bias=bias, device=w.device, dtype=w.dtype)
    fused.weight.data.copy_(w)
    if bias:
        fused.bias.data.copy_(torch.cat([m.bias.data for m in linears]))
    return fused


def _gemv_path(linear: nn.Module, x: torch.Tensor, use_triton: bool) -> bool:
    """Whether `linear` on x runs as the batch-1 GEMV kernel: Triton on, x on CUDA (or the
    interpreter), one row of 16-bit activations, a plain nn.Linear of x's dtype (a quantized
    layer keeps its own kernel), and a shape where the kernel beat cuBLAS on an H100:
    K <= 8192 (`minillm.kernels.gemv.gemv_beats_torch`: cuBLAS won down_proj 7B, 4096 x
    11008, 34.5 vs 37.3 us; the GEMV was 2-18% faster on the 1B/7B shapes up to K = 8192)."""
    if not (use_triton and type(linear) is nn.Linear and math.prod(x.shape[:-1]) == 1):
        return False
    if x.dtype not in (torch.float16, torch.bfloat16) or linear.weight.dtype != x.dtype:
        return False
    if not (x.is_cuda or interpreting()):
        return False
    from minillm.kernels.gemv import gemv_beats_torch

    return gemv_beats_torch(*linear.weight.shape)


def _linear(linear: nn.Module, x: torch.Tensor, use_triton: bool) -> torch.Tensor:
    """linear(x), through the GEMV kernel at batch 1 (`_gemv_path`)."""
    if _gemv_path(linear, x, use_triton):
        from minillm.kernels.gemv import gemv

        return gemv(x, linear.weight, linear.bias)
    return linear(x)


class FusedRMSNorm(nn.Module):
    """RMSNorm, optionally with the residual add before it: (x, r) -> (norm(x + r), x + r)."""

    def __init__(self, norm: RMSNorm, use_triton: bool):
        super().__init__()
        self.weight, self.eps, self.use_triton = norm.weight, norm.eps, use_triton

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if self.use_triton:
            from minillm.kernels.fused_layers import rms_norm as rms_norm_kernel

            return rms_norm_kernel(x, self.weight, self.eps, residual)
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        h = x + residual
        return rms_norm(h, self.weight, self.eps), h


class FusedMLP(nn.Module):
    """SwiGLU with one gate_up_proj (C -> 2F) and a fused SiLU-and-multiply."""

    def __init__(self, mlp: SwiGLUMLP, use_triton: bool):
        super().__init__()
        self.gate_up_proj = _concat_linear(mlp.gate_proj, mlp.up_proj)
        if self.gate_up_proj is None:  # quantized projections: keep them apart
            self.gate_proj, self.up_proj = mlp.gate_proj, mlp.up_proj
        self.down_proj, self.use_triton = mlp.down_proj, use_triton

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is None:
            gate_up = torch.cat([self.gate_proj(x), self.up_proj(x)], dim=-1)
        else:
            gate_up = _linear(self.gate_up_proj, x, self.use_triton)  # (..., 2F) = [gate | up]
        if _gemv_path(self.down_proj, gate_up, self.use_triton):  # batch 1: one kernel
            from minillm.kernels.gemv import silu_mul_gemv

            return silu_mul_gemv(gate_up, self.down_proj.weight, self.down_proj.bias)
        if self.use_triton:
            from minillm.kernels.fused_layers import silu_and_mul

            return self.down_proj(silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class FusedAttention(nn.Module):
    """Attention with one qkv_proj and, on CUDA, one RoPE kernel for q and k."""

    def __init__(self, attn: Attention, use_triton: bool):
        super().__init__()
        for name in ("layer_idx", "num_heads", "num_kv_heads", "head_dim", "window"):
            setattr(self, name, getattr(attn, name))
        self.qkv_proj = _concat_linear(attn.q_proj, attn.k_proj, attn.v_proj)
        if self.qkv_proj is None:
            self.q_proj, self.k_proj, self.v_proj = attn.q_proj, attn.k_proj, attn.v_proj
        self.o_proj, self.q_norm, self.k_norm = attn.o_proj, attn.q_norm, attn.k_norm
        self.use_triton = use_triton

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        if self.qkv_proj is None:
            qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        else:
            qkv = _linear(self.qkv_proj, x, self.use_triton)  # (..., (H + 2 Hkv) D)
        q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
        shape = x.shape[:-1]
        q, k, v = q.view(*shape, H, D), k.view(*shape, Hkv, D), v.view(*shape, Hkv, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        backend: str = "sdpa",
        cache: KVCache | None = None,
        attn_metadata: AttentionMetadata | None = None,
    ) -> torch.Tensor:
        if attn_metadata is not None:  # packed (N, C)
            q, k, v = self._qkv(x)  # (N, H, D), (N, Hkv, D)
            if self.use_triton and getattr(attn_metadata, "stores_kv_at_slots", False):
                from minillm.kernels.reshape_and_cache import rotary_and_cache

                k_cache, v_cache = attn_metadata.kv_cache.layer(self.layer_idx)
                # q rotated in place, rotated k and v into the pool: one kernel for two
                rotary_and_cache(q, k, v, cos, sin, k_cache, v_cache, attn_metadata.slot_mapping,
                                 check_bounds=False)  # fmt: skip
                y = attn_metadata.attend(self.layer_idx, q, k, v, self.window, kv_stored=True)
                return _linear(self.o_proj, y.reshape(x.shape[0], -1), self.use_triton)
            if self.use_triton:
                from minillm.kernels.fused_layers import rotary_

                rotary_(q, k, cos, sin)  # in place, in the qkv_proj output
            else:
                q, k = rotate_packed(q, cos, sin), rotate_packed(k, cos, sin)
            y = attn_metadata.attend(self.layer_idx, q, k, v, self.window)
            return _linear(self.o_proj, y.reshape(x.shape[0], -1), self.use_triton)
        B, T, _ = x.shape
        q, k, v = (t.transpose(1, 2) for t in self._qkv(x))  # (B, H|Hkv, T, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        y = attention(q, k, v, window=self.window, backend=backend)  # (B, H, T, D)
        return _linear(self.o_proj, y.transpose(1, 2).reshape(B, T, -1), self.use_triton)


class FusedDecoderLayer(nn.Module):
    """A decoder layer of fused modules; its norms carry the residual adds.

    `forward_carry` leaves the layer's last add to whoever normalizes next: (x, residual)
    -> (mlp output, h), the layer's output being h + mlp output. `forward` is the plain
    x -> x contract (that add done here), for code that runs one layer at a time."""

    def __init__(self, layer: nn.Module, use_triton: bool):
        super().__init__()
        self.input_layernorm = FusedRMSNorm(layer.input_layernorm, use_triton)
        self.self_attn = FusedAttention(layer.self_attn, use_triton)
        self.post_attention_layernorm = FusedRMSNorm(layer.post_attention_layernorm, use_triton)
        self.mlp = FusedMLP(layer.mlp, use_triton)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        backend: str,
        cache: KVCache | None = None,
        attn_metadata: AttentionMetadata | None = None,
    ) -> torch.Tensor:
        out, h = self.forward_carry(x, None, cos, sin, backend, cache, attn_metadata)
        return h + out

    def forward_carry(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        backend: str,
        cache: KVCache | None = None,
        attn_metadata: AttentionMetadata | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer on the hidden states x + residual (x alone when residual is None):
        returns (mlp output, h), whose sum is the layer's output."""
        if residual is None:
            normed, residual = self.input_layernorm(x), x
        else:  # the previous layer's last add, rounded as `h + out` would round it
            normed, residual = self.input_layernorm(x, residual)
        a = self.self_attn(normed, cos, sin, backend, cache, attn_metadata)
        normed, h = self.post_attention_layernorm(a, residual=residual)  # h = residual + a
        return self.mlp(normed), h
