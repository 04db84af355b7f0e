"""Triton on a CPU: switch on Triton's interpreter when there is no CUDA GPU.

`TRITON_INTERPRET=1` makes `@triton.jit` functions run in Python on CPU tensors, but Triton
reads it when a function is *defined*, and Triton defines its own standard library
(`tl.max`, `tl.sum`, `tl.zeros`, ...) when it is first imported. torch imports triton early
(`torch._dynamo` does, e.g. while initializing a model), so by the time a minillm kernel
module loads, those functions may already be compiled-mode `JITFunction`s, which the
interpreter cannot call ("Cannot call @triton.jit'd outside of the scope of a kernel").
`use_interpreter_without_gpu` sets the variable and re-wraps such functions for the
interpreter. Kernel modules call it before defining their kernels.
"""

from __future__ import annotations

import os
import sys

import torch


def use_interpreter_without_gpu() -> bool:
    """Without CUDA, turn on Triton's interpreter (idempotent); True when interpreting."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    wrapped: dict[object, InterpretedFunction] = {}
    for name, module in list(sys.modules.items()):
        if not name.startswith("triton.language") or module is None:
            continue
        for attr, value in list(vars(module).items()):
            if isinstance(value, JITFunction):  # defined before the interpreter was on
                if value.fn not in wrapped:
                    wrapped[value.fn] = InterpretedFunction(value.fn)
                setattr(module, attr, wrapped[value.fn])
    return True
