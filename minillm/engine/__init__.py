"""A mini inference engine: continuous batching over a paged KV cache, chunked prefill,
prefix caching, speculative decoding and CUDA graphs, behind vLLM's offline API.

    LLM(model).generate(prompts, SamplingParams)       llm.py       the API (+ streaming)
    LLMEngine.step(): schedule -> run -> postprocess   engine.py    the loop
    Scheduler, ScheduledSeq                            scheduler.py  who computes what
    Sequence, RequestOutput                            sequence.py   a request's state
    ModelRunner, BatchRow                              model_runner.py  packed forward
    sample_tokens (per-sequence SamplingParams)        sampler.py
    CUDAGraphs (decode steps, multi-step feedback)     cuda_graphs.py
    lookahead slots, multi-step decoding               lookahead.py
    SpeculativeDecoder, rejection_sample               speculative.py  draft + verify
    inject_fused_modules, quantize_weights             inject.py, fusion.py  fused layers
    run_recorded, plot_timeline                        timeline.py   for the notebook

The layout and names follow nano-vllm and vLLM (`block_table`, `slot_mapping`,
`cu_seqlens_q/k`, `context_lens`), so a reader can move on to either.
"""

from minillm.engine.config import EngineConfig
from minillm.engine.engine import LLMEngine
from minillm.engine.llm import LLM, StreamDelta
from minillm.engine.sequence import RequestMetrics, RequestOutput, Sequence, SequenceStatus
from minillm.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "EngineConfig",
    "LLMEngine",
    "RequestMetrics",
    "RequestOutput",
    "SamplingParams",
    "Sequence",
    "SequenceStatus",
    "StreamDelta",
]
