"""The paged KV pool, and paged attention in plain PyTorch: the reference for the kernels.

The pool holds, per layer, k_cache and v_cache of shape (num_blocks, block_size, Hkv, D)
(the layout of vLLM's FlashAttention backend and nano-vllm). A `BlockManager` decides which
blocks a sequence owns; the pool only stores numbers. Two operations touch it:

  - write (vLLM's `reshape_and_cache`): the K/V of N new tokens (N, Hkv, D) go to their
    slots, k_cache.view(-1, Hkv, D)[slot_mapping] = key; a negative slot means "skip";
  - read (paged attention): sequence b's keys are block_tables[b, t // block_size], slot
    t % block_size, for t < context_lens[b]; its newest token attends to all of them.

`paged_attention_ref` gathers the keys and runs the softmax formula; the Triton kernels in
`minillm.kernels.paged_attention` and `minillm.kernels.reshape_and_cache` must match it.
"""

from __future__ import annotations

import torch

from minillm.config import ModelConfig


class PagedKVCache:
    """K and V pools for every layer: (L, num_blocks, block_size, Hkv, D) each."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        for name, value in (("num_layers", num_layers), ("num_blocks", num_blocks),
                            ("block_size", block_size), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks, self.block_size = num_blocks, block_size

    @classmethod
    def for_model(
        cls, config: ModelConfig, num_blocks: int, block_size: int = 16, **kwargs
    ) -> PagedKVCache:
        return cls(
            config.num_hidden_layers,
            num_blocks,
            block_size,
            config.num_key_value_heads,
            config.head_dim,
            **kwargs,
        )

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        """K and V of `block_size` tokens over all layers: 2 * L * block_size * Hkv * D * bytes."""
        elem = torch.empty((), dtype=dtype).element_size()
        return (2 * config.num_hidden_layers * block_size * config.num_key_value_heads
                * config.head_dim * elem)  # fmt: skip

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache) of layer i, each (num_blocks, block_size, Hkv, D)."""
        return self.k_cache[i], self.v_cache[i]

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: block src -> block dst in every layer, for each (src, dst) pair."""
        if pairs:
            src = torch.tensor([p[0] for p in pairs], device=self.k_cache.device)
            dst = torch.tensor([p[1] for p in pairs], device=self.k_cache.device)
            self.k_cache[:, dst] = self.k_cache[:, src]
            self.v_cache[:, dst] = self.v_cache[:, src]


def block_tables_tensor(
    tables: list[list[int]], device: torch.device | str | None = None
) -> torch.Tensor:
    """Pad block tables to one (B, max_blocks) int32 tensor (padding -1 is never read)."""
    width = max(len(t) for t in tables)
    out = torch.full((len(tables), width), -1, dtype=torch.int32)
    for i, t in enumerate(tables):
        out[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    return out.to(device)


def check_paged_inputs(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    check_bounds: bool = True,
) -> None:
    """Clear errors for shapes and for block tables pointing outside the pool.

    `check_bounds` reads the tables on the host (one device sync): every block a sequence
    uses must lie in [0, num_blocks), and every context must fit its table."""
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            "k_cache and v_cache must both be (num_blocks, block_size, Hkv, D), got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if block_tables.dim() != 2 or context_lens.dim() != 1:
        raise ValueError(
            f"block_tables must be (B, max_blocks) and context_lens (B,), got "
            f"{tuple(block_tables.shape)} and {tuple(context_lens.shape)}"
        )
    if block_tables.shape[0] != context_lens.shape[0]:
        raise ValueError(
            f"{block_tables.shape[0]} block tables but {context_lens.shape[0]} context lengths"
        )
    for name, t in (("block_tables", block_tables), ("context_lens", context_lens)):
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    if not check_bounds:
        return
    num_blocks, block_size = k_cache.shape[:2]
    lens = context_lens.to("cpu", torch.int64)
    if lens.numel() and (lens.min() < 1 or lens.max() > block_tables.shape[1] * block_size):
        raise ValueError(
            f"context lengths must lie in [1, {block_tables.shape[1] * block_size}] "
            f"(max_blocks * block_size), got {lens.tolist()}"
        )
    used = torch.arange(block_tables.shape[1])[None, :] < (-(-lens // block_size))[:, None]
    entries = block_tables.to("cpu", torch.int64)[used]
    bad = entries[(entries < 0) | (entries >= num_blocks)]
    if bad.numel():
        raise ValueError(
            f"a block table points outside the pool of {num_blocks} blocks: "
            f"entries {bad[:8].tolist()}"
        )


def reshape_and_cache_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write key/value (N, Hkv, D) into the pool at `slot_mapping` (N,); slots < 0 skip."""
    keep = slot_mapping >= 0
    Hkv, D = k_cache.shape[2:]
    k_cache.view(-1, Hkv, D)[slot_mapping[keep].long()] = key[keep].to(k_cache.dtype)
    v_cache.view(-1, Hkv, D)[slot_mapping[keep].long()] = value[keep].to(v_cache.dtype)


def gather_kv(
    cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor
) -> torch.Tensor:
    """The keys (or values) of each sequence, contiguous and zero padded: (B, Hkv, S_max, D).

    This copy is the "naive" way to use a paged cache with a dense attention kernel."""
    block_size, Hkv, D = cache.shape[1:]
    S = int(context_lens.max())
    pos = torch.arange(S, device=cache.device)  # (S,)
    blocks = block_tables[:, pos // block_size].long().clamp(min=0)  # (B, S)
    slots = blocks * block_size + pos % block_size  # (B, S)
    out = cache.view(-1, Hkv, D)[slots]  # (B, S, Hkv, D)
    out = out.masked_fill((pos[None, :] >= context_lens[:, None])[..., None, None], 0)
    return out.transpose(1, 2)  # (B, Hkv, S, D)


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    window: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Decode attention over a paged cache: q (B, H, D), one query per sequence, at position
    context_lens[b] - 1 -> (B, H, D). Softmax in fp32 (fp64 for fp64 inputs)."""
    check_paged_inputs(k_cache, v_cache, block_tables, context_lens)
    B, H, D = q.shape
    Hkv = k_cache.shape[2]
    if H % Hkv:
        raise ValueError(f"{H} query heads cannot be grouped over {Hkv} kv heads")
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    k = gather_kv(k_cache, block_tables, context_lens).to(acc)  # (B, Hkv, S, D)
    v = gather_kv(v_cache, block_tables, context_lens).to(acc)
    S = k.shape[2]
    qg = q.to(acc).view(B, Hkv, H // Hkv, D)  # (B, Hkv, G, D): a kv head's query group
    scores = torch.einsum("bkgd,bksd->bkgs", qg, k) * (D**-0.5 if scale is None else scale)
    pos = torch.arange(S, device=q.device)[None, :]  # (1, S)
    last = context_lens.to(q.device)[:, None] - 1  # (B, 1): the query's position
    visible = pos <= last
    if window is not None:
        visible &= pos > last - window
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    out = torch.einsum("bkgs,bksd->bkgd", scores.softmax(-1), v)  # (B, Hkv, G, D)
    return out.reshape(B, H, D).to(q.dtype)
