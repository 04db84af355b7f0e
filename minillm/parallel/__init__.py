"""Parallelism on torch.distributed: tensor, pipeline, data (DDP, ZeRO) and sequence.

Everything runs on `torch.distributed` process groups: gloo on CPU (tests, laptops),
NCCL on GPUs, launched with `torchrun`. Each technique is tested against the same model
on one process.
"""
