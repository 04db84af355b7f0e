"""GGUF block formats against the `gguf` package (llama.cpp's own Python port of ggml)."""

import numpy as np
import pytest
import torch

import minillm
from minillm.quant.gguf import (
    GGUFLinear,
    GGUFQuantizer,
    choose_type,
    dequantize_tensor,
    quantize_tensor,
    use_more_bits,
)
from minillm.quant.gguf_blocks import LAYOUTS, GGMLType, ggml_type

gguf = pytest.importorskip("gguf")  # the reference (a dependency; absent on bare GPU images)
G = gguf.GGMLQuantizationType

ALL_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]
EXACT_QUANT = ["F16", "BF16", "Q8_0", "Q4_0", "Q5_0", "Q5_1"]  # the gguf package quantizes these


def weights(seed: int = 0, rows: int = 24, cols: int = 512) -> np.ndarray:
    """Normal rows of very different scales, plus the corner cases of a block."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)) * np.exp(rng.uniform(-8, 3, (rows, 1)))
    w[0] = 0.0  # an all-zero row (scale 0)
    w[1, :256] = 0.75  # a constant super-block
    w[2] = np.round(rng.uniform(-20, 20, cols)) / 2  # exact halves: rounding ties
    w[3, ::7] = -1e4  # outliers
    w[4] = np.abs(w[4])  # all positive (min > 0 for the asymmetric formats)
    return w.astype(np.float32)


@pytest.mark.parametrize("name", ALL_TYPES)
def test_dequantize_equals_gguf_bit_for_bit_on_random_blocks(name):
    # Random bytes reach every code, every scale (including inf / NaN fp16 headers).
    layout = LAYOUTS[ggml_type(name)]
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, size=(64, 4 * layout.type_size), dtype=np.uint8)
    with np.errstate(invalid="ignore", over="ignore"):
        ref = gguf.quants.dequantize(raw, getattr(G, name))
    ours = dequantize_tensor(torch.from_numpy(raw), name).numpy()
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    # bit for bit: equal float32 bit patterns (so -0.0 != 0.0); NaN where the reference
    # has NaN (numpy and torch may carry different NaN payloads from an fp16 NaN)
    ref = ref.astype(np.float32)
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(ours), nan), name
    assert np.array_equal(ours[~nan].view(np.uint32), ref[~nan].view(np.uint32)), name


@pytest.mark.parametrize("name", ALL_TYPES)
def test_dequantize_of_our_blocks_equals_gguf(name):
    raw = quantize_tensor(weights(), name)
    ref = gguf.quants.dequantize(raw, getattr(G, name))
    assert np.array_equal(dequantize_tensor(raw, name).numpy(), ref)


@pytest.mark.parametrize("name", EXACT_QUANT)
def test_quantize_equals_gguf_bit_for_bit(name):
    for seed in range(3):
        w = weights(seed)
        ref = gguf.quants.quantize(w, getattr(G, name))
        assert np.array_equal(quantize_tensor(w, name), ref.view(np.uint8)), (name, seed)


def test_q8_0_rounds_half_away_from_zero():
    # amax 127 -> d = 1, so x / d is exact and the halves test the rounding rule
    block = np.array([[127.0, -126.5, 0.5, -0.5, 1.5, 2.5] + [0.0] * 26], dtype=np.float32)
    codes = quantize_tensor(block, "Q8_0")[0, 2:].view(np.int8)
    assert codes[:6].tolist() == [127, -127, 1, -1, 2, 3]


@pytest.mark.parametrize(("name", "bits"), [("Q4_K", 4.5), ("Q5_K", 5.5), ("Q6_K", 6.5625)])
def test_k_quant_search_beats_round_to_nearest(name, bits):
    assert LAYOUTS[ggml_type(name)].bits_per_weight == bits
    model = minillm.load_model("minillm-tiny")
    rng = np.random.default_rng(0)
    cases = {
        "normal": rng.standard_normal((32, 512)).astype(np.float32),
        "student-t": rng.standard_t(3, (32, 512)).astype(np.float32),
        "up_proj": model.model.layers[0].mlp.up_proj.weight.detach().numpy(),
    }
    for label, w in cases.items():
        errs = [
            float(
                (
                    (dequantize_tensor(quantize_tensor(w, name, search=s), name).numpy() - w) ** 2
                ).mean()
            )
            for s in (False, True)
        ]
        assert errs[1] <= errs[0], (name, label, errs)


def test_q8_0_error_is_at_most_half_a_step():
    w = weights()[5:]
    err = np.abs(dequantize_tensor(quantize_tensor(w, "Q8_0"), "Q8_0").numpy() - w)
    blocks = np.abs(w).reshape(-1, 32)
    d = blocks.max(axis=1, keepdims=True) / 127  # the step codes are rounded with
    d16 = d.astype(np.float16).astype(np.float32)  # the step they are decoded with
    # half a step, plus up to 127 times the error of storing d in fp16 (large when d is
    # an fp16 subnormal, as in the rows of tiny weights), plus float32 rounding
    bound = 0.5 * d + 127 * np.abs(d16 - d) + 1e-6 * d
    assert (err.reshape(-1, 32) <= bound).all()


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="Q2_K"):
        ggml_type("Q2_K")
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_tensor(np.zeros((2, 96), np.float32), "Q4_K")
    with pytest.raises(TypeError, match="uint8"):
        dequantize_tensor(torch.zeros(2, 34), "Q8_0")
    with pytest.raises(ValueError, match="unknown GGUF file type"):
        GGUFQuantizer("Q3_K_XL")


def test_use_more_bits_matches_llama_cpp():
    # for 32 layers llama.cpp gives Q6_K to attn_v/ffn_down of these layers
    picked = [i for i in range(32) if use_more_bits(i, 32)]
    assert picked == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]


def test_q4_k_m_mixture_of_the_bundled_model():
    model = minillm.load_model("minillm-tiny")
    types = GGUFQuantizer("Q4_K_M").tensor_types(model)
    assert types["model.embed_tokens.weight"] == GGMLType.Q6_K  # tied: it is the output too
    assert types["model.norm.weight"] == GGMLType.F32
    for i in range(6):
        more = GGMLType.Q6_K if i in (2, 5) else GGMLType.Q4_K  # use_more_bits(i, 6)
        assert types[f"model.layers.{i}.self_attn.v_proj.weight"] == more
        assert types[f"model.layers.{i}.mlp.down_proj.weight"] == more
        assert types[f"model.layers.{i}.self_attn.q_proj.weight"] == GGMLType.Q4_K
        assert types[f"model.layers.{i}.mlp.up_proj.weight"] == GGMLType.Q4_K
    q5 = GGUFQuantizer("Q5_K_M").tensor_types(model)
    assert q5["model.layers.0.mlp.gate_proj.weight"] == GGMLType.Q5_K
    assert q5["model.layers.5.mlp.down_proj.weight"] == GGMLType.Q6_K
    q8 = GGUFQuantizer("Q8_0").tensor_types(model)
    assert set(q8.values()) == {GGMLType.Q8_0, GGMLType.F32}


def test_rows_not_multiple_of_256_fall_back_like_llama_cpp():
    assert choose_type("blk.0.ffn_up.weight", (64, 96), "Q4_K_M", 4, True) == GGMLType.Q5_0
    assert choose_type("blk.0.ffn_up.weight", (64, 96), "Q5_K_M", 4, True) == GGMLType.Q5_1
    assert choose_type("blk.2.attn_v.weight", (64, 96), "Q4_K_M", 4, True) == GGMLType.Q8_0
    assert choose_type("output.weight", (64, 96), "Q4_K_M", 4, True) == GGMLType.Q8_0
    assert choose_type("blk.1.ffn_up.weight", (64, 20), "Q4_K_M", 4, True) == GGMLType.F16
    assert choose_type("blk.1.ffn_up.weight", (64, 256), "Q4_K_M", 4, True) == GGMLType.Q4_K


def test_quantizer_error_follows_the_bits():
    model = minillm.load_model("minillm-tiny")
    state = model.state_dict()
    picked = [n for n in state if n.startswith("model.layers.2.")]  # a layer with Q6_K in the mixes
    errors = {}
    for ftype in ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0"):
        types = GGUFQuantizer(ftype).tensor_types(model)
        num = den = 0.0
        for n in picked:
            w = state[n]
            back = dequantize_tensor(quantize_tensor(w, types[n]), types[n]).reshape(w.shape)
            num, den = num + float(((back - w) ** 2).sum()), den + float((w**2).sum())
        errors[ftype] = num / den
    assert list(errors) == sorted(errors, key=errors.get), errors


def test_convert_swaps_linears_and_computes_with_the_blocks():
    model = minillm.load_model("minillm-tiny-draft")
    quantizer = GGUFQuantizer("Q8_0")
    state = quantizer.quantize(model, progress=False)
    # the reference: the same model with every tensor replaced by its dequantized blocks
    reference = minillm.load_model("minillm-tiny-draft")
    with torch.no_grad():
        for name, t in state.items():
            reference.get_parameter(name).copy_(t.dequantize())
    qmodel = quantizer.convert(model, state)
    layer = qmodel.model.layers[0].mlp.down_proj
    assert isinstance(layer, GGUFLinear) and layer.raw.dtype == torch.uint8
    assert minillm.quant.footprint(qmodel).bits_per_linear_weight == 8.5
    ids = torch.tensor([[0, 5, 9, 200, 7]])
    with torch.no_grad():
        torch.testing.assert_close(qmodel(ids), reference(ids), rtol=0, atol=1e-5)
