"""NF4: the codebook, blockwise quantization, double quantization, the dequant kernel."""

import importlib.util
import os

import pytest
import torch
from minillm.kernels.nf4 import dequantize_nf4_naive, dequantize_nf4_triton

import minillm
from minillm.quant.nf4 import (
    NF4Linear,
    NF4Quantizer,
    NF4Tensor,
    codebook_error,
    constant_bits_per_parameter,
    dequantized_copy,
    fp4_codebook,
    int4_codebook,
    nf4_codebook,
    quantize_to_codebook,
)

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
HAS_TRITON = importlib.util.find_spec("triton") is not None


def test_codebook_is_normal_quantiles_with_an_exact_zero():
    cb = nf4_codebook()
    assert cb.shape == (16,) and torch.all(cb[1:] > cb[:-1])
    assert cb[0] == -1 and cb[-1] == 1 and cb[7] == 0
    assert (cb > 0).sum() == 8 and (cb < 0).sum() == 7  # asymmetric: one more positive value
    # each positive value is the normal quantile at an equally spaced probability
    top = torch.special.ndtri(torch.tensor(1 - (1 / 32 + 1 / 30) / 2, dtype=torch.float64))
    probs = torch.distributions.Normal(0, 1).cdf(cb[8:].double() * top)  # undo the normalizing
    steps = probs.diff()
    assert torch.allclose(steps, steps[0], rtol=1e-4)


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed (optional check)")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside bitsandbytes' import
def test_codebook_and_blocks_agree_with_bitsandbytes():
    import bitsandbytes.functional as bnbf

    ref = bnbf.get_4bit_type("nf4", device="cpu")
    # bitsandbytes builds its table with scipy's norm.ppf in float64 and stores float32
    torch.testing.assert_close(nf4_codebook(), ref, rtol=0, atol=1e-6)
    torch.manual_seed(0)
    w = torch.randn(96, 320) * 0.02
    q, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    codes, absmax = quantize_to_codebook(w, nf4_codebook())
    assert torch.equal((codes[0::2] << 4) | codes[1::2], q.reshape(-1))
    assert torch.equal(absmax, state.absmax)


def test_nf4_beats_fp4_and_int4_on_normal_weights():
    torch.manual_seed(0)
    w = torch.randn(512, 512)
    errors = {name: codebook_error(w, cb()) for name, cb in
              (("nf4", nf4_codebook), ("fp4", fp4_codebook), ("int4", int4_codebook))}  # fmt: skip
    assert errors["nf4"] < errors["fp4"] and errors["nf4"] < errors["int4"], errors


def test_double_quantization_bits_are_exact():
    assert constant_bits_per_parameter(False) == 0.5
    assert constant_bits_per_parameter(True) == 8 / 64 + 32 / (64 * 256)  # 0.126953125
    t = NF4Tensor.from_weight(torch.randn(256, 1024))  # 4096 blocks, 16 second-level blocks
    bits = t.storage_bits()
    assert bits == {"codes": 4 * 256 * 1024, "absmax": 8 * 4096, "absmax_scales": 32 * 16,
                    "absmax_mean": 32}  # fmt: skip
    assert t.bits_per_parameter() == pytest.approx(4 + 0.126953125 + 32 / (256 * 1024))


def test_double_quantized_absmax_is_close_and_weights_are_within_a_code_step():
    torch.manual_seed(1)
    w = torch.randn(100, 200) * torch.logspace(-3, 0, 100)[:, None]  # irregular: padding
    t = NF4Tensor.from_weight(w)
    back = t.dequantize()
    assert back.shape == w.shape
    _, absmax = quantize_to_codebook(w, nf4_codebook())
    blocks = torch.nn.functional.pad(w.reshape(-1), (0, (-w.numel()) % 64)).reshape(-1, 64)
    # half the widest gap between NF4 codes (-1 to -0.696) times the block's absmax, plus
    # the absmax's own int8 error (<= scale / 254 of the centered value) times |code| <= 1
    gap = float(nf4_codebook().diff().max())
    scale = (absmax - absmax.mean()).abs().max()
    bound = 0.5 * gap * absmax + scale / 254 + 1e-6
    err = torch.nn.functional.pad((back - w).reshape(-1), (0, (-w.numel()) % 64)).reshape(-1, 64)
    assert (err.abs() <= bound[:, None]).all()
    assert blocks.shape[0] == t.absmax_q.numel()


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_kernel_equals_the_naive_twin_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(2)
    for shape in [(1823, 13), (257, 320), (3, 5)]:  # irregular: masking at the end
        t = NF4Tensor.from_weight(torch.randn(shape))
        args = (t.packed, t.absmax_q, t.absmax_scale, t.absmax_mean, t.codebook, t.numel)
        want = dequantize_nf4_naive(*args)
        got = dequantize_nf4_triton(*args, block=4096)
        assert torch.equal(got, want), shape


@pytest.mark.gpu
def test_triton_kernel_on_gpu_large_and_bf16():
    torch.manual_seed(3)
    w = torch.randn(4099, 1031, device="cuda")
    t = NF4Tensor.from_weight(w)
    args = (t.packed, t.absmax_q, t.absmax_scale, t.absmax_mean, t.codebook, t.numel)
    torch.testing.assert_close(dequantize_nf4_triton(*args), dequantize_nf4_naive(*args))
    # bf16 output: both round an fp32 product once; the GPU may fuse the absmax's
    # multiply-add (FMA), so the fp32 values can differ by an ulp and flip one bf16
    # rounding: at most one bf16 step (2^-8 relative)
    got = dequantize_nf4_triton(*args, dtype=torch.bfloat16).float()
    want = dequantize_nf4_naive(*args, dtype=torch.bfloat16).float()
    torch.testing.assert_close(got, want, rtol=2**-7, atol=1e-6)


def test_triton_wrapper_refuses_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    t = NF4Tensor.from_weight(torch.randn(4, 64))
    if not os.environ.get("TRITON_INTERPRET"):
        with pytest.raises(RuntimeError, match="CUDA"):
            dequantize_nf4_triton(t.packed, t.absmax_q, t.absmax_scale, t.absmax_mean,
                                  t.codebook, t.numel)  # fmt: skip


def test_nf4_linear_computes_with_the_dequantized_weight():
    model = minillm.load_model("minillm-tiny-draft")
    layer = model.model.layers[0].mlp.up_proj
    nf4 = NF4Linear(NF4Tensor.from_weight(layer.weight))
    x = torch.randn(2, 3, layer.in_features)
    want = x @ nf4.dequantized_weight().t()
    torch.testing.assert_close(nf4(x), want)
    qmodel = NF4Quantizer().apply(model, progress=False)
    fp = minillm.quant.footprint(qmodel)
    assert 4.1 < fp.bits_per_linear_weight < 4.2  # codes + double-quantized constants
    ids = torch.tensor([[0, 10, 20, 30]])
    with torch.no_grad():
        out = qmodel(ids)
        # dequantizing once for generation computes exactly what on-the-fly does
        assert torch.equal(dequantized_copy(qmodel)(ids), out)
    assert torch.isfinite(out).all()
