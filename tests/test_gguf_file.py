"""GGUF files: export, read back through `gguf.GGUFReader` and our reader, import, bad input."""

import copy

import numpy as np
import pytest
import torch

import minillm
from minillm.config import ModelConfig
from minillm.model import CausalLM
from minillm.quant.gguf import GGUFLinear, GGUFQuantizer
from minillm.quant.gguf_file import GGUFFormatError, parse_gguf, read_gguf
from minillm.quant.gguf_model import export_gguf, load_gguf, permute_rows

gguf = pytest.importorskip("gguf")  # writing goes through it (absent on bare GPU images)
pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@pytest.fixture(scope="module")
def bundled():
    return minillm.load_model("minillm-tiny"), minillm.load_tokenizer("minillm-tiny")


@pytest.fixture(scope="module")
def exported(bundled, tmp_path_factory):
    model, tok = bundled
    out = tmp_path_factory.mktemp("gguf")
    return {
        ft: export_gguf(model, out / f"tiny-{ft}.gguf", ft, tokenizer=tok)
        for ft in ("F16", "Q4_K_M")
    }


def small_model(seed: int = 0, **overrides) -> CausalLM:
    """An untied random llama with GQA and biases (rows of 64: K-quants fall back)."""
    cfg = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
               qkv_bias=True, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(seed)
    model = CausalLM(ModelConfig(**{**cfg, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def test_written_file_reads_back_through_gguf_reader(exported, bundled):
    model, _ = bundled
    path = exported["Q4_K_M"]
    ref = gguf.GGUFReader(str(path))
    ours = read_gguf(path)
    keys = {k for k in ref.fields if not k.startswith("GGUF.")}  # header fields
    assert keys == set(ours.metadata)
    for key in ("llama.block_count", "llama.attention.head_count_kv", "general.file_type"):
        assert ref.fields[key].contents() == ours.metadata[key]
    assert ours.metadata["llama.embedding_length"] == model.config.hidden_size
    assert ref.fields["tokenizer.ggml.tokens"].contents() == ours.metadata["tokenizer.ggml.tokens"]
    assert len(ours.metadata["tokenizer.ggml.tokens"]) == 4096
    assert len(ref.tensors) == len(ours.tensors) == 1 + 6 * 9 + 1  # embd, 9 per layer, norm
    for t in ref.tensors:
        mine = ours.tensors[t.name]
        assert t.tensor_type.value == mine.qtype.value
        assert tuple(int(d) for d in reversed(t.shape)) == mine.shape  # ggml order is reversed
        assert np.array_equal(np.asarray(t.data).view(np.uint8).reshape(mine.raw.shape), mine.raw)


def test_import_equals_the_quantizer_on_the_same_blocks(exported, bundled):
    model, tok = bundled
    reference = GGUFQuantizer("Q4_K_M").apply(minillm.load_model("minillm-tiny"), progress=False)
    ids = torch.tensor([tok.encode("def add(a, b):\n    return")])
    with torch.no_grad():
        want = reference(ids)
        loaded = load_gguf(exported["Q4_K_M"])
        torch.testing.assert_close(loaded(ids), want, rtol=0, atol=1e-5)  # same weights
        fly = load_gguf(exported["Q4_K_M"], on_the_fly=True)
        assert isinstance(fly.model.layers[2].self_attn.v_proj, GGUFLinear)
        torch.testing.assert_close(fly(ids), want, rtol=0, atol=1e-5)
    f16 = load_gguf(exported["F16"])
    fp16_weights = copy.deepcopy(model).half().float()  # what an F16 file holds
    assert minillm.generate(f16, ids[0], 24) == minillm.generate(fp16_weights, ids[0], 24)


def test_f32_round_trip_is_exact_with_biases_and_gqa(tmp_path):
    model = small_model()
    path = export_gguf(model, tmp_path / "small.gguf", "F32")
    loaded = load_gguf(path)
    assert loaded.config.qkv_bias and not loaded.config.tie_word_embeddings
    for name, p in model.state_dict().items():
        assert torch.equal(p, loaded.state_dict()[name]), name
    # quantized types fall back on rows of 64 (Q4_K -> Q5_0), and still load
    q = load_gguf(export_gguf(model, tmp_path / "small-q4km.gguf", "Q4_K_M"), on_the_fly=True)
    assert q.model.layers[0].mlp.up_proj.qtype.name == "Q5_0"
    assert q.lm_head.qtype.name == "Q8_0"  # output: Q6_K does not tile 64 either


def test_qk_permutation_is_llama_cpp_s_and_invertible():
    rng = np.random.default_rng(0)
    n_heads, D = 4, 8
    w = rng.standard_normal((n_heads * D, 5))
    # llama.cpp convert_hf_to_gguf.py: reshape(n_head, 2, rows // n_head // 2, ...).swapaxes(1, 2)
    ref = w.reshape(n_heads, 2, D // 2, 5).swapaxes(1, 2).reshape(w.shape)
    assert np.array_equal(permute_rows(w, n_heads), ref)
    assert np.array_equal(permute_rows(permute_rows(w, n_heads), n_heads, inverse=True), w)


def test_clear_errors(tmp_path, exported):
    with pytest.raises(FileNotFoundError):
        read_gguf(tmp_path / "missing.gguf")
    with pytest.raises(GGUFFormatError, match="not a GGUF file"):
        parse_gguf(b"PK\x03\x04" + bytes(64))
    data = exported["F16"].read_bytes()
    with pytest.raises(GGUFFormatError, match="truncated"):
        parse_gguf(data[: len(data) // 2])
    with pytest.raises(ValueError, match="q/k norms"):
        export_gguf(small_model(qk_norm=True), tmp_path / "qwen3.gguf")
    # a tensor type minillm does not decode is named
    writer = gguf.GGUFWriter(str(tmp_path / "q2k.gguf"), "llama")
    writer.add_tensor(
        "token_embd.weight", np.zeros((4, 84), np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q2_K
    )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFFormatError, match=r"Q2_K \(10\)"):
        read_gguf(tmp_path / "q2k.gguf")


@pytest.fixture(scope="module")
def fuzz_seed(tmp_path_factory):
    """A small valid file: metadata of every kind, F32, Q8_0 and Q5_0 tensors."""
    model = small_model(num_hidden_layers=1, vocab_size=32)
    path = export_gguf(model, tmp_path_factory.mktemp("fuzz") / "seed.gguf", "Q4_K_M")
    return path.read_bytes()


def _load_or_reject(data: bytes) -> None:
    try:
        load_gguf(parse_gguf(data, "fuzzed"), on_the_fly=True)
    except ValueError as e:  # GGUFFormatError, or a ModelConfig that the metadata breaks
        assert str(e)


@settings(
    max_examples=500, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(cut=st.integers(min_value=0, max_value=10**9))
def test_fuzz_truncated_files(fuzz_seed, cut):
    _load_or_reject(fuzz_seed[: cut % len(fuzz_seed)])


@settings(
    max_examples=600, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    edits=st.lists(
        st.tuples(st.integers(0, 10**9), st.binary(min_size=1, max_size=8)), min_size=1, max_size=4
    ),
    header_bias=st.booleans(),
)
def test_fuzz_corrupted_files(fuzz_seed, edits, header_bias):
    data = bytearray(fuzz_seed)
    # most of the structure (counts, lengths, types, dims, offsets) lies in the first bytes
    span = 2048 if header_bias else len(data)
    for pos, blob in edits:
        pos %= span
        data[pos : pos + len(blob)] = blob
    _load_or_reject(bytes(data))
