"""The engine's settings, validated once: memory, batching, scheduling, speculation.

The knobs are vLLM's (`block_size`, `max_num_seqs`, `max_num_batched_tokens`,
`enable_chunked_prefill`, `enable_prefix_caching`, `max_model_len`,
`num_speculative_tokens`), with vLLM's rule for the token budget: without chunked prefill
a whole prompt must fit in one step, so the budget is at least `max_model_len`.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEDULING_POLICIES = ("continuous", "static")


def _positive_int(name: str, value: object, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        none = " or None" if allow_none else ""
        raise ValueError(f"{name} must be an integer >= 1{none}, got {value!r}")


@dataclass
class EngineConfig:
    """How the engine batches, schedules and stores KV.

    block_size: token slots per KV block (paged attention).
    num_kv_blocks: blocks in the KV pool; None: sized from `kv_cache_memory`.
    kv_cache_memory: bytes for the KV pool when num_kv_blocks is None; None: on CUDA 85%
        of the free memory, on CPU what max_num_seqs sequences of max_model_len need,
        at most 512 MiB.
    max_num_seqs: sequences running at once.
    max_num_batched_tokens: the per-step token budget (decodes + prefill chunks); None:
        2048, or max_model_len when larger and chunked prefill is off.
    enable_chunked_prefill: split long prompts into chunks that fit the budget, so
        decodes keep running beside them.
    enable_prefix_caching: reuse the KV blocks of prompt prefixes already computed.
    max_model_len: the longest sequence (prompt + output); None: the model's context.
    scheduling: "continuous" (iteration-level: Orca, vLLM) or "static" (a batch is
        admitted only when the previous one has finished: the baseline).
    sort_by_length: static batching takes waiting prompts longest first (CTranslate2's
        batch reordering), so that a batch holds prompts of similar lengths.
    num_speculative_tokens: k > 0 turns on speculative decoding with a draft model.
    num_scheduler_steps: S > 1 lets a batch of greedy decodes run S steps on the GPU per
        engine step (vLLM's multi-step scheduling: each step's argmax feeds the next inside
        the CUDA graph, so the CPU schedules once per S tokens). CUDA graphs only.
    cuda_graphs: capture decode steps in CUDA graphs (CUDA only).
    cuda_graph_max_batch: the largest decode batch that runs as a graph.
    unified_attention: with Triton (CUDA), run each layer's attention over a step's prompt
        chunks and decodes as one kernel reading K/V in place through the block tables
        (`minillm.kernels.unified_attention`) instead of a paged decode kernel plus
        FlashAttention over gathered copies of the chunks' keys. Off by default: the split
        path is the one the committed GPU benchmarks measured.
    piecewise_max_tokens: with cuda_graphs, steps that are not pure decode batches replay
        the model's layers between its attention calls as graphs (`minillm.engine.piecewise`)
        when they hold at most this many tokens (0: such steps run eagerly).
    full_graph_max_tokens: with cuda_graphs and Triton, steps of prompt chunks (with or
        without decodes) of at most this many tokens replay one CUDA graph of the whole
        forward, attention included (`minillm.engine.full_graphs`); larger ones use the
        piecewise graphs. 0: off.
    """

    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    max_model_len: int | None = None
    scheduling: str = "continuous"
    sort_by_length: bool = False
    num_speculative_tokens: int = 0
    num_scheduler_steps: int = 1
    cuda_graphs: bool = True
    cuda_graph_max_batch: int = 256
    piecewise_max_tokens: int = 8192
    unified_attention: bool = False
    full_graph_max_tokens: int = 2048

    def __post_init__(self) -> None:
        _positive_int("block_size", self.block_size)
        _positive_int("num_kv_blocks", self.num_kv_blocks, allow_none=True)
        _positive_int("kv_cache_memory", self.kv_cache_memory, allow_none=True)
        _positive_int("max_num_seqs", self.max_num_seqs)
        _positive_int("max_num_batched_tokens", self.max_num_batched_tokens, allow_none=True)
        _positive_int("max_model_len", self.max_model_len, allow_none=True)
        _positive_int("cuda_graph_max_batch", self.cuda_graph_max_batch)
        for name in ("piecewise_max_tokens", "full_graph_max_tokens"):
            p = getattr(self, name)
            if isinstance(p, bool) or not isinstance(p, int) or p < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {p!r}")
        k = self.num_speculative_tokens
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= 16:
            raise ValueError(f"num_speculative_tokens must be an integer in [0, 16], got {k!r}")
        S = self.num_scheduler_steps
        if isinstance(S, bool) or not isinstance(S, int) or not 1 <= S <= 16:
            raise ValueError(f"num_scheduler_steps must be an integer in [1, 16], got {S!r}")
        if k and S > 1:
            raise ValueError("num_scheduler_steps > 1 and speculative decoding exclude each other")
        if self.scheduling not in SCHEDULING_POLICIES:
            raise ValueError(
                f"scheduling must be one of {SCHEDULING_POLICIES}, got {self.scheduling!r}"
            )
        for name in ("enable_chunked_prefill", "enable_prefix_caching", "sort_by_length",
                     "cuda_graphs", "unified_attention"):  # fmt: skip
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")

    def resolve(self, model_context: int) -> EngineConfig:
        """Fill in the defaults that depend on the model; check what must hold together."""
        max_len = self.max_model_len or model_context
        if max_len > model_context:
            raise ValueError(
                f"max_model_len {max_len} exceeds the model's context of {model_context} tokens"
            )
        budget = self.max_num_batched_tokens
        if budget is None:
            budget = 2048 if self.enable_chunked_prefill else max(2048, max_len)
        if not self.enable_chunked_prefill and budget < max_len:
            raise ValueError(
                f"without chunked prefill a whole prompt runs in one step: "
                f"max_num_batched_tokens ({budget}) must be >= max_model_len ({max_len})"
            )
        need = max(1 + self.num_speculative_tokens, self.num_scheduler_steps)  # one sequence
        if budget < need:
            raise ValueError(f"max_num_batched_tokens ({budget}) must be >= {need}")
        return EngineConfig(**{**self.__dict__, "max_model_len": max_len,
                               "max_num_batched_tokens": budget})  # fmt: skip
