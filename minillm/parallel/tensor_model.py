"""Tensor parallelism applied to a whole `CausalLM`, by swapping its modules for sharded ones.

Per decoder layer (Megatron's layout; each block costs one all-reduce forward and one
backward):

    attention  q/k/v_proj -> ColumnParallelLinear (by heads: H/p query, Hkv/p kv heads)
               o_proj     -> RowParallelLinear
    MLP        gate/up    -> ColumnParallelLinear (by the intermediate dimension F/p)
               down_proj  -> RowParallelLinear

and the vocabulary: embed_tokens -> VocabParallelEmbedding, lm_head -> ColumnParallelLinear
over V (tied weights stay tied: both hold the same V/p rows). Norms are replicated;
Qwen3's per-head q/k norms see only this rank's heads, so their weight gradients are
summed over ranks (HeadParallelRMSNorm). The
attention module keeps its own forward: it reads `num_heads`/`num_kv_heads`, which become
the per-rank counts, so a rank attends with its own heads only (GQA groups stay whole,
since rank i holds query heads [i H/p, (i+1) H/p) and kv heads [i Hkv/p, (i+1) Hkv/p)).

The sharded model is still a `CausalLM`: `model(ids)` returns the full logits (the LM head
gathers them), so generation code runs unchanged on every rank. For training, set
`model.lm_head.gather_output = False` and use `vocab_parallel_cross_entropy` on the
(B, T, V/p) logits.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from minillm.layers.norm import rms_norm
from minillm.parallel.comm import CommStats, ProcessGroup
from minillm.parallel.tensor import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tensor_parallel_region,
)
from minillm.parallel.vocab import VocabParallelEmbedding


class HeadParallelRMSNorm(nn.Module):
    """A per-head RMSNorm (Qwen3's q_norm / k_norm) on this rank's heads only.

    Its weight is shared by all heads, so each rank's gradient covers only its heads; the
    weight goes through `f` (identity forward, all-reduce backward) to sum them."""

    def __init__(self, norm: nn.Module, group: ProcessGroup, stats: CommStats | None = None):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps
        self.group, self.stats = group, stats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = copy_to_tensor_parallel_region(self.weight, self.group, self.stats)
        return rms_norm(x, weight, self.eps)


def check_tensor_parallel(config, world_size: int) -> None:
    """Raise a ValueError naming every dimension that `world_size` does not divide."""
    dims = {
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "intermediate_size": config.intermediate_size,
        "vocab_size": config.vocab_size,
    }
    bad = [f"{k}={v}" for k, v in dims.items() if v % world_size]
    if bad:
        g = math.gcd(*dims.values())
        allowed = [d for d in range(1, g + 1) if g % d == 0]
        raise ValueError(
            f"tensor parallelism splits heads, kv heads, the MLP dimension and the vocabulary "
            f"evenly over the ranks; a world size of {world_size} does not divide "
            f"{', '.join(bad)}. World sizes that work for this model: {allowed}"
        )


def _require(module: nn.Module, names: tuple[str, ...], what: str) -> None:
    missing = [n for n in names if not isinstance(getattr(module, n, None), nn.Linear)]
    if missing:
        raise TypeError(
            f"cannot shard {what} {type(module).__name__}: it has no nn.Linear "
            f"{', '.join(missing)} (tensor parallelism expects the Llama layout "
            f"{', '.join(names)})"
        )


@torch.no_grad()
def apply_tensor_parallel(
    model: nn.Module, group: ProcessGroup, stats: CommStats | None = None
) -> nn.Module:
    """Shard `model` (a CausalLM, same weights on every rank) over `group`, in place.

    Each rank keeps its shard of every matrix; the full weights are released. Returns the
    model, whose `forward` now communicates over `group`."""
    p = dist.get_world_size(group)
    check_tensor_parallel(model.config, p)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        _require(attn, ("q_proj", "k_proj", "v_proj", "o_proj"), "attention")
        _require(mlp, ("gate_proj", "up_proj", "down_proj"), "MLP")
        for name in ("q_proj", "k_proj", "v_proj"):
            full = getattr(attn, name)
            setattr(attn, name, ColumnParallelLinear.from_linear(full, group, stats=stats))
        attn.o_proj = RowParallelLinear.from_linear(attn.o_proj, group, stats=stats)
        attn.num_heads //= p
        attn.num_kv_heads //= p
        if getattr(attn, "q_norm", None) is not None:
            attn.q_norm = HeadParallelRMSNorm(attn.q_norm, group, stats)
            attn.k_norm = HeadParallelRMSNorm(attn.k_norm, group, stats)
        mlp.gate_proj = ColumnParallelLinear.from_linear(mlp.gate_proj, group, stats=stats)
        mlp.up_proj = ColumnParallelLinear.from_linear(mlp.up_proj, group, stats=stats)
        mlp.down_proj = RowParallelLinear.from_linear(mlp.down_proj, group, stats=stats)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    model.model.embed_tokens = VocabParallelEmbedding.from_embedding(
        model.model.embed_tokens, group, stats
    )
    head = ColumnParallelLinear.from_linear(model.lm_head, group, gather_output=True, stats=stats)
    if tied:
        head.weight = model.model.embed_tokens.weight
    model.lm_head = head
    model.tensor_parallel_group = group
    return model


def shard_tensors(sharded_model: nn.Module, full: dict[str, torch.Tensor]) -> dict:
    """This rank's slice of full-model tensors (weights or gradients), keyed by parameter
    name: for checking a sharded model against the unsharded one, name by name."""
    out = {}
    for mod_name, mod in sharded_model.named_modules():
        for p_name, _ in mod.named_parameters(recurse=False):
            key = f"{mod_name}.{p_name}" if mod_name else p_name
            t = full[key]
            sharded = isinstance(mod, (ColumnParallelLinear, VocabParallelEmbedding)) or (
                isinstance(mod, RowParallelLinear) and p_name == "weight"
            )
            out[key] = mod.shard(t) if sharded else t
    return out


def per_rank_config(config, world_size: int):
    """The config one rank's attention really runs: H/p query and Hkv/p kv heads (for
    sizing a KV cache of a sharded model); everything else unchanged."""
    check_tensor_parallel(config, world_size)
    return config.replace(
        num_attention_heads=config.num_attention_heads // world_size,
        num_key_value_heads=config.num_key_value_heads // world_size,
        head_dim=config.head_dim,
    )


def tensor_parallel_shapes(config, world_size: int) -> dict[str, tuple]:
    """Per-rank weight shapes of one decoder layer and the vocabulary matrices:
    name -> (full shape, shard shape, split dimension: 0 rows / 1 columns / None whole)."""
    check_tensor_parallel(config, world_size)
    C, F, D = config.hidden_size, config.intermediate_size, config.head_dim
    H, Hkv, V, p = (
        config.num_attention_heads,
        config.num_key_value_heads,
        config.vocab_size,
        world_size,
    )
    full = {
        "q_proj": (H * D, C),
        "k_proj": (Hkv * D, C),
        "v_proj": (Hkv * D, C),
        "o_proj": (C, H * D),
        "gate_proj": (F, C),
        "up_proj": (F, C),
        "down_proj": (C, F),
        "embed_tokens": (V, C),
        "lm_head": (V, C),
        "input_layernorm": (C,),
    }
    split = {"o_proj": 1, "down_proj": 1, "input_layernorm": None}
    out = {}
    for name, shape in full.items():
        dim = split.get(name, 0)
        shard = list(shape)
        if dim is not None:
            shard[dim] //= p
        out[name] = (shape, tuple(shard), dim)
    return out
