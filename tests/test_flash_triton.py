"""The Triton FlashAttention kernels (forward, backward, packed batches) against fp64 naive
attention: on CPU under Triton's interpreter at small sizes, on a GPU (`gpu`) at real ones."""

import os
import subprocess
import sys

import pytest
import torch
from minillm.kernels.flash_attn_interface import flash_attn_func, flash_attn_varlen_func

from minillm import CausalLM, ModelConfig
from minillm.layers.attention import naive_attention
from minillm.layers.flash import reference_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def qkv(B, H, Hkv, T, S, D, dtype, device=DEVICE, seed=0, grad=False):
    g = torch.Generator(device=device).manual_seed(seed)
    shapes = [(B, H, T, D), (B, Hkv, S, D), (B, Hkv, S, D)]
    return [
        torch.randn(s, generator=g, device=device).to(dtype).requires_grad_(grad) for s in shapes
    ]


def fp64_grads(q, k, v, do, window=None, causal=True):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out = reference_attention(*leaves, window=window, causal=causal)
    return out, torch.autograd.grad(out, leaves, do.double())


# Interpreter tolerances. fp32: the interpreter computes dots in full fp32 (~1e-6 here).
# fp16/bf16: the kernel rounds p to the input dtype before p @ V, like every FlashAttention
# kernel, so the error is a few units of the dtype's rounding (fp16 5e-4, bf16 4e-3).
ATOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize(
    "B, H, Hkv, T, S, D, window, causal, dtype",
    [
        (2, 4, 2, 37, 37, 32, None, True, torch.float32),  # GQA, one partial tile
        (1, 2, 1, 5, 100, 16, None, True, torch.float32),  # T < S: queries at the end
        (1, 2, 2, 100, 100, 32, 17, True, torch.float16),  # window cuts through tiles
        (1, 2, 1, 50, 77, 64, None, False, torch.bfloat16),  # non-causal, bf16
        (1, 1, 1, 130, 130, 128, 70, True, torch.float32),  # head_dim 128, 3 tiles
    ],
)
def test_flash_forward_equals_fp64_naive(B, H, Hkv, T, S, D, window, causal, dtype):
    q, k, v = qkv(B, H, Hkv, T, S, D, dtype)
    out = flash_attn_func(q, k, v, causal, window)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(
        out.double(), reference_attention(q, k, v, window, causal), atol=ATOL[dtype], rtol=0
    )


@pytest.mark.parametrize(
    "B, H, Hkv, T, S, D, window, causal, dtype, tiles",
    [
        (2, 4, 2, 37, 37, 32, None, True, torch.float32, (32, 16)),  # halves of 16 rows
        (1, 2, 1, 5, 100, 16, None, True, torch.float32, (32, 32)),  # T < S: one half empty
        (1, 2, 2, 100, 100, 32, 17, True, torch.float16, (64, 16)),  # window through tiles
        (1, 2, 1, 50, 77, 64, None, False, torch.float32, (32, 32)),  # non-causal
        (1, 1, 1, 150, 170, 16, 9, True, torch.float32, (64, 16)),  # window < a half, T < S
        (1, 1, 1, 97, 97, 16, 40, True, torch.float32, (64, 16)),  # halves' edges differ
    ],
)
def test_flash_forward_split_query_tile_equals_fp64_naive(
    B, H, Hkv, T, S, D, window, causal, dtype, tiles
):
    """SPLIT_M (the query tile as two halves sharing each K/V tile) computes the same
    attention: each half keeps its own online-softmax state and masks."""
    from minillm.kernels.flash_attn import flash_attn_forward

    q, k, v = qkv(B, H, Hkv, T, S, D, dtype)
    out, lse = flash_attn_forward(q, k, v, causal, window, D**-0.5, block_m=tiles[0],
                                  block_n=tiles[1], split_m=True)  # fmt: skip
    whole, lse_whole = flash_attn_forward(q, k, v, causal, window, D**-0.5,
                                          block_m=tiles[0], block_n=tiles[1])  # fmt: skip
    torch.testing.assert_close(
        out.double(), reference_attention(q, k, v, window, causal), atol=ATOL[dtype], rtol=0
    )
    torch.testing.assert_close(lse, lse_whole, atol=1e-5, rtol=0)
    torch.testing.assert_close(out, whole, atol=ATOL[dtype], rtol=0)


@pytest.mark.parametrize(
    "B, H, Hkv, T, S, window, causal, tiles",
    [
        (1, 2, 1, 37, 37, None, True, (64, 64)),
        (2, 4, 2, 5, 70, None, True, (32, 32)),  # T < S, GQA: dk/dv sum over the group
        (1, 4, 1, 70, 90, 20, True, (32, 16)),  # window: keys no query sees get 0
        (1, 2, 2, 40, 57, None, False, (64, 32)),
    ],
)
def test_flash_backward_equals_fp64_autograd(B, H, Hkv, T, S, window, causal, tiles):
    q, k, v = qkv(B, H, Hkv, T, S, 16, torch.float32, grad=True)
    out = flash_attn_func(q, k, v, causal, window, block_m=tiles[0], block_n=tiles[1])
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref, ref_grads = fp64_grads(q, k, v, do, window, causal)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
    for name, g, r in zip("qkv", grads, ref_grads, strict=True):
        torch.testing.assert_close(g.double(), r, atol=2e-5, rtol=0, msg=f"d{name} differs")


def varlen_case(lens_q, lens_k, H, Hkv, D, dtype, device=DEVICE):
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(sum(lens_q), H, D, generator=g, device=device).to(dtype)
    k = torch.randn(sum(lens_k), Hkv, D, generator=g, device=device).to(dtype)
    v = torch.randn(sum(lens_k), Hkv, D, generator=g, device=device).to(dtype)

    def cu(lens):
        return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)

    return q, k, v, cu(lens_q).to(device), cu(lens_k).to(device)


def varlen_reference(q, k, v, cu_q, cu_k, do, window=None):
    """Each sequence alone through fp64 naive attention, then packed again."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    outs = []
    for b in range(len(cu_q) - 1):
        sq, sk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        per_seq = [t[s].transpose(0, 1)[None] for t, s in zip(leaves, (sq, sk, sk), strict=True)]
        outs.append(reference_attention(*per_seq, window=window)[0].transpose(0, 1))
    out = torch.cat(outs)  # (Nq, H, D)
    return out, torch.autograd.grad(out, leaves, do.double())


@pytest.mark.parametrize("window", [None, 7])
def test_flash_varlen_forward_and_backward(window):
    q, k, v, cu_q, cu_k = varlen_case([5, 70, 1, 33], [9, 70, 40, 33], 4, 2, 16, torch.float32)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, window=window)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref, ref_grads = varlen_reference(q, k, v, cu_q.tolist(), cu_k.tolist(), do, window)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g.double(), r, atol=2e-5, rtol=0)


def test_flash_keeps_the_memory_layout_of_transposed_inputs():
    """The model hands over (B, T, H, D) memory viewed as (B, H, T, D); the output keeps
    that layout, so the model's transpose-and-reshape back costs no copy."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(2, 19, 4, 16, generator=g, device=DEVICE)  # (B, T, H, D)
    q = x.transpose(1, 2)  # (B, H, T, D), not contiguous
    out = flash_attn_func(q, q[:, :2], q[:, :2])
    assert out.stride() == q.stride()
    ref = reference_attention(q, q[:, :2], q[:, :2])
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)  # fp32 kept fp32 (ieee)


def test_triton_backend_matches_sdpa_in_the_model():
    config = ModelConfig(
        vocab_size=64, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=9,
    )  # fmt: skip
    torch.manual_seed(0)
    model = CausalLM(config).to(DEVICE).eval()
    ids = torch.randint(0, 64, (2, 21), device=DEVICE)
    with torch.no_grad():
        ref = model(ids)
        model.attn_backend = "triton"
        torch.testing.assert_close(model(ids), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda q, k, v: (q[:, :3], k, v), ValueError, "cannot be grouped"),
        (lambda q, k, v: (q[..., :8], k[..., :8], v[..., :8]), ValueError, "head_dim 8"),
        (lambda q, k, v: (q.double(), k.double(), v.double()), TypeError, "fp16, bf16 or fp32"),
        (lambda q, k, v: (q, k.half(), v), TypeError, "dtypes differ"),
        (lambda q, k, v: (q, k[:, :, :3], v[:, :, :3]), ValueError, "more queries"),
        (lambda q, k, v: (q, k, v[:, :, :5]), ValueError, "shapes differ"),
    ],
)
def test_flash_bad_input(change, error, message):
    q, k, v = qkv(1, 4, 2, 6, 6, 16, torch.float32)
    with pytest.raises(error, match=message):
        flash_attn_func(*change(q, k, v))


def test_flash_bad_window_and_packing():
    q, k, v = qkv(1, 2, 2, 6, 6, 16, torch.float32)
    with pytest.raises(ValueError, match="needs causal=True"):
        flash_attn_func(q, k, v, causal=False, window=3)
    with pytest.raises(ValueError, match="window must be"):
        flash_attn_func(q, k, v, window=0)
    q, k, v, cu_q, cu_k = varlen_case([3, 4], [3, 4], 2, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="must rise from 0"):
        flash_attn_varlen_func(q, k, v, cu_q.flip(0), cu_k)
    with pytest.raises(TypeError, match="int32"):
        flash_attn_varlen_func(q, k, v, cu_q.long(), cu_k)
    with pytest.raises(ValueError, match="more queries than keys"):
        flash_attn_varlen_func(q, k[:6], v[:6], cu_q, torch.tensor([0, 2, 6], dtype=torch.int32))


@pytest.mark.slow
def test_kernels_compile_for_hopper_without_spills():
    """The interpreter never compiles; this compiles each kernel for sm_90 (H100/H200) with
    Triton's bundled NVIDIA toolchain, GPU or not, and rejects register spills."""
    pytest.importorskip("triton.backends.nvidia")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run(
        [sys.executable, "-m", "minillm.kernels.compile_check", "--quick"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("ok")]
    assert len(lines) == 11, out.stdout
    spills = [line for line in lines if "bytes spilled" in line and " 0 bytes spilled" not in line]
    assert not spills, spills


# ---- GPU: real sizes in bf16 ------------------------------------------------------------
def err(x, ref):
    return (x.double() - ref).abs().max().item()


def naive_low_precision(q, k, v, window, causal):
    """Naive attention at the inputs' precision: fp32 scores, probabilities rounded to bf16."""
    if causal:
        return naive_attention(q, k, v, window)
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    probs = ((q.float() @ k.float().transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1)
    return probs.to(q.dtype) @ v


@pytest.mark.gpu
@pytest.mark.parametrize(
    "D, T, S, window, causal",
    [(128, 1000, 1000, None, True), (128, 333, 2111, 256, True), (64, 1000, 1100, None, False)],
)
def test_flash_gpu_bf16_forward_and_backward(D, T, S, window, causal):
    """FlashAttention's test rule: the kernel's error against fp64 is a small multiple of the
    error of naive low-precision attention. FlashAttention allows 2x over a baseline that
    computes the scores in bf16; ours computes them in fp32 (more accurate), so allow 3x.
    A wrong mask or a wrong gradient gives errors of order 1, far above either."""
    q, k, v = qkv(2, 16, 4, T, S, D, torch.bfloat16, "cuda", grad=True)
    out = flash_attn_func(q, k, v, causal, window)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref, ref_grads = fp64_grads(q, k, v, do, window, causal)
    naive = naive_low_precision(q, k, v, window, causal)
    naive_grads = torch.autograd.grad(naive, (q, k, v), do)
    assert err(out, ref) <= 3 * err(naive, ref) + 1e-3
    for name, g, n, r in zip("qkv", grads, naive_grads, ref_grads, strict=True):
        assert err(g, r) <= 3 * err(n, r) + 1e-3, f"d{name}: {err(g, r)} vs {err(n, r)}"


@pytest.mark.gpu
def test_flash_gpu_varlen_bf16():
    lens_q, lens_k = [1, 700, 129, 1000, 64], [1, 900, 129, 1000, 3000]
    q, k, v, cu_q, cu_k = varlen_case(lens_q, lens_k, 16, 4, 128, torch.bfloat16, "cuda")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = flash_attn_varlen_func(q, k, v, cu_q, cu_k)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref, ref_grads = varlen_reference(q, k, v, cu_q.tolist(), cu_k.tolist(), do)
    # bf16 rounding of outputs and of p (see the dense test): a few bf16 units.
    assert err(out, ref) < 2e-2
    for g, r in zip(grads, ref_grads, strict=True):
        assert err(g, r) < 5e-2 * max(1.0, r.abs().max().item())
