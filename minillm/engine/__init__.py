"""A mini inference engine: continuous batching over a paged KV cache, chunked prefill,
prefix caching, speculative decoding and CUDA graphs, behind vLLM's offline API.

    LLM(model).generate(prompts, SamplingParams)       llm.py       the API (+ streaming)
    LLMEngine.step(): schedule -> run -> postprocess   engine.py    the loop
    Scheduler, ScheduledSeq                            scheduler.py  who computes what
    Sequence, RequestOutput                            sequence.py   a request's state
    ModelRunner, BatchRow                              model_runner.py  packed forward
    SpeculativeDecoder, rejection_sample               speculative.py  draft + verify
    inject_fused_modules                               inject.py, fusion.py  fused layers

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
