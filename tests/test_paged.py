"""Paged KV: the PyTorch reference against fp64 dense attention, the Triton kernels
(reshape_and_cache, paged decode with and without splits) against the reference, the pool,
and the errors for bad block tables. (Prefix-cache hits against cold runs, bit for bit:
test_block_manager.py.)"""

import pytest
import torch
from minillm.kernels.paged_attention import paged_attention
from minillm.kernels.reshape_and_cache import reshape_and_cache

from minillm import ModelConfig
from minillm.cache.paged import (
    PagedKVCache,
    block_tables_tensor,
    gather_kv,
    paged_attention_ref,
    reshape_and_cache_ref,
)
from minillm.layers.flash import reference_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def paged_case(lens, H, Hkv, D, page, dtype, device=DEVICE, seed=0):
    """Random K/V for sequences of `lens` tokens, scattered over shuffled pages of a pool.
    Returns q (B, H, D), the pool, block tables, lengths, and the dense K/V per sequence."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // page) for n in lens]
    num_blocks = sum(blocks_per_seq) + 3  # a few blocks nobody uses
    perm = torch.randperm(num_blocks, generator=g).tolist()
    k_cache = torch.randn(num_blocks, page, Hkv, D, generator=g)  # garbage where unused
    v_cache = torch.randn(num_blocks, page, Hkv, D, generator=g)
    tables, dense = [], []
    for n, nb in zip(lens, blocks_per_seq, strict=True):
        table, perm = perm[:nb], perm[nb:]
        k, v = torch.randn(2, n, Hkv, D, generator=g)
        slots = torch.tensor([table[t // page] * page + t % page for t in range(n)])
        reshape_and_cache_ref(k, v, k_cache, v_cache, slots)
        tables.append(table)
        dense.append((k.transpose(0, 1)[None], v.transpose(0, 1)[None]))  # (1, Hkv, n, D)
    q = torch.randn(len(lens), H, D, generator=g)
    return (
        q.to(device, dtype),
        k_cache.to(device, dtype),
        v_cache.to(device, dtype),
        block_tables_tensor(tables, device),
        torch.tensor(lens, dtype=torch.int32, device=device),
        dense,
    )


def dense_reference(q, dense, window=None):
    """Each sequence's newest token through fp64 dense attention (no pages involved)."""
    outs = [
        reference_attention(q[b][None, :, None].cpu(), k.to(q.dtype), v.to(q.dtype), window)[
            0, :, 0
        ]
        for b, (k, v) in enumerate(dense)
    ]
    return torch.stack(outs)  # (B, H, D) fp64


@pytest.mark.parametrize("window", [None, 6])
def test_paged_reference_equals_dense_fp64(window):
    q, kc, vc, bt, cl, dense = paged_case([1, 17, 40], 4, 2, 8, 5, torch.float64, "cpu")
    out = paged_attention_ref(q, kc, vc, bt, cl, window=window)
    torch.testing.assert_close(out, dense_reference(q, dense, window), atol=1e-12, rtol=0)
    k = gather_kv(kc, bt, cl)
    assert k.shape == (3, 2, 40, 8) and torch.equal(k[1, :, :17], dense[1][0][0])
    assert not k[0, :, 1:].any()  # padding past a context is zero


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reshape_and_cache_kernel_equals_reference(dtype):
    g = torch.Generator().manual_seed(0)
    key, value = torch.randn(2, 11, 3, 16, generator=g).to(dtype)
    slots = torch.tensor([5, 0, -1, 39, 7, 8, 9, -1, 20, 21, 1], dtype=torch.int32)
    ref_k, ref_v = torch.zeros(2, 5, 8, 3, 16, dtype=dtype)
    reshape_and_cache_ref(key, value, ref_k, ref_v, slots)
    k_cache, v_cache = torch.zeros(2, 5, 8, 3, 16, dtype=dtype, device=DEVICE)
    key, value, slots = key.to(DEVICE), value.to(DEVICE), slots.to(DEVICE)
    reshape_and_cache(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache.cpu(), ref_k) and torch.equal(v_cache.cpu(), ref_v)
    assert ref_k.view(-1, 3, 16)[39].equal(key[3].cpu()) and not ref_k.view(-1, 3, 16)[2].any()
    with pytest.raises(ValueError, match="outside the pool"):
        reshape_and_cache(key, value, k_cache, v_cache, slots + 40)


# Interpreter tolerances: fp32 dots are exact fp32 there (~1e-6); fp16/bf16 round p before
# p @ V as every flash kernel does (a few units of 5e-4 / 4e-3).
ATOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize(
    "lens, H, Hkv, page, window, num_splits, dtype",
    [
        ([1, 37, 300], 8, 2, 16, None, 1, torch.float32),  # GQA, one pass
        ([1, 37, 300], 8, 2, 16, None, None, torch.float32),  # split-K, automatic
        ([600, 5, 530], 4, 4, 5, None, 3, torch.float16),  # MHA, odd page size, 3 splits
        ([600, 70], 4, 1, 16, 100, None, torch.bfloat16),  # sliding window, MQA
    ],
)
def test_paged_attention_kernel_equals_fp64(lens, H, Hkv, page, window, num_splits, dtype):
    q, kc, vc, bt, cl, dense = paged_case(lens, H, Hkv, 32, page, dtype)
    out = paged_attention(q, kc, vc, bt, cl, window=window, num_splits=num_splits)
    assert out.shape == q.shape and out.dtype == dtype
    ref = dense_reference(q, dense, window)
    torch.testing.assert_close(out.double().cpu(), ref, atol=ATOL[dtype], rtol=0)
    if dtype == torch.float32:  # the PyTorch reference itself, in fp32
        out_ref = paged_attention_ref(q, kc, vc, bt, cl, window)
        torch.testing.assert_close(out_ref.double().cpu(), ref, atol=1e-5, rtol=0)


def test_paged_pool_copy_blocks_and_size():
    config = ModelConfig(vocab_size=8, hidden_size=32, intermediate_size=8, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    pool = PagedKVCache.for_model(config, num_blocks=6, block_size=4)
    assert pool.k_cache.shape == (3, 6, 4, 2, 8)
    nbytes = pool.k_cache.nbytes + pool.v_cache.nbytes
    assert PagedKVCache.bytes_per_block(config, 4, torch.float32) * 6 == nbytes
    pool.k_cache[:, 2] = 1.0
    pool.copy_blocks([(2, 5)])
    assert pool.k_cache[:, 5].eq(1).all() and not pool.k_cache[:, 4].any()


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(bt=lambda bt: bt + 100), ValueError, "outside the pool of"),
        (dict(bt=lambda bt: bt.float()), TypeError, "int32 or int64"),
        (dict(cl=lambda cl: cl + 64), ValueError, "context lengths must lie in"),
        (dict(q=lambda q: q[:, :3]), ValueError, "cannot be grouped"),
        (
            dict(q=lambda q: q[..., :8], kc=lambda c: c[..., :8].contiguous()),
            ValueError,
            "head_dim",
        ),
        (dict(q=lambda q: q.half()), TypeError, "must share"),
    ],
)
def test_paged_attention_bad_input(change, error, message):
    q, kc, vc, bt, cl, _ = paged_case([3, 20], 4, 2, 32, 8, torch.float32)
    args = dict(q=q, kc=kc, vc=vc, bt=bt, cl=cl)
    args.update({name: fn(args[name]) for name, fn in change.items()})
    if "kc" in change:
        args["vc"] = args["kc"].clone()
    with pytest.raises(error, match=message):
        paged_attention(args["q"], args["kc"], args["vc"], args["bt"], args["cl"])


# ---- GPU: real sizes in bf16 ------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [1, 7])
def test_paged_attention_gpu_bf16(num_splits):
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(1, 5000, (33,), generator=g).tolist()
    q, kc, vc, bt, cl, _ = paged_case(lens, 32, 8, 128, 16, torch.bfloat16, "cuda")
    out = paged_attention(q, kc, vc, bt, cl, num_splits=num_splits)
    ref = paged_attention_ref(q.double(), kc.double(), vc.double(), bt, cl)
    # bf16 rounding of p before p @ V and of the output: a few bf16 units (4e-3 each).
    assert (out.double() - ref).abs().max().item() < 2e-2
    key = torch.randn(70, 8, 128, device="cuda", dtype=torch.bfloat16)
    slots = torch.randperm(kc.shape[0] * 16, device="cuda")[:70].int()
    ref_k, ref_v = kc.clone(), vc.clone()
    reshape_and_cache_ref(key, key, ref_k, ref_v, slots)
    reshape_and_cache(key, key, kc, vc, slots)
    assert torch.equal(kc, ref_k) and torch.equal(vc, ref_v)
