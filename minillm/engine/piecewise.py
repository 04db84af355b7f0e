"""Piecewise CUDA graphs: every step that mixes prompt chunks with decodes, cheap on the CPU.

A step made only of decodes replays one CUDA graph (`minillm.engine.cuda_graphs`). A step
that carries prompt chunks cannot: its attention depends on how many sequences it holds and
how long each one is, which a graph would freeze. Run eagerly, though, a 16-layer model
launches several hundred kernels from Python, and on a GPU that costs the CPU far longer
than the GPU needs to run them (a 1B model: ~20 ms of launches for ~3 ms of GPU work), so
every step with a prompt chunk in it would stall the decodes beside it.

vLLM's answer (V1, "piecewise CUDA graphs"): everything *between* the attention calls
only ever sees the N tokens of the batch as independent rows (embeddings, norms,
projections, RoPE, the MLP), so it can be captured once per token count N and replayed,
while attention runs eagerly between the pieces with the step's own metadata:

    graph 0: embed, RoPE tables, layer 0 up to q, k, v
    eager  : attention of layer 0 (writes its output into a static buffer)
    graph 1: o_proj of layer 0, its MLP, layer 1 up to q, k, v
    ...
    graph L: o_proj and MLP of the last layer -> hidden states (N, C)

then the final norm and the LM head run on the rows that are sampled. A batch of n tokens
runs in the smallest captured size >= n; the padding rows (token 0 at position 0, slot -1)
are computed and ignored, since no piece mixes rows. The capture runs the model's own
forward and ends one graph / begins the next inside each layer's `attend` call, so the
pieces are exactly the model's code.
"""

from __future__ import annotations

import gc

import torch

from minillm.layers.attention_metadata import AttentionMetadata

SIZES = (16, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512, 640, 768, 896, 1024,
         1280, 1536, 1792, 2048, 2560, 3072, 3584, 4096, 5120, 6144, 7168, 8192)  # fmt: skip


def capture_sizes(max_tokens: int, above: int = 0) -> list[int]:
    """The token counts captured for batches of up to `max_tokens` tokens (and more than
    `above`: smaller batches go elsewhere)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    return [s for s in SIZES if above < s < max_tokens] + [max_tokens]


class _Capture:
    """Stands in for the metadata while the forward is captured: `attend` ends the current
    graph, hands back the static output buffer of that layer's attention, and begins the
    next graph. Records (layer_idx, q, k, v, window) of every attention call."""

    def __init__(self, pool, out_buffers: list[torch.Tensor], size: int):
        self.pool, self.out_buffers, self.size = pool, out_buffers, size
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.sites: list[tuple] = []
        self.begin()

    def begin(self) -> None:
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin(pool=self.pool)
        self.graphs.append(graph)

    def attend(self, layer_idx, q, k, v, window=None):
        self.graphs[-1].capture_end()
        self.sites.append((layer_idx, q, k, v, window))
        self.begin()
        return self.out_buffers[len(self.sites) - 1][: self.size]


class _Padded:
    """Runs `md.attend` on the first n rows of padded q, k, v; the output keeps the padded
    length (the rows past n hold zeros). The eager twin of a replay (capture=False)."""

    def __init__(self, md: AttentionMetadata, n: int):
        self.md, self.n = md, n

    def attend(self, layer_idx, q, k, v, window=None):
        n, y = self.n, torch.zeros_like(q)
        y[:n] = self.md.attend(layer_idx, q[:n], k[:n], v[:n], window)
        return y


class PiecewiseGraphs:
    """The captured pieces of the model's packed forward, per token count (module doc)."""

    def __init__(self, runner, max_tokens: int, capture: bool = True, above: int = 0):
        self.model, self.device = runner.model, runner.device
        self.sizes = capture_sizes(max_tokens, above)
        n = self.sizes[-1]
        self.ids = torch.zeros(n, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(n, dtype=torch.long, device=self.device)
        self.capture = capture
        self.pieces: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.sites: dict[int, list[tuple]] = {}
        self.hidden: dict[int, torch.Tensor] = {}
        if capture:
            self._capture()

    def fits(self, num_tokens: int) -> bool:
        return num_tokens <= self.sizes[-1]

    @torch.inference_mode()
    def _capture(self) -> None:
        model, n = self.model, self.sizes[-1]
        c = model.config
        layers = len(model.model.layers)
        # One attention output buffer per layer, shared by every size (one replays at a time).
        outs = [torch.zeros(n, c.num_attention_heads, c.head_dim, dtype=model.dtype,
                            device=self.device) for _ in range(layers)]  # fmt: skip
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        # As `torch.cuda.graph` does: collect garbage first, and none during the capture (a
        # collected pinned buffer or CUDA event would call CUDA in the middle of it).
        torch.cuda.synchronize(self.device)
        gc.collect()
        gc.disable()
        try:
            self._capture_sizes(model, outs, pool, stream)
        finally:
            gc.enable()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)

    def _capture_sizes(self, model, outs, pool, stream) -> None:
        with torch.cuda.stream(stream):
            for size in reversed(self.sizes):  # largest first: the others reuse its memory
                ids, pos = self.ids[:size], self.positions[:size]
                # Warm-up outside the graphs (Triton compiles for this size, cuBLAS picks
                # its kernels), attention replaced by its output buffers.
                model.packed_hidden_states(ids, pos, _Warmup(outs, size))
                torch.cuda.synchronize(self.device)
                cap = _Capture(pool, outs, size)
                hidden = model.packed_hidden_states(ids, pos, cap)
                cap.graphs[-1].capture_end()
                self.pieces[size], self.hidden[size] = cap.graphs, hidden
                self.sites[size] = [(*site, outs[i]) for i, site in enumerate(cap.sites)]

    def run(self, ids: torch.Tensor, positions: torch.Tensor, md: AttentionMetadata):
        """Hidden states (n, C) of the packed batch ids/positions (n,) (on the device)."""
        n = ids.shape[0]
        size = next(s for s in self.sizes if s >= n)
        self.ids[:n].copy_(ids)
        self.positions[:n].copy_(positions)
        self.ids[n:size].zero_()
        self.positions[n:size].zero_()
        if not self.capture:
            padded = _Padded(md, n)
            return self.model.packed_hidden_states(self.ids[:size], self.positions[:size], padded)[
                :n
            ]
        pieces, sites = self.pieces[size], self.sites[size]
        for graph, (layer_idx, q, k, v, window, out) in zip(pieces, sites, strict=False):
            graph.replay()
            md.attend(layer_idx, q[:n], k[:n], v[:n], window, out=out[:n])
        pieces[-1].replay()
        return self.hidden[size][:n]


class _Warmup:
    """The warm-up's attention: the output buffer (no attention computed)."""

    def __init__(self, outs: list[torch.Tensor], size: int):
        self.outs, self.size, self.calls = outs, size, 0

    def attend(self, layer_idx, q, k, v, window=None):
        self.calls += 1
        return self.outs[self.calls - 1][: self.size]
