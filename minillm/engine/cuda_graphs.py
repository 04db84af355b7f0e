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

Each graph also ends with the greedy choice and its feedback: the argmax becomes the next
step's token id, positions and context lengths advance, and the slot of the next position
is looked up in the block table, all on the GPU (one Triton kernel after the argmax's
first pass, `minillm.kernels.greedy_feedback`, where PyTorch takes twenty small ones).
Replaying the graph S times then decodes S greedy tokens without the CPU (`run_steps`:
vLLM's multi-step scheduling), provided the block tables reach S - 1 positions further
(the engine's lookahead blocks).
"""

from __future__ import annotations

import gc
import warnings

import torch

from minillm.kernels.greedy_feedback import greedy_feedback, greedy_feedback_ref
from minillm.layers.attention_metadata import AttentionMetadata

MAX_STEPS = 16
BATCH_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 512)


class CUDAGraphs:
    """One captured decode forward per batch size up to `max_batch`, for one model runner."""

    def __init__(self, runner, max_batch: int, max_blocks: int, capture: bool = True):
        self.runner, self.model = runner, runner.model
        self.sizes = [s for s in BATCH_SIZES if s < max_batch] + [max_batch]
        device, n = runner.device, self.sizes[-1]
        self.max_blocks = max_blocks
        # The static inputs live in one int32 "inbox" (and its pinned host mirror), so a
        # step's inputs arrive in one copy: [ids, pos, slot, len] (4, n) | valid (n,) (0: a
        # padding row) | block tables (n, max_blocks).
        total = 5 * n + n * max_blocks
        self.inbox = torch.zeros(total, dtype=torch.int32, device=device)
        self.host = torch.zeros(total, dtype=torch.int32, pin_memory=device.type == "cuda")
        self._copied: torch.cuda.Event | None = None  # the last copy out of `host`
        self.meta = self.inbox[: 4 * n].view(4, n)  # ids, pos, slot, len
        self.valid = self.inbox[4 * n : 5 * n]
        self.tables = self.inbox[5 * n :].view(n, max_blocks)
        h = self.host.numpy()
        self._h_meta, self._h_valid = h[: 4 * n].reshape(4, n), h[4 * n : 5 * n]
        self._h_tables = h[5 * n :].reshape(n, max_blocks)
        self._h_meta[2], self._h_meta[3] = -1, 1  # padding rows store nothing, see one key
        self.inbox.copy_(self.host)
        self.steps = torch.zeros(MAX_STEPS, n, dtype=torch.int64, device=device)  # argmaxes
        self.step = torch.zeros(1, dtype=torch.int64, device=device)  # replays so far
        self.block_size = runner.block_size
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.capture = capture  # False: run the same static-buffer steps eagerly (tests, CPU)
        # the graph's tail as one Triton kernel (`minillm.kernels.greedy_feedback`)
        self.fused_feedback = runner.use_triton and device.type == "cuda"
        if capture:
            self._capture()

    def _forward(self, size: int) -> torch.Tensor:
        ids, pos, slots, lens = self.meta[:, :size]
        md = AttentionMetadata(
            kv_cache=self.runner.kv_cache, slot_mapping=slots, num_decodes=size,
            block_tables=self.tables[:size], context_lens=lens,
            max_decode_context=self.runner.max_model_len, use_triton=self.runner.use_triton,
        )  # fmt: skip
        logits = self.model(ids, pos, attn_metadata=md, check_inputs=False)  # (size, V)
        # The greedy token of each row becomes its next input; positions, lengths and
        # slots advance (past the table's end: unused); the replay counter stays in range
        # whatever replays the graph. One kernel on the GPU, twenty small ones in PyTorch.
        tail = greedy_feedback if self.fused_feedback else greedy_feedback_ref
        tail(logits, self.steps, self.step, self.meta, self.tables, self.valid, self.block_size)
        return logits

    @torch.inference_mode()
    def _capture(self) -> None:
        # No garbage collection while capturing: a collected pinned buffer or CUDA event
        # would call CUDA in the middle of a capture.
        gc.collect()
        gc.disable()
        try:
            self._capture_sizes()
        finally:
            gc.enable()

    def _capture_sizes(self) -> None:
        pool = None
        for size in reversed(self.sizes):  # largest first: the others reuse its memory
            self.step.zero_()
            try:
                self._forward(size)  # warm-up outside the graph: autotuning, lazy init
            except Exception as e:  # the kernel does not compile here: keep the PyTorch tail
                if not self.fused_feedback:
                    raise
                msg = f"greedy_feedback kernel failed ({type(e).__name__}: {e}); the decode "
                warnings.warn(msg + "graphs end with the PyTorch ops instead", stacklevel=2)
                self.fused_feedback = False
                self.step.zero_()
                self._forward(size)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._forward(size)
            pool = graph.pool()
            self.graphs[size], self.outputs[size] = graph, out
        torch.cuda.synchronize()

    def fits(self, batch: int) -> bool:
        return batch <= self.sizes[-1]

    def _load(self, rows, extra: tuple = ()) -> tuple[int, list[torch.Tensor]]:
        """Write the rows (one token each) and the padding into the static inputs, in one
        copy; `extra` host arrays are uploaded too (returned on the device). A row with
        num_logits == 0 is one the model only catches up on: it writes its K/V in the first
        step and is padding in the steps after it (its feedback slot is -1)."""
        b = len(rows)
        size = next(s for s in self.sizes if s >= b)
        if self._copied is not None:
            self._copied.synchronize()  # the previous copy has left the host mirror
        m, tables = self._h_meta, self._h_tables
        m[0, :size], m[1, :size], m[2, :size], m[3, :size] = 0, 0, -1, 1  # padding rows
        starts = [r.start for r in rows]
        m[0, :b] = [r.token_ids[0] for r in rows]
        m[1, :b] = starts
        m[2, :b] = [r.slots[0] for r in rows]
        m[3, :b] = [p + 1 for p in starts]
        self._h_valid[:size] = 0
        self._h_valid[:b] = [r.num_logits > 0 for r in rows]
        tables[:size] = 0
        for i, r in enumerate(rows):
            tables[i, : len(r.block_table)] = r.block_table
        n = 5 * self.sizes[-1] + size * self.max_blocks  # the rows of `size` only
        self.inbox[:n].copy_(self.host[:n], non_blocking=True)
        if self.inbox.is_cuda:
            self._copied = torch.cuda.Event()
            self._copied.record()
        self.step.zero_()
        return size, (self.runner._upload(list(extra)) if extra else [])

    def _replay(self, size: int) -> torch.Tensor:
        if not self.capture:
            self.outputs[size] = self._forward(size)
        else:
            self.graphs[size].replay()
        return self.outputs[size]

    def run(self, rows) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay for decode rows (one token each): logits (R, V) of the rows that want them,
        and their greedy tokens (R,), which the graph computed anyway."""
        size, _ = self._load(rows)
        logits = self._replay(size)[: len(rows)]
        best = self.steps[0, : len(rows)]  # the replay after `_load` records in row 0
        wanted = [i for i, r in enumerate(rows) if r.num_logits]
        if len(wanted) == len(rows):
            return logits, best
        return logits[wanted], best[wanted]

    def run_filled(self, rows, dst: list[int], src: list[int], tokens: torch.Tensor):
        """`run` for rows whose token ids are not all on the host: row dst[i] takes its id
        from tokens.flatten()[src[i]], a tensor on the device (another graph's output, e.g.
        a draft model's guesses), so nothing waits for it. The greedy token of every row
        (R,), on the device."""
        size, (d, s) = self._load(rows, (dst, src))
        self.meta[0].index_copy_(0, d, tokens.reshape(-1).index_select(0, s).to(self.meta.dtype))
        self._replay(size)
        return self.steps[0, : len(rows)]

    def run_steps(self, rows, steps: int) -> torch.Tensor:
        """`steps` greedy decode steps in a row: token ids (steps, B), on the GPU. Each row's
        block table must cover positions start .. start + steps - 1."""
        if not 1 <= steps <= MAX_STEPS:
            raise ValueError(f"steps must be in [1, {MAX_STEPS}], got {steps}")
        size, _ = self._load(rows)
        for _ in range(steps):
            self._replay(size)
        return self.steps[:steps, : len(rows)]
