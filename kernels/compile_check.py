"""Compile minillm's Triton kernels for an H100/H200 (sm_90) on a machine without a GPU.

Triton's CPU interpreter runs a kernel but never compiles it, so what only the compiler sees
(tile layouts, tensor-core instructions, shared memory, registers) goes unchecked on a
laptop. Triton's NVIDIA backend, ptxas included, ships with the CPU wheel, so the whole
pipeline (Triton IR -> GPU IR -> LLVM -> PTX -> cubin) runs anywhere. This tool compiles
every kernel with its autotune configs, pointers and strides marked 16-byte aligned as the
launcher marks them at run time (and the int arguments a spec types "i32:16", which the
launcher marks when their values are multiples of 16, as a model's dims are), and reports
registers and spills when a ptxas that reads the PTX is present.

    python -m minillm.kernels.compile_check            # every config (minutes)
    python -m minillm.kernels.compile_check --quick    # one config per kernel
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path


def _specs(quick: bool, dtype: str) -> list[tuple[str, object, dict, dict, object]]:
    from minillm.kernels import (
        flash_attn,
        flash_attn_bwd,
        gemv,
        greedy_feedback,
        paged_attention,
        reshape_and_cache,
    )

    first = (lambda cfgs: cfgs[:1]) if quick else (lambda cfgs: cfgs)
    flags = dict(HAS_WINDOW=False, IS_VARLEN=False, DOT_FP32=False, DOT_PRECISION="tf32")
    fwd_t = {n: f"*{dtype}" for n in "QKVO"}
    fwd_t |= {"LSE": "*fp32", "cu_seqlens_q": "*i32", "cu_seqlens_k": "*i32", "qk_scale": "fp32"}
    bwd_t = fwd_t | {n: f"*{dtype}" for n in ("DO", "DK", "DV", "DQ")}
    bwd_t |= {"DELTA": "*fp32", "sm_scale": "fp32"}
    dec_t = {"Q": f"*{dtype}", "KC": f"*{dtype}", "VC": f"*{dtype}", "O": f"*{dtype}",
             "O_part": "*fp32", "LSE_part": "*fp32", "block_tables": "*i32",
             "context_lens": "*i32", "qk_scale": "fp32"}  # fmt: skip
    specs = []
    for kernel, configs in (
        (flash_attn.flash_fwd_kernel, flash_attn.FWD_CONFIGS),
        (flash_attn_bwd.flash_bwd_dkdv_kernel, flash_attn_bwd.DKDV_CONFIGS),
        (flash_attn_bwd.flash_bwd_dq_kernel, flash_attn_bwd.DQ_CONFIGS),
    ):
        for causal in (True,) if quick else (True, False):
            for cfg in first(configs):
                ce = dict(HEAD_DIM=128, CAUSAL=causal, **flags, **cfg.kwargs)
                label = f"{kernel.__name__} causal={causal} {cfg.kwargs} w{cfg.num_warps}"
                specs.append((label, kernel, fwd_t if kernel is flash_attn.flash_fwd_kernel
                              else bwd_t, ce, cfg))  # fmt: skip
    for split in (False, True):
        for cfg in first(paged_attention.DECODE_CONFIGS):
            ce = dict(HEAD_DIM=128, PAGE_SIZE=16, BLOCK_G=16, HAS_WINDOW=False, SPLIT=split,
                      DOT_FP32=False, DOT_PRECISION="tf32", **cfg.kwargs)  # fmt: skip
            label = f"paged_decode_kernel split={split} {cfg.kwargs} w{cfg.num_warps}"
            specs.append((label, paged_attention.paged_decode_kernel, dec_t, ce, cfg))
    specs.append(("merge_splits_kernel", paged_attention.merge_splits_kernel,
                  {"O_part": "*fp32", "LSE_part": "*fp32", "O": f"*{dtype}"},
                  dict(HEAD_DIM=128, BLOCK_S=8), None))  # fmt: skip
    specs.append(("reshape_and_cache_kernel", reshape_and_cache.reshape_and_cache_kernel,
                  {n: f"*{dtype}" for n in ("K", "V", "KC", "VC")} | {"slot_mapping": "*i32"},
                  dict(HEAD_DIM=128, BLOCK=1024), None))  # fmt: skip
    specs.append(("rotary_and_cache_kernel", reshape_and_cache.rotary_and_cache_kernel,
                  {n: f"*{dtype}" for n in ("Q", "K", "V", "COS", "SIN", "KC", "VC")}
                  | {"slot_mapping": "*i32"},
                  dict(HALF=64, BLOCK_H=32, BLOCK_HKV=8, BLOCK_D=64), None))  # fmt: skip
    tail_t = {"values": f"*{dtype}", "within": "*i64", "steps": "*i64", "step": "*i64",
              "meta": "*i32", "tables": "*i32", "valid": "*i32"}  # fmt: skip
    tail_ce = dict(CHUNK=1024, PAGE=16, MAX_STEPS=16, BLOCK_R=16, BLOCK_B=128)
    specs.append(("greedy_feedback_kernel", greedy_feedback.greedy_feedback_kernel, tail_t,
                  tail_ce, None))  # fmt: skip
    gemv_t = {n: f"*{dtype}" for n in "XWBY"} | {"N": "i32:16", "K": "i32:16"}
    gemv_cases = [(False, False, 3072, 2048), (True, False, 2048, 8192)]  # qkv, down 1B
    if not quick:  # Qwen2's qkv bias; BLOCK_N 8 (gate_up 1B)
        gemv_cases += [(False, True, 3072, 2048), (False, False, 16384, 2048)]
    for silu_mul, bias, N, K in gemv_cases:
        cfg = gemv.gemv_config(N, K)
        ce = dict(HAS_BIAS=bias, SILU_MUL=silu_mul, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k)
        label = f"gemv_kernel silu_mul={silu_mul} bias={bias} N={N} K={K} {cfg}"
        specs.append((label, gemv.gemv_kernel, gemv_t, ce, cfg))
    return specs


def _registers(ptx: str) -> str:
    """Registers and spills from ptxas -v, if a ptxas new enough for this PTX is around."""
    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for name in ("ptxas-blackwell", "ptxas"):
        if (bin_dir / name).exists():
            with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
                f.write(ptx)
            out = subprocess.run([str(bin_dir / name), "-arch=sm_90a", "-v", f.name, "-o",
                                  os.devnull], capture_output=True, text=True)  # fmt: skip
            os.unlink(f.name)
            regs = re.search(r"Used (\d+) registers", out.stdout + out.stderr)
            spill = re.search(r"(\d+) bytes spill stores", out.stdout + out.stderr)
            if regs and spill:
                return f"{regs.group(1)} registers, {spill.group(1)} bytes spilled"
    return "registers unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one config per kernel")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    args = parser.parse_args(argv)
    if "minillm.kernels.flash_attn" in sys.modules or os.environ.get("TRITON_INTERPRET") == "1":
        print("run this in a fresh process without TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    os.environ["TRITON_INTERPRET"] = "0"  # compile, do not interpret (even without a GPU)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default, stated
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    failures = 0
    for label, kernel, types, constexprs, cfg in _specs(args.quick, args.dtype):
        names = kernel.arg_names
        signature = {n: "constexpr" if n in constexprs else types.get(n, "i32").split(":")[0]
                     for n in names}  # fmt: skip
        aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
                   if signature[n].startswith("*") or n.startswith("stride")
                   or types.get(n, "").endswith(":16")}  # fmt: skip
        options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages} if cfg else {}
        try:
            compiled = triton.compile(
                ASTSource(kernel, signature, constexprs, aligned),
                target=GPUTarget("cuda", 90, 32),
                options=options,
            )
        except Exception as e:  # report every kernel, then fail
            failures += 1
            print(f"FAIL {label}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
            continue
        smem = compiled.metadata.shared
        print(f"ok   {label}: {smem} B shared, {_registers(compiled.asm['ptx'])}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
