"""The Triton W4A16 kernel against its naive twin: CPU interpreter at small sizes (fp32,
fp16), CUDA at real sizes (`gpu`)."""

import functools
import os

import pytest
import torch

if not torch.cuda.is_available():  # the interpreter must be chosen before kernels are defined
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from minillm.kernels.w4a16 import KernelConfig, w4a16_matmul, w4a16_matmul_naive

from minillm.quant.linear import QuantLinear
from minillm.quant.rtn import quantize_rtn

interpreter = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter test")


@functools.lru_cache(maxsize=4)
def _layer(N, K, G, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g).to(device)  # quantized and packed on the device
    return QuantLinear.from_params(quantize_rtn(w, 4, G))


def _tolerance(ref: torch.Tensor, dtype: torch.dtype) -> float:
    """fp32 accumulation differs from fp64 by ~K * eps32 relative; a 16-bit output is
    rounded once more: half an ulp of the largest output, 2^-11 (fp16) or 2^-8 (bf16)."""
    rel = {torch.float32: 1e-5, torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
    return rel * float(ref.abs().max())


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("M", "split_k"), [(1, 1), (5, 2), (19, 4)])
def test_kernel_equals_naive_in_the_interpreter(dtype, M, split_k):
    N, K, G = 96, 256, 64  # N not a multiple of the 64-wide block: masked columns
    m = _layer(N, K, G)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = w4a16_matmul(x, m.qweight, m.scales, m.qzeros, G, KernelConfig(16, 64, 64, split_k))
    ref = w4a16_matmul_naive(x.double(), m.qweight, m.scales.double(), m.qzeros, G)
    assert y.dtype == dtype and y.shape == (M, N)
    assert (y.double() - ref).abs().max() <= _tolerance(ref, dtype)


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    ("block_k", "split_k", "prefetch"),
    [(64, 1, False), (64, 3, False), (128, 2, False), (64, 3, True), (128, 1, True)],
)
def test_one_row_kernel_equals_naive_in_the_interpreter(dtype, block_k, split_k, prefetch):
    N, K, G = 96, 512, 128  # masked columns; 3 slices of 8 (or 4) K blocks: a short last one
    m = _layer(N, K, G)
    x = torch.randn(1, K, generator=torch.Generator().manual_seed(2)).to(dtype)
    cfg = KernelConfig(1, 64, block_k, split_k, gemv=True, prefetch=prefetch)
    y = w4a16_matmul(x, m.qweight, m.scales, m.qzeros, G, cfg)
    ref = w4a16_matmul_naive(x.double(), m.qweight, m.scales.double(), m.qzeros, G)
    assert y.dtype == dtype and y.shape == (1, N)
    assert (y.double() - ref).abs().max() <= _tolerance(ref, dtype)
    with pytest.raises(ValueError, match="one-row kernel takes M = 1"):
        w4a16_matmul(torch.cat([x, x]), m.qweight, m.scales, m.qzeros, G, cfg)


@interpreter
@pytest.mark.parametrize(
    "cfg", [KernelConfig(16, 64, 64, 4), KernelConfig(1, 64, 64, 4, gemv=True)]
)
def test_split_k_slices_leave_their_counters_at_zero(cfg):
    """The last slice of each tile adds the partial sums and resets the tile's counter: a
    second call (the counters are shared) gives the same output, and they end at zero."""
    from minillm.kernels.w4a16 import _LOCKS

    N, K, G = 160, 512, 64  # 3 column blocks, 8 K blocks in 4 slices
    m = _layer(N, K, G)
    x = torch.randn(1 if cfg.gemv else 20, K, generator=torch.Generator().manual_seed(3))
    first = w4a16_matmul(x, m.qweight, m.scales, m.qzeros, G, cfg)
    assert _LOCKS and all(int(lock.abs().sum()) == 0 for lock in _LOCKS.values())
    second = w4a16_matmul(x, m.qweight, m.scales, m.qzeros, G, cfg)
    assert torch.equal(first, second)
    ref = w4a16_matmul_naive(x.double(), m.qweight, m.scales.double(), m.qzeros, G)
    assert (first.double() - ref).abs().max() <= _tolerance(ref, torch.float32)


@interpreter
def test_kernel_default_config_in_the_interpreter():
    m = _layer(64, 256, 128)
    x = torch.randn(3, 256, dtype=torch.float16)
    ref = w4a16_matmul_naive(x.double(), m.qweight, m.scales.double(), m.qzeros, 128)
    y = w4a16_matmul(x, m.qweight, m.scales, m.qzeros, 128)
    assert (y.double() - ref).abs().max() <= _tolerance(ref, torch.float16)


def test_kernel_rejects_bad_input():
    m = _layer(64, 256, 64)
    x = torch.randn(2, 256)
    with pytest.raises(ValueError, match="group_size=48 must be positive and divide K=256"):
        w4a16_matmul(x, m.qweight, m.scales, m.qzeros, 48)
    with pytest.raises(ValueError, match="qweight must be int32"):
        w4a16_matmul(torch.randn(2, 128), m.qweight, m.scales, m.qzeros, 64)
    with pytest.raises(ValueError, match="scales must be"):
        w4a16_matmul(x, m.qweight, m.scales[:2], m.qzeros, 64)


GPU_CASES = [
    (dtype, M, N, K)
    for dtype in (torch.float16, torch.bfloat16)
    for M in (1, 16, 77)
    for N, K in ((4096, 4096), (11008, 4096), (4096, 11008), (1000, 1024))
] + [(torch.float32, M, 1000, 1024) for M in (1, 77)]  # N = 1000: masked columns


@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "M", "N", "K"), GPU_CASES)
def test_kernel_equals_naive_on_gpu(dtype, M, N, K):
    m = _layer(N, K, 128, device="cuda")
    x = torch.randn(M, K, device="cuda").to(dtype)
    ref = w4a16_matmul_naive(x.double(), m.qweight, m.scales.double(), m.qzeros, 128)
    y = w4a16_matmul(x, m.qweight, m.scales, m.qzeros, 128)
    assert y.dtype == dtype
    assert (y.double() - ref).abs().max() <= _tolerance(ref, dtype)


@pytest.mark.gpu
def test_quant_linear_uses_the_kernel_on_gpu():
    m = _layer(4096, 4096, 128, device="cuda")
    x = torch.randn(2, 3, 4096, device="cuda", dtype=torch.float16)
    y = m(x)
    m.use_kernel = False  # the naive twin
    try:
        ref = m(x)
    finally:
        m.use_kernel = True  # the layer is cached for the other tests
    assert (y.double() - ref.double()).abs().max() <= 2 * _tolerance(ref.double(), torch.float16)
