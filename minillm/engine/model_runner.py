"""The model runner: packs a step's sequences into one batch without padding and runs it.

Each row of a step is a slice of one sequence: `token_ids` at positions start, start + 1,
..., whose K/V go to `slots`; its keys are the sequence's earlier tokens (found through
its block table) followed by the row's own. The runner concatenates the rows (N tokens),
builds the `AttentionMetadata` of vLLM's names (`slot_mapping`, `block_tables`,
`context_lens` for the decode rows, `cu_seqlens_q/k` and the gathered key slots for the
others), runs one forward and returns the logits of the rows that are sampled:

    input_ids  = [ seq 0 | seq 1 | ... ]                  (N,)  no padding anywhere
    cu_seqlens = [0, T_0, T_0 + T_1, ...]                 where each sequence starts

Decode rows (one token whose slot follows the block table) come first and go through
paged decode attention; on CUDA, a step made only of decodes replays a CUDA graph
(`minillm.engine.cuda_graphs`), so its hundreds of kernels cost one launch; any other
step replays the pieces of the forward between its attention calls
(`minillm.engine.piecewise`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from minillm.cache.paged import PagedKVCache
from minillm.layers.attention_metadata import AttentionMetadata
from minillm.model import CausalLM


@dataclass
class BatchRow:
    """One sequence's slice of a step (see the module docstring)."""

    token_ids: list[int]
    start: int  # position of token_ids[0]
    slots: list[int]  # pool slot of each token's K/V
    block_table: list[int]  # where positions 0 .. start - 1 live
    num_logits: int = 1  # logits wanted for the last num_logits tokens (0: none)


class ModelRunner:
    """Runs `model` over packed rows, with its KV pool `kv_cache` (one per model)."""

    def __init__(
        self,
        model: CausalLM,
        kv_cache: PagedKVCache,
        use_triton: bool = False,
        max_model_len: int | None = None,
    ):
        self.model, self.kv_cache = model, kv_cache
        self.block_size = kv_cache.block_size
        self.device = model.device
        self.use_triton = use_triton
        self.max_model_len = max_model_len or model.config.max_position_embeddings
        self.graphs = None  # a CUDAGraphs, set by `capture_cuda_graphs`
        self.piecewise = None  # a PiecewiseGraphs, set by `capture_piecewise_graphs`
        self.num_graph_steps = self.num_piecewise_steps = self.num_eager_steps = 0

    def capture_cuda_graphs(self, max_batch: int, max_blocks: int, capture: bool = True) -> None:
        """Capture decode steps of up to `max_batch` rows whose block tables have at most
        `max_blocks` entries (`minillm.engine.cuda_graphs`; capture=False runs the same
        static-buffer steps without a graph, which also works on a CPU)."""
        from minillm.engine.cuda_graphs import CUDAGraphs

        self.graphs = CUDAGraphs(self, max_batch, max_blocks, capture)

    def capture_piecewise_graphs(self, max_tokens: int, capture: bool = True) -> None:
        """Capture the model's forward between its attention calls for batches of up to
        `max_tokens` tokens (`minillm.engine.piecewise`; capture=False runs the same padded
        batches eagerly, also on a CPU)."""
        from minillm.engine.piecewise import PiecewiseGraphs

        self.piecewise = PiecewiseGraphs(self, max_tokens, capture)

    @torch.inference_mode()
    def warm_up_attention(self, max_tokens: int) -> None:
        """Run the Triton attention kernels once for every autotuning key a step can meet:
        prompt chunks of up to `max_tokens` queries (flash attention's key is the next
        power of two) and decode contexts up to max_model_len, split and not (paged
        decode's key). Autotuning a key takes ~0.4 s; done here, it never lands inside a
        step, where it would stall every running sequence."""
        from minillm.kernels.flash_attn import flash_attn_forward, seq_bucket
        from minillm.kernels.paged_attention import paged_attention

        c, dev, dtype = self.model.config, self.device, self.model.dtype
        H, Hkv, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        windows = {getattr(layer.self_attn, "window", None) for layer in self.model.model.layers}
        k_cache, v_cache = self.kv_cache.layer(0)
        top = seq_bucket(min(max_tokens, self.max_model_len))
        for T in (16 << i for i in range(top.bit_length() - 4)):  # 16, 32, ..., top
            q = torch.zeros(T, H, D, dtype=dtype, device=dev)
            kv = torch.zeros(T, Hkv, D, dtype=dtype, device=dev)
            cu = torch.tensor([0, T], dtype=torch.int32, device=dev)
            for w in windows:
                flash_attn_forward(q, kv, kv, True, w, D**-0.5, (cu, cu), (T, T))
        ctx, q = 256, torch.zeros(1, H, D, dtype=dtype, device=dev)
        while ctx // 2 < self.max_model_len:
            n = min(ctx, self.max_model_len)
            tables = torch.zeros(1, -(-n // self.block_size), dtype=torch.int32, device=dev)
            lens = torch.tensor([n], dtype=torch.int32, device=dev)
            for w, splits in itertools.product(windows, (1, 2)):
                paged_attention(q, k_cache, v_cache, tables, lens, window=w, num_splits=splits,
                                max_context_len=n, check_bounds=False)  # fmt: skip
            ctx *= 2
        torch.cuda.synchronize(dev)

    def _tensor(self, values: list[int], dtype=torch.int64) -> torch.Tensor:
        t = torch.tensor(values, dtype=dtype)
        return (
            t.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else t
        )

    def key_slots(self, row: BatchRow) -> list[int]:
        """Pool slots of every key of the row: positions 0 .. start - 1, then its tokens."""
        bs, table = self.block_size, row.block_table
        return [table[p // bs] * bs + p % bs for p in range(row.start)] + row.slots

    @torch.inference_mode()
    def execute(self, rows: list[BatchRow], num_decodes: int = 0) -> torch.Tensor:
        """Logits (R, V) of every row's last num_logits tokens, rows in order. The first
        `num_decodes` rows must be decodes: one token, in the slot its block table gives."""
        if not rows:
            raise ValueError("an empty batch")
        if self.graphs is not None and num_decodes == len(rows) and self.graphs.fits(len(rows)):
            self.num_graph_steps += 1
            return self.graphs.run(rows)
        ids, positions, slots = [], [], []
        for r in rows:
            ids += r.token_ids
            positions += range(r.start, r.start + len(r.token_ids))
            slots += r.slots
        logits_rows, offset = [], 0
        for r in rows:
            offset += len(r.token_ids)
            logits_rows += range(offset - r.num_logits, offset)
        md = AttentionMetadata(
            kv_cache=self.kv_cache,
            slot_mapping=self._tensor(slots),
            num_decodes=num_decodes,
            logits_indices=None if len(logits_rows) == offset else self._tensor(logits_rows),
            use_triton=self.use_triton,
            backend=self.model.attn_backend,
        )
        if num_decodes:
            decodes = rows[:num_decodes]
            width = max(len(r.block_table) for r in decodes)
            md.block_tables = self._tensor(
                [r.block_table + [0] * (width - len(r.block_table)) for r in decodes], torch.int32
            )  # (num_decodes, width)
            lens = [r.start + 1 for r in decodes]
            md.context_lens = self._tensor(lens, torch.int32)
            md.max_decode_context = max(lens)
        prefills = rows[num_decodes:]
        if prefills:
            md.query_lens = [len(r.token_ids) for r in prefills]
            md.key_lens = [r.start + len(r.token_ids) for r in prefills]
            key_slots = [s for r in prefills for s in self.key_slots(r)]
            md.kv_slots = self._tensor(key_slots)
            md.cu_seqlens_q = self._tensor(_prefix_sums(md.query_lens), torch.int32)
            md.cu_seqlens_k = self._tensor(_prefix_sums(md.key_lens), torch.int32)
        if self.piecewise is not None and self.piecewise.fits(len(ids)):
            self.num_piecewise_steps += 1
            hidden = self.piecewise.run(self._tensor(ids), self._tensor(positions), md)
            return self.model.compute_logits(hidden, md.logits_indices)
        self.num_eager_steps += 1
        return self.model(
            self._tensor(ids), self._tensor(positions), attn_metadata=md, check_inputs=False
        )

    def copy_slots(self, src: list[int], dst: list[int]) -> None:
        """Move K/V between pool slots in every layer (accepted speculative tokens leave
        their scratch slots for the slots the block manager gave them)."""
        if not src:
            return
        s, d = self._tensor(src), self._tensor(dst)
        for pool in (self.kv_cache.k_cache, self.kv_cache.v_cache):
            L, NB, BS, Hkv, D = pool.shape
            flat = pool.view(L, NB * BS, Hkv, D)
            flat[:, d] = flat[:, s]


def _prefix_sums(lens: list[int]) -> list[int]:
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return out
