"""CUDA graphs for decode steps: capture the forward once per batch size, then replay it.

A decode step of a small batch is launch-bound: a 1B model runs several hundred kernels
of a few microseconds each, and the CPU needs about as long to launch each one. A CUDA
graph records the whole sequence of launches once; a replay submits it in one call, so the
GPU runs the kernels back to back (vLLM and nano-vllm capture one graph per batch size
bucket, from large to small, sharing one memory pool).

A graph replays fixed memory, so its inputs live in static buffers (token ids, positions,
slot mapping, context lengths, block tables) that each step overwrites; a batch of b
sequences runs in the smallest captured size >= b, the padding rows writing no K/V
(slot -1) and attending to one key. Nothing in the captured forward may synchronize with
the host: the decode kernels get the context bound (`max_model_len`) up front, and
bounds checks are off (the scheduler built the tables).
"""

from __future__ import annotations

import numpy as np
import torch

from minillm.layers.attention_metadata import AttentionMetadata

BATCH_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 512)


class CUDAGraphs:
    """One captured decode forward per batch size up to `max_batch`, for one model runner."""

    def __init__(self, runner, max_batch: int, max_blocks: int):
        self.runner, self.model = runner, runner.model
        self.sizes = [s for s in BATCH_SIZES if s < max_batch] + [max_batch]
        device, n = runner.device, self.sizes[-1]
        self.max_blocks = max_blocks
        self.meta = torch.zeros(4, n, dtype=torch.int32, device=device)  # ids, pos, slot, len
        self.meta[2].fill_(-1)  # padding rows store nothing
        self.meta[3].fill_(1)  # ... and attend to one key
        self.tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self._capture()

    def _forward(self, size: int) -> torch.Tensor:
        ids, pos, slots, lens = self.meta[:, :size]
        md = AttentionMetadata(
            kv_cache=self.runner.kv_cache, slot_mapping=slots, num_decodes=size,
            block_tables=self.tables[:size], context_lens=lens,
            max_decode_context=self.runner.max_model_len, use_triton=True,
        )  # fmt: skip
        return self.model(ids, pos, attn_metadata=md, check_inputs=False)  # (size, V)

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        for size in reversed(self.sizes):  # largest first: the others reuse its memory
            self._forward(size)  # warm-up outside the graph: autotuning, lazy init
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._forward(size)
            pool = graph.pool()
            self.graphs[size], self.outputs[size] = graph, out
        torch.cuda.synchronize()

    def fits(self, batch: int) -> bool:
        return batch <= self.sizes[-1]

    def run(self, rows) -> torch.Tensor:
        """Replay for decode rows (one token each): logits (R, V) of the rows that want them."""
        b = len(rows)
        size = next(s for s in self.sizes if s >= b)
        meta = np.zeros((4, size), dtype=np.int32)
        meta[2], meta[3] = -1, 1
        tables = np.zeros((size, self.max_blocks), dtype=np.int32)
        for i, r in enumerate(rows):
            meta[:, i] = (r.token_ids[0], r.start, r.slots[0], r.start + 1)
            tables[i, : len(r.block_table)] = r.block_table
        self.meta[:, :size].copy_(torch.from_numpy(meta).pin_memory(), non_blocking=True)
        self.tables[:size].copy_(torch.from_numpy(tables).pin_memory(), non_blocking=True)
        self.graphs[size].replay()
        logits = self.outputs[size][:b]
        wanted = [i for i, r in enumerate(rows) if r.num_logits]
        return logits if len(wanted) == b else logits[wanted]
