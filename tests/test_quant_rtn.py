"""Round-to-nearest quantization: the derived error bound, the zero point, bad input."""

import copy

import pytest
import torch

import minillm
from minillm.quant import calibration_tokens, footprint
from minillm.quant.rtn import (
    PER_CHANNEL,
    PER_TENSOR,
    RTNQuantizer,
    fake_quantize,
    quantize_rtn,
)


def _weights(seed=0, N=48, K=256):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g)
    w[3, 5] = 9.0  # an outlier, as real weights have
    w[7, :64] = w[7, :64].abs()  # a group with no negative weight (zero point 0)
    return w


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, PER_CHANNEL, PER_TENSOR])
@pytest.mark.parametrize("sym", [False, True])
def test_error_is_at_most_half_a_step(bits, group_size, sym):
    """Every weight lies in its group's [min, max]; the grid s*(q - z), q = 0..2^b-1, covers
    that range to within s/2 at both ends (z is rounded), so |w - w_hat| <= s/2."""
    w = _weights()
    p = quantize_rtn(w, bits, group_size, sym)
    assert p.qweight.min() >= 0 and p.qweight.max() <= 2**bits - 1
    step = p.scales[:, p.g_idx.long()]  # (N, K): the scale of each weight's group
    err = (w - p.dequantize()).abs()
    # 1e-6 relative: float32 rounding of w / s and s * (q - z)
    assert (err <= step / 2 * (1 + 1e-6) + 1e-7).all(), "RTN error exceeds half a quantization step"
    assert (err / step).max() > 0.4, "the bound should be nearly reached somewhere"
    if sym:  # zero exactly representable, zero point fixed in the middle
        assert (p.zeros == 2 ** (bits - 1)).all()
        assert (p.dequantize()[w == 0] == 0).all()


def test_groups_shrink_the_error():
    w = _weights()
    errs = [(w - fake_quantize(w, 4, g)).abs().mean() for g in (PER_TENSOR, PER_CHANNEL, 128, 32)]
    assert errs == sorted(errs, reverse=True), f"finer groups should cut the error: {errs}"


def test_scales_are_fp16_exact():
    p = quantize_rtn(_weights(), 4, 64)
    assert torch.equal(p.scales, p.scales.half().float())


def test_bad_input_is_clear():
    w = _weights()
    with pytest.raises(ValueError, match="group_size=100 does not divide in_features=256"):
        quantize_rtn(w, 4, 100)
    with pytest.raises(ValueError, match=r"bits=5 is not supported; choose one of \(2, 3, 4, 8\)"):
        quantize_rtn(w, 5, 64)
    with pytest.raises(TypeError, match="bits must be an int"):
        quantize_rtn(w, 4.0, 64)
    with pytest.raises(ValueError, match="bits=16"):
        RTNQuantizer(bits=16)
    with pytest.raises(ValueError, match="group_size must be positive"):
        RTNQuantizer(group_size=-2)
    model = minillm.load_model("minillm-tiny-draft")  # hidden 128, MLP 384
    with pytest.raises(
        ValueError, match=r"model.layers.0.self_attn.q_proj: group_size=96 does not divide"
    ):
        RTNQuantizer(4, 96).quantize(model, progress=False)


def test_rtn_model_footprint_and_outputs():
    base = minillm.load_model("minillm-tiny-draft")
    model = RTNQuantizer(4, 64).apply(copy.deepcopy(base), progress=False)
    fp = footprint(model)
    # 4-bit codes + per 64 weights one fp16 scale and one 4-bit zero, + the int32 perm per input
    assert 4 < fp.bits_per_linear_weight < 4 + (16 + 4) / 64 + 32 / 128 + 1e-9
    ids = calibration_tokens(minillm.load_tokenizer(), 2, 64, seed=3)  # real text
    with torch.no_grad():
        ref = base(ids).argmax(-1)
        agree = {
            bits: float(
                (
                    RTNQuantizer(bits, 64)
                    .apply(copy.deepcopy(base), progress=False)(ids)
                    .argmax(-1)
                    == ref
                )
                .float()
                .mean()
            )
            for bits in (2, 4, 8)
        }
    assert agree[8] > 0.95, f"8-bit RTN should keep almost every greedy token: {agree}"
    assert agree[2] < agree[4] < agree[8], f"more bits should keep more greedy tokens: {agree}"


def test_mse_clip_never_loses_to_min_max():
    """The clip search includes the full range (shrink factor 1), so per group its
    sum |w - w_hat|^2.4 can only go down."""
    w = _weights()
    err = {}
    for mse in (False, True):
        w_hat = quantize_rtn(w, 4, 64, mse=mse).dequantize()
        err[mse] = (w - w_hat).abs().pow(2.4).view(48, 4, 64).sum(-1)  # (N, groups)
    assert (err[True] <= err[False] * (1 + 1e-5)).all()
    assert err[True].sum() < 0.99 * err[False].sum(), "clipping should help some groups"
