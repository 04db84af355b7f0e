"""The model's parts against independent references (fp64 formulas, transformers)."""

import math

import pytest
import torch

from minillm import CausalLM, ModelConfig
from minillm.layers.attention import attention, causal_mask, naive_attention
from minillm.layers.norm import rms_norm
from minillm.layers.rotary import apply_rotary, rope_cos_sin, rope_inv_freq


def reference_attention(q, k, v, window=None):
    """Loop-over-positions attention in fp64, straight from the definition."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    out = torch.zeros(B, H, T, D, dtype=torch.float64)
    for h in range(H):
        kh = h // (H // Hkv)
        for t in range(T):
            pos = S - T + t
            lo = 0 if window is None else max(0, pos - window + 1)
            keys, values = k[:, kh, lo : pos + 1], v[:, kh, lo : pos + 1]  # (B, n, D)
            scores = torch.einsum("bd,bnd->bn", q[:, h, t], keys) / math.sqrt(D)
            out[:, h, t] = torch.einsum("bn,bnd->bd", scores.softmax(-1), values)
    return out


@pytest.mark.parametrize("T, S, window", [(9, 9, None), (3, 11, None), (9, 9, 4), (1, 13, 5)])
@pytest.mark.parametrize("backend", ["naive", "sdpa"])
def test_attention_equals_the_definition(T, S, window, backend):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, T, 8, generator=g)
    k = torch.randn(2, 2, S, 8, generator=g)
    v = torch.randn(2, 2, S, 8, generator=g)
    out = attention(q, k, v, window=window, backend=backend)
    torch.testing.assert_close(
        out.double(), reference_attention(q, k, v, window), atol=1e-5, rtol=0
    )


def test_causal_mask_counts():
    m = causal_mask(3, 5, window=2)
    # query positions 2, 3, 4 see keys {1, 2}, {2, 3}, {3, 4}
    assert m.tolist() == [
        [False, True, True, False, False],
        [False, False, True, True, False],
        [False, False, False, True, True],
    ]


@pytest.mark.parametrize(
    "shapes, message",
    [
        (((2, 4, 3, 8), (2, 3, 3, 8), (2, 3, 3, 8)), "cannot be grouped"),
        (((2, 4, 5, 8), (2, 2, 3, 8), (2, 2, 3, 8)), "more queries"),
        (((2, 4, 3, 8), (2, 2, 3, 4), (2, 2, 3, 4)), "disagree"),
        (((4, 3, 8), (2, 2, 3, 8), (2, 2, 3, 8)), "4-D"),
    ],
)
def test_attention_rejects_bad_shapes(shapes, message):
    q, k, v = (torch.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=message):
        naive_attention(q, k, v)


def test_unknown_backend():
    q = torch.zeros(1, 1, 1, 2)
    with pytest.raises(ValueError, match="available: naive, sdpa"):
        attention(q, q, q, backend="flash9")


def test_rms_norm_matches_transformers():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    ref = LlamaRMSNorm(16, eps=1e-5)
    with torch.no_grad():
        ref.weight.normal_()
    x = torch.randn(3, 5, 16, dtype=torch.bfloat16)
    ours = rms_norm(x, ref.weight.to(torch.bfloat16), 1e-5)
    torch.testing.assert_close(ours, ref.to(torch.bfloat16)(x), atol=0, rtol=0)


@pytest.mark.parametrize(
    "scaling",
    [
        None,
        {"rope_type": "linear", "factor": 4.0},
        {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ],
)
def test_rope_frequencies_match_transformers(scaling):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = LlamaConfig(
        hidden_size=2048,
        num_attention_heads=32,
        rope_theta=500000.0,
        rope_scaling=scaling,
        max_position_embeddings=131072,
    )
    ours = rope_inv_freq(ModelConfig.from_hf_dict(hf.to_dict()))
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        D = 64
        ref = 1.0 / (500000.0 ** (torch.arange(0, D, 2).float() / D))
    else:
        ref, _ = ROPE_INIT_FUNCTIONS[rope_type](hf, "cpu")
    torch.testing.assert_close(ours, ref, atol=0, rtol=1e-6)


def test_rotation_preserves_norm_and_depends_on_distance():
    config = ModelConfig(
        vocab_size=8,
        hidden_size=32,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    inv = rope_inv_freq(config)
    q, k = torch.randn(16), torch.randn(16)

    def rot(x, pos):
        cos, sin = rope_cos_sin(torch.tensor([pos]), inv, torch.float32)
        return apply_rotary(x[None, None, None], cos, sin).flatten()

    torch.testing.assert_close(rot(q, 7).norm(), q.norm())
    # <rot(q, m), rot(k, n)> depends only on m - n
    torch.testing.assert_close(
        rot(q, 10) @ rot(k, 4), rot(q, 106) @ rot(k, 100), rtol=1e-4, atol=1e-4
    )


@pytest.fixture(scope="module")
def small_model():
    config = ModelConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    return CausalLM(config).eval()


@pytest.mark.parametrize(
    "ids, error, message",
    [
        (torch.zeros(5, dtype=torch.long), ValueError, "2-D"),
        (torch.zeros(1, 17, dtype=torch.long), ValueError, "exceed the model's context of 16"),
        (torch.tensor([[1, 50]]), ValueError, r"must lie in \[0, 50\)"),
        (torch.tensor([[-1, 2]]), ValueError, "must lie in"),
        (torch.zeros(1, 3), TypeError, "int64 or int32"),
        (torch.zeros(1, 0, dtype=torch.long), ValueError, "empty"),
        ([[1, 2]], TypeError, "torch.Tensor"),
    ],
)
def test_forward_rejects_bad_input(small_model, ids, error, message):
    with pytest.raises(error, match=message):
        small_model(ids)


def test_batch_rows_are_independent(small_model):
    ids = torch.randint(0, 50, (3, 10))
    with torch.no_grad():
        batched = small_model(ids)
        for i in range(3):
            torch.testing.assert_close(batched[i], small_model(ids[i : i + 1])[0])


def test_causality(small_model):
    """Changing a future token never changes the logits of earlier positions."""
    ids = torch.randint(0, 50, (1, 12))
    other = ids.clone()
    other[0, 8] = (other[0, 8] + 1) % 50
    with torch.no_grad():
        a, b = small_model(ids), small_model(other)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])
