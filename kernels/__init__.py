"""Triton kernels, installed as `minillm.kernels` (never as a top-level `kernels`).

Each kernel sits beside its naive PyTorch twin and follows the teaching order: the bytes
the naive op moves, pseudo-code, the kernel, its wrapper (check, allocate, launch), tests
on irregular shapes, and a benchmark. On a CPU the kernels run under the Triton
interpreter (`TRITON_INTERPRET=1`); on a CUDA GPU they compile.
"""

import os


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (no GPU compilation)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
