"""Tiled online-softmax attention (plain PyTorch) against fp64 naive attention."""

import pytest
import torch

from minillm import CausalLM, ModelConfig
from minillm.layers.attention import ATTENTION_BACKENDS, causal_mask
from minillm.layers.flash import (
    FULL,
    MASKED,
    SKIP,
    attention_cost,
    flash_attention,
    online_softmax_merge,
    online_softmax_steps,
    reference_attention,
    tile_plan,
)


def qkv(B, H, Hkv, T, S, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, H, T, D, generator=g).to(dtype),
        torch.randn(B, Hkv, S, D, generator=g).to(dtype),
        torch.randn(B, Hkv, S, D, generator=g).to(dtype),
    )


# Irregular shapes: lengths not multiples of the tiles, T < S (decode against a prefix),
# GQA and MHA, sliding windows narrower and wider than a tile, non-causal.
CASES = [
    # B, H, Hkv, T, S, window, causal
    (2, 4, 2, 37, 37, None, True),
    (1, 4, 1, 5, 70, None, True),
    (1, 2, 2, 70, 70, 9, True),
    (2, 2, 1, 1, 33, 4, True),
    (1, 2, 1, 61, 90, 40, True),
    (1, 2, 2, 20, 45, None, False),
]


@pytest.mark.parametrize("B, H, Hkv, T, S, window, causal", CASES)
@pytest.mark.parametrize("tiles", [(16, 8), (32, 32)])
def test_tiled_attention_equals_fp64_naive(B, H, Hkv, T, S, window, causal, tiles):
    q, k, v = qkv(B, H, Hkv, T, S, 16)
    out, lse = flash_attention(
        q, k, v, window, causal=causal, block_m=tiles[0], block_n=tiles[1], return_lse=True
    )
    ref = reference_attention(q, k, v, window, causal)
    # fp32 scores and statistics: ~1e-7 relative rounding per op over a few hundred terms.
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=0)
    scores = (q.double() @ k.double().repeat_interleave(H // Hkv, 1).transpose(-2, -1)) * 0.25
    if causal:
        scores = scores.masked_fill(~causal_mask(T, S, window), float("-inf"))
    torch.testing.assert_close(lse.double(), scores.logsumexp(-1), atol=2e-6, rtol=0)


def test_tiled_attention_gradients_equal_fp64_autograd():
    q, k, v = (t.double().requires_grad_() for t in qkv(1, 4, 2, 29, 41, 8))
    out = flash_attention(q, k, v, window=13, block_m=8, block_n=16)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref = reference_attention(q, k, v, window=13)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=0)  # both fp64


def test_online_softmax_merge_equals_softmax_over_the_union():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(3, 10, generator=g, dtype=torch.float64)  # scores of 10 keys
    v = torch.randn(10, 4, generator=g, dtype=torch.float64)

    def part(sl):
        return torch.softmax(s[:, sl], -1) @ v[sl], s[:, sl].logsumexp(-1)

    o, lse = online_softmax_merge(*part(slice(0, 3)), *part(slice(3, 10)))
    torch.testing.assert_close(o, torch.softmax(s, -1) @ v)
    torch.testing.assert_close(lse, s.logsumexp(-1))
    # An empty part (lse = -inf) weighs nothing; two empty parts give zeros, not NaN.
    empty = (torch.zeros(3, 4, dtype=torch.float64), torch.full((3,), float("-inf")).double())
    o2, _ = online_softmax_merge(o, lse, *empty)
    torch.testing.assert_close(o2, o)
    o3, lse3 = online_softmax_merge(*empty, *empty)
    assert torch.equal(o3, torch.zeros_like(o3)) and torch.isneginf(lse3).all()


@pytest.mark.parametrize(
    "T, S, window, causal",
    [(50, 50, None, True), (20, 77, 30, True), (33, 33, 5, True), (9, 40, None, False)],
)
def test_tile_plan_skips_only_hidden_tiles_and_masks_only_cut_ones(T, S, window, causal):
    bm, bn = 8, 16
    plan = tile_plan(T, S, bm, bn, causal, window)
    allowed = causal_mask(T, S, window) if causal else torch.ones(T, S, dtype=torch.bool)
    for i in range(plan.shape[0]):
        for j in range(plan.shape[1]):
            tile = allowed[i * bm : (i + 1) * bm, j * bn : (j + 1) * bn]
            full_tile = tile.shape[1] == bn  # all its keys exist (rows past T do not matter)
            if plan[i, j] == SKIP:
                assert not tile.any(), f"tile ({i}, {j}) has visible keys but is skipped"
            elif plan[i, j] == FULL:
                assert tile.all() and full_tile, f"tile ({i}, {j}) needs a mask"
            else:
                assert plan[i, j] == MASKED and tile.any()
    if causal and window is None and T == S:  # the classic triangle: ~half the tiles skipped
        assert (plan == SKIP).sum() >= plan.numel() // 2 - plan.shape[0]


def test_tiled_backend_is_registered_and_matches_sdpa():
    config = ModelConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=7,
    )  # fmt: skip
    torch.manual_seed(0)
    model = CausalLM(config).eval()
    ids = torch.randint(0, 64, (2, 23))
    with torch.no_grad():
        ref = model(ids)
        model.attn_backend = "tiled"
        out = model(ids)
    assert "tiled" in ATTENTION_BACKENDS and "triton" in ATTENTION_BACKENDS
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(causal=False, window=3), "needs causal=True"),
        (dict(block_m=0), "block sizes"),
    ],
)
def test_tiled_attention_bad_input(kwargs, message):
    q, k, v = qkv(1, 2, 1, 4, 4, 8)
    window = kwargs.pop("window", None)
    with pytest.raises(ValueError, match=message):
        flash_attention(q, k, v, window, **kwargs)
    with pytest.raises(ValueError, match="cannot be grouped"):
        flash_attention(*qkv(1, 3, 2, 4, 4, 8))


def test_online_softmax_steps_end_at_the_softmax():
    g = torch.Generator().manual_seed(2)
    s, v = torch.randn(23, generator=g, dtype=torch.float64) * 3, torch.randn(23, 5, generator=g)
    steps = online_softmax_steps(s, v.double(), block_n=5)
    assert len(steps) == 5
    torch.testing.assert_close(steps[-1]["o"], torch.softmax(s, 0) @ v.double())
    torch.testing.assert_close(steps[-1]["weights"], torch.softmax(s, 0))
    assert torch.equal(steps[-1]["m"], s.max())
    torch.testing.assert_close(steps[1]["weights"], torch.softmax(s[:10], 0))


def test_attention_cost_counts_flops_and_bytes():
    flops, nbytes = attention_cost(2, 8, 100, 100, 64, Hkv=2, causal=False)
    assert flops == 4 * 2 * 8 * 100 * 100 * 64
    assert nbytes == 2 * 2 * 64 * (2 * 8 * 100 + 2 * 2 * 100)
    flops_c, _ = attention_cost(2, 8, 100, 100, 64, causal=True)
    _, unfused = attention_cost(2, 8, 100, 100, 64, fused=False)
    assert flops_c == flops / 2 and unfused > nbytes + 4 * 4 * 2 * 8 * 100 * 100 - 1
