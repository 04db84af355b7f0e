"""The KV-cache memory calculator: published figures, and the bytes the caches really hold."""

import pytest
import torch

import minillm
from minillm.cache import DynamicKVCache, StaticKVCache
from minillm.memory import (
    GiB,
    format_table,
    kv_cache_bytes,
    kv_cache_bytes_per_token,
    kv_cache_table,
    max_batch_size,
    table_models,
)

KiB = 2**10


@pytest.mark.parametrize(
    "name, kib_per_token",
    [
        # fp16 figures quoted for these models: Llama-2-7B 0.5 MiB/token, Llama-2-70B
        # (GQA) 320 KiB/token, Llama-3-8B 128 KiB/token, Qwen3-0.6B 112 KiB/token.
        ("Llama-2-7B (MHA)", 512),
        ("Llama-2-70B (GQA)", 320),
        ("Llama-2-70B as MHA", 2560),
        ("Llama-3-8B (GQA)", 128),
        ("Qwen3-0.6B (GQA)", 112),
    ],
)
def test_bytes_per_token_of_real_models(name, kib_per_token):
    config = table_models()[name]
    assert kv_cache_bytes_per_token(config, torch.float16) == kib_per_token * KiB
    assert kv_cache_bytes_per_token(config, torch.float32) == 2 * kib_per_token * KiB


def test_the_textbook_70b_claim_and_what_gqa_changes():
    """A 70B model at 8K context needs 10-20 GB of KV cache per request without GQA:
    2 x 80 layers x 64 heads x 128 x 2 bytes x 8192 tokens = 20 GiB (21.5 GB); with
    Llama-2-70B's 8 kv heads it is 8x less."""
    models = table_models()
    mha = kv_cache_bytes(models["Llama-2-70B as MHA"], 8192, 1, torch.float16)
    gqa = kv_cache_bytes(models["Llama-2-70B (GQA)"], 8192, 1, torch.float16)
    assert 10 <= mha / GiB <= 20 and mha == 20 * GiB
    assert mha == 8 * gqa
    # The weights alone (138 GB in bf16) exceed one 80 GB card; on eight of them, GQA
    # serves more than 8x as many 8K-token requests (187 against 22: its smaller k/v
    # projections leave a little more memory too).
    config = models["Llama-2-70B (GQA)"]
    assert max_batch_size(config, 8192, 80 * 10**9) == 0
    n_mha = max_batch_size(models["Llama-2-70B as MHA"], 8192, 640 * 10**9)
    n_gqa = max_batch_size(config, 8192, 640 * 10**9)
    assert n_gqa >= 8 * n_mha > 0


def test_table_rows_and_markdown():
    rows = kv_cache_table(context_lengths=(1024, 4096), batch_sizes=(1, 4))
    assert len(rows) == 5 * 2 * 2
    r = next(r for r in rows if r["model"] == "Llama-3-8B (GQA)" and r["context"] == 4096)
    assert r["batch"] == 1 and r["kv_gib"] == 0.5  # 128 KiB x 4096
    text = format_table(rows)
    assert text.count("\n") == len(rows) + 1 and "| Llama-2-70B as MHA | 80 | 64/64 |" in text


@pytest.mark.parametrize("name", list(table_models()))
@pytest.mark.parametrize("batch, seq", [(1, 4096), (8, 2048), (3, 100)])
def test_calculator_equals_the_allocated_cache(name, batch, seq):
    """The static cache's tensors (on the meta device: shapes without memory) hold exactly
    the calculated bytes, for real shapes."""
    config = table_models()[name].replace(max_position_embeddings=4096)
    for dtype in (torch.bfloat16, torch.float32):
        cache = StaticKVCache(config, batch, seq, dtype, device="meta")
        assert cache.nbytes == kv_cache_bytes(config, seq, batch, dtype)


@pytest.mark.parametrize("name", list(minillm.BUNDLED_MODELS))
def test_calculator_equals_the_filled_cache_of_the_bundled_models(name):
    """Real allocations: a dynamic cache after a prompt and decode steps holds exactly the
    calculated bytes of the tokens so far; a static cache those of its max_seq_len."""
    model = minillm.load_model(name)
    static = StaticKVCache(model.config, 2, 100, model.dtype)
    dynamic = DynamicKVCache(model.config)
    ids = torch.randint(0, 4096, (2, 30))
    with torch.no_grad():
        for cache in (static, dynamic):
            model(ids, None, cache)
            for t in range(3):
                model(ids[:, t : t + 1], None, cache)
    storage = sum(t.untyped_storage().nbytes() for t in dynamic.k + dynamic.v)
    assert dynamic.nbytes == storage == kv_cache_bytes(model.config, 33, 2, torch.float32)
    assert static.nbytes == kv_cache_bytes(model.config, 100, 2, torch.float32)


def test_bad_arguments():
    config = table_models()["Llama-3-8B (GQA)"]
    with pytest.raises(ValueError, match="num_tokens must be an integer >= 0"):
        kv_cache_bytes(config, -1)
    with pytest.raises(TypeError, match=r"dtype must be a torch\.dtype"):
        kv_cache_bytes_per_token(config, "bf16")


@pytest.mark.gpu
def test_calculator_equals_cuda_allocation():
    """The device allocator's count grows by exactly the calculated bytes: each layer's
    tensor (4 x 8 x 8192 x 64 x 2 bytes = 32 MiB) is a multiple of the allocator's 2 MiB
    rounding of large blocks, so nothing is rounded up."""
    config = minillm.ModelConfig.from_name("llama-3.2-1b")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # a cached free block could serve the request with slack
    before = torch.cuda.memory_allocated()
    cache = StaticKVCache(config, 4, 8192, torch.bfloat16, "cuda")
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - before == kv_cache_bytes(config, 8192, 4) == cache.nbytes
