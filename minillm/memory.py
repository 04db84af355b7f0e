"""The KV-cache memory calculator: how many bytes the cache of a model needs.

Every token keeps, in every layer, one key and one value vector per kv head:

    KV bytes per token = 2 (K and V) x L x Hkv x D x bytes per element
    KV bytes           = per token x tokens (context) x sequences (batch)

Grouped-query attention (GQA; Ainslie et al., 2023) shrinks Hkv, and with it the cache,
by H / Hkv: Llama-2-70B has 64 query heads but 8 kv heads, so its cache is 8x smaller
than the same model with multi-head attention (a 70B MHA model needs 20 GiB per 8K-token
request in fp16, the "10-20 GB" of the textbooks). These numbers are exactly the bytes
`minillm.cache.StaticKVCache` allocates (tested), and the GPU benchmark checks them
against the device's allocator.

`python -m minillm.memory` prints the table for well-known shapes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from minillm.config import ModelConfig

GiB = 2**30


def dtype_bytes(dtype: torch.dtype) -> int:
    """Bytes of one element of `dtype` (2 for bf16/fp16, 4 for fp32...)."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    return torch.empty((), dtype=dtype).element_size()


def kv_cache_bytes_per_token(config: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> int:
    """2 x L x Hkv x D x bytes: the keys and values of one token in every layer."""
    L, Hkv, D = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    return 2 * L * Hkv * D * dtype_bytes(dtype)


def kv_cache_bytes(
    config: ModelConfig,
    num_tokens: int,
    batch_size: int = 1,
    dtype: torch.dtype = torch.bfloat16,
) -> int:
    """Bytes of the KV cache of `batch_size` sequences of `num_tokens` tokens each."""
    for name, value in (("num_tokens", num_tokens), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return kv_cache_bytes_per_token(config, dtype) * num_tokens * batch_size


def weight_bytes(config: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of the model's parameters (what the cache competes with for memory)."""
    return config.num_parameters() * dtype_bytes(dtype)


def max_batch_size(
    config: ModelConfig,
    num_tokens: int,
    memory_bytes: int,
    dtype: torch.dtype = torch.bfloat16,
) -> int:
    """How many sequences of `num_tokens` fit in `memory_bytes` next to the weights."""
    free = memory_bytes - weight_bytes(config, dtype)
    per_sequence = kv_cache_bytes(config, num_tokens, 1, dtype)
    return max(0, free // per_sequence) if per_sequence else 0


def table_models() -> dict[str, ModelConfig]:
    """The real shapes of the table: Llama-2-70B twice, as published (GQA, 8 kv heads) and
    as it would be with multi-head attention (64 kv heads), to show what GQA changes."""
    llama2_70b = ModelConfig.from_name("llama-2-70b")
    return {
        "Llama-2-7B (MHA)": ModelConfig.from_name("llama-2-7b"),
        "Llama-2-70B as MHA": llama2_70b.replace(num_key_value_heads=64),
        "Llama-2-70B (GQA)": llama2_70b,
        "Llama-3-8B (GQA)": ModelConfig.from_name("llama-3-8b"),
        "Qwen3-0.6B (GQA)": ModelConfig.from_name("qwen3-0.6b"),
    }


def kv_cache_table(
    models: dict[str, ModelConfig] | None = None,
    context_lengths: Sequence[int] = (2048, 8192, 32768),
    batch_sizes: Sequence[int] = (1, 8, 32),
    dtype: torch.dtype = torch.bfloat16,
) -> list[dict]:
    """One row per model x context x batch: the cache in GiB and as a multiple of the weights."""
    rows = []
    for name, config in (models or table_models()).items():
        H, Hkv = config.num_attention_heads, config.num_key_value_heads
        for context in context_lengths:
            for batch in batch_sizes:
                nbytes = kv_cache_bytes(config, context, batch, dtype)
                rows.append(
                    {
                        "model": name,
                        "layers": config.num_hidden_layers,
                        "heads": f"{H}/{Hkv}",
                        "head_dim": config.head_dim,
                        "kib_per_token": kv_cache_bytes_per_token(config, dtype) / 2**10,
                        "context": context,
                        "batch": batch,
                        "kv_gib": nbytes / GiB,
                        "weights_gib": weight_bytes(config, dtype) / GiB,
                    }
                )
    return rows


def format_table(rows: list[dict]) -> str:
    """The rows of `kv_cache_table` as a Markdown table."""
    lines = [
        "| model | L | H/Hkv | D | KiB/token | context | batch | KV cache GiB | weights GiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['layers']} | {r['heads']} | {r['head_dim']} | "
            f"{r['kib_per_token']:.0f} | {r['context']} | {r['batch']} | {r['kv_gib']:.2f} | "
            f"{r['weights_gib']:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_table(kv_cache_table()))
