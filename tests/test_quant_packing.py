"""Bit packing and the GPTQ / AWQ checkpoint folders: hand-computed words, round trips,
and AutoAWQ's own unpacking code when it is installed (`pip install --no-deps autoawq`)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import minillm
from minillm.loading import CheckpointError
from minillm.quant.base import set_module
from minillm.quant.formats import load_quantized, save_quantized, to_checkpoint
from minillm.quant.gptq import gptq_quantize, hessian
from minillm.quant.linear import QuantLinear
from minillm.quant.packing import (
    pack_awq,
    pack_cols,
    pack_rows,
    unpack_awq,
    unpack_cols,
    unpack_rows,
)
from minillm.quant.rtn import RTNQuantizer, quantize_rtn


def u32(word: int) -> int:
    """The int32 a uint32 word is stored as."""
    return word - 2**32 if word >= 2**31 else word


def test_gptq_4bit_words_by_hand():
    codes = torch.arange(1, 9, dtype=torch.int32)[:, None].repeat(1, 3)  # rows k=0..7 -> codes 1..8
    assert pack_rows(codes, 4).tolist() == [[u32(0x87654321)] * 3]  # code k in nibble k
    assert pack_cols(codes.t().contiguous(), 4).tolist() == [[u32(0x87654321)]] * 3
    assert pack_rows(torch.tensor([[1], [2], [3], [255]]), 8).tolist() == [[u32(0xFF030201)]]
    two = torch.tensor(
        [[3]] + [[0]] * 14 + [[1]]
    )  # code 0 = 3 (bits 0-1), code 15 = 1 (bits 30-31)
    assert pack_rows(two, 2).tolist() == [[u32(0x40000003)]]


def test_gptq_3bit_straddles_words_by_hand():
    codes = torch.zeros(32, 1, dtype=torch.int32)
    codes[10] = 0b101  # stream bits 30..32: bits 30 and 32 -> word 0 bit 30, word 1 bit 0
    codes[21] = 0b110  # stream bits 63..65: bit 64 and 65 -> word 2 bits 0 and 1
    codes[1] = 0b111  # bits 3..5 of word 0
    assert pack_rows(codes, 3).view(-1).tolist() == [u32((1 << 30) | (7 << 3)), 1, 0b11]
    assert torch.equal(unpack_rows(pack_rows(codes, 3), 3), codes)
    assert pack_rows(torch.full((32, 1), 7), 3).view(-1).tolist() == [-1, -1, -1]


def test_awq_nibble_order_by_hand():
    codes = torch.arange(8, dtype=torch.int32)[None, :]  # columns 0..7 hold codes 0..7
    # nibble j holds column AWQ_ORDER[j] = (0, 2, 4, 6, 1, 3, 5, 7)[j]
    assert pack_awq(codes).tolist() == [[u32(0x75316420)]]
    assert torch.equal(unpack_awq(pack_awq(codes)), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (64, 96), generator=g, dtype=torch.int32)
    assert torch.equal(unpack_rows(pack_rows(codes, bits), bits), codes)
    assert torch.equal(unpack_cols(pack_cols(codes, bits), bits), codes)
    assert pack_rows(codes, bits).shape == (64 * bits // 32, 96)


def test_pack_rejects_bad_codes():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_rows(torch.zeros(12, 4, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match=r"must lie in \[0, 16\)"):
        pack_rows(torch.full((8, 1), 16), 4)
    with pytest.raises(ValueError, match="4-bit codes only"):
        pack_awq(torch.zeros(1, 8, dtype=torch.int32), bits=3)


def _layer(bits=4, act_order=False, sym=False, seed=0, N=64, K=256, G=64):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g)
    x = torch.randn(512, K, generator=g) * torch.linspace(0.1, 3, K)  # unequal input scales
    p = gptq_quantize(w, hessian(x), bits, G, sym=sym, act_order=act_order)
    return QuantLinear.from_params(p, torch.randn(N, generator=g)), p


def test_gptq_v1_symmetric_zeros_read_0x77777777():
    m, _ = _layer(sym=True)
    t = to_checkpoint(m, "gptq")
    assert (t["qzeros"] == u32(0x77777777)).all()  # zero 8 stored as 8 - 1 in every nibble
    assert (to_checkpoint(m, "gptq", "gptq_v2")["qzeros"] == u32(0x88888888)).all()


def test_checkpoint_tensors_match_the_codes():
    m, p = _layer(act_order=True)
    t = to_checkpoint(m, "gptq")
    assert t["qweight"].shape == (256 // 8, 64) and t["qweight"].dtype == torch.int32
    assert t["qzeros"].shape == (4, 64 // 8) and t["scales"].dtype == torch.float16
    assert torch.equal(unpack_rows(t["qweight"], 4), p.qweight.t())  # original feature order
    assert torch.equal(t["g_idx"], p.g_idx)
    assert not torch.equal(
        p.g_idx, torch.arange(256, dtype=torch.int32) // 64
    )  # act-order did reorder
    assert torch.equal((unpack_cols(t["qzeros"], 4) + 1) % 16, p.zeros.t().int())


def _awq_reference():
    spec = importlib.util.find_spec("awq")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("AutoAWQ is not installed (pip install --no-deps autoawq)")
    path = Path(spec.submodule_search_locations[0]) / "utils" / "packing_utils.py"
    # Load the pure-torch file alone: the package's __init__ needs accelerate and a GPU stack.
    ref_spec = importlib.util.spec_from_file_location("awq_packing_reference", path)
    mod = importlib.util.module_from_spec(ref_spec)
    ref_spec.loader.exec_module(mod)
    return mod


def test_awq_layout_against_autoawq():
    ref = _awq_reference()
    m, p = _layer(act_order=False)
    awq = to_checkpoint(m, "awq")
    w_ref = ref.dequantize_gemm(awq["qweight"], awq["qzeros"], awq["scales"], 4, 64)  # (K, N)
    assert torch.equal(w_ref.float(), (p.dequantize().t().half()).float())
    # AutoAWQ's converter to the GPTQ/exllama layout gives exactly our GPTQ v1 tensors
    qweight, qzeros = ref.unpack_reorder_pack(awq["qweight"], awq["qzeros"], 4)
    gptq = to_checkpoint(m, "gptq")
    assert torch.equal(qweight, gptq["qweight"]) and torch.equal(qzeros, gptq["qzeros"])


@pytest.fixture(scope="module")
def draft():
    return minillm.load_model("minillm-tiny-draft")


@pytest.mark.parametrize(
    ("bits", "act_order", "method", "fmt"),
    [(4, True, "gptq", "gptq"), (3, True, "gptq", "gptq_v2"), (4, False, "awq", "gptq")],
)
def test_folder_round_trip_is_exact(tmp_path, draft, bits, act_order, method, fmt):
    import copy

    model = copy.deepcopy(draft)
    rng = torch.Generator().manual_seed(0)
    state = RTNQuantizer(bits, 64).quantize(model, progress=False)
    model = RTNQuantizer(bits, 64).convert(model, state)
    if act_order:  # give every layer a random group assignment, as act-order does
        for name, m in list(model.named_modules()):
            if isinstance(m, QuantLinear):
                p = m.params()
                p.g_idx = p.g_idx[torch.randperm(m.in_features, generator=rng)]
                set_module(model, name, QuantLinear.from_params(p, m.bias))
    save_quantized(model, tmp_path, method, checkpoint_format=fmt, dtype=torch.float32)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == method and qc["bits"] == bits
    loaded = load_quantized(tmp_path)
    for (k, a), (k2, b) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert k == k2 and torch.equal(a, b), f"{k} changed in the round trip"
    ids = torch.randint(0, 4096, (1, 16), generator=rng)
    assert torch.equal(model(ids), loaded(ids))


def test_unknown_method_and_bad_configs_are_clear(tmp_path, draft):
    import copy

    model = RTNQuantizer(4, 64).apply(copy.deepcopy(draft), progress=False)
    save_quantized(model, tmp_path, "gptq")
    hf = json.loads((tmp_path / "config.json").read_text())
    for change, msg in [
        ({"quant_method": "exl2"}, "unknown quantization method 'exl2'"),
        ({"bits": 5}, "bits=5 is not supported"),
        ({"checkpoint_format": "marlin"}, "checkpoint_format 'marlin' not supported"),
    ]:
        bad = {**hf, "quantization_config": {**hf["quantization_config"], **change}}
        (tmp_path / "config.json").write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=msg):
            load_quantized(tmp_path)
    plain = {k: v for k, v in hf.items() if k != "quantization_config"}
    (tmp_path / "config.json").write_text(json.dumps(plain))
    with pytest.raises(CheckpointError, match="no quantization_config"):
        load_quantized(tmp_path)
    with pytest.raises(ValueError, match="unknown quant_method"):
        save_quantized(model, tmp_path, "exl2")
    with pytest.raises(ValueError, match="4-bit layers without act-order"):
        save_quantized(
            RTNQuantizer(8, 64).apply(copy.deepcopy(draft), progress=False), tmp_path, "awq"
        )


def test_quant_linear_matches_its_params():
    w = torch.randn(64, 128)
    p = quantize_rtn(w, 4, 32)
    m = QuantLinear.from_params(p)
    x = torch.randn(3, 5, 128)
    assert torch.allclose(m(x), x @ p.dequantize().t(), atol=1e-5)
    assert torch.equal(m.weight, p.dequantize())
