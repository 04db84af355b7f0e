"""W8A8: activation calibration methods, the int8 linear's derived error bound, SmoothQuant."""

import copy

import pytest
import torch

import minillm
from minillm.quant import calibration_tokens
from minillm.quant.calibrate import QMAX, W8A8Linear, W8A8Quantizer, activation_scale, int8_quantize
from minillm.quant.rtn import RTNQuantizer


def _activations(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4096, generator=g)
    x[:3] = torch.tensor([40.0, -35.0, 30.0])  # a few outliers, as LLM activations have
    return x


def test_calibration_methods():
    x = _activations()
    s_max = activation_scale(x, "minmax")
    assert s_max == pytest.approx(40.0 / QMAX)
    s_pct = activation_scale(x, "percentile", 99.9)
    assert s_pct < s_max / 5, "the percentile clips the three outliers"
    s_mse = activation_scale(x, "mse")

    def mse(s):
        return float(((int8_quantize(x, s) * s - x) ** 2).mean())

    assert mse(s_mse) <= min(mse(s_max), mse(s_pct)) * (1 + 1e-6)
    with pytest.raises(ValueError, match="unknown calibration method 'kl'"):
        activation_scale(x, "kl")
    with pytest.raises(ValueError, match="unknown calibration method"):
        W8A8Quantizer(method="kl")


def test_w8a8_linear_error_bound():
    """Without clipping, |x - x_hat| <= s_x / 2 and |w - w_hat| <= s_w / 2, so
    |y - y_hat| <= sum_k |x_k| s_w / 2 + |w_k| s_x / 2 + s_x s_w / 4 for every output."""
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(96, 40)
    x = torch.randn(8, 96, generator=g)
    s_x = activation_scale(x, "minmax")
    q = W8A8Linear.from_linear(lin, s_x)
    with torch.no_grad():
        err = (q(x) - lin(x)).abs()  # (8, 40)
        w = lin.weight
        s_w = q.weight_scale[None, :]
        bound = (
            x.abs() @ torch.ones(96, 40) * s_w / 2
            + (w.abs().sum(1) * s_x / 2)[None, :]
            + 96 * s_x * s_w / 4
        )
    assert (err <= bound * (1 + 1e-5)).all()
    assert q.weight.dtype == torch.int8 and q.weight.abs().max() == QMAX


def test_smoothing_keeps_the_float_model():
    model = minillm.load_model("minillm-tiny-draft")
    cal = calibration_tokens(minillm.load_tokenizer(), 2, 32)
    with torch.no_grad():
        ref = model(cal)
        W8A8Quantizer(smooth_alpha=0.5).smooth(model, cal)
        assert torch.allclose(model(cal), ref, atol=1e-4, rtol=1e-4)


def _nll(model, ids):
    with torch.no_grad():
        logits = model(ids[:, :-1])
    return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()))


def test_w8a8_model_stays_close():
    base = minillm.load_model("minillm-tiny-draft")
    cal = calibration_tokens(minillm.load_tokenizer(), 4, 64)
    model = W8A8Quantizer("percentile").apply(copy.deepcopy(base), cal, progress=False)
    assert (
        sum(isinstance(m, W8A8Linear) for m in model.modules()) == 7 * base.config.num_hidden_layers
    )
    rtn4 = RTNQuantizer(4, 64).apply(copy.deepcopy(base), progress=False)
    fp, w8a8, w4 = _nll(base, cal), _nll(model, cal), _nll(rtn4, cal)
    assert abs(w8a8 - fp) < w4 - fp, (
        f"W8A8 should lose less than 4-bit weights: {fp=} {w8a8=} {w4=}"
    )
