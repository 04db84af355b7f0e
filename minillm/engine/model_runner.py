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
step of up to a few thousand tokens replays one graph of the whole forward, attention
included (`minillm.engine.full_graphs`), and a larger one the pieces of the forward
between its attention calls (`minillm.engine.piecewise`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
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
        unified_attention: bool = False,
    ):
        self.model, self.kv_cache = model, kv_cache
        self.block_size = kv_cache.block_size
        self.device = model.device
        self.use_triton = use_triton
        self.unified_attention = unified_attention  # one Triton kernel for a step's attention
        self.max_model_len = max_model_len or model.config.max_position_embeddings
        self.graphs = None  # a CUDAGraphs, set by `capture_cuda_graphs`
        self.piecewise = None  # a PiecewiseGraphs, set by `capture_piecewise_graphs`
        self.full = None  # a FullGraphs, set by `capture_full_graphs`
        self.num_graph_steps = self.num_piecewise_steps = self.num_eager_steps = 0
        self.num_full_steps = 0
        # the greedy tokens of the last `execute`'s rows when a decode graph computed them
        # (its tail takes the argmax for the next step anyway): sampling need not redo it
        self.graph_argmax: torch.Tensor | None = None
        self._staging: torch.Tensor | None = None  # pinned host buffer of `_upload`
        self._staged: torch.cuda.Event | None = None  # its last copy

    def capture_cuda_graphs(self, max_batch: int, max_blocks: int, capture: bool = True) -> None:
        """Capture decode steps of up to `max_batch` rows whose block tables have at most
        `max_blocks` entries (`minillm.engine.cuda_graphs`; capture=False runs the same
        static-buffer steps without a graph, which also works on a CPU)."""
        from minillm.engine.cuda_graphs import CUDAGraphs

        self.graphs = CUDAGraphs(self, max_batch, max_blocks, capture)

    def capture_piecewise_graphs(
        self, max_tokens: int, capture: bool = True, above: int = 0
    ) -> None:
        """Capture the model's forward between its attention calls for batches of up to
        `max_tokens` tokens, sizes above `above` only (`minillm.engine.piecewise`;
        capture=False runs the same padded batches eagerly, also on a CPU)."""
        from minillm.engine.piecewise import PiecewiseGraphs

        self.piecewise = PiecewiseGraphs(self, max_tokens, capture, above)

    def capture_full_graphs(
        self, max_tokens: int, max_seqs: int, max_blocks: int, capture: bool = True
    ) -> None:
        """Capture whole steps of up to `max_tokens` tokens in up to `max_seqs` sequences,
        attention included (`minillm.engine.full_graphs`; Triton kernels; capture=False
        runs the same static buffers eagerly, also on a CPU under the interpreter)."""
        from minillm.engine.full_graphs import FullGraphs

        self.full = FullGraphs(self, max_tokens, max_seqs, max_blocks, capture)

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

    def _upload(self, arrays: list) -> list[torch.Tensor]:
        """Host integer arrays -> device int64 tensors, in one copy: on CUDA through a
        pinned staging buffer, so the copy runs asynchronously (pinning each small array
        anew costs more than the whole copy)."""
        parts = [np.asarray(a, dtype=np.int64) for a in arrays]
        flat = np.concatenate([a.ravel() for a in parts])
        if self.device.type != "cuda":
            t = torch.from_numpy(flat)
        else:
            n = flat.size
            if self._staging is None or self._staging.numel() < n:
                size = max(n, 2 * (0 if self._staging is None else self._staging.numel()), 4096)
                self._staging = torch.empty(size, dtype=torch.int64, pin_memory=True)
            elif self._staged is not None:
                self._staged.synchronize()  # the previous copy out of the buffer is done
            host = self._staging[:n]
            host.numpy()[:] = flat
            t = host.to(self.device, non_blocking=True)
            self._staged = torch.cuda.Event()
            self._staged.record()
        out = torch.split(t, [a.size for a in parts])
        return [o.view(a.shape) for o, a in zip(out, parts, strict=True)]

    def key_slots(self, row: BatchRow) -> np.ndarray:
        """Pool slots of every key of the row: positions 0 .. start - 1, then its tokens."""
        bs, table = self.block_size, np.asarray(row.block_table, dtype=np.int64)
        prefix = (table[:, None] * bs + np.arange(bs)).ravel()[: row.start]  # (start,)
        return np.concatenate([prefix, np.asarray(row.slots, dtype=np.int64)])

    @torch.inference_mode()
    def execute(self, rows: list[BatchRow], num_decodes: int = 0) -> torch.Tensor:
        """Logits (R, V) of every row's last num_logits tokens, rows in order. The first
        `num_decodes` rows must be decodes: one token, in the slot its block table gives."""
        if not rows:
            raise ValueError("an empty batch")
        self.graph_argmax = None
        if self.graphs is not None and num_decodes == len(rows) and self.graphs.fits(len(rows)):
            self.num_graph_steps += 1
            logits, self.graph_argmax = self.graphs.run(rows)
            return logits
        ids, positions, slots = [], [], []
        logits_rows, offset = [], 0
        for r in rows:
            n = len(r.token_ids)
            ids += r.token_ids
            positions += range(r.start, r.start + n)
            slots += r.slots
            offset += n
            logits_rows += range(offset - r.num_logits, offset)
        widest = max(len(r.block_table) for r in rows)
        if self.full is not None and self.full.fits(offset, len(rows), widest):
            self.num_full_steps += 1
            hidden, sampled = self.full.run(
                ids, positions, slots, None if len(logits_rows) == offset else logits_rows,
                [r.block_table for r in rows], [r.start + len(r.token_ids) for r in rows],
                [len(r.token_ids) for r in rows],
            )  # fmt: skip
            return self.model.compute_logits(hidden, sampled)
        # Everything the step needs on the device, in one upload: (name, values).
        host = [("ids", ids), ("positions", positions), ("slots", slots)]
        if len(logits_rows) != offset:
            host.append(("logits", logits_rows))
        decodes, prefills = rows[:num_decodes], rows[num_decodes:]
        if self.unified_attention:  # every row is a sequence of T >= 1 queries
            from minillm.kernels.unified_attention import unified_block_q

            decodes, prefills = [], []
            query_lens = [len(r.token_ids) for r in rows]
            width = max(len(r.block_table) for r in rows)
            tables = [r.block_table + [0] * (width - len(r.block_table)) for r in rows]
            c = self.model.config
            bq = unified_block_q(c.num_attention_heads // c.num_key_value_heads)
            programs = [(b, m0) for b, t in enumerate(query_lens) for m0 in range(0, t, bq)]
            host += [
                ("u_tables", np.array(tables).reshape(len(rows), width)),
                ("u_lens", [r.start + len(r.token_ids) for r in rows]),
                ("u_cu", _prefix_sums(query_lens)),
                ("u_programs", np.array(programs).reshape(-1, 2).T),
            ]
        if decodes:
            width = max(len(r.block_table) for r in decodes)
            tables = [r.block_table + [0] * (width - len(r.block_table)) for r in decodes]
            lens = [r.start + 1 for r in decodes]
            host += [("tables", np.array(tables).reshape(len(decodes), width)), ("lens", lens)]
        if prefills:
            query_lens = [len(r.token_ids) for r in prefills]
            key_lens = [r.start + len(r.token_ids) for r in prefills]
            host += [
                ("kv_slots", np.concatenate([self.key_slots(r) for r in prefills])),
                ("cu_q", _prefix_sums(query_lens)),
                ("cu_k", _prefix_sums(key_lens)),
            ]
        dev = dict(zip([k for k, _ in host], self._upload([v for _, v in host]), strict=True))
        md = AttentionMetadata(
            kv_cache=self.kv_cache,
            slot_mapping=dev["slots"],
            num_decodes=num_decodes,
            logits_indices=dev.get("logits"),
            use_triton=self.use_triton,
            backend=self.model.attn_backend,
        )
        if decodes:
            md.block_tables = dev["tables"].int()  # (num_decodes, width)
            md.context_lens = dev["lens"].int()
            md.max_decode_context = max(lens)
        if self.unified_attention:
            seqs, starts = dev["u_programs"].int()
            md.unified = (dev["u_tables"].int(), dev["u_cu"].int(), dev["u_lens"].int(),
                          query_lens, (seqs, starts))  # fmt: skip
        if prefills:
            md.query_lens, md.key_lens, md.kv_slots = query_lens, key_lens, dev["kv_slots"]
            md.cu_seqlens_q, md.cu_seqlens_k = dev["cu_q"].int(), dev["cu_k"].int()
        if self.piecewise is not None and self.piecewise.fits(len(ids)):
            self.num_piecewise_steps += 1
            hidden = self.piecewise.run(dev["ids"], dev["positions"], md)
            return self.model.compute_logits(hidden, md.logits_indices)
        self.num_eager_steps += 1
        return self.model(dev["ids"], dev["positions"], attn_metadata=md, check_inputs=False)

    def copy_slots(self, src: list[int], dst: list[int]) -> None:
        """Move K/V between pool slots in every layer (accepted speculative tokens leave
        their scratch slots for the slots the block manager gave them)."""
        if not src:
            return
        s, d = self._upload([src, dst])
        for pool in (self.kv_cache.k_cache, self.kv_cache.v_cache):
            L, NB, BS, Hkv, D = pool.shape
            flat = pool.view(L, NB * BS, Hkv, D)
            flat[:, d] = flat[:, s]


def _prefix_sums(lens: list[int]) -> list[int]:
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return out
