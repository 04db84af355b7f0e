"""Full CUDA graphs for steps with prompt chunks: the whole forward, attention included.

Piecewise graphs (`minillm.engine.piecewise`) replay everything between the attention
calls and launch each layer's attention from Python, because attention depends on the
step: how many sequences, how many queries each brings, where their keys live. Those
launches still cost the CPU: on a 1B model with 64 decodes beside a 512-token chunk, a
step kept the CPU busy ~8 ms for ~2.4 ms of GPU work, and every decode beside the chunk
waited for it.

What stops a graph is not the attention itself but *where its description lives*. A
captured kernel reads the same addresses with the same launch grid at every replay, so:

  - every per-step tensor lives in one static device buffer, the inbox, which a step
    fills with a single host-to-device copy before the replay:

        inbox = [ ids | positions | slots | logits rows | block tables | cu_seqlens_q
                  | context lens | program -> sequence | program -> first query ]

  - attention is the unified kernel (`minillm.kernels.unified_attention`): one launch per
    layer for decodes and chunks alike, reading K/V through the block tables in place,
    driven by a program table. A batch of n <= N tokens in at most S sequences needs at
    most cdiv(N, BLOCK_M) + S programs, so the grid is fixed at that; the programs a step
    does not use point at a padding sequence with no queries and no keys, and store
    nothing;
  - padding tokens (n .. N) carry slot -1 (their K/V are not stored) and are computed
    and ignored, as in the piecewise graphs.

One graph per token count N (the piecewise sizes); a step runs in the smallest N >= n.
Then the final norm and the LM head run eagerly on the sampled rows (their count varies).
Steps too large for the biggest graph fall back to the piecewise graphs.
"""

from __future__ import annotations

import gc

import numpy as np
import torch

from minillm.engine.piecewise import capture_sizes
from minillm.layers.attention_metadata import AttentionMetadata


class FullGraphs:
    """Whole-step CUDA graphs for steps of up to `max_tokens` tokens in up to `max_seqs`
    sequences whose block tables have at most `max_blocks` entries. capture=False runs
    the same static buffers eagerly (a CPU, with Triton's interpreter)."""

    def __init__(self, runner, max_tokens: int, max_seqs: int, max_blocks: int,
                 capture: bool = True):  # fmt: skip
        from minillm.kernels.unified_attention import unified_block_q

        self.model, self.kv_cache, self.device = runner.model, runner.kv_cache, runner.device
        c = self.model.config
        self.block_m = unified_block_q(c.num_attention_heads // c.num_key_value_heads)
        self.sizes = capture_sizes(max_tokens)
        self.max_seqs, self.max_blocks = max_seqs, max_blocks
        N, S, W = self.sizes[-1], max_seqs, max_blocks
        # The padding sequence is number S: tables, lens and cu_seqlens have room for it.
        P = self.num_programs(N)
        layout = [("ids", N), ("positions", N), ("slots", N), ("logits", N),
                  ("tables", (S + 1) * W), ("cu", S + 2), ("lens", S + 1),
                  ("prog_seq", P), ("prog_start", P)]  # fmt: skip
        self.offsets, total = {}, 0
        for name, n in layout:
            self.offsets[name] = (total, n)
            total += n
        self.inbox = torch.zeros(total, dtype=torch.int64, device=self.device)
        on_cuda = self.device.type == "cuda"
        self.host = torch.zeros(total, dtype=torch.int64, pin_memory=on_cuda)
        self._copied: torch.cuda.Event | None = None  # the last copy out of `host`
        self.view = {name: self.inbox[o : o + n] for name, (o, n) in self.offsets.items()}
        self.tables = self.view["tables"].view(S + 1, W)
        self._reset_host()
        self.inbox.copy_(self.host)  # slots -1, programs on the padding sequence: inert
        self.capture = capture
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.hidden: dict[int, torch.Tensor] = {}
        if capture:
            self._capture()

    def num_programs(self, size: int) -> int:
        """Programs of a step of at most `size` tokens: sum_b cdiv(T_b, BLOCK_M) is at most
        cdiv(size, BLOCK_M) + (number of sequences)."""
        return -(-size // self.block_m) + self.max_seqs

    def fits(self, num_tokens: int, num_seqs: int, widest_table: int) -> bool:
        return (
            num_tokens <= self.sizes[-1]
            and num_seqs <= self.max_seqs
            and widest_table <= self.max_blocks
        )

    def metadata(self, size: int) -> AttentionMetadata:
        """The static metadata every graph of `size` tokens reads."""
        v, P = self.view, self.num_programs(size)
        return AttentionMetadata(
            kv_cache=self.kv_cache,
            slot_mapping=v["slots"][:size],
            use_triton=True,
            backend=self.model.attn_backend,
            unified=(
                self.tables,
                v["cu"],
                v["lens"],
                None,
                (v["prog_seq"][:P], v["prog_start"][:P]),
            ),
        )

    def _reset_host(self) -> None:
        h, (o, n) = self.host.numpy(), self.offsets["slots"]
        h[:] = 0
        h[o : o + n] = -1
        o, n = self.offsets["prog_seq"]
        h[o : o + n] = self.max_seqs  # the padding sequence: T = 0, S = 0

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        torch.cuda.synchronize(self.device)
        gc.collect()  # as `torch.cuda.graph` does: no garbage collection inside a capture
        gc.disable()
        try:
            with torch.cuda.stream(stream):
                for size in reversed(self.sizes):  # largest first: the others reuse its memory
                    ids, pos = self.view["ids"][:size], self.view["positions"][:size]
                    md = self.metadata(size)
                    self.model.packed_hidden_states(ids, pos, md)  # warm-up: compile, pick
                    torch.cuda.synchronize(self.device)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool, stream=stream):
                        self.hidden[size] = self.model.packed_hidden_states(ids, pos, md)
                    self.graphs[size] = graph
        finally:
            gc.enable()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)

    def run(self, ids: list[int], positions: list[int], slots: list[int],
            logits_rows: list[int] | None, tables: list[list[int]], context_lens: list[int],
            query_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """Hidden states (n, C) of the step and the device indices of its sampled rows
        (None: every row), through the graph of the smallest size >= n."""
        n, B = len(ids), len(query_lens)
        size = next(s for s in self.sizes if s >= n)
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy has left `host`
        self._reset_host()
        h, off = self.host.numpy(), self.offsets

        def put(name: str, values, at: int = 0) -> None:
            o = off[name][0] + at
            h[o : o + len(values)] = values

        put("ids", ids)
        put("positions", positions)
        put("slots", slots)
        if logits_rows is not None:
            put("logits", logits_rows)
        W = self.max_blocks
        for b, table in enumerate(tables):
            put("tables", table, b * W)
        cu = np.zeros(self.max_seqs + 2, dtype=np.int64)
        cu[1 : B + 1] = np.cumsum(query_lens)
        cu[B + 1 :] = n  # every later sequence (the padding one): no queries
        put("cu", cu)
        put("lens", context_lens)  # the padding sequence: 0 keys
        seq = [b for b, t in enumerate(query_lens) for _ in range(0, t, self.block_m)]
        start = [m0 for t in query_lens for m0 in range(0, t, self.block_m)]
        put("prog_seq", seq)
        put("prog_start", start)
        self.inbox.copy_(self.host, non_blocking=True)
        if self.device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()
        if self.capture:
            self.graphs[size].replay()
            hidden = self.hidden[size]
        else:
            v = self.view
            hidden = self.model.packed_hidden_states(
                v["ids"][:size], v["positions"][:size], self.metadata(size)
            )
        logits = None if logits_rows is None else self.view["logits"][: len(logits_rows)]
        return hidden[:n], logits
