"""The shared quantization interface: layer selection, footprint, calibration data."""

import pytest
import torch
from torch import nn

import minillm
from minillm.quant import Quantizer, calibration_tokens, footprint, linear_layers, set_module


def test_linear_layers_skip_the_head():
    model = minillm.load_model("minillm-tiny-draft")
    names = list(linear_layers(model))
    assert "lm_head" not in names
    assert len(names) == 7 * model.config.num_hidden_layers  # q k v o gate up down
    assert names[0] == "model.layers.0.self_attn.q_proj"


def test_footprint_counts_tied_weights_once():
    model = minillm.load_model("minillm-tiny-draft")
    fp = footprint(model)
    assert fp.total_bytes == 4 * model.num_parameters()
    assert fp.bits_per_linear_weight == 32
    half = footprint(model.to(torch.float16))
    assert half.total_bytes * 2 == fp.total_bytes


def test_set_module():
    model = minillm.load_model("minillm-tiny-draft")
    new = nn.Identity()
    set_module(model, "model.layers.1.mlp.up_proj", new)
    assert model.model.layers[1].mlp.up_proj is new


def test_calibration_is_seeded_and_shaped():
    tok = minillm.load_tokenizer()
    a = calibration_tokens(tok, 4, 64, seed=1)
    b = calibration_tokens(tok, 4, 64, seed=1)
    assert a.shape == (4, 64) and torch.equal(a, b)
    assert not torch.equal(a, calibration_tokens(tok, 4, 64, seed=2))


def test_apply_requires_calibration_when_the_scheme_does():
    class NeedsData(Quantizer):
        name = "needs-data"
        needs_calibration = True

        def quantize(self, model, calibration=None, progress=True):
            return {}

        def convert(self, model, state):
            return model

    with pytest.raises(ValueError, match="needs calibration tokens"):
        NeedsData().apply(minillm.load_model("minillm-tiny-draft"))
