"""Parallelism on torch.distributed: tensor, pipeline, data (DDP, ZeRO) and sequence.

Everything runs on `torch.distributed` process groups, passed explicitly: gloo on CPU
(tests, laptops), NCCL on GPUs, launched with `torchrun` (`init_distributed`) or, on one
machine, with `spawn`. Each technique is tested against the same model on one process.

    comm          collectives with clear timeout errors; CommStats counts bytes sent
    launch        init_distributed (torchrun), spawn (gloo processes with a time limit)
    tensor        Megatron's f/g operators, ColumnParallelLinear, RowParallelLinear
    vocab         VocabParallelEmbedding, vocab_parallel_cross_entropy
    tensor_model  apply_tensor_parallel: a CausalLM sharded by heads and MLP columns
    schedule      GPipe and 1F1B programs, their simulated timeline, the bubble formula
    pipeline      PipelineStage, run_pipeline, Recorder (the measured timeline)
    data          DataParallel: DDP with gradient buckets overlapped with the backward
    zero          ZeroDataParallel: ZeRO stages 1-3 and offload
    zero_memory   the ZeRO paper's memory formulas and the measured per-rank bytes
    ring          ring attention (blockwise, online-softmax merge, causal)
    ulysses       DeepSpeed-Ulysses (all-to-all between sequence and heads)
    sequence      apply_sequence_parallel: a CausalLM with ring or Ulysses attention
"""

from minillm.parallel.comm import CollectiveTimeoutError, CommStats
from minillm.parallel.data import DataParallel
from minillm.parallel.launch import SpawnError, SpawnTimeoutError, init_distributed, spawn
from minillm.parallel.pipeline import PipelineStage, Recorder, run_pipeline
from minillm.parallel.ring import merge_attention_blocks, ring_attention
from minillm.parallel.schedule import (
    gpipe_schedule,
    one_f_one_b_schedule,
    simulate,
    theoretical_bubble,
)
from minillm.parallel.sequence import apply_sequence_parallel, shard_sequence
from minillm.parallel.tensor import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
)
from minillm.parallel.tensor_model import apply_tensor_parallel
from minillm.parallel.ulysses import ulysses_attention
from minillm.parallel.vocab import VocabParallelEmbedding, vocab_parallel_cross_entropy
from minillm.parallel.zero import ZeroDataParallel
from minillm.parallel.zero_memory import measure_model_states, zero_model_state_bytes

__all__ = [
    "CollectiveTimeoutError",
    "ColumnParallelLinear",
    "CommStats",
    "DataParallel",
    "PipelineStage",
    "Recorder",
    "RowParallelLinear",
    "SpawnError",
    "SpawnTimeoutError",
    "VocabParallelEmbedding",
    "ZeroDataParallel",
    "apply_sequence_parallel",
    "apply_tensor_parallel",
    "copy_to_tensor_parallel_region",
    "gpipe_schedule",
    "init_distributed",
    "measure_model_states",
    "merge_attention_blocks",
    "one_f_one_b_schedule",
    "reduce_from_tensor_parallel_region",
    "ring_attention",
    "run_pipeline",
    "shard_sequence",
    "simulate",
    "spawn",
    "theoretical_bubble",
    "ulysses_attention",
    "vocab_parallel_cross_entropy",
    "zero_model_state_bytes",
]
