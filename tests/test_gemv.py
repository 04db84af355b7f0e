"""The batch-1 GEMV kernels (`minillm.kernels.gemv`) against an fp64 F.linear on irregular
shapes (CPU interpreter in fp32/fp16; bf16 at real sizes on the GPU), the SiLU prologue
against silu_and_mul + F.linear, bad input, the config rule, and the fused modules with the
GEMV at batch 1 against their PyTorch path."""

import minillm.kernels.gemv as gemv_module
import pytest
import torch
import torch.nn.functional as F
from minillm.kernels.fused_layers import silu_and_mul
from minillm.kernels.gemv import GemvConfig, gemv, gemv_beats_torch, gemv_config, silu_mul_gemv

from minillm.config import ModelConfig
from minillm.engine.fusion import FusedAttention, FusedMLP
from minillm.layers.attention import Attention
from minillm.layers.mlp import SwiGLUMLP
from minillm.layers.rotary import rope_cos_sin, rope_inv_freq

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def randn(g, *shape, dtype, device="cpu"):
    return torch.randn(*shape, generator=g).to(device, dtype)


def assert_within_bound(y, x, w, b=None):
    """y against the exact x @ w^T + b (fp64), within the error the kernel can make: fp32
    accumulation of K products and the bias, any order (<= (K + 2) u32 sum |w x| + |b|),
    then one rounding to the output dtype (u |y|)."""
    K = w.shape[1]
    x64, w64 = x.double().reshape(1, K), w.double()
    b64 = None if b is None else b.double()
    exact = F.linear(x64, w64, b64).reshape(-1)
    mass = (w64 * x64).abs().sum(-1) + (0 if b64 is None else b64.abs())
    acc = (K + 2) * UNIT_ROUNDOFF[torch.float32] * mass
    bound = acc + UNIT_ROUNDOFF[y.dtype] * (exact.abs() + acc)
    err = (y.double().reshape(-1) - exact).abs()
    assert (err <= bound).all(), f"max error {err.max():.3g} over the bound {bound.min():.3g}"


CASES = [  # (N, K, config): N and K not multiples of the blocks; a few programs each
    (37, 1000, GemvConfig(block_n=16, block_k=256)),  # 3 row blocks x 4 K steps, both ragged
    (130, 515, GemvConfig(block_n=64, block_k=512)),  # K = one full step + 3
    (37, 1000, GemvConfig(block_n=4, block_k=512)),  # the GPU rule's blocks
    (300, 77, None),  # the default rule (the interpreter's)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N, K, config", CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_linear_on_irregular_shapes(dtype, N, K, config, bias):
    g = torch.Generator().manual_seed(N + K)
    x, w = randn(g, 1, K, dtype=dtype), randn(g, N, K, dtype=dtype)
    b = randn(g, N, dtype=dtype) if bias else None
    y = gemv(x, w, b, config=config)
    assert y.shape == (1, N) and y.dtype == dtype
    assert_within_bound(y, x, w, b)
    for shape in [(K,), (1, 1, K)]:  # any leading dims that multiply to one row
        assert torch.equal(gemv(x.view(shape), w, b, config=config), y.view(*shape[:-1], N))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N, K, config", CASES[:2])
def test_silu_mul_gemv_matches_silu_and_mul_then_linear(dtype, N, K, config):
    g = torch.Generator().manual_seed(N)
    gate_up, w = randn(g, 1, 1, 2 * K, dtype=dtype), randn(g, N, K, dtype=dtype)
    y = silu_mul_gemv(gate_up, w, config=config)
    assert y.shape == (1, 1, N)
    assert_within_bound(y, silu_and_mul(gate_up), w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_silu_prologue_gives_silu_and_muls_bits(dtype):
    """Through an identity weight the GEMV returns its input x exactly (one 1.0 per row,
    exact sums, x already in the dtype): the prologue's x is silu_and_mul's output, bit
    for bit."""
    g = torch.Generator().manual_seed(1)
    gate_up = 3 * randn(g, 1, 2 * 300, dtype=dtype)
    eye = torch.eye(300, dtype=dtype)
    assert torch.equal(silu_mul_gemv(gate_up, eye), silu_and_mul(gate_up))


def test_gemv_rejects_bad_input(monkeypatch):
    x, w = torch.randn(1, 8), torch.randn(5, 8)
    with pytest.raises(ValueError, match="one row"):
        gemv(torch.randn(2, 8), w)
    with pytest.raises(ValueError, match="must end in 8"):
        gemv(torch.randn(1, 9), w)
    with pytest.raises(ValueError, match="must end in 16"):
        silu_mul_gemv(x, w)  # [gate | up] is 2K wide
    with pytest.raises(ValueError, match="2-D"):
        gemv(x, w.view(5, 8, 1))
    with pytest.raises(ValueError, match="one dtype"):
        gemv(x.half(), w)
    with pytest.raises(ValueError, match="one dtype"):
        gemv(x.long(), w.long())
    with pytest.raises(ValueError, match="bias must be"):
        gemv(x, w, torch.randn(4))
    with pytest.raises(ValueError, match="rows must be contiguous"):
        gemv(torch.randn(1, 5), w.t())
    with pytest.raises(ValueError, match="power of 2"):
        GemvConfig(block_n=3)
    monkeypatch.setattr(gemv_module, "interpreting", lambda: False)  # as on a CPU-only run
    with pytest.raises(ValueError, match="needs CUDA"):
        gemv(x, w)


def test_config_rule_reproduces_the_measured_configs(monkeypatch):
    monkeypatch.setattr(gemv_module, "interpreting", lambda: False)  # the GPU rule
    measured = {  # H100 (N, K) -> (BLOCK_N, BLOCK_K, warps): the table in gemv.py (its
        (3072, 2048): (4, 512, 4), (2048, 2048): (4, 512, 4),  # stages compile the same)
        (16384, 2048): (8, 512, 4), (2048, 8192): (4, 512, 4), (12288, 4096): (8, 512, 4),
    }  # fmt: skip
    for (N, K), (bn, bk, warps) in measured.items():
        cfg = gemv_config(N, K)
        assert (cfg.block_n, cfg.block_k, cfg.num_warps) == (bn, bk, warps), (N, K)
        assert gemv_beats_torch(N, K)
    assert not gemv_beats_torch(4096, 11008)  # down_proj 7B: cuBLAS was faster


def _small_config():
    return ModelConfig(vocab_size=128, hidden_size=192, intermediate_size=300,
                       num_hidden_layers=1, num_attention_heads=6, num_key_value_heads=2,
                       qkv_bias=True, o_bias=True, mlp_bias=True, qk_norm=True)  # fmt: skip


def _count_calls(monkeypatch):
    calls = {"gemv": 0, "silu_mul_gemv": 0}
    for name in calls:
        fn = getattr(gemv_module, name)

        def counted(*args, _fn=fn, _name=name, **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(gemv_module, name, counted)
    return calls


@pytest.mark.parametrize("bias", [False, True])
def test_fused_modules_at_batch_1_match_the_pytorch_path(monkeypatch, bias):
    """One row in fp16 through the GEMV (qkv_proj, o_proj, gate_up_proj, down_proj with the
    SiLU prologue) against use_triton=False; two rows, or fp32, keep the old path."""
    torch.manual_seed(0)
    dtype = torch.float16
    mlp = SwiGLUMLP(192, 300, bias=bias).to(dtype)
    attn = Attention(_small_config(), 0)
    if not bias:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(attn, name).bias = None
    attn = attn.to(dtype)
    calls = _count_calls(monkeypatch)
    x = torch.randn(1, 1, 192).to(dtype)
    cos, sin = rope_cos_sin(torch.tensor([5]), rope_inv_freq(_small_config()), dtype)
    tol = dict(atol=1e-2, rtol=1e-2)  # fp16 outputs that may round the other way, then mix
    with torch.no_grad():
        y, ref = FusedMLP(mlp, True)(x), FusedMLP(mlp, False)(x)
        torch.testing.assert_close(y, ref, **tol)
        assert calls == {"gemv": 1, "silu_mul_gemv": 1}
        y, ref = FusedAttention(attn, True)(x, cos, sin), FusedAttention(attn, False)(x, cos, sin)
        torch.testing.assert_close(y, ref, **tol)
        assert calls == {"gemv": 3, "silu_mul_gemv": 1}
        FusedMLP(mlp, True)(torch.randn(2, 192).to(dtype))  # two rows: cuBLAS + silu_and_mul
        FusedMLP(mlp.float(), True)(x.float())  # fp32: F.linear
        assert calls == {"gemv": 3, "silu_mul_gemv": 1}


@pytest.mark.gpu
@pytest.mark.parametrize("N, K", [(3072, 2048), (2048, 2048), (16384, 2048), (12288, 4096),
                                  (4099, 2051)])  # fmt: skip
def test_gemv_bf16_at_real_sizes_on_the_gpu(N, K):
    g = torch.Generator().manual_seed(0)
    x = randn(g, 1, K, dtype=torch.bfloat16, device="cuda")
    w = randn(g, N, K, dtype=torch.bfloat16, device="cuda")
    b = randn(g, N, dtype=torch.bfloat16, device="cuda")
    assert_within_bound(gemv(x, w), x, w)
    assert_within_bound(gemv(x, w, b), x, w, b)
    gate_up = randn(g, 1, 2 * K, dtype=torch.bfloat16, device="cuda")
    w_down = randn(g, N, K, dtype=torch.bfloat16, device="cuda")
    assert_within_bound(silu_mul_gemv(gate_up, w_down), silu_and_mul(gate_up), w_down)
    eye = torch.eye(K, dtype=torch.bfloat16, device="cuda")
    assert torch.equal(silu_mul_gemv(gate_up, eye), silu_and_mul(gate_up))  # the same bits
    graph, y = torch.cuda.CUDAGraph(), gemv(x, w, b)  # warm-up (compiles), then capture
    with torch.cuda.graph(graph):
        y_graph = gemv(x, w, b)
    x.copy_(randn(g, 1, K, dtype=torch.bfloat16, device="cuda"))
    graph.replay()
    assert torch.equal(y_graph, gemv(x, w, b)) and not torch.equal(y_graph, y)
